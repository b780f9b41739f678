"""Per-class ridge box regression (R-CNN appendix C, SPP-net PAPER.md 2.3).

For each class k, a linear map from (scaled) pooled features to the R-CNN deltas
(dx, dy, log dw, log dh) of `sppdet.boxes.encode`, fitted with ridge regression (lambda = 4000
in the SPP code, 1000 in R-CNN) on training windows that overlap their ground truth by at least
`min_iou`. The result is the detector's `heads.BoxRegressor`; at test time it moves each
detection by the deltas of its class (`boxes.decode`), then the box is clipped to the image.

Two official-code switches (BBoxRegConfig; the paper's values are the defaults):
`include_gt` adds each image's ground-truth boxes (IoU 1, target 0) to the training windows, as
the official roidb lists them among the boxes; `penalize_bias` fits the official ridge
(spp_train_bbox_regressor.m): [X, 1] solved in closed form with lambda on all D + 1
coefficients, the bias included, on mean-centred targets whose mean goes back into the
intercept. By default the intercept is unpenalised (sklearn's Ridge on centred X and Y).

Whitening. The official code also whitens the centred targets, Yw = Yc T with
T = V diag(1 / sqrt(d + 0.001)) V^T (S = Yc^T Yc / n = V diag(d) V^T), solves each column of Yw
with the same lambda, and predicts Yw_hat T_inv + mu with T_inv = V diag(sqrt(d + 0.001)) V^T.
That changes nothing: ridge is linear in the targets, its solution B = M Y with one matrix
M = (A^T A + lambda I)^-1 A^T for every column (one shared lambda, the same A = [X, 1]), so
the prediction is A M Yc T T_inv + mu = A M Yc + mu, and T T_inv = V V^T = I exactly. (It would
matter with a lambda per output, or with `robust` > 0, which drops samples by their loss in the
whitened space; the SPP code runs robust 0.) The plain centred targets are therefore fitted:
the same result up to rounding (tests/test_official.py checks it against the whitened
procedure written out).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import scipy.linalg
import torch
from sklearn.linear_model import Ridge
from tqdm import tqdm

from . import boxes as box_ops
from .config import BBoxRegConfig
from .heads import BoxRegressor
from .svm import feature_scale

__all__ = ["ridge_penalized_bias", "train_box_regressor", "train_box_regressors"]

# Systems up to this size are solved in float64; larger ones (12,800-d SPP features: 12,801 x
# 12,801, 0.66 GB in float32, twice that in float64) in float32: with lambda = 4000 on features
# of mean norm 20 the system is well conditioned (eigenvalues >= lambda).
_FLOAT64_MAX_SIZE = 4096


def ridge_penalized_bias(X, Y, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """The official box-regression ridge (spp_train_bbox_regressor.m, `ridge_reg_chol`):
    min_B ||[X, 1] B - (Y - mu)||^2 + lam ||B||^2 over all D + 1 rows of B, the bias row
    penalised like the weights, mu = mean(Y). X (n, D), Y (n, t) -> (coef (D, t), intercept
    (t,) = B's bias row + mu), float64.

    Solved without forming [X, 1]: the normal equations (X^T X + lam I, X^T 1; 1^T X, n + lam)
    when D + 1 <= n, else the dual form B = [X, 1]^T (X X^T + 1 1^T + lam I)^-1 (Y - mu), the
    same solution with the smaller matrix. See the module docstring for the whitening.
    """
    X = np.asarray(X)
    Y = np.asarray(Y, dtype=np.float64)
    n, d = X.shape
    mu = Y.mean(axis=0) if n else np.zeros(Y.shape[1])
    Yc = Y - mu
    dtype = np.float64 if min(n, d + 1) <= _FLOAT64_MAX_SIZE else np.float32
    Xt = X.astype(dtype, copy=False)
    if d + 1 <= n:
        G = np.empty((d + 1, d + 1), dtype)
        G[:d, :d] = Xt.T @ Xt
        G[:d, d] = G[d, :d] = Xt.sum(axis=0)
        G[d, d] = n
        G[np.diag_indices(d + 1)] += lam
        rhs = np.empty((d + 1, Y.shape[1]), dtype)
        rhs[:d] = Xt.T @ Yc.astype(dtype)
        rhs[d] = Yc.sum(axis=0)
        beta = _solve_pos(G, rhs)
    else:
        K = Xt @ Xt.T
        K += 1
        K[np.diag_indices(n)] += lam
        alpha = _solve_pos(K, Yc.astype(dtype))
        beta = np.concatenate([Xt.T @ alpha, alpha.sum(axis=0, keepdims=True)])
    beta = beta.astype(np.float64)
    return beta[:d], beta[d] + mu


def _solve_pos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a x = b for a symmetric positive (semi)definite a: Cholesky, else least squares."""
    try:
        return scipy.linalg.solve(a, b, assume_a="pos", overwrite_a=True, check_finite=False)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):  # singular: lambda 0, few samples
        return np.linalg.lstsq(a, b, rcond=None)[0]


def train_box_regressors(features, proposals, gt_boxes, labels, overlaps, num_classes: int,
                         min_iou: float = 0.5, lam: float = 4000.0, feat_scale: float = 1.0,
                         min_samples: int = 10, class_names: Sequence[str] | None = None,
                         logger: logging.Logger | None = None, penalize_bias: bool = False) -> BoxRegressor:
    """Fit one ridge regressor per class on windows with IoU >= min_iou to their ground truth.

    features (N, D) raw pooled features; proposals (N, 4) the windows and gt_boxes (N, 4) the
    ground truth each is matched to (inclusive-end xyxy); labels (N,) that ground truth's class
    in 1..K (0 rows are ignored); overlaps (N,) their IoU. Features are multiplied by feat_scale
    (stored in the result). Targets are `boxes.encode(proposals, gt_boxes)`; Ridge(alpha=lam)
    with an unpenalised intercept, or with `penalize_bias` the official ridge on [X, 1] with the
    bias penalised (`ridge_penalized_bias`). Classes with fewer than `min_samples` windows get the
    identity regressor and a warning. Returns the fitted `heads.BoxRegressor`.
    """
    logger = logger or logging.getLogger("sppdet.bbox_reg")
    if torch.is_tensor(features):
        features = features.detach().cpu().numpy()
    features = np.asarray(features)
    proposals = np.asarray(proposals, dtype=np.float32).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    overlaps = np.asarray(overlaps, dtype=np.float32).reshape(-1)
    n = len(features)
    if features.ndim != 2 or not (len(proposals) == len(gt_boxes) == len(labels)
                                  == len(overlaps) == n):
        raise ValueError(f"need features (N, D) and N proposals, gt_boxes, labels, overlaps; got "
                         f"{features.shape}, {len(proposals)}, {len(gt_boxes)}, {len(labels)}, "
                         f"{len(overlaps)}")
    if n and (labels.min() < 0 or labels.max() > num_classes):
        raise ValueError(f"labels must be in 0..{num_classes}")
    dim = features.shape[1]
    coef = np.zeros((num_classes, dim, 4), np.float32)
    intercept = np.zeros((num_classes, 4), np.float32)
    counts = np.zeros(num_classes, np.int64)
    use = (overlaps >= min_iou) & (labels > 0)
    targets = box_ops.encode(proposals[use], gt_boxes[use])
    use_labels = labels[use]
    use_rows = np.flatnonzero(use)
    for k in range(1, num_classes + 1):
        sel = use_labels == k
        counts[k - 1] = int(sel.sum())
        name = f"{class_names[k - 1]!r} (class {k})" if class_names else f"class {k}"
        if counts[k - 1] < max(min_samples, 1):
            logger.warning(f"bbox_reg {name}: {counts[k - 1]} training windows with IoU >= "
                           f"{min_iou} (< {min_samples}); its boxes are left unregressed")
            continue
        # Fancy indexing copies; scale in place so at most one scaled copy exists.
        X = features[use_rows[sel]].astype(np.float32, copy=False)
        X *= np.float32(feat_scale)
        Y = targets[sel].astype(np.float32)
        if penalize_bias:
            c, b = ridge_penalized_bias(X, Y, lam)
            coef[k - 1], intercept[k - 1] = c, b
            resid = Y - (X @ coef[k - 1] + intercept[k - 1])
        else:
            model = Ridge(alpha=lam, fit_intercept=True).fit(X, Y)
            coef[k - 1] = model.coef_.T
            intercept[k - 1] = model.intercept_
            resid = Y - model.predict(X)
        logger.info(f"bbox_reg {name}: {counts[k - 1]} windows, target std "
                    f"{np.round(Y.std(0), 4).tolist()} -> residual std "
                    f"{np.round(resid.std(0), 4).tolist()}")
    return BoxRegressor.from_arrays(coef, intercept, feat_scale, counts)


@torch.no_grad()
def train_box_regressor(source, records: Sequence, proposals: dict[str, np.ndarray], cfg: BBoxRegConfig,
                        num_classes: int, target_norm: float = 20.0, class_names: Sequence[str] | None = None,
                        seed: int = 0, logger: logging.Logger | None = None) -> BoxRegressor:
    """Fit the detector's box regressor on pooled features of the training proposals that
    overlap a ground truth by at least `cfg.min_iou` (at most `cfg.max_per_image` per image, drawn
    at random), norm-scaled to `target_norm` as the SPP code scales pool5 to 20. With
    `cfg.include_gt` every ground-truth box of the image is a training window too (IoU 1, its own
    target: zero deltas), on top of the proposals, as the official roidb's rows include them;
    with `cfg.penalize_bias` the ridge penalises the bias (`ridge_penalized_bias`).

    source(image_id, rows) gives pooled features of an image's training windows (its proposals,
    then its ground truth, rows len(props) .. len(props) + G - 1: `features.TrainingFeatures`);
    records are the training ImageRecords.
    """
    rng = np.random.default_rng(seed)
    feats, boxes, gt, labels, overlaps = [], [], [], [], []
    for rec in tqdm(records, desc="box regression", leave=False, dynamic_ncols=True):
        props = proposals[rec.image_id]
        if len(rec.boxes) == 0 or (len(props) == 0 and not cfg.include_gt):
            continue
        parts = []  # (rows, windows, their ground truth, its class, IoU)
        if len(props):
            overlap, index = box_ops.max_iou(props, rec.boxes)
            sel = np.flatnonzero(overlap >= cfg.min_iou)
            if len(sel) > cfg.max_per_image:
                sel = rng.choice(sel, cfg.max_per_image, replace=False)
            parts.append((sel, props[sel], rec.boxes[index[sel]], rec.labels[index[sel]], overlap[sel]))
        if cfg.include_gt:
            g = len(rec.boxes)
            parts.append((len(props) + np.arange(g), rec.boxes, rec.boxes, rec.labels, np.ones(g, np.float32)))
        rows = np.concatenate([part[0] for part in parts])
        if len(rows) == 0:
            continue
        feats.append(source(rec.image_id, rows).cpu().numpy().astype(np.float16))
        boxes.append(np.concatenate([part[1] for part in parts]).reshape(-1, 4))
        gt.append(np.concatenate([part[2] for part in parts]).reshape(-1, 4))
        labels.append(np.concatenate([part[3] for part in parts]))
        overlaps.append(np.concatenate([part[4] for part in parts]))
    if not feats:
        (logger or logging.getLogger("sppdet.bbox_reg")).warning(
            f"bbox_reg: no training proposal overlaps a ground truth by {cfg.min_iou}; boxes stay unregressed")
        return BoxRegressor(num_classes, source.features.output_dim)
    x = np.concatenate(feats).astype(np.float32)
    return train_box_regressors(x, np.concatenate(boxes), np.concatenate(gt), np.concatenate(labels),
                                np.concatenate(overlaps), num_classes, min_iou=cfg.min_iou, lam=cfg.lam,
                                feat_scale=feature_scale(x, target_norm), class_names=class_names, logger=logger,
                                penalize_bias=cfg.penalize_bias)
