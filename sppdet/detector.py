"""SPP-net detection: image + proposal windows -> per-class scored, regressed, NMS'd boxes.

    image ─► resize (short side s, per scale) ─► conv1..conv5 once per scale
    windows ─► best scale per window ─► project onto conv5 ─► pyramid max-pool {6,3,2,1}
            ─► fc6 ─► fc7 ─► linear SVM scores ──┐
            └─► pooled conv5 ─► box regression ──┴► per-class NMS ─► detections

`Detector` holds everything after the pooled window features (fc head, SVMs, box regressors,
NMS); `SPPDetector` supplies the pooled features from one conv pass per scale, and
`sppdet.rcnn.RCNNDetector` from one conv pass per warped window, so a comparison of the two
isolates the feature path.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch
from torch import nn

from . import boxes as box_ops
from .backbones import Backbone
from .spp import choose_scales, project_boxes, resize_factor, spp_pool, spp_output_dim
from .utils import Timer


class FCHead(nn.Module):
    """fc6 -> fc7 (4096, ReLU, dropout in training) on pooled windows, plus the (K+1)-way fc8
    (`cls_score`, label 0 = background) that only fine-tuning uses."""

    def __init__(self, in_dim: int, fc_dim: int, num_classes: int, dropout: float = 0.5,
                 fc8_std: float = 0.01):
        super().__init__()
        self.fc6 = nn.Linear(in_dim, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.cls_score = nn.Linear(fc_dim, num_classes + 1)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.cls_score.weight, std=fc8_std)
        nn.init.zeros_(self.cls_score.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled (R, in_dim) -> fc7 (R, fc_dim)."""
        x = self.dropout(torch.relu(self.fc6(pooled)))
        return self.dropout(torch.relu(self.fc7(x)))


@dataclass
class Detections:
    """Detections of one image: boxes (N, 4) float32 0-based inclusive in original pixels,
    scores (N,) float32, labels (N,) int64 in 1..K, sorted by decreasing score."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def _timed(timers: dict | None, name: str, device: torch.device):
    """The timer `name` of `timers` (created on first use), or a no-op without timers."""
    if timers is None:
        return contextlib.nullcontext()
    return timers.setdefault(name, Timer(device))


class Detector(nn.Module):
    """Shared tail: fc head, per-class linear SVMs on fc7, box regression on pooled features.

    Subclasses implement `pooled_features(image, boxes) -> (R, D)`. The SVM and regression
    parameters are buffers, so they live in the state dict (checkpoints) and move with `.to()`.
    """

    def __init__(self, backbone: Backbone, num_classes: int, levels: Sequence[int] = (6, 3, 2, 1),
                 fc_dim: int = 4096, dropout: float = 0.5, chunk: int = 512):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.levels = tuple(levels)
        self.chunk = chunk
        self.feature_dim = spp_output_dim(backbone.out_channels, self.levels)
        self.head = FCHead(self.feature_dim, fc_dim, num_classes, dropout)
        k, d = num_classes, self.feature_dim
        self.register_buffer("svm_weight", torch.zeros(k, fc_dim))
        self.register_buffer("svm_bias", torch.zeros(k))
        self.register_buffer("svm_scale", torch.ones(()))      # fc7 features x this (mean norm 20)
        self.register_buffer("bbox_coef", torch.zeros(k, d, 4))
        self.register_buffer("bbox_intercept", torch.zeros(k, 4))
        self.register_buffer("bbox_scale", torch.ones(()))     # pooled features x this
        self.register_buffer("bbox_enabled", torch.zeros((), dtype=torch.bool))

    @property
    def device(self) -> torch.device:
        return self.svm_bias.device

    def pooled_features(self, image: np.ndarray, boxes: torch.Tensor, timers: dict | None = None) -> torch.Tensor:
        raise NotImplementedError

    def fc7(self, pooled: torch.Tensor) -> torch.Tensor:
        """(R, D) -> (R, fc_dim), in chunks of `self.chunk` windows to bound memory."""
        return torch.cat([self.head(p) for p in pooled.split(self.chunk)]) if len(pooled) else \
            pooled.new_zeros(0, self.head.fc7.out_features)

    def svm_scores(self, fc7: torch.Tensor) -> torch.Tensor:
        """(R, fc_dim) -> (R, K) linear SVM scores."""
        return (fc7 * self.svm_scale) @ self.svm_weight.T + self.svm_bias

    def regress(self, pooled: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Move boxes (N, 4) by the regressor of their class (labels in 1..K)."""
        if not bool(self.bbox_enabled) or len(boxes) == 0:
            return boxes
        coef, intercept = self.bbox_coef[labels - 1], self.bbox_intercept[labels - 1]
        deltas = torch.einsum("nd,ndj->nj", pooled * self.bbox_scale, coef) + intercept
        return box_ops.decode(boxes, deltas)

    @torch.no_grad()
    def detect(self, image: np.ndarray, boxes: np.ndarray, score_thresh: float = -1.5,
               nms: float = 0.3, max_per_image: int = 100, timers: dict | None = None) -> Detections:
        """image: BGR uint8 (H, W, 3); boxes: proposals (R, 4) 0-based inclusive.

        Per class: windows scoring above `score_thresh` -> NMS -> at most `max_per_image`
        -> box regression, clipped to the image -> NMS again (as the official evaluation does).
        """
        self.eval()
        height, width = image.shape[:2]
        proposals = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        pooled = self.pooled_features(image, proposals, timers)
        proposals = proposals.to(pooled.device)  # indexed below by (device) candidate indices
        with _timed(timers, "fc", self.device):
            scores = self.svm_scores(self.fc7(pooled))
        with _timed(timers, "nms", self.device):
            window, cls = (scores > score_thresh).nonzero(as_tuple=True)
            cand_scores = scores[window, cls]
            labels = cls + 1
            keep = box_ops.nms_per_class(proposals[window], cand_scores, labels, nms)
            keep = self._top_per_class(keep, labels, max_per_image)
            window, labels, cand_scores = window[keep], labels[keep], cand_scores[keep]
            out = self.regress(pooled[window], proposals[window], labels)
            out = box_ops.clip(out, height, width)
            keep = box_ops.nms_per_class(out, cand_scores, labels, nms)
        return Detections(out[keep].cpu().numpy().astype(np.float32),
                          cand_scores[keep].cpu().numpy().astype(np.float32),
                          labels[keep].cpu().numpy().astype(np.int64))

    @staticmethod
    def _top_per_class(keep: torch.Tensor, labels: torch.Tensor, limit: int) -> torch.Tensor:
        """`keep` is sorted by decreasing score; keep the first `limit` of each class."""
        kept_labels = labels[keep]
        rank = torch.zeros_like(keep)
        for c in kept_labels.unique():
            idx = (kept_labels == c).nonzero(as_tuple=True)[0]
            rank[idx] = torch.arange(len(idx))
        return keep[rank < limit]


class SPPDetector(Detector):
    """SPP-net: conv1..conv5 once per scale per image; every window pooled from the conv5 map
    of its best scale (one scale = the paper's single-scale, five = its multi-scale mode)."""

    def __init__(self, backbone: Backbone, num_classes: int, levels: Sequence[int] = (6, 3, 2, 1),
                 fc_dim: int = 4096, dropout: float = 0.5, chunk: int = 512,
                 scales: Sequence[int] = (688,), max_size: int = 2000,
                 projection: str = "paper", scale_rule: str = "paper"):
        super().__init__(backbone, num_classes, levels, fc_dim, dropout, chunk)
        self.scales = tuple(scales)
        self.max_size = max_size
        self.projection = projection
        self.scale_rule = scale_rule

    def conv5_pyramid(self, image: np.ndarray, scale_ids: Sequence[int] | None = None,
                      timers: dict | None = None) -> dict[int, torch.Tensor]:
        """conv5 maps {scale index: (C, H5, W5)} of the image resized to each scale (or only
        those in `scale_ids`). Resizing is bilinear, short side -> scale, long side capped."""
        height, width = image.shape[:2]
        maps = {}
        for k in (range(len(self.scales)) if scale_ids is None else scale_ids):
            f = resize_factor(height, width, self.scales[k], self.max_size)
            size = (max(1, round(width * f)), max(1, round(height * f)))
            with _timed(timers, "conv", self.device):
                resized = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
                x = self.backbone.preprocess(resized)[None].to(self.device)
                maps[k] = self.backbone(x)[0]
        return maps

    def window_scales(self, image_shape: tuple[int, int], boxes: torch.Tensor) -> torch.Tensor:
        """(R,) index of the scale each window is pooled at."""
        height, width = image_shape[:2]
        return choose_scales(boxes, self.scales, height, width, self.max_size, rule=self.scale_rule)

    def pool(self, maps: dict[int, torch.Tensor], image_shape: tuple[int, int], boxes: torch.Tensor,
             scale_idx: torch.Tensor, timers: dict | None = None) -> torch.Tensor:
        """Pool each window (R, 4) from the conv5 map of scale `scale_idx[r]` -> (R, D)."""
        height, width = image_shape[:2]
        pooled = None
        for k, conv5 in maps.items():
            sel = (scale_idx == k).nonzero(as_tuple=True)[0]
            if len(sel) == 0:
                continue
            f = resize_factor(height, width, self.scales[k], self.max_size)
            with _timed(timers, "pool", self.device):
                windows = project_boxes(boxes[sel] * f, self.backbone.stride, self.backbone.center0,
                                        conv5.shape[1], conv5.shape[2], rule=self.projection)
                part = spp_pool(conv5, windows.to(conv5.device), self.levels)
            if pooled is None:
                pooled = part.new_empty(len(boxes), part.shape[1])
            pooled[sel.to(part.device)] = part
        if pooled is None:
            pooled = torch.zeros(len(boxes), self.feature_dim, device=self.device)
        return pooled

    def pooled_features(self, image: np.ndarray, boxes: torch.Tensor, timers: dict | None = None) -> torch.Tensor:
        """image (H, W, 3) BGR uint8, boxes (R, 4) original pixels -> pooled conv5 (R, D)."""
        scale_idx = self.window_scales(image.shape, boxes)
        maps = self.conv5_pyramid(image, scale_idx.unique().tolist(), timers)
        return self.pool(maps, image.shape, boxes, scale_idx, timers)
