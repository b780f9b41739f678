"""SVM stage: feature scaling, liblinear wrapper, negative selection, hard-negative mining."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.svm import LinearSVC

from sppdet import boxes as box_ops
from sppdet.heads import LinearSVMScorer
from sppdet.svm import SVMTrainer, feature_scale, fit_svm, svm_objective


def score(features, W, b, scale):
    """The detector's SVM scores of raw features (N, D) as numpy: (features * scale) @ W.T + b."""
    scorer = LinearSVMScorer.from_arrays(W, b, scale)
    return scorer(torch.as_tensor(np.asarray(features, np.float32))).numpy()
from sppdet.utils import SppdetError

D = 10
U = np.eye(D, dtype=np.float32)[0]  # the direction that separates class 1 from background


def far_boxes(n: int, row: int = 0) -> np.ndarray:
    """n disjoint 10x10 boxes on a row far from the ground truth used below (IoU 0 to it)."""
    x = 20.0 * np.arange(n, dtype=np.float32)
    y = np.full(n, 200.0 + 20 * row, np.float32)
    return np.stack([x, y, x + 9, y + 9], 1)


GT = np.array([[0, 0, 49, 49]], np.float32)


def cloud(rng, n: int, centre: float, noise: float = 0.2) -> np.ndarray:
    return (centre * U + noise * rng.standard_normal((n, D))).astype(np.float32)


def test_feature_scale_is_exact():
    x = np.random.default_rng(0).standard_normal((37, 9)) * 3.0
    s = feature_scale(x, target_norm=20.0)
    assert np.linalg.norm(x * s, axis=1).mean() == pytest.approx(20.0, rel=1e-12)
    assert feature_scale(torch.from_numpy(x), 5.0) == pytest.approx(s / 4, rel=1e-12)
    with pytest.raises(SppdetError):
        feature_scale(np.zeros((3, 4)))
    with pytest.raises(SppdetError):
        feature_scale(np.zeros((0, 4)))


def test_scorer_module_computes_scaled_linear_scores():
    rng = np.random.default_rng(1)
    x, W, b = rng.standard_normal((5, 4)), rng.standard_normal((3, 4)), rng.standard_normal(3)
    ref = (x * 2.5) @ W.T + b
    np.testing.assert_allclose(score(x, W, b, 2.5), ref, rtol=1e-5, atol=1e-5)
    scorer = LinearSVMScorer.from_arrays(W, b, 2.5)
    assert set(scorer.state_dict()) == {"weight", "bias", "scale"}  # a module owning its tensors


def test_fit_svm_reproduces_linearsvc_and_objective():
    rng = np.random.default_rng(2)
    pos = rng.standard_normal((60, 8)) + 1.0
    neg = rng.standard_normal((200, 8)) - 0.5
    w, b, _ = fit_svm(pos, neg, C=0.01, pos_weight=2.0, bias_mult=10.0, seed=0)
    clf = LinearSVC(C=0.01, loss="hinge", dual=True, intercept_scaling=10.0,
                    class_weight={1: 2.0, -1: 1.0}, random_state=0, max_iter=10000)
    clf.fit(np.vstack([pos, neg]), np.r_[np.ones(60), -np.ones(200)])
    held = rng.standard_normal((50, 8))
    np.testing.assert_allclose(held @ w + b, clf.decision_function(held), rtol=1e-9, atol=1e-9)
    # Objective terms against a row-by-row evaluation of liblinear's primal with bias feature 10.
    terms = svm_objective(pos, neg, w, b, C=0.01, pos_weight=2.0, bias_mult=10.0)
    wb = np.r_[w, b / 10.0]
    pos_loss = sum(0.01 * 2.0 * max(0.0, 1 - np.r_[p, 10.0] @ wb) for p in pos)
    neg_loss = sum(0.01 * max(0.0, 1 + np.r_[q, 10.0] @ wb) for q in neg)
    assert terms["pos_loss"] == pytest.approx(pos_loss, rel=1e-9)
    assert terms["neg_loss"] == pytest.approx(neg_loss, rel=1e-9)
    assert terms["reg"] == pytest.approx(0.5 * wb @ wb, rel=1e-9)
    # liblinear's dual solution is (close to) the primal optimum: nudging it does not help.
    for _ in range(20):
        delta = 1e-2 * rng.standard_normal(9)
        other = svm_objective(pos, neg, w + delta[:8], b + 10.0 * delta[8], 0.01, 2.0, 10.0)
        assert other["objective"] >= terms["objective"] - 1e-6


def two_class_image():
    """Ground truth of class 1 and 2 and proposals whose IoU with them is known exactly."""
    gt_boxes = np.array([[0, 0, 9, 9], [100, 100, 109, 109]], np.float32)
    gt_labels = np.array([1, 2])
    proposals = np.array([
        [0, 0, 9, 9],          # 0: IoU 1.0 with class 1
        [0, 0, 9, 3],          # 1: IoU 0.4 with class 1
        [0, 0, 9, 1],          # 2: IoU 0.2 with class 1
        [100, 100, 109, 103],  # 3: IoU 0.4 with class 2
        [50, 50, 59, 59],      # 4: IoU 0 with both
        [0, 0, 9, 2],          # 5: IoU exactly 0.3 with class 1: not a negative (IoU < 0.3)
    ], np.float32)
    np.testing.assert_allclose(box_ops.iou(proposals, gt_boxes)[:, 0], [1, .4, .2, 0, 0, .3],
                               atol=1e-6)
    return proposals, gt_boxes, gt_labels


def test_negatives_are_per_class_iou_below_threshold():
    proposals, gt_boxes, gt_labels = two_class_image()
    rng = np.random.default_rng(3)
    trainer = SVMTrainer(2, 6, neg_overlap_prune=None, hard_thresh=-np.inf,
                         evict_thresh=-np.inf, C=0.1)
    cand = trainer.candidate_negatives(proposals, gt_boxes, gt_labels)
    assert cand[0].tolist() == [2, 3, 4]
    assert cand[1].tolist() == [0, 1, 2, 4, 5]
    # Class 1 with a second ground-truth box: the max IoU over both counts.
    cand2 = trainer.candidate_negatives(proposals, np.vstack([gt_boxes, [[50, 50, 59, 59]]]),
                                        np.r_[gt_labels, 1])
    assert cand2[0].tolist() == [2, 3]

    trainer.add_positives(rng.standard_normal((8, 6)), [1, 1, 1, 1, 2, 2, 2, 2])
    for _ in range(2):  # first image (all negatives) and a later one (all hard here)
        trainer.add_image(rng.standard_normal((6, 6)), proposals, gt_boxes, gt_labels)
    keys1, keys2 = trainer.negative_keys(1), trainer.negative_keys(2)
    assert keys1.tolist() == [[0, 2], [0, 3], [0, 4], [1, 2], [1, 3], [1, 4]]
    assert keys2.tolist() == [[i, j] for i in (0, 1) for j in (0, 1, 2, 4, 5)]


def greedy_prune_reference(boxes: np.ndarray, thresh: float) -> list[int]:
    kept: list[int] = []
    ov = box_ops.iou(boxes, boxes)
    for i in range(len(boxes)):
        if all(ov[i, j] <= thresh for j in kept):
            kept.append(i)
    return kept


def test_negative_overlap_prune():
    # A; B overlaps A by 0.818 (dropped); C; D overlaps A by 0.667 (kept) and B by 0.818, but B
    # is gone; E overlaps C by 0.818 (dropped).
    boxes = np.array([[0, 0, 9, 9], [1, 0, 10, 9], [20, 20, 29, 29], [2, 0, 11, 9],
                      [21, 20, 30, 29]], np.float32)
    gt_boxes, gt_labels = np.array([[300, 300, 320, 320]], np.float32), np.array([2])
    pruned = SVMTrainer(2, 4, neg_overlap_prune=0.7)
    assert [c.tolist() for c in pruned.candidate_negatives(boxes, gt_boxes, gt_labels)] == \
        [[0, 2, 3], [0, 2, 3]]
    official = SVMTrainer(2, 4, neg_overlap_prune=None)
    assert official.candidate_negatives(boxes, gt_boxes, gt_labels)[0].tolist() == [0, 1, 2, 3, 4]
    # Pruning runs on each class's own negatives: a class-1 box overlapping A by 0.33 (B by
    # 0.25, D by 0.18) removes A from class 1's negatives, so B survives and suppresses D.
    c = pruned.candidate_negatives(boxes, np.array([[-5, 0, 4, 9]], np.float32), np.array([1]))
    assert c[0].tolist() == [1, 2] and c[1].tolist() == [0, 2, 3]
    # Random boxes against a slow greedy loop.
    rng = np.random.default_rng(4)
    xy = rng.uniform(0, 80, (300, 2))
    wh = rng.uniform(5, 40, (300, 2))
    rand = np.hstack([xy, xy + wh]).astype(np.float32)
    got = pruned.candidate_negatives(rand, np.zeros((0, 4)), np.zeros(0))[0]
    assert got.tolist() == greedy_prune_reference(rand, 0.7)
    assert 0 < len(got) < 300


def test_no_positives_is_a_user_error():
    trainer = SVMTrainer(2, 4, class_names=["cat", "dog"])
    trainer.add_positives(np.ones((3, 4)), [1, 1, 1])
    with pytest.raises(SppdetError, match="'dog' \\(class 2\\)"):
        trainer.add_image(np.ones((2, 4)), far_boxes(2), GT, [1])
    with pytest.raises(SppdetError, match="no training images"):
        SVMTrainer(1, 4).finish()


def mining_stream(seed: int = 0, images: int = 41):
    """Image 0: 10 hard (positive-like), 20 medium (at the boundary), 70 easy negatives; later
    images: 5 hard then 45 easy. Positives: 200 around 2u; easy negatives around -4u."""
    rng = np.random.default_rng(seed)
    positives = cloud(rng, 200, 2.0)
    stream = [np.vstack([cloud(rng, 10, 2.0), cloud(rng, 20, 0.0), cloud(rng, 70, -4.0)])]
    stream += [np.vstack([cloud(rng, 5, 2.0), cloud(rng, 45, -4.0)]) for _ in range(images - 1)]
    return positives, stream


def test_hard_negative_mining():
    positives, stream = mining_stream()
    scale = feature_scale(positives, 20.0)
    retrain_every = 20
    trainer = SVMTrainer(1, D, feat_scale=scale, retrain_every=retrain_every)
    trainer.add_positives(positives, np.ones(len(positives)))

    # The first image adds all its negatives, is trained at once, and its easy ones are evicted.
    added = trainer.add_image(stream[0], far_boxes(100), GT, [1])
    assert added.tolist() == [100]
    first = trainer.history[0]
    assert (first["image"], first["positives"], first["negatives"]) == (0, 200, 100)
    cached = set(trainer.negative_keys(1)[:, 1].tolist())
    assert set(range(10)) <= cached and not cached & set(range(30, 100))
    assert first["evicted"] == 100 - len(cached) >= 70

    expected_trains, since = [0], 0
    for i, feats in enumerate(stream[1:], start=1):
        hard = np.flatnonzero(score(feats, trainer.W, trainer.b, scale)[:, 0] > -1.0001)
        assert hard.tolist() == [0, 1, 2, 3, 4]  # the hard ones, never the easy ones
        before = trainer.negative_keys(1).copy()
        n_hist = len(trainer.history)
        assert trainer.add_image(feats, far_boxes(50), GT, [1]).tolist() == [len(hard)]
        since += len(hard)
        if since >= retrain_every:
            expected_trains.append(i)
            since = 0
            assert len(trainer.history) == n_hist + 1
            entry = trainer.history[-1]
            assert entry["negatives"] == len(before) + len(hard)
            # After a retrain nothing in the cache scores below the eviction threshold.
            s = trainer.negatives(1).astype(np.float64) @ trainer.W[0] + trainer.b[0]
            assert s.min() >= -1.2 - 1e-4
        else:
            assert len(trainer.history) == n_hist
            keys = trainer.negative_keys(1)
            np.testing.assert_array_equal(keys[: len(before)], before)
            assert keys[len(before):].tolist() == [[i, j] for j in hard]
    assert [h["image"] for h in trainer.history] == expected_trains
    assert len(expected_trains) == 11  # 40 later images x 5 hard / 20

    W, b = trainer.finish()
    if since:
        assert trainer.history[-1]["image"] is None
    assert W.shape == (1, D) and W.dtype == np.float32 and b.dtype == np.float32
    # Every hard negative was mined and kept; no easy negative survives.
    keys = {tuple(k) for k in trainer.negative_keys(1).tolist()}
    hard_keys = {(0, j) for j in range(10)} | {(i, j) for i in range(1, 41) for j in range(5)}
    assert hard_keys <= keys
    assert not {k for k in keys if k[0] > 0 or k[1] >= 30} - hard_keys

    rng = np.random.default_rng(99)
    assert (score(cloud(rng, 100, 2.0), W, b, scale) > 0).all()
    assert (score(cloud(rng, 100, -4.0), W, b, scale) < -1).all()


def test_finish_retrains_only_classes_with_new_negatives_and_state_resumes():
    positives, stream = mining_stream(seed=5, images=9)
    scale = feature_scale(positives, 20.0)
    kw = dict(feat_scale=scale, retrain_every=12)
    a = SVMTrainer(1, D, **kw)
    a.add_positives(positives, np.ones(len(positives)))
    for feats in stream[:5]:
        a.add_image(feats, far_boxes(len(feats)), GT, [1])
    b = SVMTrainer(1, D, **kw)
    b.load_state_dict(a.state_dict())
    for t in (a, b):
        for feats in stream[5:]:
            t.add_image(feats, far_boxes(len(feats)), GT, [1])
    Wa, ba = a.finish()
    Wb, bb = b.finish()
    np.testing.assert_array_equal(Wa, Wb)
    np.testing.assert_array_equal(ba, bb)
    assert [h["image"] for h in a.history] == [h["image"] for h in b.history]
    # 8 later images x 5 hard: retrains after images 3 and 6 (15 >= 12), 10 left for finish().
    assert [h["image"] for h in a.history] == [0, 3, 6, None]
    n = len(a.history)
    a.finish()  # nothing new: no retrain
    assert len(a.history) == n
    with pytest.raises(SppdetError, match="other settings"):
        SVMTrainer(1, D, feat_scale=scale, retrain_every=13).load_state_dict(a.state_dict())


def test_first_image_takes_all_negatives_whatever_their_score():
    rng = np.random.default_rng(6)
    trainer = SVMTrainer(1, D, hard_thresh=5.0, evict_thresh=-np.inf, retrain_every=1)
    trainer.add_positives(cloud(rng, 20, 2.0), np.ones(20))
    assert trainer.add_image(cloud(rng, 30, -4.0), far_boxes(30), GT, [1]).tolist() == [30]
    assert trainer.history[0]["negatives"] == 30
    # Once trained, nothing scores above 5: no new negatives and no retrain.
    assert trainer.add_image(cloud(rng, 30, -4.0), far_boxes(30), GT, [1]).tolist() == [0]
    assert len(trainer.history) == 1 and trainer.negatives(1).shape == (30, D)
