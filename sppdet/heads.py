"""The detector's heads on pooled window features: fc6/fc7 (+ the fine-tuning fc8), the per-class
linear-SVM scorer and the per-class box regressor.

    pooled (R, D) ─► FCHead: fc6 ─► fc7 (R, F) ─► LinearSVMScorer ─► scores (R, K)
                                          └──► fc8 (cls_score, K + 1 logits; fine-tuning, softmax scorer)
    pooled (R, D) ─► BoxRegressor (class of each box) ─► boxes (R, 4)

Each head is an nn.Module owning its tensors, as torchvision's FastRCNNPredictor does, so a
checkpoint is one state dict and `.to(device)` moves everything. The SVM and regression tensors
are fitted in closed form by scikit-learn (`svm.py`, `bbox_reg.py`), never by gradients, so
they are buffers. Labels are 1..K (0 is background); boxes are float [x1, y1, x2, y2], 0-based,
x2/y2 inclusive.
"""
from __future__ import annotations

import torch
from torch import nn

from . import boxes as box_ops


class FCHead(nn.Module):
    """fc6 -> fc7 (ReLU, dropout in training) on pooled windows (R, in_dim) -> (R, fc_dim), plus
    fc8 `cls_score` (fc_dim -> num_outputs), initialised N(0, fc8_std) with bias 0 [P 2.1]: the
    detector's (K+1)-way fc8 (label 0 = background) that fine-tuning trains, or the N-way
    classifier of pretraining (`classifier.SPPClassifier`), on the same fc6/fc7."""

    def __init__(self, in_dim: int, fc_dim: int, num_outputs: int, dropout: float = 0.5,
                 fc8_std: float = 0.01):
        super().__init__()
        self.fc6 = nn.Linear(in_dim, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.cls_score = nn.Linear(fc_dim, num_outputs)
        self.dropout = nn.Dropout(dropout)
        self.reset_cls_score(fc8_std)

    @property
    def out_dim(self) -> int:
        return self.fc7.out_features

    def reset_cls_score(self, std: float) -> None:
        nn.init.normal_(self.cls_score.weight, std=std)
        nn.init.zeros_(self.cls_score.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled (R, in_dim) -> fc7 (R, fc_dim)."""
        x = self.dropout(torch.relu(self.fc6(pooled)))
        return self.dropout(torch.relu(self.fc7(x)))



class LinearSVMScorer(nn.Module):
    """One linear SVM per class on scaled fc7 features: scores = (fc7 * scale) @ weight.T + bias.

    weight (K, F), bias (K,), scale () (fc7 features are scaled to a mean L2 norm of 20 [C 2.2]).
    A score is the SVM margin: > 0 means that class's SVM calls the window an object.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_classes, dim))
        self.register_buffer("bias", torch.zeros(num_classes))
        self.register_buffer("scale", torch.ones(()))

    @classmethod
    def from_arrays(cls, weight, bias, scale: float) -> "LinearSVMScorer":
        weight = torch.as_tensor(weight, dtype=torch.float32)
        scorer = cls(*weight.shape)
        scorer.weight.copy_(weight)
        scorer.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
        scorer.scale.fill_(float(scale))
        return scorer

    def forward(self, fc7: torch.Tensor) -> torch.Tensor:
        """fc7 (R, F) -> scores (R, K)."""
        return (fc7.float() * self.scale) @ self.weight.T + self.bias


class BoxRegressor(nn.Module):
    """Class-specific linear box regression [P 2.3]: the deltas of a window of class k are
    (pooled * scale) @ coef[k-1] + intercept[k-1], applied with `boxes.decode`.

    coef (K, D, 4), intercept (K, 4), scale (); a class with all zeros leaves its boxes as they
    are (an untrained regressor is the identity). num_samples (K,) records the training windows.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.register_buffer("coef", torch.zeros(num_classes, dim, 4))
        self.register_buffer("intercept", torch.zeros(num_classes, 4))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("num_samples", torch.zeros(num_classes, dtype=torch.int64))

    @classmethod
    def from_arrays(cls, coef, intercept, scale: float, num_samples=None) -> "BoxRegressor":
        coef = torch.as_tensor(coef, dtype=torch.float32)
        regressor = cls(coef.shape[0], coef.shape[1])
        regressor.coef.copy_(coef)
        regressor.intercept.copy_(torch.as_tensor(intercept, dtype=torch.float32))
        regressor.scale.fill_(float(scale))
        if num_samples is not None:
            regressor.num_samples.copy_(torch.as_tensor(num_samples, dtype=torch.int64))
        return regressor

    def deltas(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """pooled (N, D), labels (N,) in 1..K -> (dx, dy, log dw, log dh) (N, 4)."""
        labels = torch.as_tensor(labels, device=pooled.device).long()
        if len(labels) and (int(labels.min()) < 1 or int(labels.max()) > len(self.coef)):
            raise ValueError(f"labels must be in 1..{len(self.coef)}")
        return torch.einsum("nd,ndj->nj", pooled.float() * self.scale, self.coef[labels - 1]) \
            + self.intercept[labels - 1]

    def forward(self, pooled: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Move boxes (N, 4) by the regressor of their class; not clipped to the image."""
        if len(boxes) == 0:
            return boxes
        return box_ops.decode(boxes, self.deltas(pooled, labels))
