"""NMS as the official nms_mex.cpp: hand-worked cases and a randomized comparison with a
pure-Python transliteration of nms_mex.

Boxes are 0-based inclusive [x1, y1, x2, y2]; [0, 0, 9, 9] is 10 x 10 = 100 px.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms

from sppdet import boxes as box_ops
from sppdet.boxes import nms_exact, nms_per_class

# --------------------------------------------------------------------------------------------
# reference



@pytest.fixture(autouse=True)
def torchvision_path_for_small_inputs(monkeypatch):
    """These tests check nms_per_class's torchvision path on small hand-made cases: below
    _EXACT_LOOP_MAX_BOXES boxes it would run the exact loop instead (the same results)."""
    monkeypatch.setattr(box_ops, "_EXACT_LOOP_MAX_BOXES", 0)

def reference_nms_mex(boxes, scores, thr):
    """nms_mex.cpp in plain Python floats (double): the remaining boxes sorted by (score,
    index) ascending, as the std::multimap holds them (equal keys in insertion order); pick the
    last; erase every remaining box (the picked one included) whose overlap with it is > thr;
    repeat. Returns the picks in order."""
    boxes = [[float(v) for v in b] for b in boxes]
    area = [(b[2] - b[0] + 1) * (b[3] - b[1] + 1) for b in boxes]
    remaining = sorted(range(len(boxes)), key=lambda i: (float(scores[i]), i))
    picks = []
    while remaining:
        last = remaining[-1]
        picks.append(last)
        survivors = []
        for j in remaining:
            a, b = boxes[last], boxes[j]
            w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
            h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
            union = area[last] + area[j] - w * h
            ov = w * h / union if union != 0 else float("nan")
            if not ov > thr and j != last:  # j == last: nms_mex erases it (ov = 1 > thr)
                survivors.append(j)
        remaining = survivors
    return picks


def reference_per_class(boxes, scores, labels, thr):
    """Per label: the reference on that label's boxes in input order. All picks merged by
    decreasing score, equal scores by decreasing index."""
    kept = []
    for c in sorted(set(np.asarray(labels).tolist())):
        idx = [i for i in range(len(labels)) if labels[i] == c]
        kept += [idx[p] for p in reference_nms_mex([boxes[i] for i in idx], [scores[i] for i in idx], thr)]
    return sorted(kept, key=lambda i: (-float(scores[i]), -i))


def iou_mex(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    return w * h / ((a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - w * h)


def iou_matrix_mex(b):
    """iou_mex for every pair, same operations in numpy float64."""
    w = np.maximum(0.0, np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0]) + 1)
    h = np.maximum(0.0, np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1]) + 1)
    area = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    return w * h / (area[:, None] + area[None, :] - w * h)


def all_ways(boxes, scores, labels, thr):
    """nms_per_class on numpy and on torch input (float32 and float64 scores as given)."""
    out_np = nms_per_class(np.asarray(boxes), np.asarray(scores), np.asarray(labels), thr)
    out_t = nms_per_class(torch.as_tensor(np.asarray(boxes)), torch.as_tensor(np.asarray(scores)),
                          torch.as_tensor(np.asarray(labels)), thr)
    assert isinstance(out_np, np.ndarray) and isinstance(out_t, torch.Tensor)
    assert out_t.tolist() == out_np.tolist()
    return out_np.tolist()


# --------------------------------------------------------------------------------------------
# hand-worked cases

# A = [0, 0, 12, 9] and B = [7, 0, 19, 9]: 13 x 10 = 130 px each; the intersection is columns
# 7..12 (6 px) x 10 rows = 60 px; union 130 + 130 - 60 = 200; IoU = 60 / 200 = 0.3 exactly
# (in double, 60 / 200 rounds to the same double as the literal 0.3).
A03, B03 = [0, 0, 12, 9], [7, 0, 19, 9]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_two_boxes_at_exactly_03_both_survive(dtype):
    assert iou_mex(A03, B03) == 0.3
    boxes = np.array([A03, B03], dtype)
    scores = np.array([0.9, 0.8], dtype)
    assert nms_exact(boxes, scores, 0.3).tolist() == [0, 1]
    assert all_ways(boxes, scores, [1, 1], 0.3) == [0, 1]
    # torchvision's nms in float32 (what nms_per_class used to run) drops B here: 60 / 200 in
    # float32 is 0.30000001192..., which is > 0.3.
    old = batched_nms(torch.tensor([A03, B03], dtype=torch.float32) + torch.tensor([0, 0, 1, 1]),
                      torch.tensor([0.9, 0.8]), torch.tensor([1, 1]), 0.3)
    assert old.tolist() == [0]


@pytest.mark.parametrize("shift, expect", [(-2.0 ** -10, [0]), (0.0, [0, 1]), (2.0 ** -10, [0, 1])])
def test_just_above_03_is_suppressed_and_just_below_is_not(shift, expect):
    # B's x1 moved by d = shift: intersection (6 - d) x 10, B's area (13 - d) x 10, union 200
    # -> IoU = (6 - d) / 20: d = -1/1024 -> 0.30005 > 0.3, B dropped; d = +1/1024 -> below.
    b = [B03[0] + shift, 0, 19, 9]
    assert (iou_mex(A03, b) > 0.3) == (expect == [0])
    assert nms_exact([A03, b], [0.9, 0.8], 0.3).tolist() == expect
    assert all_ways([A03, b], [0.9, 0.8], [3, 3], 0.3) == expect


def test_at_07_and_a_hair_above_where_float32_misses_it():
    # A = [0, 0, 16, 9], B = [3, 0, 19, 9]: 17 x 10 each, intersection 14 x 10 = 140, union
    # 340 - 140 = 200 -> IoU 0.7 exactly: both kept.
    a, b = [0, 0, 16, 9], [3, 0, 19, 9]
    assert iou_mex(a, b) == 0.7
    assert all_ways([a, b], [0.9, 0.8], [1, 1], 0.7) == [0, 1]
    # B's x1 at 3 - 2^-22: IoU = (14 + 2^-22) / 20 = 0.7 + 1.2e-8 > 0.7 -> B dropped. float32
    # cannot tell this from 0.7 (14 + 2^-22 rounds to 14 in float32), so torchvision in float32
    # keeps both.
    b = [3 - 2.0 ** -22, 0, 19, 9]
    assert iou_mex(a, b) > 0.7
    assert nms_exact([a, b], [0.9, 0.8], 0.7).tolist() == [0]
    assert all_ways([a, b], [0.9, 0.8], [1, 1], 0.7) == [0]
    old = batched_nms(torch.tensor([a, b], dtype=torch.float32) + torch.tensor([0, 0, 1, 1]),
                      torch.tensor([0.9, 0.8]), torch.tensor([1, 1]), 0.7)
    assert old.tolist() == [0, 1]


def test_equal_scores_the_later_box_is_picked_first():
    # nms_mex keeps the boxes in a multimap keyed by score (equal keys in input order) and picks
    # the last: of three identical boxes with equal scores the third (index 2) is kept.
    same = [[0, 0, 9, 9]] * 3
    assert nms_exact(same, [0.5, 0.5, 0.5], 0.3).tolist() == [2]
    assert all_ways(same, [0.5, 0.5, 0.5], [1, 1, 1], 0.3) == [2]
    # a higher score still wins over a later index
    assert all_ways(same, [0.5, 0.9, 0.5], [1, 1, 1], 0.3) == [1]
    # disjoint boxes with equal scores: all kept, picked in decreasing index
    disjoint = [[0, 0, 9, 9], [20, 0, 29, 9], [40, 0, 49, 9]]
    assert nms_exact(disjoint, [0.5, 0.5, 0.5], 0.3).tolist() == [2, 1, 0]
    assert all_ways(disjoint, [0.5, 0.5, 0.5], [1, 1, 1], 0.3) == [2, 1, 0]
    # a chain [A, A, B], equal scores: 2 (B) goes first and keeps both A's (IoU 0.3 is not
    # > 0.3); then 1 drops 0 (IoU 1) -> [2, 1]. Ties taken in increasing index would give [0, 2].
    chain = [A03, A03, B03]
    assert nms_exact(chain, [0.5, 0.5, 0.5], 0.3).tolist() == [2, 1]
    assert all_ways(chain, [0.5, 0.5, 0.5], [1, 1, 1], 0.3) == [2, 1]


def test_classes_do_not_suppress_each_other_and_output_order():
    # the same box in classes 1 and 2, plus a duplicate in class 1 with a lower score
    boxes = [[0, 0, 9, 9], [0, 0, 9, 9], [0, 0, 9, 9], [50, 50, 59, 59]]
    scores = [0.5, 0.5, 0.4, 0.9]
    labels = [1, 2, 1, 2]
    # class 1: {0, 2} -> 0 kept (0.5 > 0.4); class 2: {1, 3} disjoint -> both.
    # merged: 3 (0.9), then the 0.5 tie between 0 and 1 by decreasing index: 1, 0
    assert all_ways(boxes, scores, labels, 0.3) == [3, 1, 0]


@pytest.mark.parametrize("thr", [0.0, 0.3])
def test_class_offsets_do_not_create_overlaps(thr):
    # the one-call path moves each class by an integer offset (on x and y); boxes at both ends
    # of the range, in two classes, must stay apart after it: at threshold 0 any overlap would
    # already suppress. Within a class the two boxes are disjoint, so all four survive.
    boxes = [[0, 0, 9, 9], [100, 100, 109.5, 109.5], [0.25, 0.25, 9, 9], [100, 100, 109, 109]]
    scores = [0.1, 0.2, 0.9, 0.8]
    assert all_ways(boxes, scores, [1, 1, 2, 2], thr) == [2, 3, 1, 0]
    # and in one class: 2 drops 0 (IoU 9.75^2 / 100 = 0.95), 3 drops 1 (IoU 100 / 110.25)
    assert all_ways(boxes, scores, [1, 1, 1, 1], thr) == [2, 3]


def test_empty_input_and_bad_scores():
    assert all_ways(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), 0.3) == []
    assert nms_exact(np.zeros((0, 4)), [], 0.3).tolist() == []
    with pytest.raises(ValueError, match="NaN"):
        nms_per_class(np.zeros((1, 4)), np.array([np.nan]), np.array([1]), 0.3)


def test_negative_threshold_keeps_one_per_class():
    # every IoU (even 0 between disjoint boxes) is > -1: one box per class, the best
    boxes = [[0, 0, 9, 9], [50, 50, 59, 59], [0, 0, 9, 9]]
    assert all_ways(boxes, [0.1, 0.2, 0.3], [1, 1, 2], -1.0) == [2, 1]


# --------------------------------------------------------------------------------------------
# randomized: the fast path, the exact path and the reference agree


def exact_pair(rng, thr):
    """Two same-height boxes whose IoU is exactly thr (0.3, 0.5 or 0.7): widths a, overlap c
    with c / (2a - c) = p / q, i.e. a = (p + q) k, c = 2 p k."""
    p, q = {0.3: (3, 10), 0.5: (1, 2), 0.7: (7, 10)}[thr]
    k = int(rng.integers(1, 4))
    a, c = (p + q) * k, 2 * p * k
    x, y, h = (int(v) for v in rng.integers(0, 200, 3))
    h += 1
    return [x, y, x + a - 1, y + h - 1], [x + a - c, y, x + 2 * a - c - 1, y + h - 1]


def random_case(rng, n, kind, thr, classes):
    xy = rng.integers(0, 120, (n, 2)).astype(np.float64)
    wh = rng.integers(1, 60, (n, 2)).astype(np.float64)
    boxes = np.concatenate([xy, xy + wh - 1], 1)
    if kind == "float32":  # regressed-looking boxes, as the detector's second NMS sees them
        boxes = (boxes + rng.normal(0, 1.5, boxes.shape)).clip(0, 300).astype(np.float32)
    elif kind == "float64":  # arbitrary doubles: the exact loop handles them
        boxes = boxes + rng.random(boxes.shape) * 0.999
    boxes = boxes.tolist()
    for _ in range(n // 10):  # exact-threshold pairs, often with equal scores
        i, j = (int(v) for v in rng.choice(n, 2, replace=False))
        boxes[i], boxes[j] = exact_pair(rng, thr)
    scores = (rng.integers(0, 12, n) / 4).astype(np.float32)  # few values: many ties
    labels = rng.integers(1, classes + 1, n)
    dtype = np.float32 if kind == "float32" else np.float64
    return np.asarray(boxes, dtype), scores, labels


@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_random_boxes_match_the_reference(thr, monkeypatch):
    rng = np.random.default_rng(int(thr * 10))
    at_threshold = kept_at_threshold = 0
    for kind in ("int", "float32", "float64"):
        for n, classes in ((300, 3), (1400, 6)):  # one torchvision call / a loop over classes
            boxes, scores, labels = random_case(rng, n, kind, thr, classes)
            want = reference_per_class(boxes.tolist(), scores.tolist(), labels.tolist(), thr)
            with monkeypatch.context() as m:
                if kind != "float64":  # the fast path alone must do integer and float32 boxes
                    m.setattr(box_ops, "_greedy_exact", _forbidden)
                assert all_ways(boxes, scores, labels, thr) == want, (kind, n)
            with monkeypatch.context() as m:  # the exact loop alone
                m.setattr(box_ops, "_float64_exact", lambda *a, **k: False)
                assert all_ways(boxes, scores, labels, thr) == want, (kind, n)
            for c in np.unique(labels):  # nms_exact per class
                idx = np.flatnonzero(labels == c)
                got = idx[nms_exact(boxes[idx], scores[idx], thr)].tolist()
                assert got == [i for i in want if labels[i] == c]
            kept = np.zeros(n, bool)
            kept[want] = True
            for c in np.unique(labels):
                idx = np.flatnonzero(labels == c)
                u, v = np.triu_indices(len(idx), 1)
                on = iou_matrix_mex(boxes[idx].astype(np.float64))[u, v] == thr
                at_threshold += int(on.sum())
                kept_at_threshold += int((kept[idx[u]] & kept[idx[v]])[on].sum())
    assert at_threshold > 50 and kept_at_threshold > 10  # the boundary is exercised


def _forbidden(*args, **kwargs):
    raise AssertionError("the exact fallback ran where the torchvision path should")


def test_fast_path_on_detector_like_input(monkeypatch):
    # 2000 proposals x 20 classes in float32, as Detector.detect passes them (integers for the
    # first NMS, regressed and clipped for the second): torchvision does all of it (the exact
    # loop is forbidden), and the result equals nms_exact's per class
    rng = np.random.default_rng(5)
    xy = rng.integers(0, 400, (2000, 2))
    boxes = np.tile(np.concatenate([xy, xy + rng.integers(8, 200, (2000, 2))], 1), (20, 1)).astype(np.float32)
    scores = rng.normal(size=40000).astype(np.float32)
    labels = np.repeat(np.arange(1, 21), 2000)
    for b in (boxes, (boxes + rng.normal(0, 2, boxes.shape)).clip(0, 599).astype(np.float32)):
        exact = np.concatenate([np.flatnonzero(labels == c)[nms_exact(b[labels == c], scores[labels == c], 0.3)]
                                for c in range(1, 21)])
        with monkeypatch.context() as m:
            m.setattr(box_ops, "_greedy_exact", _forbidden)
            got = nms_per_class(torch.from_numpy(b), torch.from_numpy(scores), torch.from_numpy(labels), 0.3)
        assert sorted(got.tolist()) == sorted(exact.tolist())
        assert (np.diff(scores[got.numpy()]) <= 0).all()


def test_arbitrary_doubles_take_the_exact_loop():
    # A = [0, 0, 15.5 + 3 * 2^-49, 9], B = [7, 0, 19, 9]. A's x2 uses the last bit of [8, 16);
    # x2 + 1 lands in [16, 32), where the spacing doubles, and rounds up by 2^-49. So
    # torchvision's width on exclusive ends, (x2 + 1) - x1, is 2^-49 wider than nms_mex's
    # (x2 - x1) + 1, and its IoU one ulp larger. With the threshold set to nms_mex's IoU, nms_mex
    # keeps both; torchvision on these doubles would drop B. `_float64_exact` sees that these
    # coordinates are not safe, and the exact loop gives nms_mex's answer.
    a, b = [0.0, 0.0, 15.5 + 3 * 2.0 ** -49, 9.0], [7.0, 0.0, 19.0, 9.0]
    thr = iou_mex(a, b)
    assert thr == pytest.approx(0.475)
    assert not box_ops._float64_exact(np.array([a, b]))
    assert nms_exact([a, b], [0.9, 0.8], thr).tolist() == [0, 1]
    assert all_ways([a, b], [0.9, 0.8], [1, 1], thr) == [0, 1]
    with pytest.MonkeyPatch.context() as m:  # what skipping the check would give
        m.setattr(box_ops, "_float64_exact", lambda *args, **kwargs: True)
        assert all_ways([a, b], [0.9, 0.8], [1, 1], thr) == [0]



def test_few_boxes_run_the_exact_loop_with_the_same_result(monkeypatch):
    rng = np.random.default_rng(5)
    xy = rng.integers(0, 50, (40, 2))
    boxes = np.concatenate([xy, xy + rng.integers(5, 30, (40, 2))], 1).astype(np.float32)
    scores, labels = rng.integers(0, 6, 40).astype(np.float32), rng.integers(0, 3, 40)
    fast = box_ops.nms_per_class(boxes, scores, labels, 0.3)
    monkeypatch.setattr(box_ops, "_EXACT_LOOP_MAX_BOXES", 64)
    monkeypatch.setattr(box_ops, "_float64_exact", lambda *a, **k: pytest.fail("torchvision path taken"))
    assert box_ops.nms_per_class(boxes, scores, labels, 0.3).tolist() == fast.tolist()
