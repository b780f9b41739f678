"""detector: SPP features against a manual resize -> conv -> project -> pool path, and the
shared detection tail (score threshold, per-class NMS, per-class and per-image caps, box
regression, the softmax scorer)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from sppdet import boxes as box_ops
from sppdet.backbones import build_backbone
from sppdet.detector import Detector
from sppdet.features import SPPFeatures, WindowFeatures
from sppdet.rcnn import RCNNFeatures
from sppdet.spp import project_boxes, spp_pool_reference

IMAGE = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)


def tiny_backbone():
    torch.manual_seed(0)
    return build_backbone("zf5", width=0.125, weights="none")


# ----------------------------------------------------------------------------- SPP features

def manual_pooled(net: SPPFeatures, image: np.ndarray, boxes: np.ndarray) -> tuple[torch.Tensor, list[int]]:
    """The paper's path written out: per window the scale whose resized area is closest to
    224^2, resize the image (short side = scale), conv5, project the scaled box, pool."""
    h, w = image.shape[:2]
    rows, picked = [], []
    for box in boxes:
        area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
        factors = [s / min(h, w) for s in net.scales]
        k = int(np.argmin([abs(area * f * f - 224 ** 2) for f in factors]))
        f = factors[k]
        resized = cv2.resize(image, (round(w * f), round(h * f)), interpolation=cv2.INTER_LINEAR)
        with torch.no_grad():
            conv5 = net.backbone(net.backbone.preprocess(resized)[None])[0]
        window = project_boxes(torch.tensor(box[None] * f), net.backbone.stride, net.backbone.center0,
                               conv5.shape[1], conv5.shape[2])
        rows.append(spp_pool_reference(conv5, window, net.levels)[0])
        picked.append(k)
    return torch.stack(rows), picked


@pytest.mark.parametrize("scales", [(100,), (100, 300)])
def test_pooled_features_match_manual_path(scales):
    net = SPPFeatures(tiny_backbone(), levels=(4, 2, 1), scales=scales).eval()
    boxes = np.array([[0, 0, 79, 59], [10, 10, 25, 30], [40, 5, 79, 40], [2, 3, 9, 8],
                      [30, 20, 60, 59]], dtype=np.float32)
    with torch.no_grad():
        got = net(IMAGE, torch.from_numpy(boxes))
    want, picked = manual_pooled(net, IMAGE, boxes)
    assert got.shape == (len(boxes), net.output_dim) == want.shape
    if len(scales) == 2:
        assert set(picked) == {0, 1}, "both scales should be exercised"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- detection tail

class OneHot(WindowFeatures):
    """Window r's pooled feature is the one-hot row e_r."""

    kind = "spp"

    def forward(self, image, boxes, timers=None, dtype=None):
        return torch.eye(len(boxes), self.output_dim, dtype=dtype)


class FixedScores(Detector):
    """features = one-hot rows, fc6 = fc7 = identity, so fc7 == pooled and the SVM scores are
    exactly svm.weight[:, r] + svm.bias for window r: hand-made scores."""

    def __init__(self, scores: np.ndarray):
        num_windows, num_classes = scores.shape
        super().__init__(OneHot(tiny_backbone(), levels=(1,)), num_classes, fc_dim=32, dropout=0.0)
        assert self.features.output_dim == 32 >= num_windows
        with torch.no_grad():
            for fc in (self.head.fc6, self.head.fc7):
                fc.weight.copy_(torch.eye(32))
                fc.bias.zero_()
            self.svm.weight.zero_()
            self.svm.weight[:, :num_windows] = torch.tensor(scores, dtype=torch.float32).T


def entry(label, score, box) -> tuple:
    """A detection as a hashable row, rounded so float32 round-off does not matter."""
    return int(label), round(float(score), 4), tuple(np.round(np.asarray(box, np.float64), 3).tolist())


def as_set(det) -> set:
    return {entry(lab, s, b) for b, s, lab in zip(det.boxes, det.scores, det.labels)}


BOXES = np.array([[0, 0, 19, 19],      # 0
                  [1, 1, 20, 20],      # 1: IoU 0.82 with 0
                  [40, 40, 59, 59],    # 2: disjoint
                  [0, 0, 20, 20],      # 3: IoU 0.91 with 0
                  [60, 10, 79, 30]],   # 4
                 dtype=np.float32)


def test_detect_threshold_per_class_nms_and_order():
    scores = np.array([[3.0, 0.5],
                       [2.0, 2.5],
                       [1.0, -2.0],
                       [-3.0, 1.5],
                       [-1.0, -1.6]])
    det = FixedScores(scores).detect(IMAGE, BOXES, score_thresh=-1.5, nms=0.3, max_per_image=100)
    # class 1: 0 (3.0) suppresses 1 and 3 (overlap), keeps 2 (1.0) and 4 (-1.0); 3 is -3 anyway.
    # class 2: 1 (2.5) suppresses 3 (1.5, IoU 0.91) and 0 (0.5); 2 and 4 are below -1.5.
    want = {entry(1, 3.0, BOXES[0]), entry(1, 1.0, BOXES[2]), entry(1, -1.0, BOXES[4]),
            entry(2, 2.5, BOXES[1])}
    assert as_set(det) == want
    assert np.all(np.diff(det.scores) <= 0), "sorted by decreasing score"
    assert det.boxes.dtype == np.float32 and det.scores.dtype == np.float32 and det.labels.dtype == np.int64
    # a looser NMS keeps the overlapping windows of class 1; a higher threshold drops low scores
    det = FixedScores(scores).detect(IMAGE, BOXES, score_thresh=0.0, nms=0.95, max_per_image=100)
    assert as_set(det) == {entry(1, 3.0, BOXES[0]), entry(1, 2.0, BOXES[1]), entry(1, 1.0, BOXES[2]),
                           entry(2, 2.5, BOXES[1]), entry(2, 1.5, BOXES[3]), entry(2, 0.5, BOXES[0])}


def test_detect_caps_per_class_then_per_image_keeping_the_best():
    # five disjoint windows, class 1 scores 1..5, class 2 scores 10..50
    boxes = np.array([[i * 15, 0, i * 15 + 9, 9] for i in range(5)], dtype=np.float32)
    scores = np.stack([np.arange(1, 6), 10 * np.arange(1, 6)], 1).astype(np.float64)
    det = FixedScores(scores).detect(IMAGE, boxes, score_thresh=0.0, nms=0.3, max_per_class=2)
    assert as_set(det) == {entry(1, 5.0, boxes[4]), entry(1, 4.0, boxes[3]),
                           entry(2, 50.0, boxes[4]), entry(2, 40.0, boxes[3])}
    assert det.scores.tolist() == [50.0, 40.0, 5.0, 4.0]
    # at most 3 per image, all classes together: the 3 best of the whole image
    det = FixedScores(scores).detect(IMAGE, boxes, score_thresh=0.0, nms=0.3, max_per_image=3)
    assert det.scores.tolist() == [50.0, 40.0, 30.0] and det.labels.tolist() == [2, 2, 2]
    det = FixedScores(scores).detect(IMAGE, boxes, score_thresh=0.0, nms=0.3, max_per_class=2, max_per_image=3)
    assert det.scores.tolist() == [50.0, 40.0, 5.0]


def test_softmax_scorer_reports_fc8_probabilities():
    net = FixedScores(np.zeros((3, 2)))
    with torch.no_grad():  # fc8 logits of window r: background 0, class 1 r, class 2 -r
        net.head.cls_score.weight.zero_()
        net.head.cls_score.bias.zero_()
        net.head.cls_score.weight[1, :3] = torch.tensor([0.0, 1.0, 2.0])
        net.head.cls_score.weight[2, :3] = torch.tensor([0.0, -1.0, -2.0])
    boxes = BOXES[[0, 2, 4]]
    det = net.detect(IMAGE, boxes, scorer="softmax", score_thresh=0.0, nms=0.3)
    logits = np.array([[0, r, -r] for r in range(3)], np.float64)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    want = {entry(k, probs[r, k], boxes[r]) for r in range(3) for k in (1, 2)}
    assert as_set(det) == want and det.scores.max() <= 1.0


def test_detect_applies_box_regression_then_clips():
    scores = np.array([[2.0, -9.0], [-9.0, 1.0], [0.5, -9.0]])
    boxes = BOXES[[0, 2, 4]]
    net = FixedScores(scores)
    deltas = torch.tensor([[0.1, -0.2, np.log(1.5), 0.0],      # class 1: shift, widen
                           [0.5, 0.5, 0.0, np.log(2.0)]])      # class 2: shift, taller
    net.regressor.intercept.copy_(deltas)                      # coef stays zero: deltas = intercept
    det = net.detect(IMAGE, boxes, score_thresh=0.0, nms=0.3)
    labels = np.array([1, 2, 1])
    expected = box_ops.clip(box_ops.decode(boxes, deltas.numpy()[labels - 1]), 60, 80)
    # hand check of one: window 4 (x 60..79, y 10..30, 20 x 21) with class-1 deltas -> centre x
    # 70 + 0.1 * 20 = 72, w 30 -> x 57..86 clipped to 79; centre y 20.5 - 0.2 * 21 = 16.3, h 21
    assert expected[2] == pytest.approx([57.0, 5.8, 79.0, 25.8], abs=1e-4)
    assert as_set(det) == {entry(1, 2.0, expected[0]), entry(2, 1.0, expected[1]),
                           entry(1, 0.5, expected[2])}
    assert det.boxes.min() >= 0 and det.boxes[:, 2].max() <= 79 and det.boxes[:, 3].max() <= 59
    # disabled: the proposals themselves
    assert as_set(net.detect(IMAGE, boxes, score_thresh=0.0, regress=False)) == {
        entry(1, 2.0, boxes[0]), entry(2, 1.0, boxes[1]), entry(1, 0.5, boxes[2])}


def test_regression_uses_coefficients_of_the_detected_class():
    net = FixedScores(np.array([[-9.0, 1.0]]))
    net.regressor.scale.fill_(2.0)
    # window 0's pooled feature is e_0 (x scale 2): class 2's coef row 0 gives the deltas
    net.regressor.coef[1, 0] = torch.tensor([0.05, 0.0, 0.0, 0.0])
    net.regressor.coef[0, 0] = torch.tensor([9.0, 9.0, 9.0, 9.0])   # class 1's: must not be used
    det = net.detect(IMAGE, BOXES[2:3], score_thresh=0.0)
    assert det.labels.tolist() == [2]
    np.testing.assert_allclose(det.boxes[0], [42, 40, 61, 59], atol=1e-4)  # moved 0.1 * 20 px


@pytest.mark.parametrize("kind", ["spp", "rcnn"])
def test_no_proposals_gives_no_detections(kind):
    if kind == "spp":
        net = Detector(SPPFeatures(tiny_backbone(), scales=(100, 200)), num_classes=3, fc_dim=16)
    else:
        net = Detector(RCNNFeatures(tiny_backbone(), input_size=64, context=4), num_classes=3, fc_dim=16)
    for proposals in (np.zeros((0, 4), np.float32), np.zeros(0, np.float32)):
        det = net.detect(IMAGE, proposals, score_thresh=-np.inf)
        assert len(det) == 0 and det.boxes.shape == (0, 4) and det.labels.dtype == np.int64
    # with proposals and -inf threshold every (window, class) is a candidate: NMS bounds it
    det = net.detect(IMAGE, BOXES, score_thresh=-np.inf, nms=0.3)
    assert 0 < len(det) <= 3 * len(BOXES) and set(det.labels.tolist()) <= {1, 2, 3}


def test_detect_timers_and_eval_mode():
    net = Detector(SPPFeatures(tiny_backbone(), scales=(100,)), num_classes=2, fc_dim=16)
    net.train()
    timers = {}
    a = net.detect(IMAGE, BOXES, timers=timers)
    b = net.detect(IMAGE, BOXES)
    assert not net.training, "detect runs in eval mode (no dropout)"
    assert {"conv", "pool", "fc", "nms"} <= set(timers)
    assert as_set(a) == as_set(b)


def test_bf16_conv_stays_close_to_fp32():
    torch.manual_seed(0)
    net = Detector(SPPFeatures(tiny_backbone(), scales=(100,)), num_classes=2, fc_dim=16).eval()
    with torch.no_grad():
        net.svm.weight.normal_()
    a = net.detect(IMAGE, BOXES, score_thresh=-np.inf, nms=1.0)
    b = net.detect(IMAGE, BOXES, score_thresh=-np.inf, nms=1.0, conv_precision="bf16")
    assert len(a) == len(b) == 2 * len(BOXES)
    sa = sorted(zip(a.labels.tolist(), a.boxes.tolist(), a.scores.tolist()))
    sb = sorted(zip(b.labels.tolist(), b.boxes.tolist(), b.scores.tolist()))
    spread = np.ptp(a.scores)
    assert max(abs(x[2] - y[2]) for x, y in zip(sa, sb)) < 0.05 * spread


@pytest.mark.parametrize("kind", ["spp", "rcnn"])
def test_bf16_head_pools_in_bf16_with_the_same_scores(kind):
    """precision="bf16" pools conv5 rounded to bf16 (half the bytes): since max pooling commutes
    with rounding, fc6 gets exactly what autocast makes of fp32 pooled features, so the scores
    are bit-identical to the fc layers run in bf16 on fp32 pooling."""
    torch.manual_seed(0)
    features = SPPFeatures(tiny_backbone(), scales=(100,)) if kind == "spp" else \
        RCNNFeatures(tiny_backbone(), input_size=64, context=4)
    net = Detector(features, num_classes=2, fc_dim=16).eval()
    with torch.no_grad():
        net.svm.weight.normal_()
        pooled = net.features(IMAGE, torch.as_tensor(BOXES))
        assert pooled.dtype == torch.float32
        assert torch.equal(net.features(IMAGE, torch.as_tensor(BOXES), dtype=torch.bfloat16),
                           pooled.bfloat16())
        want = net.svm(net.fc7(pooled, "bf16"))
    det = net.detect(IMAGE, BOXES, score_thresh=-np.inf, nms=1.0, regress=False, precision="bf16")
    got = {(int(k), tuple(b)): s for k, b, s in zip(det.labels, det.boxes.tolist(), det.scores)}
    assert len(got) == 2 * len(BOXES)
    for r, box in enumerate(BOXES.tolist()):
        for k in (1, 2):
            assert got[(k, tuple(box))] == want[r, k - 1].item()
