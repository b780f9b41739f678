"""VOC evaluator: hand-worked cases, a loop transliteration of VOCevaldet.m on random cases,
results files, COCO, and the evaluate.py script.

Boxes below are 0-based inclusive [x1, y1, x2, y2]; a box [0, 0, 9, 9] is 10 x 10 = 100 px.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sppdet.evaluation import (METRIC_NAMES, METRICS, VOC07_PY_THRESHOLDS, VOC07_THRESHOLDS,
                               ClassDetections, VOCEvaluator, coco_ap, collect_detections,
                               evaluate_class, evaluate_detections, format_ap_table,
                               matlab_colon, read_results_file, read_results_files,
                               to_coco_ground_truth, to_coco_results, voc_ap,
                               write_results_files)
from sppdet.utils import SppdetError
from sppdet.voc import ImageRecord

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# helpers


def gt(*images):
    """gt(("a", [box, ...], [difficult, ...]), ...) -> the mapping evaluate_class takes."""
    return {i: (np.asarray(b, np.float64).reshape(-1, 4), np.asarray(d, bool)) for i, b, d in images}


def dets(*rows):
    """dets((image_id, score, x1, y1, x2, y2), ...) in file order."""
    return ClassDetections([r[0] for r in rows], [r[1] for r in rows], [r[2:] for r in rows])


def record(image_id, boxes=(), labels=(), difficult=None):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(labels, np.int64)
    diff = np.zeros(len(labels), bool) if difficult is None else np.asarray(difficult, bool)
    return ImageRecord(image_id=image_id, path=Path(f"{image_id}.jpg"), width=100, height=100,
                       boxes=boxes, labels=labels, difficult=diff, truncated=np.zeros(len(labels), bool))


B = [0, 0, 9, 9]  # the usual ground-truth box


def ap_both(g, d):
    """(AP07, AP10). AP07 adds p / 11 eleven times as the devkit does, so a perfect class
    scores 1.0000000000000002; hence the approx(abs=1e-15) comparisons."""
    return evaluate_class(g, d, "voc07").ap, evaluate_class(g, d, "voc10").ap


# --------------------------------------------------------------------------------------------
# hand-worked cases


def test_iou_exactly_half_matches_and_just_below_does_not():
    g = gt(("a", [B], [0]))
    # det 10 x 20 = 200 px over the 100 px box: inter 100, union 200 + 100 - 100 = 200 -> 0.5
    # exactly, a match (>= 0.5). Without the +1 widths it would be 81 / 171 = 0.47, no match.
    r = evaluate_class(g, dets(("a", 1.0, 0, 0, 9, 19)))
    assert r.tp.tolist() == [1] and r.fp.tolist() == [0] and r.ap == pytest.approx(1.0, abs=1e-15)
    # one more row: 10 x 21 = 210 px -> 100 / 210 = 0.476 -> FP, AP 0
    r = evaluate_class(g, dets(("a", 1.0, 0, 0, 9, 20)))
    assert r.tp.tolist() == [0] and r.fp.tolist() == [1] and r.ap == 0.0
    # larger boxes: 100 x 100 GT, 100 x 201 det -> 10000 / 20100 = 0.4975 -> FP
    g = gt(("a", [[0, 0, 99, 99]], [0]))
    assert evaluate_class(g, dets(("a", 1.0, 0, 0, 99, 200))).fp.tolist() == [1]
    assert evaluate_class(g, dets(("a", 1.0, 0, 0, 99, 199))).tp.tolist() == [1]


def test_touching_boxes_overlap_by_one_pixel_and_disjoint_do_not():
    # det [9, 0, 18, 9] shares column 9 with B: iw = 9 - 9 + 1 = 1 -> IoU 10 / 190 (a FP, but
    # it overlaps); det [10, 0, 19, 9]: iw = 0 -> no overlap at all. Both FP; AP 0.
    g = gt(("a", [B], [0]))
    r = evaluate_class(g, dets(("a", 1.0, 9, 0, 18, 9), ("a", 0.5, 10, 0, 19, 9)))
    assert r.fp.tolist() == [1, 1] and r.ap == 0.0


def test_duplicate_detection_is_false_positive():
    # one GT; two detections on it: 0.9 -> TP, 0.8 -> duplicate FP.
    # prec = [1, 0.5], rec = [1, 1]; AP07 = AP10 = 1 (max precision at every recall is 1)
    g = gt(("a", [B], [0]))
    r = evaluate_class(g, dets(("a", 0.8, *B), ("a", 0.9, *B)))
    assert r.order.tolist() == [1, 0]
    assert r.tp.tolist() == [1, 0] and r.fp.tolist() == [0, 1]
    np.testing.assert_array_equal(r.precision, [1.0, 0.5])
    assert ap_both(g, dets(("a", 0.8, *B), ("a", 0.9, *B))) == pytest.approx((1.0, 1.0), abs=1e-15)


def test_difficult_best_match_is_ignored_even_when_a_normal_box_also_overlaps():
    # GT1 difficult [0,0,9,9] (100 px), GT2 normal [0,0,9,11] (120 px); npos = 1.
    # d1 = [0,0,9,9]: IoU 1 with GT1, 100/120 = 0.83 with GT2 -> best is GT1 (difficult) -> ignored.
    g = gt(("a", [B, [0, 0, 9, 11]], [1, 0]))
    r = evaluate_class(g, dets(("a", 0.9, *B)))
    assert r.npos == 1 and r.tp.tolist() == [0] and r.fp.tolist() == [0]
    assert r.precision.tolist() == [0.0] and r.ap == 0.0  # the devkit gets NaN here
    # d2 = [0,0,9,11]: IoU 1 with GT2 (0.83 with GT1) -> TP. tp = [0, 1], fp = [0, 0]
    d = dets(("a", 0.9, *B), ("a", 0.8, 0, 0, 9, 11))
    r = evaluate_class(g, d)
    assert r.tp.tolist() == [0, 1] and r.fp.tolist() == [0, 0]
    assert ap_both(g, d) == pytest.approx((1.0, 1.0), abs=1e-15)


def test_precision_is_zero_not_nan_before_anything_counts():
    # image a: one difficult box; image b: one normal box; npos = 1.
    # d1 (0.9) on the difficult box -> ignored: cumsum tp = fp = 0 -> precision 0 (not 0/0).
    # d2 (0.8) -> TP. prec = [0, 1], rec = [0, 1]; AP07: max(prec[rec >= t]) = 1 for every t
    # -> 1; AP10: mrec [0, 0, 1, 1], envelope [1, 1, 1, 0] -> (1 - 0) * 1 = 1.
    g = gt(("a", [B], [1]), ("b", [B], [0]))
    d = dets(("a", 0.9, *B), ("b", 0.8, *B))
    r = evaluate_class(g, d)
    np.testing.assert_array_equal(r.precision, [0.0, 1.0])
    np.testing.assert_array_equal(r.recall, [0.0, 1.0])
    assert ap_both(g, d) == pytest.approx((1.0, 1.0), abs=1e-15)


def test_argmax_includes_already_matched_boxes():
    # GT1 [0,0,9,9] and GT2 [0,0,9,11], both normal; npos = 2.
    # d1 (0.9) = GT1 -> TP (marks GT1). d2 (0.8) = GT1 again: best is GT1 (IoU 1; GT2 only
    # 0.83 but unmatched) -> FP, not a TP on GT2. d3 (0.7) = GT2 -> TP.
    # tp = [1, 0, 1]; prec = [1, 1/2, 2/3]; rec = [1/2, 1/2, 1].
    # AP07: t = 0 .. 0.5 (6 points) -> 1; t = 0.6 .. 1 (5 points) -> 2/3: (6 + 10/3) / 11 = 28/33
    # AP10: envelope [1, 1, 2/3]: 0.5 * 1 + 0.5 * 2/3 = 5/6
    g = gt(("a", [B, [0, 0, 9, 11]], [0, 0]))
    d = dets(("a", 0.9, *B), ("a", 0.8, *B), ("a", 0.7, 0, 0, 9, 11))
    r = evaluate_class(g, d)
    assert r.tp.tolist() == [1, 0, 1] and r.fp.tolist() == [0, 1, 0]
    ap07, ap10 = ap_both(g, d)
    assert ap07 == pytest.approx(28 / 33, abs=1e-15)
    assert ap10 == pytest.approx(5 / 6, abs=1e-15)


@pytest.mark.parametrize("difficult, expect_tp", [([1, 0], 0), ([0, 1], 1)])
def test_equal_iou_picks_the_first_box_in_xml_order(difficult, expect_tp):
    # det [0,5,9,24] (200 px) vs GT1 [0,0,9,19] and GT2 [0,10,9,29] (200 px each): both
    # intersections are 10 x 15 = 150 -> IoU 150 / 250 = 0.6 for both. The first (GT1) wins:
    # GT1 difficult -> ignored (tp 0, fp 0); GT2 difficult -> TP on GT1.
    g = gt(("a", [[0, 0, 9, 19], [0, 10, 9, 29]], difficult))
    r = evaluate_class(g, dets(("a", 1.0, 0, 5, 9, 24)))
    assert r.tp.tolist() == [expect_tp] and r.fp.tolist() == [0]


def test_score_ties_keep_file_order():
    # image a has one box, image b none. Same score 0.5 for a FP (on b) and a TP (on a).
    # FP first: prec = [0, 1/2], rec = [0, 1] -> AP07 = AP10 = 0.5
    # TP first: prec = [1, 1/2], rec = [1, 1] -> AP07 = AP10 = 1
    g = gt(("a", [B], [0]), ("b", [], []))
    assert ap_both(g, dets(("b", 0.5, *B), ("a", 0.5, *B))) == pytest.approx((0.5, 0.5), abs=1e-15)
    assert ap_both(g, dets(("a", 0.5, *B), ("b", 0.5, *B))) == pytest.approx((1.0, 1.0), abs=1e-15)
    # a long run of ties (past numpy's insertion-sort cutoff) still comes out in file order
    rng = np.random.default_rng(0)
    pattern = rng.random(500) < 0.5  # True -> on a box (first one per image is a TP)
    ids = [f"i{n}" for n in range(500)]
    g = gt(*[(i, [B], [0]) for i in ids], ("b", [], []))
    d = ClassDetections([i if p else "b" for i, p in zip(ids, pattern)], np.full(500, 0.5),
                        np.tile(B, (500, 1)))
    r = evaluate_class(g, d)
    np.testing.assert_array_equal(r.order, np.arange(500))
    np.testing.assert_array_equal(r.tp, pattern.astype(float))


# --------------------------------------------------------------------------------------------
# the 11 thresholds: MATLAB's 0:0.1:1 (voc07) and numpy.arange (voc07_py)


def test_voc07_thresholds_are_matlabs_and_voc07_py_are_numpys():
    # written out as literals: 0.30000000000000004 is 3 * 0.1; 0.6 and 0.7 are the doubles
    # nearest 0.6 and 0.7 (MATLAB's 1 - 0.4 and 1 - 0.3)
    assert VOC07_THRESHOLDS.tolist() == [0, 0.1, 0.2, 0.30000000000000004, 0.4, 0.5, 0.6, 0.7, 0.8,
                                         0.9, 1.0]
    assert VOC07_PY_THRESHOLDS.tolist() == np.arange(0, 1.1, 0.1).tolist()
    assert VOC07_PY_THRESHOLDS[6] == 0.6000000000000001 and VOC07_PY_THRESHOLDS[7] == 0.7000000000000001
    # they differ exactly at 0.6 and 0.7
    assert np.flatnonzero(VOC07_THRESHOLDS != VOC07_PY_THRESHOLDS).tolist() == [6, 7]
    assert set(METRICS) >= {"voc07", "voc07_py", "voc10"} and "voc07_py" in METRIC_NAMES


def test_matlab_colon_is_symmetric_and_matches_matlab_output():
    # A MATLAB session reported on MATLAB Answers ("Floating point accuracy and COLON"):
    # x = 0:0.1:0.3; y = 0:0.1:0.4; x - y(1:end-1) = 1e-16 * [0 0 -0.2776 -0.5551]:
    # x ends at 0.3 exactly and x(3) = 0.3 - 0.1, while y(4) = 0.4 - 0.1 = 0.30000000000000004.
    x, y = matlab_colon(0, 0.1, 0.3), matlab_colon(0, 0.1, 0.4)
    assert (x - y[:-1]).tolist() == [0.0, 0.0, -2.0 ** -55, -2.0 ** -54]
    # -1:0.01:1 is 201 values symmetric about 0, with 0 exactly in the middle
    v = matlab_colon(-1, 0.01, 1)
    assert len(v) == 201 and v[100] == 0.0 and (v == -v[::-1]).all()
    # an even count has the exact midpoint (a + c) / 2: 0:0.1:0.6 has 0.3 in the middle, where
    # 0 + 3 * 0.1 = 0.30000000000000004 and 0.6 - 3 * 0.1 = 0.29999999999999993
    v = matlab_colon(0, 0.1, 0.6)
    assert v[3] == 0.3 and v[2] == 0.2 and v[4] == 0.6 - 0.2 and v[6] == 0.6
    # a step that does not divide the range: n = 3, c = 3 * 0.3 = 0.8999999999999999 (not
    # snapped to 1), and the second half counts back from c: c - 0.3 = 0.5999999999999999
    assert matlab_colon(0, 0.3, 1).tolist() == [0, 0.3, 0.8999999999999999 - 0.3, 0.8999999999999999]
    assert matlab_colon(1, -0.1, 0).tolist() == matlab_colon(0, 0.1, 1)[::-1].tolist()
    assert matlab_colon(0, 1, 0).tolist() == [0.0] and matlab_colon(1, 1, 0).size == 0


def ten_boxes_and(flags):
    """npos = 10 (images i0..i9, one box each); detections in decreasing score, flag True = a TP
    on the next unmatched box, False = a FP (on image "e", which has no objects)."""
    g = gt(*[(f"i{n}", [B], [0]) for n in range(10)], ("e", [], []))
    rows, n = [], 0
    for k, hit in enumerate(flags):
        rows.append((f"i{n}" if hit else "e", 1.0 - k / 100, *B))
        n += hit
    return g, dets(*rows)


def test_recall_exactly_03_misses_the_03_threshold_in_both():
    # npos = 10, 3 TPs: rec = 0.1, 0.2, 0.3 (3/10 is the double nearest 0.3), prec = 1.
    # t[3] = 0.30000000000000004 > 0.3 in both threshold sets, so only t = 0, 0.1, 0.2 count:
    # AP07 = AP07_py = 3/11 (not 4/11). AP10 = 0.1 + 0.1 + 0.1 = 0.3.
    assert VOC07_THRESHOLDS[3] > 0.3 and VOC07_PY_THRESHOLDS[3] > 0.3
    g, d = ten_boxes_and([True] * 3)
    r = evaluate_class(g, d)
    assert r.recall[-1] == 0.3
    assert r.ap == pytest.approx(3 / 11, abs=1e-15)
    assert evaluate_class(g, d, "voc07_py").ap == pytest.approx(3 / 11, abs=1e-15)
    assert evaluate_class(g, d, "voc10").ap == pytest.approx(0.3, abs=1e-15)


def test_recall_exactly_06_reaches_06_under_matlab_thresholds_only():
    # npos = 10; T T F T T T T: ctp = 1 2 2 3 4 5 6, cfp = 0 0 1 1 1 1 1
    # prec = 1, 1, 2/3, 3/4, 4/5, 5/6, 6/7; rec = .1, .2, .2, .3, .4, .5, .6 (6/10 = the double
    # nearest 0.6)
    # t = 0, .1, .2: max prec = 1 (3 points)
    # t = .30000000000000004, .4, .5: rec >= t are .4, .5, .6 -> max(4/5, 5/6, 6/7) = 6/7
    # t = 0.6: voc07 (MATLAB, 0.6) reaches rec .6 -> 6/7; voc07_py (0.6000000000000001) -> 0
    # t = .7 .. 1: 0
    # voc07 = (3 + 4 * 6/7) / 11 = 45/77; voc07_py = (3 + 3 * 6/7) / 11 = 39/77
    g, d = ten_boxes_and([True, True, False, True, True, True, True])
    r = evaluate_class(g, d, "voc07")
    assert r.recall[-1] == 0.6
    assert r.ap == pytest.approx(45 / 77, abs=1e-15)
    assert evaluate_class(g, d, "voc07_py").ap == pytest.approx(39 / 77, abs=1e-15)
    # the same with npos = 5 and 3 TPs (3/5 is the same double): rec = .2, .4, .6, prec 1
    # -> voc07 7/11 (t = 0 .. 0.6), voc07_py 6/11 (t = 0 .. 0.5)
    g = gt(*[(f"i{n}", [B], [0]) for n in range(5)])
    d = dets(*[(f"i{n}", 1.0 - n / 10, *B) for n in range(3)])
    assert evaluate_class(g, d).ap == pytest.approx(7 / 11, abs=1e-15)
    assert evaluate_class(g, d, "voc07_py").ap == pytest.approx(6 / 11, abs=1e-15)


def test_recall_exactly_07_reaches_07_under_matlab_thresholds_only():
    # npos = 10; T T T T T T F T: ctp = 1..6 6 7, cfp = 0 x6, 1, 1
    # prec = 1 (x6), 6/7, 7/8; rec = .1 .. .6, .6, .7 (7/10 = the double nearest 0.7)
    # voc07 (MATLAB): t = 0 .. 0.6 (7 points) -> 1 (rec .6 has prec 1); t = 0.7 reaches rec .7
    #   -> 7/8; t = .8, .9, 1 -> 0: AP = (7 + 7/8) / 11 = 63/88
    # voc07_py: t = 0 .. 0.5 (6 points) -> 1; t = 0.6000000000000001 > rec .6, so only rec .7
    #   -> 7/8; t = 0.7000000000000001 > .7 -> 0: AP = (6 + 7/8) / 11 = 55/88 = 5/8
    g, d = ten_boxes_and([True] * 6 + [False, True])
    r = evaluate_class(g, d, "voc07")
    assert r.recall[-1] == 0.7
    assert r.ap == pytest.approx(63 / 88, abs=1e-15)
    assert evaluate_class(g, d, "voc07_py").ap == pytest.approx(5 / 8, abs=1e-15)


def test_recall_03_06_07_in_one_curve():
    # npos = 10; T T T F T T T F T F: ctp = 1 2 3 3 4 5 6 6 7 7, cfp = 0 0 0 1 1 1 1 2 2 3
    # rec = .1 .2 .3 .3 .4 .5 .6 .6 .7 .7; prec = 1 1 1 3/4 4/5 5/6 6/7 6/8 7/9 7/10
    # t = 0, .1, .2: 1 (3 points); t = .30000000000000004 (misses rec .3 in both), .4, .5:
    #   max over rec >= .4 = max(4/5, 5/6, 6/7, 3/4, 7/9, 7/10) = 6/7 (3 points)
    # voc07: t = 0.6 -> 6/7; t = 0.7 -> max(7/9, 7/10) = 7/9; t = .8 .. 1 -> 0
    #   = (3 + 4 * 6/7 + 7/9) / 11 = (189 + 216 + 49) / 63 / 11 = 454/693
    # voc07_py: t = 0.6000000000000001 -> rec .7 only -> 7/9; t = 0.7000000000000001 -> 0
    #   = (3 + 3 * 6/7 + 7/9) / 11 = (189 + 162 + 49) / 63 / 11 = 400/693
    g, d = ten_boxes_and([True, True, True, False, True, True, True, False, True, False])
    assert evaluate_class(g, d, "voc07").ap == pytest.approx(454 / 693, abs=1e-15)
    assert evaluate_class(g, d, "voc07_py").ap == pytest.approx(400 / 693, abs=1e-15)


def test_envelope_numbers_voc07_and_voc10():
    # npos = 4 (images a, b, c, d one box each; e has no objects).
    # score order: TP(a), FP(a, duplicate), TP(b), FP(e), TP(c)
    # tp cum = 1 1 2 2 3; fp cum = 0 1 1 2 2
    # prec = 1, 1/2, 2/3, 1/2, 3/5; rec = 1/4, 1/4, 1/2, 1/2, 3/4
    # AP10: mrec = [0, .25, .25, .5, .5, .75, 1], envelope = [1, 1, 2/3, 2/3, .6, .6, 0]
    #       = .25 * 1 + .25 * 2/3 + .25 * .6 + .25 * 0 = 0.5666...
    # AP07: t = 0, .1, .2 -> 1; t = .3, .4, .5 -> 2/3; t = .6, .7 -> .6; t = .8, .9, 1 -> 0
    #       = (3 + 2 + 1.2) / 11 = 6.2 / 11
    g = gt(("a", [B], [0]), ("b", [B], [0]), ("c", [B], [0]), ("d", [B], [0]), ("e", [], []))
    d = dets(("a", 0.9, *B), ("a", 0.8, *B), ("b", 0.7, *B), ("e", 0.6, *B), ("c", 0.5, *B))
    r = evaluate_class(g, d)
    np.testing.assert_allclose(r.precision, [1, 1 / 2, 2 / 3, 1 / 2, 3 / 5], rtol=0, atol=1e-15)
    np.testing.assert_allclose(r.recall, [.25, .25, .5, .5, .75], rtol=0, atol=1e-15)
    ap07, ap10 = ap_both(g, d)
    assert ap10 == pytest.approx(0.25 + 0.25 * 2 / 3 + 0.25 * 0.6, abs=1e-15)
    assert ap07 == pytest.approx(6.2 / 11, abs=1e-15)
    # no recall lands on 0.6 or 0.7 exactly: voc07_py agrees
    assert evaluate_class(g, d, "voc07_py").ap == ap07


def test_voc_ap_on_given_curves():
    # monotone precision 1 up to recall 0.5, nothing after: AP07 = 6/11 (t = 0..0.5), AP10 = 0.5
    assert voc_ap([0.25, 0.5], [1.0, 1.0], "voc07") == pytest.approx(6 / 11, abs=1e-15)
    assert voc_ap([0.25, 0.5], [1.0, 1.0], "voc07_py") == pytest.approx(6 / 11, abs=1e-15)
    # recall 0.7 reached: MATLAB's t = 0.7 counts it (8 points), numpy's 0.7000000000000001 not
    assert voc_ap([0.7], [1.0], "voc07") == pytest.approx(8 / 11, abs=1e-15)
    assert voc_ap([0.7], [1.0], "voc07_py") == pytest.approx(7 / 11, abs=1e-15)
    assert voc_ap([0.25, 0.5], [1.0, 1.0], "voc10") == 0.5
    # a dip is bridged by the envelope: prec (1, .25, .5) at rec (.5, .5, 1) -> .5 * 1 + .5 * .5
    assert voc_ap([0.5, 0.5, 1.0], [1.0, 0.25, 0.5], "voc10") == 0.75
    assert voc_ap([], [], "voc07") == 0.0 and voc_ap([], [], "voc10") == 0.0
    assert voc_ap([], [], "voc07_py") == 0.0
    with pytest.raises(ValueError):
        voc_ap([1.0], [1.0], "area51")


def test_empty_class_and_class_without_positives_and_images_without_objects():
    classes = ("car", "dog", "cat")
    records = [
        record("1", [B, [20, 20, 39, 39]], [1, 2], [0, 1]),  # car, dog (difficult)
        record("2"),  # no objects: part of the split, a detection there is a FP
        record("3", [[50, 50, 59, 59]], [1]),  # car
    ]
    detections = {
        # car: TP on 1, FP on the empty image 2, TP on 3 -> prec 1, 1/2, 2/3 at rec .5, .5, 1
        # -> AP07 = (6 * 1 + 5 * 2/3) / 11 = 28/33
        "car": dets(("1", 0.9, *B), ("2", 0.8, *B), ("3", 0.7, 50, 50, 59, 59)),
        # dog: only a difficult box -> no positives; its detection is ignored -> AP 0, no NaN
        "dog": dets(("1", 0.9, 20, 20, 39, 39), ("2", 0.5, *B)),
        # cat: no detections at all (key absent) -> AP 0
    }
    result = evaluate_detections(records, detections, classes, "voc07")
    # plain rows (image_id, score, box) are accepted too
    rows = {"car": [("1", 0.9, B), ("2", 0.8, B), ("3", 0.7, [50, 50, 59, 59])]}
    assert evaluate_detections(records, rows, classes)["ap"]["car"] == result["ap"]["car"]
    assert result["ap"]["car"] == pytest.approx(28 / 33, abs=1e-15)
    assert result["ap"]["dog"] == 0.0 and result["ap"]["cat"] == 0.0
    assert result["npos"] == {"car": 2, "dog": 0, "cat": 0}
    assert result["num_detections"] == {"car": 3, "dog": 2, "cat": 0}
    assert result["map"] == pytest.approx(28 / 33 / 3, abs=1e-15)
    assert all(not math.isnan(v) for v in result["ap"].values())
    table = format_ap_table(result, context="toy")
    assert "VOC07 11-point" in table and "mAP" in table and "28.3" in table  # 84.8 / 3
    assert "no positives" in table.splitlines()[4]  # the dog row
    assert "no detections" in table.splitlines()[5]  # the cat row
    assert "MATLAB" in table.splitlines()[0]
    # voc07_py is accepted everywhere voc07 is, and named in the table (car: rec .5, 1 -> same AP)
    result_py = evaluate_detections(records, detections, classes, "voc07_py")
    assert result_py["metric"] == "voc07_py" and result_py["ap"] == result["ap"]
    table_py = format_ap_table(result_py)
    assert "numpy.arange" in table_py.splitlines()[0] and "(voc07_py, mean over 3 classes)" in table_py


def test_detection_on_image_not_in_split_is_an_error():
    g = gt(("a", [B], [0]))
    with pytest.raises(SppdetError, match="'zz'"):
        evaluate_class(g, dets(("a", 0.9, *B), ("zz", 0.8, *B)))


def test_evaluator_accumulates_per_image_output():
    classes = ("car", "dog")
    records = [record("1", [B, [20, 20, 39, 39]], [1, 2]), record("2", [B], [1])]
    ev = VOCEvaluator(records, classes)
    ev.process("1", [B, [20, 20, 39, 39], B], [0.9, 0.8, 0.7], [1, 2, 1])  # TP car, TP dog, dup FP
    ev.process("2", np.zeros((0, 4)), [], [])
    # car: prec 1, 1/2 at rec 1/2, 1/2 -> AP07 = 6/11; dog: AP 1
    result = ev.evaluate()
    assert result["ap"] == pytest.approx({"car": 6 / 11, "dog": 1.0}, abs=1e-15)
    assert ev.detections["car"].image_ids == ["1", "1"]
    ev_py = VOCEvaluator(records, classes, metric="voc07_py")
    ev_py._per_image = ev._per_image
    assert ev_py.evaluate()["ap"] == result["ap"]
    with pytest.raises(SppdetError, match="voc07_py"):
        VOCEvaluator(records, classes, metric="voc07_matlab")


# --------------------------------------------------------------------------------------------
# against a loop transliteration of VOCevaldet.m


def reference_evaldet(gt_by_image, rows, npos_only_nondifficult=True):
    """VOCevaldet.m line by line: rows are (image_id, score, x1, y1, x2, y2)."""
    order = sorted(range(len(rows)), key=lambda d: -rows[d][1])  # Python's sort is stable
    matched = {i: [False] * len(gt_by_image[i][0]) for i in gt_by_image}
    npos = sum(int(not f) for i in gt_by_image for f in gt_by_image[i][1])
    tp, fp = [], []
    for d in order:
        image_id, _, *bb = rows[d]
        boxes, diff = gt_by_image[image_id]
        ovmax, jmax = -math.inf, None
        for j, g in enumerate(boxes):
            bi = [max(bb[0], g[0]), max(bb[1], g[1]), min(bb[2], g[2]), min(bb[3], g[3])]
            iw = bi[2] - bi[0] + 1
            ih = bi[3] - bi[1] + 1
            if iw > 0 and ih > 0:
                ua = (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (g[2] - g[0] + 1) * (g[3] - g[1] + 1) - iw * ih
                ov = iw * ih / ua
                if ov > ovmax:
                    ovmax, jmax = ov, j
        t = f = 0
        if ovmax >= 0.5:
            if not diff[jmax]:
                if not matched[image_id][jmax]:
                    t = 1
                    matched[image_id][jmax] = True
                else:
                    f = 1
        else:
            f = 1
        tp.append(t)
        fp.append(f)
    ctp = cfp = 0
    rec, prec = [], []
    for t, f in zip(tp, fp):
        ctp, cfp = ctp + t, cfp + f
        rec.append(ctp / npos if npos else math.nan)
        prec.append(ctp / (ctp + cfp) if ctp + cfp else 0.0)
    if npos == 0 or not rows:
        return tp, fp, 0.0, 0.0, 0.0
    ap07, ap07_py = 0.0, 0.0
    # the devkit's `for t=0:0.1:1` as MATLAB builds it, written out; and numpy's arange
    for t in [0, 0.1, 0.2, 0.1 * 3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]:
        ps = [p for r, p in zip(rec, prec) if r >= t]
        ap07 += (max(ps) if ps else 0.0) / 11
    for t in np.arange(0, 1.1, 0.1):
        ps = [p for r, p in zip(rec, prec) if r >= t]
        ap07_py += (max(ps) if ps else 0.0) / 11
    mrec, mpre = [0.0] + rec + [1.0], [0.0] + prec + [0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    ap10 = 0.0
    for i in range(1, len(mrec)):
        if mrec[i] != mrec[i - 1]:
            ap10 += (mrec[i] - mrec[i - 1]) * mpre[i]
    return tp, fp, ap07, ap07_py, ap10


def random_case(rng):
    n_images = int(rng.integers(1, 6))
    gt_by_image = {}
    for n in range(n_images):
        k = int(rng.integers(0, 5))
        xy = rng.integers(0, 16, size=(k, 2))
        wh = rng.integers(1, 12, size=(k, 2))  # some boxes are 1 px wide
        boxes = np.concatenate([xy, xy + wh - 1], axis=1).astype(float)
        if k and rng.random() < 0.3:
            boxes[-1] = boxes[0]  # an exact duplicate box (tie in the argmax)
        gt_by_image[f"im{n}"] = (boxes.tolist(), (rng.random(k) < 0.3).tolist())
    rows = []
    for _ in range(int(rng.integers(0, 30))):
        image_id = f"im{int(rng.integers(n_images))}"
        boxes = gt_by_image[image_id][0]
        score = float(rng.integers(0, 6)) / 5  # few distinct scores -> many ties
        if boxes and rng.random() < 0.7:  # near a box: jitter by whole pixels (IoU ties, 0.5s)
            b = np.asarray(boxes[int(rng.integers(len(boxes)))]) + rng.integers(-2, 3, size=4)
        else:
            xy = rng.integers(0, 16, size=2)
            b = np.concatenate([xy, xy + rng.integers(1, 12, size=2) - 1])
        if rng.random() < 0.2:
            b = b + rng.choice([0.25, 0.5])  # fractional coordinates as well
        rows.append((image_id, score, *map(float, b)))
    return gt_by_image, rows


def test_matches_loop_reference_on_random_cases():
    rng = np.random.default_rng(2007)
    exact_half = differ = 0
    for _ in range(400):
        gt_by_image, rows = random_case(rng)
        g = {i: (np.asarray(b, float).reshape(-1, 4), np.asarray(d, bool)) for i, (b, d) in gt_by_image.items()}
        d = ClassDetections([r[0] for r in rows], [r[1] for r in rows], [r[2:] for r in rows])
        tp, fp, ap07, ap07_py, ap10 = reference_evaldet(gt_by_image, rows)
        r07 = evaluate_class(g, d, "voc07")
        r07_py = evaluate_class(g, d, "voc07_py")
        r10 = evaluate_class(g, d, "voc10")
        assert r07.tp.tolist() == tp and r07.fp.tolist() == fp
        assert abs(r07.ap - ap07) <= 1e-12 and abs(r10.ap - ap10) <= 1e-12
        assert abs(r07_py.ap - ap07_py) <= 1e-12
        differ += ap07 != ap07_py
        exact_half += sum(1 for r in rows for b in g[r[0]][0] if _iou(r[2:], b) == 0.5)
    assert exact_half > 0  # the random cases do exercise the >= 0.5 boundary
    assert differ > 0  # and recalls of exactly 0.6 or 0.7


def _iou(a, b):
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return -1.0
    return iw * ih / ((a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - iw * ih)


# --------------------------------------------------------------------------------------------
# results files


def test_results_files_round_trip(tmp_path):
    classes = ("car", "dog")
    rng = np.random.default_rng(1)
    records = [record(f"{n:06d}", np.tile(rng.integers(0, 60, size=(3, 2)), 2) + [0, 0, 20, 20],
                      [1, 2, 1], [0, 0, 1]) for n in range(6)]
    detections = {}
    for k, c in enumerate(classes):
        n = 40
        boxes = (rng.random((n, 4)) * 60).astype(np.float32)
        boxes[:, 2:] += boxes[:, :2]
        scores = rng.random(n).astype(np.float32)
        scores[::5] = scores[0]  # ties
        detections[c] = ClassDetections([f"{int(i):06d}" for i in rng.integers(0, 6, n)], scores, boxes)
    paths = write_results_files(tmp_path, "test", classes, detections)
    assert [p.name for p in paths] == ["comp4_det_test_car.txt", "comp4_det_test_dog.txt"]
    back = read_results_files(tmp_path, "test", classes)
    for c in classes:
        assert back[c].image_ids == detections[c].image_ids
        np.testing.assert_array_equal(back[c].scores, detections[c].scores)
        np.testing.assert_array_equal(back[c].boxes, detections[c].boxes)
    for metric in ("voc07", "voc07_py", "voc10"):
        assert evaluate_detections(records, back, classes, metric) == \
            evaluate_detections(records, detections, classes, metric)


def test_results_file_is_one_based(tmp_path):
    write_results_files(tmp_path, "val", ["car"], {"car": dets(("000005", 0.5, 0, 1, 9, 19))})
    assert (tmp_path / "comp4_det_val_car.txt").read_text() == "000005 0.5 1.0 2.0 10.0 20.0\n"
    d = read_results_file(tmp_path / "comp4_det_val_car.txt")
    assert d.boxes.tolist() == [[0, 1, 9, 19]]


@pytest.mark.parametrize("line, problem", [
    ("000005 0.5 1 2 3", "expected 'image_id score x1 y1 x2 y2'"),
    ("000005 high 1 2 3 4", "non-numeric"),
    ("000005 nan 1 2 3 4", "non-finite"),
])
def test_malformed_results_line_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / "comp4_det_test_car.txt"
    path.write_text(f"000005 0.9 1 1 10 10\n\n{line}\n")
    with pytest.raises(SppdetError, match=rf"comp4_det_test_car\.txt:3: {problem}"):
        read_results_files(tmp_path, "test", ["car"])


def test_missing_results_files(tmp_path):
    (tmp_path / "comp4_det_test_car.txt").write_text("000005 0.9 1 1 10 10\n")
    got = read_results_files(tmp_path, "test", ["car", "dog"])
    assert len(got["car"]) == 1 and len(got["dog"]) == 0  # a missing file = no detections
    with pytest.raises(SppdetError, match="splits found: test"):  # none at all: wrong split?
        read_results_files(tmp_path, "val", ["car", "dog"])


def test_results_on_image_not_in_split_names_file_and_line(tmp_path):
    (tmp_path / "comp4_det_test_car.txt").write_text("000005 0.9 1 1 10 10\n000007 0.8 1 1 10 10\n")
    with pytest.raises(SppdetError, match=r"comp4_det_test_car\.txt:2: image id '000007'"):
        read_results_files(tmp_path, "test", ["car"], image_ids=["000005"])
    # without the id list the evaluator still names the file
    records = [record("000005", [B], [1])]
    with pytest.raises(SppdetError, match=r"comp4_det_test_car\.txt: image id '000007'"):
        evaluate_detections(records, read_results_files(tmp_path, "test", ["car"]), ["car"])


def test_collect_detections_groups_by_class_in_order():
    per_image = [("a", [B, B, B], [0.1, 0.2, 0.3], [2, 1, 2]), ("b", [B], [0.4], [2])]
    got = collect_detections(per_image, ("car", "dog"))
    assert got["car"].image_ids == ["a"] and got["car"].scores.tolist() == [0.2]
    assert got["dog"].image_ids == ["a", "a", "b"] and got["dog"].scores.tolist() == [0.1, 0.3, 0.4]
    with pytest.raises(ValueError):
        collect_detections([("a", [B], [0.1], [0])], ("car",))  # 0 is background


# --------------------------------------------------------------------------------------------
# COCO


def test_coco_conversion_and_perfect_detections():
    classes = ("car", "dog")
    records = [record("000005", [B, [20, 20, 39, 49]], [1, 2]),
               record("000007", [[5, 5, 14, 24], [60, 60, 69, 69]], [1, 1], [0, 1])]
    cgt = to_coco_ground_truth(records, classes)
    assert [im["id"] for im in cgt["images"]] == [1, 2]
    assert cgt["images"][0]["voc_id"] == "000005" and cgt["images"][0]["file_name"] == "000005.jpg"
    a = cgt["annotations"][1]
    assert a["bbox"] == [20, 20, 20, 30] and a["area"] == 600 and a["category_id"] == 2
    assert [x["iscrowd"] for x in cgt["annotations"]] == [0, 0, 0, 1]  # difficult -> crowd
    # detections = the non-difficult ground truth (the difficult box is not needed)
    detections = {"car": dets(("000005", 0.9, *B), ("000007", 0.8, 5, 5, 14, 24)),
                  "dog": dets(("000005", 0.7, 20, 20, 39, 49))}
    res = to_coco_results(detections, classes, ["000005", "000007"])
    assert res[0] == {"image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 10.0, 10.0], "score": 0.9}
    out = coco_ap(cgt, res)
    assert out["map"] == pytest.approx(1.0) and out["ap50"] == pytest.approx(1.0)
    assert out["ap"] == pytest.approx({"car": 1.0, "dog": 1.0})
    # the dog box shifted down 3 px: IoU 20*27 / (2*600 - 540) = 0.82, a match at IoU
    # thresholds .50 .. .80 (7 of 10): AP50 stays 1, the dog AP drops to 0.7
    detections["dog"] = dets(("000005", 0.7, 20, 23, 39, 52))
    out = coco_ap(cgt, to_coco_results(detections, classes, ["000005", "000007"]))
    assert out["ap50"] == pytest.approx(1.0) and out["ap"]["car"] == pytest.approx(1.0)
    assert out["ap"]["dog"] == pytest.approx(0.7)
    # pycocotools' full summary: AP (mean of car 1.0 and dog 0.7), AP50, AP75 (the dog box's IoU
    # 0.82 matches at .75), no small objects (area < 32^2 counts as small: the car boxes are),
    # AR at 1 detection per image
    summary = out["summary"]
    assert len(summary) == 12 and list(summary)[0].startswith("AP @[IoU=0.50:0.95 | area=all")
    assert summary["AP @[IoU=0.50:0.95 | area=all | maxDets=100]"] == pytest.approx(0.85)
    assert summary["AP @[IoU=0.75 | area=all | maxDets=100]"] == pytest.approx(1.0)
    assert summary["AR @[IoU=0.50:0.95 | area=all | maxDets=100]"] == pytest.approx(0.85)
    assert summary["AP @[IoU=0.50:0.95 | area=large | maxDets=100]"] == -1.0  # no large objects
    table = format_ap_table({"metric": "coco", **out})
    assert "pycocotools summary" in table and "AR @[IoU=0.50:0.95 | area=small | maxDets=100]" in table
    assert coco_ap(cgt, [])["map"] == 0.0


# --------------------------------------------------------------------------------------------
# the script


def write_devkit(root: Path) -> None:
    """VOC2007 layout: 3 test images (000002 has no objects, 000003 a difficult car)."""
    objects = {"000001": [("car", 0, (1, 1, 10, 10)), ("dog", 0, (21, 21, 40, 40))],
               "000002": [],
               "000003": [("car", 1, (5, 5, 30, 30)), ("car", 0, (50, 50, 60, 60)),
                          ("person", 0, (1, 1, 5, 5))]}
    folder = root / "VOC2007"
    (folder / "ImageSets" / "Main").mkdir(parents=True)
    (folder / "Annotations").mkdir()
    (folder / "ImageSets" / "Main" / "test.txt").write_text("".join(f"{i}\n" for i in objects))
    for image_id, objs in objects.items():
        xml = "".join(
            f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin>"
            f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for n, d, b in objs)
        (folder / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><size><width>100</width><height>100</height><depth>3</depth></size>{xml}</annotation>")


def run_script(*args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_evaluate_script(tmp_path):
    write_devkit(tmp_path / "devkit")
    results = tmp_path / "results"
    results.mkdir()
    # car (1-based lines): TP on 000001, FP on 000002, ignored on 000003's difficult car,
    # TP on 000003 -> tp 1 0 0 1, fp 0 1 0 0; prec 1, 1/2, 1/2, 2/3; rec 1/2, 1/2, 1/2, 1
    # -> AP07 = (6 * 1 + 5 * 2/3) / 11 = 28/33. dog: TP -> 1. No person file -> 0.
    (results / "comp4_det_test_car.txt").write_text(
        "000001 0.9 1 1 10 10\n000002 0.8 1 1 10 10\n000003 0.7 5 5 30 30\n000003 0.6 50 50 60 60\n")
    (results / "comp4_det_test_dog.txt").write_text("000001 0.5 21 21 40 40\n")
    out = tmp_path / "out" / "ap.json"
    common = ["--voc-root", tmp_path / "devkit", "--year", "2007", "--split", "test",
              "--classes", "car,dog,person"]
    p = run_script("--results-dir", results, *common, "--json", out)
    assert p.returncode == 0, p.stderr
    got = json.loads(out.read_text())
    assert set(got) == {"metric", "ap", "map"} and got["metric"] == "voc07"
    assert got["ap"] == pytest.approx({"car": 28 / 33, "dog": 1.0, "person": 0.0}, abs=1e-12)
    assert got["map"] == pytest.approx((28 / 33 + 1) / 3, abs=1e-12)
    assert "VOC07 11-point" in p.stdout and "84.8" in p.stdout and "no results file" in p.stdout

    # a detection on an image outside the split: one line, exit 1, no json
    (results / "comp4_det_test_dog.txt").write_text("000009 0.5 21 21 40 40\n")
    out2 = tmp_path / "out" / "bad.json"
    p = run_script("--results-dir", results, *common, "--json", out2)
    assert p.returncode == 1 and not out2.exists()
    assert p.stderr.strip().count("\n") == 0 and "000009" in p.stderr and "comp4_det_test_dog.txt:1" in p.stderr

    # no devkit there
    p = run_script("--results-dir", results, "--voc-root", tmp_path / "nowhere", "--json", out2)
    assert p.returncode == 1 and p.stderr.startswith("error:") and not out2.exists()
