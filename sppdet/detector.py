"""The detector: image + proposal windows -> per-class scored, regressed, NMS'd boxes.

    image, windows ─► features (SPP: conv5 once per scale, pyramid pooling; R-CNN: per window)
                  ─► pooled (R, D) ─► fc6 ─► fc7 ─► scorer (linear SVMs, or fc8 softmax) ──┐
                                  └─► box regressor ─────────────────────────────────────────┴► NMS

One `Detector` class serves SPP-net and the R-CNN baseline: only its `features` module differs
(`sppdet.features.SPPFeatures` or `sppdet.rcnn.RCNNFeatures`), which isolates the feature path in
the paper's Table 10 comparison. The heads are modules (`sppdet.heads`), trained by the stages
in finetune.py, svm.py and bbox_reg.py and held here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import boxes as box_ops
from .features import WindowFeatures, pooling_dtype, timed
from .heads import BoxRegressor, FCHead, LinearSVMScorer

# The decision boundary of each scorer: the default drawing threshold (`test.draw_thresh`).
DECISION_BOUNDARY = {"svm": 0.0, "softmax": 0.5}


@dataclass
class Detections:
    """Detections of one image: boxes (N, 4) float32 [x1, y1, x2, y2] in original pixels, 0-based,
    x2/y2 inclusive; scores (N,) float32 (SVM margins, or softmax probabilities: see
    `Detector.detect`); labels (N,) int64 in 1..K, naming `class_names[label - 1]` when given;
    sorted by decreasing score."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.scores)

    def above(self, thresh: float) -> "Detections":
        """Only the detections scoring at least `thresh`."""
        keep = self.scores >= thresh
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep], self.class_names)


class Detector(nn.Module):
    """features (image, windows) -> pooled (R, D); head: fc6/fc7 (+ fc8); svm: per-class linear
    SVMs on fc7; regressor: per-class box regression on pooled features."""

    def __init__(self, features: WindowFeatures, num_classes: int, fc_dim: int = 4096,
                 dropout: float = 0.5, fc8_std: float = 0.01, chunk: int = 512):
        super().__init__()
        self.features = features
        self.num_classes = num_classes
        self.chunk = chunk  # windows per pass through the fc layers, bounds memory
        self.head = FCHead(features.output_dim, fc_dim, num_classes + 1, dropout, fc8_std)
        self.svm = LinearSVMScorer(num_classes, fc_dim)
        self.regressor = BoxRegressor(num_classes, features.output_dim)

    @property
    def kind(self) -> str:
        """"spp" or "rcnn": the feature path."""
        return self.features.kind

    @property
    def backbone(self):
        return self.features.backbone

    @property
    def device(self) -> torch.device:
        return self.svm.bias.device

    def fc7(self, pooled: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """(R, D) -> (R, fc_dim) float32, in chunks of `self.chunk` windows; precision "bf16" runs
        the fc layers in bfloat16 (autocast)."""
        if len(pooled) == 0:
            return pooled.new_zeros(0, self.head.out_dim, dtype=torch.float32)
        if precision != "bf16":
            pooled = pooled.float()
        with torch.autocast(pooled.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return torch.cat([self.head(p) for p in pooled.split(self.chunk)]).float()

    def scores(self, fc7: torch.Tensor, scorer: str = "svm") -> torch.Tensor:
        """fc7 (R, F) -> (R, K): SVM margins ("svm") or fc8 softmax probabilities ("softmax")."""
        if scorer == "svm":
            return self.svm(fc7)
        if scorer == "softmax":  # without the background column
            return torch.softmax(self.head.cls_score(fc7), dim=1)[:, 1:]
        raise ValueError(f"scorer must be 'svm' or 'softmax', got {scorer!r}")

    @torch.no_grad()
    def detect(self, image: np.ndarray, boxes: np.ndarray, scorer: str = "svm",
               score_thresh: float = -1.5, nms: float = 0.3, max_per_class: int = 100,
               max_per_image: int = 100, regress: bool = True, precision: str = "fp32",
               conv_precision: str = "fp32", timers: dict | None = None) -> Detections:
        """image: BGR uint8 (H, W, 3); boxes: proposals (R, 4) 0-based inclusive.

        Per class: windows scoring above `score_thresh` -> NMS -> the best `max_per_class` -> box
        regression (if `regress`), clipped to the image -> NMS again (as the official evaluation
        does); then the best `max_per_image` over all classes. Scores are SVM margins (> 0: the
        class's SVM calls it an object) or, with scorer="softmax", fc8 probabilities.
        precision "bf16" runs fc6/fc7 in bfloat16 (see `inference.resolve_precision`) on windows
        pooled in bf16 (`features.pooling_dtype`; box regression reads them too), conv_precision
        "bf16" the conv layers.
        """
        self.eval()
        height, width = image.shape[:2]
        proposals = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=conv_precision == "bf16"):
            pooled = self.features(image, proposals, timers=timers, dtype=pooling_dtype(precision))
        proposals = proposals.to(pooled.device)
        with timed(timers, "fc", self.device):
            scores = self.scores(self.fc7(pooled, precision), scorer)
        with timed(timers, "nms", self.device):
            window, cls = (scores > score_thresh).nonzero(as_tuple=True)
            cand_scores = scores[window, cls]
            labels = cls + 1
            keep = box_ops.nms_per_class(proposals[window], cand_scores, labels, nms)
            keep = keep[_rank_within(labels[keep]) < max_per_class]
            window, labels, cand_scores = window[keep], labels[keep], cand_scores[keep]
            out = self.regressor(pooled, proposals[window], labels, window) if regress else proposals[window]
            out = box_ops.clip(out, height, width)
            keep = box_ops.nms_per_class(out, cand_scores, labels, nms)[:max_per_image]
        return Detections(out[keep].cpu().numpy().astype(np.float32),
                          cand_scores[keep].cpu().numpy().astype(np.float32),
                          labels[keep].cpu().numpy().astype(np.int64))


def _rank_within(labels: torch.Tensor) -> torch.Tensor:
    """For labels (N,) of detections sorted by decreasing score: each one's rank within its class
    (0 = that class's best)."""
    order = torch.argsort(labels, stable=True)       # by class, score order kept inside
    sorted_labels = labels[order]
    starts = torch.searchsorted(sorted_labels, sorted_labels, right=False)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(labels), device=labels.device) - starts
    return rank
