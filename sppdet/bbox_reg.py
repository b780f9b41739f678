"""Per-class ridge box regression (R-CNN appendix C, SPP-net PAPER.md 2.3).

For each class k, a linear map from (scaled) pooled features to the R-CNN deltas
(dx, dy, log dw, log dh) of `sppdet.boxes.encode`, fitted with ridge regression (lambda = 4000
in the SPP code, 1000 in R-CNN) on training windows that overlap their ground truth by at least
`min_iou`. At test time the deltas of the detection's class are applied with `boxes.decode`;
clip to the image afterwards with `boxes.clip`.

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

from . import boxes as box_ops
from .utils import SppdetError

__all__ = ["BoxRegressor", "train_box_regressors"]


class BoxRegressor:
    """Class-specific linear box regressors.

    deltas = (features * feat_scale) @ coef[k-1] + intercept[k-1] for a window of class k.

    coef (K, D, 4) float32, intercept (K, 4) float32; a class with all zeros is the identity.
    num_samples (K,) records how many windows each class was fitted on.
    """

    def __init__(self, coef, intercept, feat_scale: float = 1.0, num_samples=None) -> None:
        self.coef = np.ascontiguousarray(coef, dtype=np.float32)
        self.intercept = np.ascontiguousarray(intercept, dtype=np.float32)
        if self.coef.ndim != 3 or self.coef.shape[2] != 4 or self.intercept.shape != (
                self.coef.shape[0], 4):
            raise ValueError(f"coef must be (K, D, 4) and intercept (K, 4), got "
                             f"{self.coef.shape} and {self.intercept.shape}")
        self.feat_scale = float(feat_scale)
        K = self.coef.shape[0]
        self.num_samples = (np.zeros(K, np.int64) if num_samples is None
                            else np.asarray(num_samples, dtype=np.int64))

    @property
    def num_classes(self) -> int:
        return self.coef.shape[0]

    @property
    def dim(self) -> int:
        return self.coef.shape[1]

    @classmethod
    def identity(cls, num_classes: int, dim: int) -> "BoxRegressor":
        return cls(np.zeros((num_classes, dim, 4)), np.zeros((num_classes, 4)))

    def deltas(self, features, labels):
        """Deltas (N, 4) of each row's class: features (N, D), labels (N,) in 1..K.

        numpy in -> numpy out; torch in -> torch out on the features' device.
        """
        if torch.is_tensor(features):
            f = features.float()
            lab = torch.as_tensor(labels, device=f.device).reshape(-1).long()
            out = torch.zeros((len(f), 4), dtype=torch.float32, device=f.device)
            unique = torch.unique(lab).tolist()
        else:
            f = np.asarray(features, dtype=np.float32)
            lab = np.asarray(labels, dtype=np.int64).reshape(-1)
            out = np.zeros((len(f), 4), np.float32)
            unique = np.unique(lab).tolist()
        if f.ndim != 2 or f.shape[1] != self.dim or len(lab) != len(f):
            raise ValueError(f"features must be (N, {self.dim}) with N labels, got "
                             f"{tuple(f.shape)} and {len(lab)} labels")
        if unique and (unique[0] < 1 or unique[-1] > self.num_classes):
            raise ValueError(f"labels must be in 1..{self.num_classes}, got {unique}")
        for k in unique:
            rows = lab == k
            coef, bias = self.coef[k - 1], self.intercept[k - 1]
            if torch.is_tensor(f):
                coef = torch.from_numpy(coef).to(f.device)
                bias = torch.from_numpy(bias).to(f.device)
            out[rows] = (f[rows] * self.feat_scale) @ coef + bias
        return out

    def predict(self, features, boxes, labels):
        """Regressed boxes (N, 4): apply class `labels` (N,) deltas to `boxes` (N, 4).

        Boxes are inclusive-end xyxy in image pixels; the result is not clipped.
        """
        d = self.deltas(features, labels)
        if torch.is_tensor(d):
            return box_ops.decode(torch.as_tensor(boxes, device=d.device), d)
        return box_ops.decode(np.asarray(boxes, dtype=np.float32), d)

    def predict_all(self, features, boxes):
        """Boxes regressed for every class, (N, K, 4), from features (N, D) and boxes (N, 4)."""
        K, D = self.num_classes, self.dim
        W = self.coef.transpose(1, 0, 2).reshape(D, K * 4)
        if torch.is_tensor(features):
            f = features.float()
            d = (f * self.feat_scale) @ torch.from_numpy(W).to(f.device)
            d = d.reshape(-1, K, 4) + torch.from_numpy(self.intercept).to(f.device)
            b = torch.as_tensor(boxes, dtype=torch.float32, device=f.device)
            b = b.repeat_interleave(K, dim=0)
        else:
            d = (np.asarray(features, np.float32) * np.float32(self.feat_scale)) @ W
            d = d.reshape(-1, K, 4) + self.intercept
            b = np.repeat(np.asarray(boxes, np.float32), K, axis=0)
        return box_ops.decode(b, d.reshape(-1, 4)).reshape(-1, K, 4)

    def to_dict(self) -> dict:
        """Plain arrays for a checkpoint."""
        return {"coef": self.coef.copy(), "intercept": self.intercept.copy(),
                "feat_scale": self.feat_scale, "num_samples": self.num_samples.copy()}

    @classmethod
    def from_dict(cls, d: dict) -> "BoxRegressor":
        try:
            return cls(np.asarray(d["coef"]), np.asarray(d["intercept"]), float(d["feat_scale"]),
                       d.get("num_samples"))
        except (KeyError, TypeError, ValueError) as e:
            raise SppdetError(f"checkpoint bbox_reg: malformed box regressor ({e})") from None


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
    regressor and a warning.
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
    return BoxRegressor(coef, intercept, feat_scale, counts)
