"""The official code's settings as switches (configs/voc07_zf5_official.yaml), each on a case
worked by hand: fc8's bias init, bias lr x2 and no decay on fc8's bias, conv5 de-duplication of
negatives, the random feature-scale sample, strict retraining, ground-truth rows and the
penalised bias in box regression, and the official box scaling (b - 1)(s - 1)/(m - 1) + 1."""
from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from sppdet import boxes as box_ops
from sppdet.backbones import build_backbone
from sppdet.bbox_reg import ridge_penalized_bias, train_box_regressor, train_box_regressors
from sppdet.config import BBoxRegConfig, FinetuneConfig, SVMConfig, load_config
from sppdet.detector import Detector
from sppdet.features import SPPFeatures
from sppdet.finetune import TrainWindows, finetune, param_groups
from sppdet.rcnn import RCNNFeatures
from sppdet.spp import project_boxes, resize_boxes
from sppdet.svm import SVMTrainer, conv5_keys, scale_sample_rows, train_svms
from sppdet.voc import ImageRecord


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_detector(seed: int = 0, **features) -> Detector:
    torch.manual_seed(seed)
    spp = SPPFeatures(build_backbone("zf5", width=0.125, weights="none"), **{"levels": (2, 1), **features})
    return Detector(spp, num_classes=2, fc_dim=8, dropout=0.0)


def record(image_id: str, boxes, labels) -> ImageRecord:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return ImageRecord(image_id, Path(f"{image_id}.jpg"), 80, 60, boxes, np.asarray(labels, np.int64),
                       np.zeros(len(boxes), bool), np.zeros(len(boxes), bool))


class ListLog(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, rec):
        self.messages.append(rec.getMessage())


def list_logger(name: str) -> tuple[logging.Logger, ListLog]:
    logger = logging.getLogger(f"test_official.{name}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = ListLog()
    logger.handlers = [handler]
    return logger, handler


# ----------------------------------------------------------------------------- the profile

def test_official_profile_loads_with_every_setting():
    cfg = load_config("voc07_zf5_official")
    paper = load_config("voc07_zf5")
    assert cfg.model.scales == paper.model.scales == (688,)
    assert (cfg.model.projection, cfg.model.scale_rule) == ("code", "code")
    f = cfg.finetune
    assert (f.lr, f.lr_steps, f.gamma, f.iterations) == (1e-3, (30000, 60000), 0.1, 90000)
    assert (f.flip, f.random_scale, f.fc8_bias, f.bias_lr_mult, f.fc8_bias_decay) == (True, True, 1.0, 2.0, False)
    s = cfg.svm
    assert (s.neg_overlap_prune, s.dedup_conv5, s.scale_sample, s.retrain_strict) == (None, True, "random", True)
    assert (cfg.bbox_reg.include_gt, cfg.bbox_reg.penalize_bias) == (True, True)
    # the paper's values stay the defaults
    d = FinetuneConfig()
    assert (d.fc8_bias, d.bias_lr_mult, d.fc8_bias_decay) == (0.0, 1.0, True)
    assert (SVMConfig().dedup_conv5, SVMConfig().scale_sample, SVMConfig().retrain_strict) == (False, "first", False)
    assert (BBoxRegConfig().include_gt, BBoxRegConfig().penalize_bias) == (False, False)


# ----------------------------------------------------------------------------- fine-tuning

def zero_source(dim: int):
    """Pooled features all zero: with fc6/fc7 biases below zero nothing reaches fc8 (ReLU), so
    every gradient is zero but fc8's bias's: the loss depends on fc8's bias alone."""
    return lambda image_id, index, flip=False, scale_idx=None: torch.zeros(len(index), dim)


def one_image_windows() -> dict[str, TrainWindows]:
    """2 positives of class 1 and 8 background windows: a batch of 8 with fg_fraction 0.25 is
    exactly both positives and 6 background windows."""
    overlap = np.array([0.9, 0.9] + [0.3] * 8, np.float32)
    label = np.array([1, 1] + [0] * 8, np.int64)
    return {"a": TrainWindows(np.zeros((10, 4), np.float32), overlap, label)}


@pytest.mark.parametrize("fc8_bias_decay", [False, True])
def test_one_finetune_step_by_hand(fc8_bias_decay):
    """lr 0.1, weight decay 0.1, bias lr x2; SGD's first step is p -= lr * mult * (g + wd * p)."""
    det = tiny_detector()
    with torch.no_grad():
        det.head.fc6.bias.fill_(-1.0)
        det.head.fc7.bias.fill_(-1.0)
        det.head.cls_score.bias.fill_(5.0)  # replaced by fc8_bias at the start
    before = {n: p.detach().clone() for n, p in det.head.named_parameters()}
    cfg = dataclasses.replace(FinetuneConfig(), iterations=1, lr=0.1, lr_steps=(), weight_decay=0.1,
                              batch_size=8, images_per_batch=1, fc8_bias=1.0, bias_lr_mult=2.0,
                              fc8_bias_decay=fc8_bias_decay)
    state = finetune(det, zero_source(det.features.output_dim), one_image_windows(), cfg)
    after = dict(det.head.named_parameters())
    for name in ("fc6.weight", "fc7.weight", "cls_score.weight"):  # zero gradient: decay only
        torch.testing.assert_close(after[name], before[name] * (1 - 0.1 * 0.1), rtol=0, atol=1e-7)
    for name in ("fc6.bias", "fc7.bias"):  # zero gradient, p = -1: -0.1 * 2 * 0.1 * (-1) = +0.02
        torch.testing.assert_close(after[name], torch.full_like(before[name], -1.0 + 0.02), rtol=0, atol=1e-7)
    # fc8: logits = its bias, all 1 -> softmax 1/3 each; targets 6 x 0, 2 x 1, 0 x 2:
    # dL/db_j = 1/3 - n_j / 8 = (-5/12, 1/12, 1/3); step -0.1 * 2 * (g + decay * 1)
    grad = np.array([-5 / 12, 1 / 12, 1 / 3]) + (0.1 if fc8_bias_decay else 0.0)
    np.testing.assert_allclose(after["cls_score.bias"].detach().numpy(), 1.0 - 0.2 * grad, rtol=0, atol=1e-6)
    lrs = {g["name"]: (g["lr"], g["weight_decay"]) for g in state["optimizer"]["param_groups"]}
    assert lrs == {"head.weight": (0.1, 0.1), "head.bias": (0.2, 0.1),
                   "fc8.bias": (0.2, 0.1 if fc8_bias_decay else 0.0)}


def test_param_groups_one_sgd_step_and_schedule():
    """Every parameter 1, every gradient 0.5, lr 0.1, weight decay 0.01, biases x2, conv x0.5:
    the deltas are -lr * mult * (0.5 + decay)."""
    det = tiny_detector()
    cfg = dataclasses.replace(FinetuneConfig(), lr=0.1, weight_decay=0.01, momentum=0.9, bias_lr_mult=2.0,
                              fc8_bias_decay=False, train_conv=True, conv_lr_mult=0.5)
    groups = param_groups(det, cfg)
    assert [g["name"] for g in groups] == ["head.weight", "head.bias", "fc8.bias", "backbone.weight",
                                           "backbone.bias"]
    assert [g["mult"] for g in groups] == [1.0, 2.0, 2.0, 0.5, 1.0]
    named = dict(det.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(named)  # each parameter exactly once
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in named.values()}
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    with torch.no_grad():
        for p in named.values():
            p.fill_(1.0)
            p.grad = torch.full_like(p, 0.5)
    opt.step()
    expected = {"head.fc6.weight": -0.1 * 0.51, "head.fc6.bias": -0.2 * 0.51, "head.cls_score.weight": -0.1 * 0.51,
                "head.cls_score.bias": -0.2 * 0.5, "features.backbone.conv1.weight": -0.05 * 0.51,
                "features.backbone.conv1.bias": -0.1 * 0.51}
    for name, delta in expected.items():
        torch.testing.assert_close(named[name].detach() - 1.0, torch.full_like(named[name], delta),
                                   rtol=0, atol=1e-7)
    # the defaults are the paper's: one lr and one decay for every parameter
    plain = param_groups(det, dataclasses.replace(FinetuneConfig(), lr=0.1))
    assert {(g["lr"], g["mult"], g["weight_decay"]) for g in plain} == {(0.1, 1.0, 5e-4)}


def test_fc8_bias_is_set_at_the_start_not_on_resume():
    det = tiny_detector()
    weight = det.head.cls_score.weight.detach().clone()
    assert not det.head.cls_score.bias.any()
    cfg = dataclasses.replace(FinetuneConfig(), iterations=0, fc8_bias=1.0)
    state = finetune(det, zero_source(det.features.output_dim), one_image_windows(), cfg)
    assert torch.equal(det.head.cls_score.bias, torch.ones(3))
    assert torch.equal(det.head.cls_score.weight, weight), "fc8's N(0, fc8_std) weights stay"
    state = copy.deepcopy(state)
    state["model"]["head.cls_score.bias"].fill_(0.5)
    again = tiny_detector(1)
    finetune(again, zero_source(det.features.output_dim), one_image_windows(), cfg, state=state)
    assert torch.equal(again.head.cls_score.bias, torch.full((3,), 0.5)), "a resumed run keeps its bias"


# ----------------------------------------------------------------------------- SVM: dedup_conv5

def test_conv5_keys_by_hand():
    """60x80 image, short side m = 60. One scale 100: boxes scale by 99/59; the official cells
    (0-based) are left = floor((x - 13.5)/16 + 0.5), right = ceil((x - 26.5)/16 - 0.5), raw:
    not collapsed, not clipped."""
    features = SPPFeatures(build_backbone("zf5", width=0.125, weights="none"), levels=(1,), scales=(100,),
                           projection="code", scale_rule="code")
    boxes = np.array([[32, 0, 59, 59],    # x1 53.695 -> floor(3.012) = 3; y1 0 -> floor(-0.344) = -1;
                                          # x2 = y2 99 -> ceil(4.031) = 5
                      [33, 0, 59, 59],    # x1 55.373 -> floor(3.117) = 3: the same key
                      [32, 1, 59, 59],    # y1 1.678 -> floor(-0.239) = -1: the same key
                      [32, 5, 59, 59],    # y1 8.390 -> floor(0.181) = 0: another key (same clipped window)
                      [0, 0, 79, 59]],    # x2 132.56 -> ceil(6.130) = 7: beyond the map, kept raw
                     np.float32)
    assert conv5_keys(features, (60, 80), boxes).tolist() == [
        [0, 3, -1, 5, 5], [0, 3, -1, 5, 5], [0, 3, -1, 5, 5], [0, 3, 0, 5, 5], [0, -1, -1, 7, 5]]
    # Two scales, the code rule: expected = round(208 * 60 / sqrt(area)): the whole image 180 ->
    # scale 100 (index 0), box 0 304 -> 300 (index 1), where it scales by 299/59: x1 162.17 ->
    # floor(9.79) = 9, x2 299 -> ceil(16.53) = 17.
    features.scales = (100, 300)
    keys = conv5_keys(features, (60, 80), boxes[[4, 0]])
    assert keys.tolist() == [[0, -1, -1, 7, 5], [1, 9, -1, 17, 17]]


def test_dedup_keeps_the_first_box_of_each_key():
    """As spp_features_convX_to_poolX.m: unique(keys) over the image's boxes, then the overlap
    test; a key's later boxes are dropped even when its first box is no negative."""
    gt, labels = np.array([[0, 0, 9, 9]], np.float32), np.array([1])
    boxes = np.array([[0, 0, 9, 9],        # 0: IoU 1 with class 1: a negative of class 2 only
                      [100, 0, 109, 9],    # 1
                      [120, 0, 129, 9],    # 2: key of 0 -> dropped for both classes
                      [140, 0, 149, 9],    # 3
                      [160, 0, 169, 9],    # 4: key of 1 -> dropped
                      [180, 0, 189, 9]],   # 5: the cells of 1 at another scale: kept
                     np.float32)
    a, b, c = [0, 1, 1, 2, 2], [0, 4, 4, 5, 5], [0, 7, 7, 8, 8]
    keys = np.array([a, b, a, c, b, [1, 4, 4, 5, 5]])
    trainer = SVMTrainer(2, 3, neg_overlap_prune=None, evict_thresh=-np.inf)
    assert [x.tolist() for x in trainer.candidate_negatives(boxes, gt, labels)] == [[1, 2, 3, 4, 5], list(range(6))]
    assert [x.tolist() for x in trainer.candidate_negatives(boxes, gt, labels, keys)] == [[1, 3, 5], [0, 1, 3, 5]]
    trainer.add_positives(np.eye(3)[:2], [1, 2])
    trainer.add_image(np.random.default_rng(0).random((6, 3)), boxes, gt, labels, keys=keys)
    assert trainer.negative_keys(1)[:, 1].tolist() == [1, 3, 5]
    with pytest.raises(ValueError, match="one row per box"):
        trainer.candidate_negatives(boxes, gt, labels, keys[:3])


class FakeSource:
    """source(image_id, rows) -> the rows of a fixed random matrix per image, recording calls."""

    def __init__(self, windows: dict[str, int], dim: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.data = {i: torch.from_numpy(rng.random((n, dim), dtype=np.float32) + 0.1) for i, n in windows.items()}
        self.calls: list[tuple[str, list[int]]] = []
        self.features = SimpleNamespace(output_dim=dim)

    def __call__(self, image_id, rows, flip=False, scale_idx=None):
        rows = np.asarray(rows, dtype=np.int64)
        self.calls.append((image_id, rows.tolist()))
        return self.data[image_id][torch.from_numpy(rows)]

    def image_shape(self, image_id):
        return (60, 80)


def test_train_svms_dedups_by_conv5_window_and_says_when_it_cannot():
    gt = [[0, 0, 19, 19]]
    # image "a": boxes 1 and 2 share a key with box 0 (test_conv5_keys_by_hand), box 3 does not
    props = np.array([[32, 0, 59, 59], [33, 0, 59, 59], [32, 1, 59, 59], [32, 5, 59, 59]], np.float32)
    records = [record("a", gt, [1]), record("b", gt, [2])]
    proposals = {"a": props, "b": props}
    det = tiny_detector(levels=(1,), scales=(100,), projection="code", scale_rule="code")
    source = FakeSource({"a": 5, "b": 5}, det.features.output_dim)
    cfg = dataclasses.replace(SVMConfig(), neg_overlap_prune=None, dedup_conv5=True)
    logger, log = list_logger("dedup")
    _, history = train_svms(det, source, records, proposals, cfg, logger=logger)
    # the first image trains both classes on all its negatives: the 2 unique ones
    assert [(h["image"], h["negatives"]) for h in history[:2]] == [(0, 2), (0, 2)]
    assert any("svm.dedup_conv5: 4 of 8 proposals" in m for m in log.messages), log.messages
    _, plain = train_svms(det, source, records, proposals, dataclasses.replace(cfg, dedup_conv5=False))
    assert [(h["image"], h["negatives"]) for h in plain[:2]] == [(0, 4), (0, 4)]
    # R-CNN: no conv5 window per proposal; a log line says the switch does not apply
    rcnn = Detector(RCNNFeatures(build_backbone("zf5", width=0.125, weights="none"), levels=(1,), input_size=64),
                    num_classes=2, fc_dim=8, dropout=0.0)
    logger, log = list_logger("rcnn")
    _, history = train_svms(rcnn, FakeSource({"a": 5, "b": 5}, rcnn.features.output_dim), records, proposals, cfg,
                            logger=logger)
    assert history[0]["negatives"] == 4
    assert any("dedup_conv5" in m and "does not apply" in m for m in log.messages), log.messages


# ----------------------------------------------------------------------------- SVM: scale sample

def test_scale_sample_random_is_200_random_windows_of_200_random_images():
    few = [record(f"f{i}", [[0, 0, 9, 9]], [1]) for i in range(3)]
    props = {r.image_id: np.zeros((4, 4), np.float32) for r in few}
    rng = np.random.default_rng(0)
    taken = scale_sample_rows(few, props, "random", rng)
    # fewer than 200 images and windows: all of them, the ground-truth row (4) included
    assert sorted(taken) == [0, 1, 2] and all(sorted(v.tolist()) == [0, 1, 2, 3, 4] for v in taken.values())
    assert {k: sorted(v.tolist()) for k, v in scale_sample_rows(few, props, "first", rng).items()} == \
        {i: [0, 1, 2, 3] for i in range(3)}, "first: proposals only (the ground truth comes separately)"

    many = [record(f"m{i}", [[0, 0, 9, 9], [5, 5, 20, 20]], [1, 2]) for i in range(250)]
    props = {r.image_id: np.zeros((300, 4), np.float32) for r in many}
    taken = scale_sample_rows(many, props, "random", np.random.default_rng(7))
    assert len(taken) == 200 and max(taken) >= 200, "200 of the 250 images, not the first 200"
    assert all(len(v) == 200 and len(set(v.tolist())) == 200 and v.max() < 302 for v in taken.values())
    assert any(v.max() >= 300 for v in taken.values()), "ground-truth rows are among the windows"
    again = scale_sample_rows(many, props, "random", np.random.default_rng(7))
    assert list(again) == list(taken) and all(np.array_equal(again[k], taken[k]) for k in taken), "seeded"
    first = scale_sample_rows(many, props, "first", np.random.default_rng(7))
    assert sorted(first) == list(range(200)) and all(v.max() < 300 for v in first.values())


def test_train_svms_random_scale_uses_only_the_sample():
    """fc7 = pooled (a stub detector); proposals have norm 1, ground truth norm 3. first: the
    proposals and the ground truth (10 x 1 and 2 x 3); random: 200 of each image's 202 rows."""
    dim = 4

    class Stub:
        num_classes, kind = 2, "spp"
        features = None
        head = SimpleNamespace(out_dim=dim)

        def eval(self):
            return self

        def fc7(self, pooled):
            return pooled

    class NormSource(FakeSource):
        def __init__(self, n_props):
            self.n_props, self.calls = n_props, []

        def __call__(self, image_id, rows, flip=False, scale_idx=None):
            rows = np.asarray(rows)
            self.calls.append((image_id, rows.tolist()))
            out = torch.zeros(len(rows), dim)
            out[:, 0] = torch.from_numpy(np.where(rows < self.n_props, 1.0, 3.0).astype(np.float32))
            out[:, 1] = torch.from_numpy((rows % 2).astype(np.float32) * 1e-3)  # not all alike
            return out

    records = [record("a", [[0, 0, 9, 9]], [1]), record("b", [[0, 0, 9, 9]], [2])]
    props = {"a": np.array([[50, 50, 59, 59]] * 5, np.float32), "b": np.array([[50, 50, 59, 59]] * 5, np.float32)}
    cfg = dataclasses.replace(SVMConfig(), neg_overlap_prune=None)
    norms = {}
    for how in ("first", "random"):
        scorer, _ = train_svms(Stub(), NormSource(5), records, props, dataclasses.replace(cfg, scale_sample=how))
        norms[how] = 20.0 / float(scorer.scale)
    # both: all 12 windows (few images and boxes), mean norm (10 + 6) / 12; in "random" the
    # ground-truth rows are drawn as sample rows, in "first" added as the positives
    assert norms["first"] == pytest.approx(16 / 12, rel=1e-3)
    assert norms["random"] == pytest.approx(16 / 12, rel=1e-3)
    props = {"a": np.array([[50, 50, 59, 59]] * 300, np.float32), "b": np.array([[50, 50, 59, 59]] * 300, np.float32)}
    scorer, _ = train_svms(Stub(), NormSource(300), records, props, dataclasses.replace(cfg, scale_sample="first"))
    # first: 200 proposals of each image (norm 1) plus the 2 ground truths (norm 3): 406 / 402
    assert 20.0 / float(scorer.scale) == pytest.approx(406 / 402, rel=1e-3)
    scorer, _ = train_svms(Stub(), NormSource(300), records, props, dataclasses.replace(cfg, scale_sample="random"))
    # random: 200 of each image's 301 rows (seed 0, as train_svms draws them), g of them ground
    # truth: (400 + 2 g) / 400, the ground truth not added on top
    drawn = scale_sample_rows(records, props, "random", np.random.default_rng(0))
    g = sum(int((v >= 300).sum()) for v in drawn.values())
    assert 20.0 / float(scorer.scale) == pytest.approx((400 + 2 * g) / 400, rel=1e-3)


# ----------------------------------------------------------------------------- SVM: retrain_strict

@pytest.mark.parametrize("strict, retrained_after", [(False, [0, 1]), (True, [0, 2])])
def test_retrain_strict_at_the_boundary(strict, retrained_after):
    """retrain_every 5; every far box is a hard negative (hard_thresh -inf). Image 1 adds exactly
    5: `>=` retrains there; strict (`>`, spp_train.m) waits for image 2's sixth."""
    rng = np.random.default_rng(0)
    trainer = SVMTrainer(1, 4, hard_thresh=-np.inf, evict_thresh=-np.inf, retrain_every=5, retrain_strict=strict,
                         neg_overlap_prune=None)
    trainer.add_positives(rng.random((5, 4)) + 1, np.ones(5))
    def far(n):
        x = np.arange(n) * 20.0
        return np.stack([x, np.full(n, 200.0), x + 9, np.full(n, 209.0)], 1)
    gt, labels = np.array([[0, 0, 9, 9]], np.float32), [1]
    for n in (3, 5, 1):
        trainer.add_image(-rng.random((n, 4)), far(n), gt, labels)
    assert [h["image"] for h in trainer.history] == retrained_after
    with pytest.raises(Exception, match="other settings"):
        SVMTrainer(1, 4, hard_thresh=-np.inf, evict_thresh=-np.inf, retrain_every=5, retrain_strict=not strict,
                   neg_overlap_prune=None).load_state_dict(trainer.state_dict())


# ----------------------------------------------------------------------------- box regression

def official_ridge_prediction(X, Y, lam, X_test):
    """spp_train_bbox_regressor.m + spp_predict_bbox_regressor.m written out: [X, 1], centred
    and whitened targets, ridge with lambda on every coefficient, un-whitened, mean added back."""
    A = np.hstack([X, np.ones((len(X), 1))])
    mu = Y.mean(0)
    Yc = Y - mu
    d, V = np.linalg.eigh(Yc.T @ Yc / len(Yc))
    T = V @ np.diag(1 / np.sqrt(d + 0.001)) @ V.T
    T_inv = V @ np.diag(np.sqrt(d + 0.001)) @ V.T
    beta = np.linalg.inv(A.T @ A + lam * np.eye(A.shape[1])) @ A.T @ (Yc @ T)
    return (np.hstack([X_test, np.ones((len(X_test), 1))]) @ beta) @ T_inv + mu


@pytest.mark.parametrize("n, dim", [(60, 5), (12, 20)])  # the primal and the dual solve
def test_penalized_bias_ridge_against_the_closed_form(n, dim):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((n, dim)) + 2.0
    Y = X[:, :4] @ rng.standard_normal((4, 4)) + 3.0 + 0.1 * rng.standard_normal((n, 4))
    lam = 7.0
    coef, intercept = ridge_penalized_bias(X, Y, lam)
    # hand-written closed form on [X, 1] (no whitening): the bias row penalised too
    A = np.hstack([X, np.ones((n, 1))])
    beta = np.linalg.solve(A.T @ A + lam * np.eye(dim + 1), A.T @ (Y - Y.mean(0)))
    np.testing.assert_allclose(coef, beta[:dim], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(intercept, beta[dim] + Y.mean(0), rtol=1e-9, atol=1e-10)
    # the official whitening changes nothing (one lambda, ridge linear in the targets)
    X_test = rng.standard_normal((9, dim))
    np.testing.assert_allclose(X_test @ coef + intercept, official_ridge_prediction(X, Y, lam, X_test),
                               rtol=1e-8, atol=1e-8)
    # ... and the penalised bias does change the fit (sklearn's intercept is free)
    free = Ridge(alpha=lam).fit(X, Y)
    assert not np.allclose(intercept, free.intercept_, atol=1e-3)


def test_train_box_regressors_penalize_bias_switch():
    rng = np.random.default_rng(2)
    gt = np.tile(np.array([[10, 10, 59, 49]], np.float32), (40, 1))
    proposals = gt + rng.uniform(-5, 5, gt.shape).astype(np.float32)
    features = rng.random((40, 6)).astype(np.float32)
    labels, overlaps = np.ones(40, np.int64), np.ones(40, np.float32)
    reg = train_box_regressors(features, proposals, gt, labels, overlaps, 1, lam=3.0, feat_scale=2.0,
                               penalize_bias=True)
    coef, intercept = ridge_penalized_bias(features.astype(np.float64) * 2.0,
                                           box_ops.encode(proposals, gt).astype(np.float64), 3.0)
    np.testing.assert_allclose(reg.coef[0].numpy(), coef, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(reg.intercept[0].numpy(), intercept, rtol=1e-4, atol=1e-6)
    free = train_box_regressors(features, proposals, gt, labels, overlaps, 1, lam=3.0, feat_scale=2.0)
    assert not torch.allclose(free.intercept, reg.intercept, atol=1e-3)


def test_box_regression_ground_truth_rows():
    """Each image: 4 proposals (two with IoU >= 0.5 to its ground truth), one ground truth; the
    ground truth is row 4 of the image's training windows, its target zero."""
    gt = [[10, 10, 49, 49]]
    props = np.array([[10, 10, 49, 49 - 8], [12, 10, 49, 49], [100, 100, 120, 120], [0, 60, 9, 79]], np.float32)
    records = [record(f"i{k}", gt, [1]) for k in range(6)]
    proposals = {r.image_id: props for r in records}
    source = FakeSource({r.image_id: 5 for r in records}, 3, seed=4)
    base = dataclasses.replace(BBoxRegConfig(), lam=1.0)
    plain = train_box_regressor(source, records, proposals, base, 1)
    assert plain.num_samples.tolist() == [12]
    assert all(rows == [0, 1] for _, rows in source.calls)
    source.calls.clear()
    with_gt = train_box_regressor(source, records, proposals, dataclasses.replace(base, include_gt=True), 1)
    assert with_gt.num_samples.tolist() == [18]
    assert all(rows == [0, 1, 4] for _, rows in source.calls)
    # the same fit as the samples assembled by hand: proposals 0, 1 and the ground truth itself
    x = np.concatenate([source.data[r.image_id][[0, 1, 4]].numpy() for r in records])
    x = x.astype(np.float16).astype(np.float32)
    wins = np.concatenate([np.vstack([props[:2], gt]) for _ in records]).astype(np.float32)
    from sppdet.svm import feature_scale
    ref = train_box_regressors(x, wins, np.tile(np.array(gt, np.float32), (18, 1)), np.ones(18, np.int64),
                               np.ones(18, np.float32), 1, lam=1.0, feat_scale=feature_scale(x, 20.0))
    torch.testing.assert_close(with_gt.coef, ref.coef)
    torch.testing.assert_close(with_gt.intercept, ref.intercept)
    np.testing.assert_array_equal(box_ops.encode(np.array(gt, np.float32), np.array(gt, np.float32)), 0)
    # an image without proposals still gives its ground truth
    source.calls.clear()
    empty = {r.image_id: np.zeros((0, 4), np.float32) for r in records}
    source_empty = FakeSource({r.image_id: 1 for r in records}, 3)
    reg = train_box_regressor(source_empty, records, empty, dataclasses.replace(base, include_gt=True), 1,
                              logger=list_logger("empty")[0])
    assert reg.num_samples.tolist() == [6] and not reg.coef.any()  # 6 < min_samples 10: identity
    assert [rows for _, rows in source_empty.calls] == [[0]] * 6


# ----------------------------------------------------------------------------- box scaling

def test_resize_boxes_official_rule():
    boxes = np.array([[0, 0, 59, 59], [32, 0, 79, 59]], np.float64)
    # 60x80 at scale 100: short side m = 60 -> s = 100; 0 -> 0 and m - 1 = 59 -> s - 1 = 99
    np.testing.assert_allclose(resize_boxes(boxes, 60, 80, 100, rule="code"),
                               boxes * 99 / 59, rtol=0, atol=0)
    assert resize_boxes(boxes, 60, 80, 100, rule="code")[0].tolist() == [0, 0, 99, 99]
    np.testing.assert_allclose(resize_boxes(boxes, 60, 80, 100, rule="paper"), boxes * 100 / 60)
    # capped by max_size 120: f = 1.5, the resized short side is 90 pixels -> 89 / 59
    assert resize_boxes(boxes, 60, 80, 100, max_size=120, rule="code")[0].tolist() == [0, 0, 89, 89]
    t = torch.tensor(boxes, dtype=torch.float32)
    assert resize_boxes(t, 60, 80, 100, rule="code").dtype == torch.float64


def test_pool_scales_boxes_as_the_projection_rule_says():
    """A conv5 map whose channels are (col, row, -col, -row) and the 1x1 level: the pooled
    vector spells out the window. Box [32, 0, 59, 59] of a 60x80 image at scale 100:
    code rule, official scaling (x 99/59): x1 53.69 -> left floor(3.012) = 3,
        x2 = y2 99 -> ceil(4.031) = 5, y1 0 -> -1, clipped to 0: window cols 3..5, rows 0..5;
    code rule on boxes * 5/3 (what pool did before): x1 53.33 -> floor(2.990) = 2, x2 98.33 ->
        ceil(3.990) = 4: cols 2..4 -- the one pixel the two scalings differ by moves the window."""
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(10.0), indexing="ij")
    conv5 = torch.stack([cols, rows, -cols, -rows])
    box = torch.tensor([[32.0, 0.0, 59.0, 59.0]])

    def window(projection):
        net = SPPFeatures(build_backbone("zf5", width=0.125, weights="none"), levels=(1,), scales=(100,),
                          projection=projection)
        c2, r2, c1, r1 = net.pool({0: conv5}, (60, 80), box, torch.zeros(1, dtype=torch.int64))[0].tolist()
        return [-c1, -r1, c2, r2]

    assert window("code") == [3, 0, 5, 5]
    assert project_boxes(box * 100 / 60, 16, 20.0, 8, 10, rule="code").tolist() == [[2, 0, 4, 4]]
    assert window("paper") == project_boxes(box * 100 / 60, 16, 20.0, 8, 10, rule="paper")[0].tolist()
