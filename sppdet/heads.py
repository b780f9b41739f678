"""The detector's heads on pooled window features: fc6/fc7 (+ the fine-tuning fc8), the per-class
linear-SVM scorer and the per-class box regressor.

    pooled (R, D) ─► FCHead: fc6 ─► fc7 (R, F) ─► LinearSVMScorer ─► scores (R, K)
                                          └──► fc8 (cls_score, K + 1 logits; fine-tuning, softmax scorer)
    pooled (R, D) ─► BoxRegressor (class of each box) ─► boxes (R, 4)

Each head is an nn.Module owning its tensors, as torchvision's FastRCNNPredictor does, so a
checkpoint is one state dict and `.to(device)` moves everything. The SVM and regression tensors
are fitted in closed form by scikit-learn (`svm.py`, `bbox_reg.py`), never by gradients, so
they are buffers. Labels are 1..K (0 is background); boxes are float [x1, y1, x2, y2], 0-based,
x2/y2 inclusive. `compress_head` replaces fc6/fc7 by truncated SVDs (a post-training option).
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
        return self.fc7.out_features  # LowRankLinear has it too

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

    def deltas(self, pooled: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor | None = None
               ) -> torch.Tensor:
        """pooled (R, D), labels (N,) in 1..K, rows (N,): the window of each label (default: row i
        for label i, N = R) -> (dx, dy, log dw, log dh) (N, 4)."""
        labels = torch.as_tensor(labels, device=pooled.device).long()
        rows = torch.arange(len(labels), device=pooled.device) if rows is None else \
            torch.as_tensor(rows, device=pooled.device).long()
        if len(rows) != len(labels):
            raise ValueError(f"{len(labels)} labels but {len(rows)} rows")
        if len(labels) and (int(labels.min()) < 1 or int(labels.max()) > len(self.coef)):
            raise ValueError(f"labels must be in 1..{len(self.coef)}")
        if len(labels) == 0:
            return pooled.new_zeros(0, 4)
        # every class's deltas in one (windows, D) @ (D, K * 4) product, then each label's own:
        # far cheaper than a copy of the (D, 4) coefficients per label, or one skinny product per
        # class. The product runs on the distinct windows asked for, or on all of them when those
        # are most: gathering their (D,) rows first costs more than the extra multiply-adds.
        k, d, _ = self.coef.shape
        coef = self.coef.permute(1, 0, 2).reshape(d, k * 4)
        windows, rows = rows.unique(return_inverse=True)
        if 2 * len(windows) > len(pooled):
            every, rows = pooled.float() @ coef, windows[rows]
        else:
            every = pooled.index_select(0, windows).float() @ coef
        every = every.view(-1, k, 4)
        return every[rows, labels - 1] * self.scale + self.intercept[labels - 1]

    def forward(self, pooled: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """Move boxes (N, 4) by the regressor of their class (`labels` (N,)), from the pooled
        features (R, D) of their windows (`rows` (N,), default the first N); not clipped."""
        if len(boxes) == 0:
            return boxes
        return box_ops.decode(boxes, self.deltas(pooled, labels, rows))


# ----------------------------------------------------------------------------- compression

class LowRankLinear(nn.Module):
    """A Linear layer replaced by its truncated SVD, as Fast R-CNN compresses fc6/fc7 (its
    section 3.1): W (out, in) ~ U_r S_r V_r^T runs as `reduce` (in -> r, no bias, weight S_r V_r^T)
    then `expand` (r -> out, weight U_r, the original bias). At full rank it is the same map."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.reduce = nn.Linear(in_features, rank, bias=False)
        self.expand = nn.Linear(rank, out_features)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rank: int) -> "LowRankLinear":
        """The rank-`rank` truncation of `linear` (SVD in float64)."""
        w = linear.weight.detach().double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        out = cls(linear.in_features, linear.out_features, rank).to(linear.weight.device)
        out.reduce.weight.copy_(s[:rank, None] * vh[:rank])
        out.expand.weight.copy_(u[:, :rank])
        out.expand.bias.copy_(linear.bias.detach())
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.reduce(x))


def svd_rank(spec: float, layer: nn.Module) -> int | None:
    """The rank a `test.svd_fc*` value asks of `layer`: >= 1 an absolute rank, in (0, 1) a
    fraction of min(in, out) (0.25 and 0.0625 give Fast R-CNN's 1024 and 256 for 4096-wide
    layers), 0 none; None when that would not make the layer cheaper (or it is compressed)."""
    if spec <= 0 or not isinstance(layer, nn.Linear):
        return None
    full = min(layer.in_features, layer.out_features)
    rank = int(spec) if spec >= 1 else max(1, round(spec * full))
    # two layers cost rank * (in + out) multiply-adds against in * out for one
    return rank if rank * (layer.in_features + layer.out_features) < layer.in_features * layer.out_features else None


def compress_head(head: FCHead, fc6: float, fc7: float) -> dict[str, int]:
    """Replace fc6 / fc7 by their truncated SVDs where that makes them cheaper (in place);
    returns {layer: rank} of what was replaced."""
    done = {}
    for name, spec in (("fc6", fc6), ("fc7", fc7)):
        rank = svd_rank(spec, getattr(head, name))
        if rank is not None:
            setattr(head, name, LowRankLinear.from_linear(getattr(head, name), rank))
            done[name] = rank
    return done


def svd_ranks(head: FCHead) -> dict[str, int]:
    """{layer: rank} of the fc layers that are truncated SVDs (empty when the head is exact)."""
    return {n: layer.rank for n in ("fc6", "fc7") for layer in [getattr(head, n)] if isinstance(layer, LowRankLinear)}


def match_compression(head: FCHead, state: dict, prefix: str = "head.") -> None:
    """Give `head` the low-rank fc6/fc7 a state dict holds (a compressed checkpoint)."""
    for name in ("fc6", "fc7"):
        key = f"{prefix}{name}.reduce.weight"
        if key in state:
            layer = getattr(head, name)
            setattr(head, name, LowRankLinear(layer.in_features, layer.out_features, state[key].shape[0]))
