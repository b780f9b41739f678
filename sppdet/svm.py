"""Per-class linear SVMs on fc7 features, trained with one pass of hard-negative mining.

Follows the SPP-net / R-CNN recipe (PAPER.md 2.2): positives are the ground-truth boxes of a
class, negatives are proposals with IoU < 0.3 to every ground truth of that class; liblinear
L2-regularised hinge loss (dual) with C = 1e-3, positive weight 2 and bias multiplier 10, on
features scaled so their mean L2 norm is 20. Mining as in R-CNN's `rcnn_train.m`: the first
image adds all its negatives, later images only negatives scoring above `hard_thresh`, a class
is retrained after `retrain_every` new negatives, and a retrain evicts cached negatives scoring
below `evict_thresh`. The paper also drops a negative that overlaps a kept negative by > 0.7
(`neg_overlap_prune`); the official code does not (set it to None).

The official code's own choices are switches (SVMConfig; the paper's values are the defaults):
`dedup_conv5` drops a proposal that maps to the same conv5 window at the same scale as an
earlier proposal of the image (spp_features_convX_to_poolX.m's `dedup`: same pooled feature);
`scale_sample: random` estimates the feature scale from 200 random windows of 200 random images
(spp_feature_stats.m); `retrain_strict` retrains when the new negatives exceed `retrain_every`
(spp_train.m's `num_added > retrain_limit`) rather than reach it.

Scores: ``score = (features * scale) @ W.T + b``, W (K, D), b (K,), column k-1 for class k:
`train_svms` returns them as the detector's `heads.LinearSVMScorer`.
"""
from __future__ import annotations

import logging
import time
import warnings
from typing import Sequence

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import LinearSVC
from tqdm import tqdm

from . import boxes as box_ops
from .config import SVMConfig
from .features import SPPFeatures
from .heads import LinearSVMScorer
from .spp import resize_boxes, response_cells
from .utils import SppdetError

__all__ = ["conv5_keys", "feature_scale", "fit_svm", "scale_sample_rows", "svm_objective", "SVMTrainer", "train_svms"]


def feature_scale(sample_features, target_norm: float = 20.0) -> float:
    """Factor that makes the mean L2 norm of `sample_features` (N, D) equal `target_norm`.

    R-CNN / SPP estimate it once on a sample of training windows and apply it to every feature
    before SVM training and scoring.
    """
    if torch.is_tensor(sample_features):
        sample_features = sample_features.detach().cpu().numpy()
    x = np.asarray(sample_features, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise SppdetError(f"feature scale: need a non-empty (N, D) sample, got shape {x.shape}")
    mean_norm = float(np.linalg.norm(x, axis=1).mean())
    if not np.isfinite(mean_norm) or mean_norm <= 0:
        raise SppdetError(f"feature scale: the sample's mean feature norm is {mean_norm}; "
                          "features are all zero or not finite")
    return float(target_norm) / mean_norm


def svm_objective(pos, neg, w, b, C: float, pos_weight: float, bias_mult: float) -> dict:
    """liblinear's primal objective for (w, b), split into its terms.

    pos (P, D), neg (M, D), w (D,), b scalar. liblinear appends a constant feature `bias_mult`
    whose weight b / bias_mult is regularised like the rest, hence the bias term in `reg`.
    """
    w = np.asarray(w, dtype=np.float64)
    pos_loss = C * pos_weight * float(np.maximum(0.0, 1.0 - (pos @ w + b)).sum())
    neg_loss = C * float(np.maximum(0.0, 1.0 + (neg @ w + b)).sum())
    reg = 0.5 * float(w @ w) + 0.5 * (b / bias_mult) ** 2
    return {"pos_loss": pos_loss, "neg_loss": neg_loss, "reg": reg,
            "objective": pos_loss + neg_loss + reg}


def fit_svm(pos, neg, C: float = 1e-3, pos_weight: float = 2.0, bias_mult: float = 10.0,
            tol: float = 1e-4, max_iter: int = 10000, seed: int = 0,
            logger: logging.Logger | None = None, name: str = ""):
    """Train one binary linear SVM (liblinear -s 3 -c C -w1 pos_weight -B bias_mult).

    pos (P, D) positives, neg (M, D) negatives (already scaled). Returns (w (D,) float64,
    b float, X) where X is the float64 training matrix [pos; neg] (reused by the caller).
    """
    X = np.concatenate([pos, neg], axis=0, dtype=np.float64)
    y = np.concatenate([np.ones(len(pos)), -np.ones(len(neg))])
    clf = LinearSVC(C=C, loss="hinge", dual=True, intercept_scaling=bias_mult,
                    class_weight={1: pos_weight, -1: 1.0}, tol=tol, max_iter=max_iter,
                    random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(X, y)
    for c in caught:
        if issubclass(c.category, ConvergenceWarning):
            (logger or logging.getLogger("sppdet.svm")).warning(
                f"svm {name}: liblinear did not converge in {max_iter} iterations")
        else:
            warnings.warn(c.message, c.category)
    w = clf.coef_[0].astype(np.float64)
    b = float(clf.intercept_[0])
    # decision_function is for classes_[1]; make sure that is the positive label and that the
    # extracted (w, b) reproduce it (fast-rcnn's train_svms.py makes the same check).
    assert list(clf.classes_) == [-1, 1], clf.classes_
    rows = X[:: max(1, len(X) // 1000)]
    if not np.allclose(rows @ w + b, clf.decision_function(rows), rtol=1e-6, atol=1e-6):
        raise RuntimeError(f"svm {name}: extracted (w, b) do not reproduce decision_function")
    return w, b, X


def _numpy(x, dtype) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


class _Rows:
    """A growable (n, D) array: appends amortised by doubling, compaction after eviction."""

    def __init__(self, dim: int, dtype, capacity: int = 256) -> None:
        self.buf = np.empty((capacity, dim), dtype=dtype)
        self.n = 0

    @property
    def data(self) -> np.ndarray:
        return self.buf[: self.n]

    def append(self, rows: np.ndarray) -> None:
        need = self.n + len(rows)
        if need > len(self.buf):
            grown = np.empty((max(need, 2 * len(self.buf)), self.buf.shape[1]), self.buf.dtype)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n: need] = rows
        self.n = need

    def keep(self, mask: np.ndarray) -> None:
        kept = self.buf[: self.n][mask]
        if len(kept) < len(self.buf) // 4 and len(self.buf) > 1024:
            # Give memory back after a large eviction.
            self.buf = np.empty((max(2 * len(kept), 1024), self.buf.shape[1]), self.buf.dtype)
        self.buf[: len(kept)] = kept
        self.n = len(kept)


class SVMTrainer:
    """Streams images once and trains K one-vs-rest linear SVMs with hard-negative mining.

    Usage (the official order: all ground-truth features first, then one mining pass)::

        trainer = SVMTrainer(K, D, feat_scale=feature_scale(sample))
        trainer.add_positives(gt_features, gt_labels)        # any number of calls
        for image in images:
            trainer.add_image(features, boxes, gt_boxes, gt_labels)
        W, b = trainer.finish()

    (`train_svms` runs exactly this over a dataset.) All features passed in are raw (unscaled); the trainer multiplies them by `feat_scale`, and
    W, b apply to scaled features (see `score`). Memory: the positives plus, per class, the
    cached negatives (float32), bounded by hard-negative eviction.

    Args mirror liblinear / rcnn_train.m: C, pos_weight (-w1), bias_mult (-B); neg_iou:
    negatives have IoU < neg_iou with every ground truth of the class (+1 pixel convention);
    neg_overlap_prune: drop a negative whose IoU with an earlier kept negative of the same
    image and class exceeds this (greedy in proposal order; None disables); hard_thresh: a
    negative is mined if its current score is above this; evict_thresh: after a retrain,
    cached negatives scoring below this are dropped; retrain_every: retrain a class after this
    many new negatives (retrain_strict: after more than this many, as spp_train.m's
    `num_added > retrain_limit`). class_names: K names (classes 1..K) for messages.
    `add_image(..., keys=...)` de-duplicates an image's negatives by key (`conv5_keys`).
    """

    def __init__(self, num_classes: int, dim: int, C: float = 1e-3, pos_weight: float = 2.0,
                 bias_mult: float = 10.0, neg_iou: float = 0.3,
                 neg_overlap_prune: float | None = 0.7, hard_thresh: float = -1.0001,
                 evict_thresh: float = -1.2, retrain_every: int = 2000, feat_scale: float = 1.0,
                 tol: float = 1e-4, max_iter: int = 10000, seed: int = 0, retrain_strict: bool = False,
                 class_names: Sequence[str] | None = None,
                 logger: logging.Logger | None = None) -> None:
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes")
        self.K, self.D = int(num_classes), int(dim)
        self.C, self.pos_weight, self.bias_mult = float(C), float(pos_weight), float(bias_mult)
        self.neg_iou = float(neg_iou)
        self.neg_overlap_prune = None if neg_overlap_prune is None else float(neg_overlap_prune)
        self.hard_thresh, self.evict_thresh = float(hard_thresh), float(evict_thresh)
        self.retrain_every = int(retrain_every)
        self.retrain_strict = bool(retrain_strict)
        self.feat_scale = float(feat_scale)
        self.tol, self.max_iter, self.seed = float(tol), int(max_iter), int(seed)
        self.class_names = list(class_names) if class_names is not None else None
        self.logger = logger or logging.getLogger("sppdet.svm")

        # Until a class is first trained it takes every negative (rcnn_train.m's first image;
        # its zero-initialised detectors score 0 > hard_thresh).
        self.W = np.zeros((self.K, self.D), np.float32)
        self.b = np.zeros(self.K, np.float32)
        self.trained = np.zeros(self.K, bool)
        self.num_added = np.zeros(self.K, np.int64)   # new negatives since the last retrain
        self.images_seen = 0
        self._pos = _Rows(self.D, np.float32)
        self._pos_labels = _Rows(1, np.int64)
        self._neg = [_Rows(self.D, np.float32) for _ in range(self.K)]
        self._neg_keys = [_Rows(2, np.int64) for _ in range(self.K)]  # (image index, row)
        self.history: list[dict] = []  # one entry per (re)train

    # -- inspection -------------------------------------------------------------------------
    def class_name(self, k: int) -> str:
        """'name (class k)' for messages; k in 1..K."""
        return f"{self.class_names[k - 1]!r} (class {k})" if self.class_names else f"class {k}"

    def num_positives(self, k: int) -> int:
        return int((self._pos_labels.data[:, 0] == k).sum())

    def negatives(self, k: int) -> np.ndarray:
        """Cached (scaled) negative features of class k, (M, D) float32 (a view)."""
        return self._neg[k - 1].data

    def negative_keys(self, k: int) -> np.ndarray:
        """(M, 2) int64: (image index in stream order, row in that image) per cached negative."""
        return self._neg_keys[k - 1].data

    def positives(self, k: int) -> np.ndarray:
        """Scaled positive features of class k, (P, D) float32."""
        return self._pos.data[self._pos_labels.data[:, 0] == k]

    # -- data -------------------------------------------------------------------------------
    def add_positives(self, features, labels) -> None:
        """Ground-truth features (P, D) with labels (P,) in 1..K; call before `add_image`."""
        if self.images_seen:
            raise RuntimeError("add_positives must come before the mining pass (add_image)")
        features = self._check_features(features)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(labels) != len(features):
            raise ValueError(f"{len(features)} positive features but {len(labels)} labels")
        if len(labels) and (labels.min() < 1 or labels.max() > self.K):
            raise ValueError(f"positive labels must be in 1..{self.K}, got {np.unique(labels)}")
        self._pos.append(features * np.float32(self.feat_scale))
        self._pos_labels.append(labels[:, None])

    def _check_features(self, features) -> np.ndarray:
        features = _numpy(features, np.float32)
        if features.ndim != 2 or features.shape[1] != self.D:
            raise ValueError(f"features must be (N, {self.D}), got {features.shape}")
        return features

    def candidate_negatives(self, boxes, gt_boxes, gt_labels, keys=None) -> list[np.ndarray]:
        """For each class k = 1..K, the rows of `boxes` that are negatives for k (sorted).

        Negative: IoU < neg_iou with every ground truth of class k. With `keys` (N, d) int, one
        row per box (`conv5_keys`: scale index and conv5 window), only the first box of each
        key is a candidate at all, as the official code's `dedup` (`unique(rsp_keys, 'rows')`
        over the image's boxes, then the overlap test): a later box with an earlier box's key
        is dropped, whether or not that earlier box is a negative of k. Then, if
        neg_overlap_prune is set, a negative is dropped when its IoU with an earlier kept
        negative exceeds it.
        """
        boxes = _numpy(boxes, np.float32).reshape(-1, 4)
        gt_boxes = _numpy(gt_boxes, np.float32).reshape(-1, 4)
        gt_labels = _numpy(gt_labels, np.int64).reshape(-1)
        first = np.ones(len(boxes), bool)
        if keys is not None:
            keys = np.asarray(keys)
            if keys.ndim != 2 or len(keys) != len(boxes):
                raise ValueError(f"keys must have one row per box ({len(boxes)}), got shape {keys.shape}")
            first[:] = False
            if len(keys):
                first[np.unique(keys, axis=0, return_index=True)[1]] = True  # first occurrences
        overlaps = box_ops.iou(boxes, gt_boxes) if len(gt_boxes) else None
        pruned: dict[bytes, np.ndarray] = {}  # classes absent from the image share one set
        out = []
        for k in range(1, self.K + 1):
            mask = first.copy()
            if overlaps is not None and (gt_labels == k).any():
                mask &= overlaps[:, gt_labels == k].max(axis=1) < self.neg_iou
            key = mask.tobytes()
            if key not in pruned:
                idx = np.flatnonzero(mask)
                if self.neg_overlap_prune is not None and len(idx) > 1:
                    idx = self._prune(boxes[idx], idx)
                pruned[key] = idx
            out.append(pruned[key])
        return out

    def _prune(self, boxes: np.ndarray, idx: np.ndarray) -> np.ndarray:
        # Greedy NMS in proposal order: the score -i makes earlier proposals win.
        order_scores = -np.arange(len(idx), dtype=np.float32)
        keep = box_ops.nms_per_class(boxes, order_scores, np.zeros(len(idx), np.int64),
                                     self.neg_overlap_prune)
        return idx[np.sort(keep)]

    def add_image(self, features, boxes, gt_boxes, gt_labels, keys=None) -> np.ndarray:
        """Mine the negatives of one image; retrain the classes that hit `retrain_every`.

        features (N, D) raw fc7 features of the proposals `boxes` (N, 4), inclusive-end xyxy;
        gt_boxes (G, 4) and gt_labels (G,) in 1..K; keys (N, d) optional de-duplication keys
        (see `candidate_negatives`). Returns the number of negatives added per class, (K,) int64.
        """
        if self.images_seen == 0:
            self._check_positives()
        features = self._check_features(features)
        if len(boxes) != len(features):
            raise ValueError(f"{len(features)} feature rows but {len(boxes)} boxes")
        x = features * np.float32(self.feat_scale)
        scores = x @ self.W.T + self.b
        added = np.zeros(self.K, np.int64)
        for k, idx in enumerate(self.candidate_negatives(boxes, gt_boxes, gt_labels, keys), start=1):
            # A class without a model yet (the first image) takes all its negatives.
            hard = idx[scores[idx, k - 1] > self.hard_thresh] if self.trained[k - 1] else idx
            if len(hard):
                self._neg[k - 1].append(x[hard])
                self._neg_keys[k - 1].append(
                    np.stack([np.full(len(hard), self.images_seen), hard], axis=1))
                added[k - 1] = len(hard)
        self.num_added += added
        first = self.images_seen == 0
        for k in range(1, self.K + 1):
            if (first or self._retrain_due(k)) and self._neg[k - 1].n:
                self._train(k, image=self.images_seen)
        self.images_seen += 1
        return added

    def _retrain_due(self, k: int) -> bool:
        """Class k has gathered enough new negatives: >= retrain_every, or with `retrain_strict`
        > retrain_every (spp_train.m's `num_added > retrain_limit`)."""
        added = int(self.num_added[k - 1])
        return added > self.retrain_every if self.retrain_strict else added >= self.retrain_every

    def _check_positives(self) -> None:
        for k in range(1, self.K + 1):
            if self.num_positives(k) == 0:
                raise SppdetError(f"SVM training: no positive (ground-truth) examples for "
                                  f"{self.class_name(k)}; every class needs at least one "
                                  "object in the training split")

    # -- training ---------------------------------------------------------------------------
    def _train(self, k: int, image: int | None) -> None:
        start = time.perf_counter()
        pos, neg = self.positives(k), self._neg[k - 1].data
        name = self.class_name(k)
        w, b, X = fit_svm(pos, neg, self.C, self.pos_weight, self.bias_mult, self.tol,
                          self.max_iter, self.seed, self.logger, name)
        terms = svm_objective(X[: len(pos)], X[len(pos):], w, b, self.C, self.pos_weight,
                              self.bias_mult)
        self.W[k - 1], self.b[k - 1] = w, b
        self.trained[k - 1] = True
        self.num_added[k - 1] = 0
        # Evict easy negatives (scored with the float64 model the SVM just produced).
        keep = X[len(pos):] @ w + b >= self.evict_thresh
        del X
        n_neg = len(neg)
        self._neg[k - 1].keep(keep)
        self._neg_keys[k - 1].keep(keep)
        entry = {"class": k, "image": image, "positives": len(pos), "negatives": n_neg,
                 "evicted": int(n_neg - keep.sum()), "kept": int(keep.sum()), **terms,
                 "seconds": time.perf_counter() - start}
        self.history.append(entry)
        self.logger.info(
            f"svm {name} after image {'(end)' if image is None else image}: "
            f"{entry['positives']} pos, {n_neg} neg, {entry['evicted']} evicted, "
            f"{entry['kept']} kept; obj {terms['objective']:.5f} (pos {terms['pos_loss']:.5f}, "
            f"neg {terms['neg_loss']:.5f}, reg {terms['reg']:.5f}); {entry['seconds']:.2f}s")

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Retrain every class with new negatives (or never trained); return W (K, D), b (K,)."""
        if self.images_seen == 0:
            raise SppdetError("SVM training: no training images were given")
        for k in range(1, self.K + 1):
            if self.trained[k - 1] and self.num_added[k - 1] == 0:
                continue
            if self._neg[k - 1].n == 0:
                raise SppdetError(f"SVM training: no negative windows for {self.class_name(k)} "
                                  f"(IoU < {self.neg_iou} with its ground truth) in any image")
            self._train(k, image=None)
        return self.W.copy(), self.b.copy()

    # -- resuming ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue the pass after `images_seen` images (plain arrays)."""
        return {
            "hparams": self._hparams(), "W": self.W.copy(), "b": self.b.copy(),
            "trained": self.trained.copy(), "num_added": self.num_added.copy(),
            "images_seen": self.images_seen, "pos": self._pos.data.copy(),
            "pos_labels": self._pos_labels.data[:, 0].copy(),
            "neg": [r.data.copy() for r in self._neg],
            "neg_keys": [r.data.copy() for r in self._neg_keys],
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("hparams") != self._hparams():
            raise SppdetError(f"SVM resume state was made with other settings: "
                              f"{state.get('hparams')} != {self._hparams()}")
        self.W, self.b = state["W"].astype(np.float32), state["b"].astype(np.float32)
        self.trained = state["trained"].astype(bool)
        self.num_added = state["num_added"].astype(np.int64)
        self.images_seen = int(state["images_seen"])
        self._pos, self._pos_labels = _Rows(self.D, np.float32), _Rows(1, np.int64)
        self._pos.append(state["pos"])
        self._pos_labels.append(np.asarray(state["pos_labels"])[:, None])
        for k in range(self.K):
            self._neg[k], self._neg_keys[k] = _Rows(self.D, np.float32), _Rows(2, np.int64)
            self._neg[k].append(state["neg"][k])
            self._neg_keys[k].append(state["neg_keys"][k])
        self.history = [dict(h) for h in state["history"]]

    def _hparams(self) -> dict:
        return {"K": self.K, "D": self.D, "C": self.C, "pos_weight": self.pos_weight,
                "bias_mult": self.bias_mult, "neg_iou": self.neg_iou,
                "neg_overlap_prune": self.neg_overlap_prune, "hard_thresh": self.hard_thresh,
                "evict_thresh": self.evict_thresh, "retrain_every": self.retrain_every,
                "retrain_strict": self.retrain_strict,
                "feat_scale": self.feat_scale, "tol": self.tol, "max_iter": self.max_iter,
                "seed": self.seed}


def conv5_keys(features: SPPFeatures, image_shape: tuple[int, ...], boxes) -> np.ndarray:
    """The official code's de-duplication key of each box (N, 4) (original pixels, 0-based):
    (N, 5) int64 (scale index, c1, r1, c2, r2), the scale the detector pools the box at
    (`window_scales`) and the conv5 cells the detector's projection rule gives the box scaled
    to that scale (as `SPPFeatures.pool` scales it), before an empty window is collapsed and
    before the clip to the map: spp_features_convX_to_poolX.m keys `dedup` on
    [spm_response_boxes(scaled_boxes), best_scale_ids] (0-based cells here). Boxes with the
    same key are pooled from the same conv5 cells: the same feature."""
    boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
    height, width = image_shape[:2]
    scale_idx = features.window_scales(image_shape, boxes).cpu()
    keys = np.zeros((len(boxes), 5), np.int64)
    keys[:, 0] = scale_idx.numpy()
    backbone = features.backbone
    for k in scale_idx.unique().tolist():
        sel = scale_idx == k
        scaled = resize_boxes(boxes[sel], height, width, features.scales[k], features.max_size,
                              rule=features.projection)
        cells = response_cells(scaled, backbone.stride, backbone.center0, rule=features.projection)
        keys[sel.numpy(), 1:] = cells.cpu().numpy().astype(np.int64)
    return keys


def scale_sample_rows(records: Sequence, proposals: dict[str, np.ndarray], how: str,
                       rng: np.random.Generator) -> dict[int, np.ndarray]:
    """{record index: rows of its training windows (proposals, then ground truth)} whose fc7
    features estimate the feature scale.

    first: 200 random proposals of each of the first 200 images (the ground-truth features
    are added by the caller). random (spp_feature_stats.m): 200 random images (all when fewer),
    each 200 random windows (all when fewer) of its roidb rows, proposals and ground truth.
    """
    out: dict[int, np.ndarray] = {}
    if how == "first":
        for i, rec in enumerate(records[:200]):
            n = len(proposals[rec.image_id])
            if n:
                out[i] = rng.choice(n, min(n, 200), replace=False)
        return out
    if how != "random":
        raise ValueError(f"scale_sample must be 'first' or 'random', got {how!r}")
    for i in rng.choice(len(records), min(len(records), 200), replace=False).tolist():
        n = len(proposals[records[i].image_id]) + len(records[i].boxes)
        if n:
            out[i] = rng.choice(n, min(n, 200), replace=False)
    return out


@torch.no_grad()
def train_svms(detector, source, records: Sequence, proposals: dict[str, np.ndarray], cfg: SVMConfig,
               class_names: Sequence[str] | None = None, seed: int = 0,
               logger: logging.Logger | None = None) -> tuple[LinearSVMScorer, list[dict]]:
    """Train the detector's per-class SVMs on fc7 features of the training images, in two passes
    as the official code: ground-truth features (the positives) plus a sample of windows for the
    feature scale (mean norm `cfg.target_norm`; `cfg.scale_sample`: first = 200 random proposals
    of each of the first 200 images plus the ground truth, random = 200 random windows of 200
    random images as spp_feature_stats.m), then one hard-negative mining pass over every image's
    proposals. With `cfg.dedup_conv5` (SPP only) a proposal with the conv5 window and scale of
    an earlier proposal of its image is no negative (`conv5_keys`). (The official roidb lists
    each image's ground truth first, so there the ground-truth boxes take part in the
    de-duplication and are negatives of the other classes; here, as before, only proposals are
    mined.)

    source(image_id, rows) gives pooled features of an image's training windows (its proposals,
    then its ground truth: `features.TrainingFeatures`); records are the training ImageRecords.
    Returns (scorer, per-retrain history).
    """
    log = logger or logging.getLogger("sppdet.svm")
    detector.eval()
    rng = np.random.default_rng(seed)
    take = scale_sample_rows(records, proposals, cfg.scale_sample, rng)
    gt_feats, gt_labels, sample = [], [], []
    for i, rec in enumerate(tqdm(records, desc="SVM positives", leave=False, dynamic_ncols=True)):
        props = proposals[rec.image_id]
        rows = np.concatenate([len(props) + np.arange(len(rec.boxes)), take.get(i, np.zeros(0, np.int64))])
        if len(rows) == 0:
            continue
        fc7 = detector.fc7(source(rec.image_id, rows)).cpu().numpy()
        gt_feats.append(fc7[: len(rec.boxes)])
        gt_labels.append(rec.labels)
        sample.append(fc7[len(rec.boxes):])
    scale_sample = sample + gt_feats if cfg.scale_sample == "first" else sample
    scale = feature_scale(np.concatenate(scale_sample), cfg.target_norm)
    log.info(f"svm feature scale ({cfg.scale_sample}): {sum(len(x) for x in scale_sample)} windows of "
             f"{len(take)} images, x {scale:.4g} for a mean fc7 norm of {cfg.target_norm:g}")
    dedup = cfg.dedup_conv5 and isinstance(detector.features, SPPFeatures)
    if cfg.dedup_conv5 and not dedup:
        log.info(f"svm.dedup_conv5: the {detector.kind} detector has no shared conv5 map to project a "
                 "proposal onto, so the conv5-window de-duplication of negatives does not apply")
    trainer = SVMTrainer(detector.num_classes, detector.head.out_dim, C=cfg.C, pos_weight=cfg.pos_weight,
                         bias_mult=cfg.bias_mult, neg_iou=cfg.neg_iou, neg_overlap_prune=cfg.neg_overlap_prune,
                         hard_thresh=cfg.hard_thresh, evict_thresh=cfg.evict_thresh,
                         retrain_every=cfg.retrain_every, retrain_strict=cfg.retrain_strict,
                         feat_scale=scale, seed=seed, class_names=class_names, logger=logger)
    trainer.add_positives(np.concatenate(gt_feats), np.concatenate(gt_labels))
    total = duplicates = 0
    for rec in tqdm(records, desc="SVM mining", leave=False, dynamic_ncols=True):
        props = proposals[rec.image_id]
        if len(props) == 0:
            log.info(f"{rec.image_id}: no proposals; skipped for SVM mining")
            continue
        keys = None
        if dedup:
            shape = source.image_shape(rec.image_id) if hasattr(source, "image_shape") \
                else (rec.height, rec.width)
            keys = conv5_keys(detector.features, shape, props)
            total += len(keys)
            duplicates += len(keys) - len(np.unique(keys, axis=0))
        fc7 = detector.fc7(source(rec.image_id, np.arange(len(props))))
        trainer.add_image(fc7.cpu().numpy(), props, rec.boxes, rec.labels, keys=keys)
    if dedup:
        log.info(f"svm.dedup_conv5: {duplicates} of {total} proposals share their conv5 window and scale "
                 "with an earlier proposal of their image: no negatives")
    W, b = trainer.finish()
    return LinearSVMScorer.from_arrays(W, b, scale), trainer.history
