"""Per-class ridge box regression (R-CNN appendix C, SPP-net PAPER.md 2.3).

For each class k, a linear map from (scaled) pooled features to the R-CNN deltas
(dx, dy, log dw, log dh) of `sppdet.boxes.encode`, fitted with ridge regression (lambda = 4000
in the SPP code, 1000 in R-CNN) on training windows that overlap their ground truth by at least
`min_iou`. The result is the detector's `heads.BoxRegressor`; at test time it moves each
detection by the deltas of its class (`boxes.decode`), then the box is clipped to the image.

The SPP code also whitens the targets; with one lambda shared by the four outputs and an
unpenalised intercept (sklearn's Ridge) that changes nothing (ridge is linear in the targets),
so the plain targets are used.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from sklearn.linear_model import Ridge
from tqdm import tqdm

from . import boxes as box_ops
from .config import BBoxRegConfig
from .heads import BoxRegressor
from .svm import feature_scale

__all__ = ["train_box_regressor", "train_box_regressors"]


def train_box_regressors(features, proposals, gt_boxes, labels, overlaps, num_classes: int,
                         min_iou: float = 0.5, lam: float = 4000.0, feat_scale: float = 1.0,
                         min_samples: int = 10, class_names: Sequence[str] | None = None,
                         logger: logging.Logger | None = None) -> BoxRegressor:
    """Fit one ridge regressor per class on windows with IoU >= min_iou to their ground truth.

    features (N, D) raw pooled features; proposals (N, 4) the windows and gt_boxes (N, 4) the
    ground truth each is matched to (inclusive-end xyxy); labels (N,) that ground truth's class
    in 1..K (0 rows are ignored); overlaps (N,) their IoU. Features are multiplied by feat_scale
    (stored in the result). Targets are `boxes.encode(proposals, gt_boxes)`; Ridge(alpha=lam)
    with an unpenalised intercept. Classes with fewer than `min_samples` windows get the identity
    regressor and a warning. Returns the fitted `heads.BoxRegressor`.
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
    at random), norm-scaled to `target_norm` as the SPP code scales pool5 to 20.

    source(image_id, rows) gives pooled features of an image's training windows (proposals
    first: `features.TrainingFeatures`); records are the training ImageRecords.
    """
    rng = np.random.default_rng(seed)
    feats, boxes, gt, labels, overlaps = [], [], [], [], []
    for rec in tqdm(records, desc="box regression", leave=False, dynamic_ncols=True):
        props = proposals[rec.image_id]
        if len(props) == 0 or len(rec.boxes) == 0:
            continue
        overlap, index = box_ops.max_iou(props, rec.boxes)
        sel = np.flatnonzero(overlap >= cfg.min_iou)
        if len(sel) > cfg.max_per_image:
            sel = rng.choice(sel, cfg.max_per_image, replace=False)
        if len(sel) == 0:
            continue
        feats.append(source(rec.image_id, sel).cpu().numpy().astype(np.float16))
        boxes.append(props[sel])
        gt.append(rec.boxes[index[sel]])
        labels.append(rec.labels[index[sel]])
        overlaps.append(overlap[sel])
    if not feats:
        (logger or logging.getLogger("sppdet.bbox_reg")).warning(
            f"bbox_reg: no training proposal overlaps a ground truth by {cfg.min_iou}; boxes stay unregressed")
        return BoxRegressor(num_classes, source.features.output_dim)
    x = np.concatenate(feats).astype(np.float32)
    return train_box_regressors(x, np.concatenate(boxes), np.concatenate(gt), np.concatenate(labels),
                                np.concatenate(overlaps), num_classes, min_iou=cfg.min_iou, lam=cfg.lam,
                                feat_scale=feature_scale(x, target_norm), class_names=class_names, logger=logger)
