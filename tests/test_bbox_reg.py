"""Box regression: delta encoding, ridge fitting on features that encode the true deltas."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from sppdet import boxes as box_ops
from sppdet.bbox_reg import train_box_regressors
from sppdet.heads import BoxRegressor
from sppdet.svm import feature_scale

D = 24


def predict(reg: BoxRegressor, features, boxes, labels) -> np.ndarray:
    """The detector's regression of boxes (N, 4) by their classes' regressors, as numpy."""
    with torch.no_grad():
        return reg(torch.as_tensor(np.asarray(features, np.float32)), torch.as_tensor(boxes),
                   torch.as_tensor(labels)).numpy()


def random_boxes(rng, n: int) -> np.ndarray:
    xy = rng.uniform(0, 300, (n, 2))
    wh = rng.uniform(20, 200, (n, 2))
    return np.hstack([xy, xy + wh - 1]).astype(np.float32)


def jitter(rng, gt: np.ndarray, amount: float) -> np.ndarray:
    """Proposals near `gt`: corners moved by up to `amount` of the box size."""
    wh = np.repeat(box_ops.widths_heights(gt), 2, axis=0).reshape(-1, 4)
    p = gt + rng.uniform(-amount, amount, gt.shape) * wh[:, [0, 1, 0, 1]]
    p[:, 2:] = np.maximum(p[:, 2:], p[:, :2] + 4)
    return p.astype(np.float32)


def paired_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of a[i] with b[i] (+1 pixel convention), without the (N, N) matrix."""
    iw = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]) + 1
    ih = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area = lambda x: (x[:, 2] - x[:, 0] + 1) * (x[:, 3] - x[:, 1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def problem(seed: int = 0, n: int = 1500, num_classes: int = 3, labelled=(1, 2)):
    """Windows around random ground truth whose features are a linear image of the true deltas
    (plus small noise), so a linear regressor can recover the ground truth."""
    rng = np.random.default_rng(seed)
    gt = random_boxes(rng, n)
    proposals = jitter(rng, gt, 0.25)
    overlaps = paired_iou(proposals, gt)
    labels = rng.choice(labelled, n)
    deltas = box_ops.encode(proposals, gt)
    mix = rng.standard_normal((num_classes, 4, D)).astype(np.float32)  # class-specific features
    features = np.einsum("ni,nid->nd", deltas, mix[labels - 1]) + 0.05 + \
        1e-3 * rng.standard_normal((n, D)).astype(np.float32)
    return features.astype(np.float32), proposals, gt, labels, overlaps, mix


def test_encode_decode_are_inverse():
    rng = np.random.default_rng(0)
    p, g = random_boxes(rng, 500), random_boxes(rng, 500)
    np.testing.assert_allclose(box_ops.decode(p, box_ops.encode(p, g)), g, atol=1e-3)
    np.testing.assert_allclose(box_ops.encode(p, p), 0, atol=1e-7)
    # Hand-worked: a 10x10 box at the origin, target shifted by 5 and twice as wide.
    d = box_ops.encode(np.array([[0, 0, 9, 9]], np.float32), np.array([[5, 0, 24, 9]], np.float32))
    np.testing.assert_allclose(d, [[1.0, 0.0, np.log(2), 0.0]], atol=1e-6)


def test_recovers_ground_truth_and_matches_closed_form_ridge():
    # lambda 4000 is tuned for many windows of 12800-d features: with too few it shrinks the
    # deltas noticeably, so give it 4000 windows per class.
    features, proposals, gt, labels, overlaps, mix = problem(n=8000)
    np.testing.assert_allclose(overlaps[:50], np.diag(box_ops.iou(proposals[:50], gt[:50])),
                               atol=1e-6)
    scale = feature_scale(features, 20.0)
    reg = train_box_regressors(features, proposals, gt, labels, overlaps, num_classes=3,
                               min_iou=0.5, lam=4000.0, feat_scale=scale)
    use = overlaps >= 0.5
    assert 0.6 < use.mean() < 1.0  # the jitter puts some windows below the threshold
    assert reg.num_samples.tolist() == [int((use & (labels == k)).sum()) for k in (1, 2, 3)]

    # Held-out windows (same feature map, no noise): regressed boxes land on the ground truth.
    rng = np.random.default_rng(7)
    g3 = random_boxes(rng, 300)
    p3 = jitter(rng, g3, 0.2)
    l3 = rng.choice([1, 2], 300)
    d3 = box_ops.encode(p3, g3)
    f3 = (np.einsum("ni,nid->nd", d3, mix[l3 - 1]) + 0.05).astype(np.float32)
    before = paired_iou(p3, g3)
    after = paired_iou(predict(reg, f3, p3, l3), g3)
    assert before.mean() < 0.8 and after.min() > 0.95, (before.mean(), after.min())

    # Class 1's coefficients against the closed form with an unpenalised intercept.
    sel = use & (labels == 1)
    X = features[sel].astype(np.float64) * scale
    Y = box_ops.encode(proposals[sel], gt[sel]).astype(np.float64)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    coef = np.linalg.solve(Xc.T @ Xc + 4000.0 * np.eye(D), Xc.T @ Yc)
    np.testing.assert_allclose(reg.coef[0].numpy(), coef, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(reg.intercept[0].numpy(), Y.mean(0) - X.mean(0) @ coef, atol=1e-4)


def test_windows_below_min_iou_are_not_used():
    features, proposals, gt, labels, overlaps, _ = problem(n=600)
    low = overlaps < 0.6
    assert low.any() and (~low).any()
    # Corrupt the low-overlap windows: if any of them were used, the fit would change.
    bad = features.copy()
    bad[low] = np.random.default_rng(3).standard_normal((int(low.sum()), D)) * 50
    gt_bad = gt.copy()
    gt_bad[low] += 37.0
    a = train_box_regressors(features[~low], proposals[~low], gt[~low], labels[~low],
                             overlaps[~low], 3, min_iou=0.6, lam=1000.0, feat_scale=2.0)
    b = train_box_regressors(bad, proposals, gt_bad, labels, overlaps, 3, min_iou=0.6,
                             lam=1000.0, feat_scale=2.0)
    assert torch.equal(a.coef, b.coef) and torch.equal(a.intercept, b.intercept)
    assert int(b.num_samples.sum()) == (~low).sum()
    # Rows labelled 0 (background) are ignored too.
    zero = labels.copy()
    zero[low] = 0
    c = train_box_regressors(bad, proposals, gt_bad, zero, np.ones(len(zero)), 3, min_iou=0.6,
                             lam=1000.0, feat_scale=2.0)
    assert torch.equal(a.coef, c.coef)


def test_class_without_samples_is_identity(caplog):
    features, proposals, gt, labels, overlaps, _ = problem(n=300)
    with caplog.at_level(logging.WARNING, logger="sppdet.bbox_reg"):
        reg = train_box_regressors(features, proposals, gt, labels, overlaps, 3,
                                   class_names=["cat", "dog", "cow"])
    assert reg.num_samples[2] == 0
    assert any("'cow' (class 3)" in r.getMessage() for r in caplog.records)
    assert not reg.coef[2].any() and not reg.intercept[2].any()
    out = predict(reg, features[:20], proposals[:20], np.full(20, 3))
    np.testing.assert_allclose(out, proposals[:20], atol=1e-4)
    # min_samples also applies to classes with a few windows.
    few = train_box_regressors(features, proposals, gt, labels, overlaps, 3,
                               min_samples=10 ** 6)
    assert not few.coef.any()


def test_module_state_round_trip_and_class_selection():
    features, proposals, gt, labels, overlaps, _ = problem(n=400)
    reg = train_box_regressors(features, proposals, gt, labels, overlaps, 3, feat_scale=3.0)
    again = BoxRegressor(3, D)
    again.load_state_dict(reg.state_dict())
    np.testing.assert_array_equal(predict(again, features, proposals, labels),
                                  predict(reg, features, proposals, labels))
    assert float(again.scale) == 3.0 and again.num_samples.tolist() == reg.num_samples.tolist()
    # each window moves by its own class's regressor: the same as regressing it alone
    for k in (1, 2, 3):
        sel = labels == k
        np.testing.assert_allclose(predict(reg, features[sel], proposals[sel], np.full(sel.sum(), k)),
                                   predict(reg, features, proposals, labels)[sel], atol=1e-4)
    with pytest.raises(ValueError, match="labels must be in 1..3"):
        predict(reg, features[:2], proposals[:2], np.array([1, 4]))


@pytest.mark.parametrize("n_rows", [3, 9])   # few distinct windows (gathered) / most (all rows)
def test_deltas_of_windows_by_row_index(n_rows):
    """Labels that name their windows by row (one window may carry several classes, rows in any
    order) get the deltas of those rows' features, whether the product runs on the distinct
    rows asked for or on every window."""
    rng = np.random.default_rng(4)
    reg = BoxRegressor.from_arrays(rng.normal(size=(3, D, 4)), rng.normal(size=(3, 4)), scale=0.5)
    pooled = torch.as_tensor(rng.normal(size=(10, D)), dtype=torch.float32)
    rows = torch.as_tensor(rng.permutation(10)[:n_rows].repeat(2))   # each row for two classes
    labels = torch.as_tensor(rng.integers(1, 4, len(rows)))
    want = [pooled[r].double() @ reg.coef[k - 1].double() * 0.5 + reg.intercept[k - 1].double()
            for r, k in zip(rows.tolist(), labels.tolist())]
    with torch.no_grad():
        got = reg.deltas(pooled, labels, rows)
        np.testing.assert_allclose(got.numpy(), torch.stack(want).numpy(), rtol=1e-5, atol=1e-5)
        # bf16 features are read as they are (widened to fp32 for the product)
        got16 = reg.deltas(pooled.bfloat16(), labels, rows)
        np.testing.assert_allclose(got16.numpy(), reg.deltas(pooled.bfloat16().float(), labels, rows).numpy(),
                                   rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="6 labels but 5 rows"):
        reg.deltas(pooled, labels[:6], rows[:5])
