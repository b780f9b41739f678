"""The SPP classification network (the paper's first half, PAPER.md 1.7), which pretraining trains
and whose conv1..conv5 and fc6/fc7 the detector starts from.

    image (B, 3, H, W), any size ─► backbone conv1..conv5 ─► spatial pyramid max pooling
        ─► fc6 ─► fc7 (the detector's own FCHead) ─► N-way fc8 ─► logits (B, N)

`pyramid="none"` is the paper's no-SPP baseline: one fixed max pooling after conv5, its window
and stride set for the training input size by the paper's rule for an a x a map and n x n bins
(window ceil(a/n), stride floor(a/n), n the finest pyramid level: ZF-5 at 224 has a = 13, so
3x3 stride 2 and 6x6 bins, the original network's pool5), so fc6 sees a fixed-size map and the
net takes only its training input size. Batch norm after each conv (`add_batch_norm`) is an option
for training from scratch; `detection_weights` folds it into the conv weights and biases, so the
plain trunk of the detector computes the same function.
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Backbone, map_size
from .heads import FCHead
from .spp import spp_output_dim, spp_pool_maps

class ConvBN(nn.Module):
    """A convolution followed by batch norm (training only: `fold_batch_norm` merges them)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(conv.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def _replace(module: nn.Module, kind: type, make) -> None:
    for name, child in module.named_children():
        if isinstance(child, kind):
            setattr(module, name, make(child))
        else:
            _replace(child, kind, make)


def add_batch_norm(backbone: nn.Module) -> nn.Module:
    """Put a BatchNorm2d after every conv of the trunk (in place)."""
    _replace(backbone, nn.Conv2d, ConvBN)
    return backbone


@torch.no_grad()
def fold_batch_norm(backbone: nn.Module) -> nn.Module:
    """Merge each ConvBN into one conv computing what it computes in eval mode (in place):
    w' = w * g, b' = (b - mean) * g + beta with g = gamma / sqrt(var + eps)."""
    def fold(m: ConvBN) -> nn.Conv2d:
        conv, bn = m.conv, m.bn
        g = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        out = copy.deepcopy(conv)
        out.weight.copy_(conv.weight * g[:, None, None, None])
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        if out.bias is None:
            out.bias = nn.Parameter(torch.zeros_like(bn.running_mean))
        out.bias.copy_((bias - bn.running_mean) * g + bn.bias)
        return out
    _replace(backbone, ConvBN, fold)
    return backbone


class SPPClassifier(nn.Module):
    """backbone -> pyramid {levels} (or the fixed pool) -> FCHead fc6/fc7 -> N-way fc8.

    `fixed_input`: the training input size of the no-SPP baseline (fc6's input is the fixed
    pool's output at that size); ignored with the pyramid.
    """

    def __init__(self, backbone: Backbone, num_classes: int, levels: Sequence[int] = (6, 3, 2, 1),
                 fc_dim: int = 4096, dropout: float = 0.5, pyramid: str = "spp", fixed_input: int = 224,
                 fc8_std: float = 0.01):
        super().__init__()
        if pyramid not in ("spp", "none"):
            raise ValueError(f"pyramid must be 'spp' or 'none', got {pyramid!r}")
        self.backbone, self.pyramid, self.levels = backbone, pyramid, tuple(levels)
        c = backbone.out_channels
        if pyramid == "spp":
            in_dim = spp_output_dim(c, self.levels)
        else:
            a, n = map_size(backbone.layers, fixed_input), max(self.levels)
            self.pool = (math.ceil(a / n), max(1, a // n))  # window, stride [P 2.3]
            side = map_size([(*self.pool, 0, False)], a)
            in_dim = c * side * side
        self.head = FCHead(in_dim, fc_dim, num_classes, dropout, fc8_std)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        conv5 = self.backbone(x)
        if self.pyramid == "spp":
            return spp_pool_maps(conv5, self.levels)
        return F.max_pool2d(conv5, *self.pool).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) from `backbone.preprocess` -> logits (B, N)."""
        return self.head.cls_score(self.head(self.pooled(x)))

    @torch.no_grad()
    def detection_weights(self) -> dict[str, torch.Tensor]:
        """What `model.weights` loads: the trunk's state dict (batch norm folded in, under the
        plain backbone's keys, preprocessing included) plus fc6/fc7 as fc6.weight ... fc7.bias."""
        trunk = fold_batch_norm(copy.deepcopy(self.backbone)).eval()
        state = {k: v.detach().clone().cpu() for k, v in trunk.state_dict().items()}
        for name in ("fc6", "fc7"):
            layer = getattr(self.head, name)
            state[f"{name}.weight"] = layer.weight.detach().clone().cpu()
            state[f"{name}.bias"] = layer.bias.detach().clone().cpu()
        return state


# ----------------------------------------------------------------------------- initialisation

def initialize(model: SPPClassifier, scheme: str = "default") -> None:
    """Initial weights for pretraining from scratch: "default" (PyTorch's), "kaiming" (He normal,
    fan-out, on every conv and fc6/fc7; biases 0), or "gabor" (kaiming, with conv1 a bank of
    Gabor filters and colour-opponent blobs, what trained first layers end up as: it saves about
    an epoch of the demo's pretraining). fc8 stays N(0, fc8_std)."""
    if scheme == "default":
        return
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for fc in (model.head.fc6, model.head.fc7):
            nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")
            nn.init.zeros_(fc.bias)
        if scheme == "gabor":
            conv1 = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
            conv1.weight.copy_(gabor_bank(tuple(conv1.weight.shape)))


def gabor_bank(shape: tuple[int, int, int, int]) -> torch.Tensor:
    """conv1 weights (out, in, k, k): luminance Gabor filters (orientations x even/odd phase, at
    wavelengths 3.5 and 6 px) for three quarters of the channels, colour-opponent centre blobs
    for the rest; each zero-mean (the Gabors) and scaled to He-normal's expected norm."""
    out, cin, k, _ = shape
    r = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    filters = []
    n_orient = max(1, (out - max(2, out // 4)) // 4)
    for wavelength in (3.5, 6.0):
        envelope = torch.exp(-(xx ** 2 + yy ** 2) / (2 * (0.45 * wavelength) ** 2))
        for o in range(n_orient):
            theta = math.pi * o / n_orient
            u = xx * math.cos(theta) + yy * math.sin(theta)
            for phase in (0.0, math.pi / 2):
                g = envelope * torch.cos(2 * math.pi * u / wavelength + phase)
                filters.append((g - g.mean()).expand(cin, k, k))
    blob = torch.exp(-(xx ** 2 + yy ** 2) / (2 * 1.5 ** 2))
    opponents = [(1, -1, 0), (0, 1, -1), (1, 0, -1), (-1, -1, 2), (2, -1, -1), (-1, 2, -1)]
    i = 0
    while len(filters) < out:
        sign = 1 if (i // len(opponents)) % 2 == 0 else -1
        colour = torch.tensor(opponents[i % len(opponents)][:cin], dtype=torch.float64) * sign
        filters.append(colour[:, None, None] * blob)
        i += 1
    w = torch.stack(filters[:out])
    w = w / w.flatten(1).norm(dim=1)[:, None, None, None]
    return (w * math.sqrt(2.0 / (out * k * k)) * math.sqrt(cin * k * k)).float()
