"""The one path from (image, windows) to pooled window features, for detection and training.

    SPPFeatures:  image ─► resize (short side s, per scale) ─► conv1..conv5 once per scale
                  windows ─► best scale per window ─► project onto conv5 ─► pyramid max-pool
    RCNNFeatures (sppdet.rcnn): each window warped ─► conv1..conv5 ─► pyramid max-pool
    TrainingFeatures: the training stages' view of either, with what frozen conv layers produce
                  computed once per image and reused (conv5 maps per scale and flip for SPP, pooled
                  windows for R-CNN), in memory or on disk.

Boxes are float [x1, y1, x2, y2] in original-image pixels, 0-based, x2/y2 inclusive. Images are
BGR uint8 (H, W, 3). Pooled features are (R, C * sum(n * n)), levels in the given order.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch import nn

from .backbones import Backbone
from .spp import choose_scales, project_boxes, resize_boxes, resize_factor, spp_output_dim, spp_pool
from .utils import CorruptFileError, Timer, content_digest, file_signature, get_logger, \
    load_verified, save_verified, stable_hash
from .voc import load_image


def timed(timers: dict | None, name: str, device: torch.device):
    """The timer `name` of `timers` (created on first use), or a no-op without timers."""
    if timers is None:
        return contextlib.nullcontext()
    return timers.setdefault(name, Timer(device))


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Mirror boxes (R, 4) in an image of `width` pixels: x -> width - 1 - x."""
    out = boxes.copy()
    out[:, 0], out[:, 2] = width - 1 - boxes[:, 2], width - 1 - boxes[:, 0]
    return out


def pooling_dtype(precision: str) -> torch.dtype:
    """The dtype windows are pooled in for fc layers running in `precision` ("fp32" | "bf16").
    bf16 pools conv5 rounded to bf16: max pooling commutes with rounding (it is monotone), so
    fc6 sees the same input as from fp32 pooling cast by autocast, and pooling moves half the
    bytes."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


class WindowFeatures(nn.Module):
    """Base of the two feature paths: a backbone and a pyramid. forward(image, boxes, timers=None,
    dtype=None) -> (R, D)."""

    kind: str

    def __init__(self, backbone: Backbone, levels: Sequence[int]):
        super().__init__()
        self.backbone = backbone
        self.levels = tuple(levels)

    @property
    def output_dim(self) -> int:
        return spp_output_dim(self.backbone.out_channels, self.levels)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def settings(self) -> dict:
        """Everything besides the weights that shapes the features (for cache keys)."""
        return {"kind": self.kind, "levels": self.levels, "backbone": self.backbone.name,
                "out_channels": self.backbone.out_channels, "preprocess": self.backbone.preprocessing(),
                # the layers themselves (model.lrn removes ZF-5's LRN, which has no weights)
                "layers": [type(m).__name__ for m in self.backbone.modules()]}


class SPPFeatures(WindowFeatures):
    """SPP-net: conv1..conv5 once per scale per image; each window pooled from the conv5 map of
    its scale (one scale = the paper's single-scale mode, five = its multi-scale mode)."""

    kind = "spp"

    def __init__(self, backbone: Backbone, levels: Sequence[int] = (6, 3, 2, 1),
                 scales: Sequence[int] = (688,), max_size: int = 2000,
                 projection: str = "paper", scale_rule: str = "paper", scale_target: float | None = None):
        super().__init__(backbone, levels)
        self.scales = tuple(scales)
        self.max_size = max_size
        self.projection = projection
        self.scale_rule = scale_rule
        self.scale_target = scale_target

    def settings(self) -> dict:
        return {**super().settings(), "scales": self.scales, "max_size": self.max_size,
                "projection": self.projection, "scale_rule": self.scale_rule, "scale_target": self.scale_target}

    def conv5(self, image: np.ndarray, scale_ids: Sequence[int] | None = None,
              timers: dict | None = None) -> dict[int, torch.Tensor]:
        """conv5 maps {scale index: (C, H5, W5)} of the image resized to each scale (or only those
        in `scale_ids`). Resizing is bilinear, short side -> scale, long side capped at max_size."""
        height, width = image.shape[:2]
        maps = {}
        for k in (range(len(self.scales)) if scale_ids is None else scale_ids):
            f = resize_factor(height, width, self.scales[k], self.max_size)
            size = (max(1, round(width * f)), max(1, round(height * f)))
            with timed(timers, "conv", self.device):
                resized = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
                x = self.backbone.preprocess(resized)[None].to(self.device)
                maps[k] = self.backbone(x)[0]
        return maps

    def window_scales(self, image_shape: tuple[int, ...], boxes: torch.Tensor) -> torch.Tensor:
        """(R,) index of the scale each window is pooled at."""
        height, width = image_shape[:2]
        return choose_scales(boxes, self.scales, height, width, self.max_size, rule=self.scale_rule,
                             target=self.scale_target)

    def pool(self, maps: dict[int, torch.Tensor], image_shape: tuple[int, ...], boxes: torch.Tensor,
             scale_idx: torch.Tensor, timers: dict | None = None, dtype: torch.dtype | None = None
             ) -> torch.Tensor:
        """Pool each window (R, 4) from the conv5 map of scale `scale_idx[r]` -> (R, D), in
        `dtype` (default: the maps'; see `pooling_dtype`). Boxes reach the resized image as the
        projection rule's code does: boxes * f (paper), or (b - 1)(s - 1)/(m - 1) + 1 on
        1-based corners (code; `spp.resize_boxes`)."""
        height, width = image_shape[:2]
        pooled = None
        for k, conv5 in maps.items():
            sel = (scale_idx == k).nonzero(as_tuple=True)[0]
            if len(sel) == 0:
                continue
            with timed(timers, "pool", self.device):
                # paper: boxes * f; code: the official (b - 1)(s - 1)/(m - 1) + 1 (spp.resize_boxes)
                scaled = resize_boxes(boxes[sel], height, width, self.scales[k], self.max_size,
                                      rule=self.projection)
                windows = project_boxes(scaled, self.backbone.stride, self.backbone.center0,
                                        conv5.shape[1], conv5.shape[2], rule=self.projection)
                part = spp_pool(conv5.to(dtype or conv5.dtype), windows.to(conv5.device), self.levels)
            if len(sel) == len(boxes):  # one scale for every window: no (R, D) scatter copy
                return part
            if pooled is None:
                pooled = part.new_empty(len(boxes), part.shape[1])
            pooled[sel.to(part.device)] = part
        if pooled is None:
            pooled = torch.zeros(len(boxes), self.output_dim, device=self.device)
        return pooled

    def forward(self, image: np.ndarray, boxes: torch.Tensor, timers: dict | None = None,
                scale_idx: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """image (H, W, 3) BGR uint8, boxes (R, 4) original pixels -> pooled conv5 (R, D) in
        `dtype` (default: conv5's). `scale_idx` (R,) overrides the per-window scale rule
        (fine-tuning's random scales)."""
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        if scale_idx is None:
            scale_idx = self.window_scales(image.shape, boxes)
        maps = self.conv5(image, scale_idx.unique().tolist(), timers)
        return self.pool(maps, image.shape, boxes, scale_idx, timers, dtype)


class TrainingFeatures:
    """Pooled features of each training image's windows (`windows[id]`, (R, 4): its proposals,
    then its ground truth), as fine-tuning, the SVMs and box regression read them.

    With conv frozen (`train_conv=False`), what the conv layers produce is computed once and
    kept (`cache` memory | disk | none) as fp16: SPP keeps conv5 maps per (image, scale, flip)
    and pools the requested windows from them; R-CNN keeps the pooled features of every window
    of an unflipped image (its warp + conv per window is the costly part; flipped windows are
    computed when asked). Every read of a kept value returns the fp16-rounded one, the first
    included, so a resumed run trains exactly as an uninterrupted one. Disk files live under
    `folder/<key>/`, the key covering the network weights and every feature setting; a file
    that fails its integrity check is recomputed with a warning. With `train_conv`, features
    come from the network live, with autograd.
    """

    def __init__(self, features: WindowFeatures, image_paths: dict[str, Path],
                 windows: dict[str, np.ndarray], cache: str = "memory", folder: Path | None = None,
                 train_conv: bool = False):
        if cache not in ("memory", "disk", "none"):
            raise ValueError(f"cache must be memory, disk or none, got {cache!r}")
        self.features, self.paths, self.windows = features, image_paths, windows
        self.cache = "none" if train_conv else cache
        self.train_conv = train_conv
        self.memory: dict[tuple, torch.Tensor] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        self.folder = None
        if self.cache == "disk":
            if folder is None:
                raise ValueError("a disk cache needs a folder")
            key = stable_hash(features.settings(), content_digest(features.backbone.state_dict()),
                              features.kind == "rcnn" and content_digest(windows))
            self.folder = Path(folder) / f"{features.kind}-{key}"

    @property
    def device(self) -> torch.device:
        return self.features.device

    def __call__(self, image_id: str, rows, flip: bool = False,
                 scale_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features (len(rows), D) on the network's device of windows `rows` (indices into
        `windows[image_id]`), of the mirrored image when `flip`; `scale_idx` (SPP) per window."""
        rows = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        boxes = self.windows[image_id][rows.numpy()]
        if self.train_conv:
            image, boxes = self._image(image_id, boxes, flip)
            return self.features(image, torch.from_numpy(boxes), scale_idx=scale_idx) \
                if self.features.kind == "spp" else self.features(image, torch.from_numpy(boxes))
        with torch.no_grad():
            if self.features.kind == "spp":
                return self._spp(image_id, boxes, flip, scale_idx)
            if flip:
                image, boxes = self._image(image_id, boxes, flip)
                return self.features(image, torch.from_numpy(boxes))
            return self._kept(image_id, "windows", self._all_windows)[rows.to(self.device)]

    def _image(self, image_id: str, boxes: np.ndarray, flip: bool) -> tuple[np.ndarray, np.ndarray]:
        image = load_image(self.paths[image_id])
        if flip:
            image = np.ascontiguousarray(image[:, ::-1])
            boxes = flip_boxes(boxes, image.shape[1])
        return image, boxes.astype(np.float32)

    def _spp(self, image_id: str, boxes: np.ndarray, flip: bool, scale_idx) -> torch.Tensor:
        feats: SPPFeatures = self.features  # type: ignore[assignment]
        shape = self.image_shape(image_id)
        if flip:
            boxes = flip_boxes(boxes, shape[1])
        boxes_t = torch.from_numpy(boxes.astype(np.float32))
        if scale_idx is None:
            scale_idx = feats.window_scales(shape, boxes_t)
        maps = {}
        for k in scale_idx.unique().tolist():
            name = f"{'flip_' if flip else ''}s{k}"
            maps[k] = self._kept(image_id, name, lambda i, k=k, flip=flip: feats.conv5(
                self._image(i, np.zeros((0, 4), np.float32), flip)[0], [k])[k])
        return feats.pool(maps, shape, boxes_t, scale_idx)

    def image_shape(self, image_id: str) -> tuple[int, int]:
        """(height, width) of the image as read (not as its annotation says)."""
        if image_id not in self.shapes:
            self.shapes[image_id] = load_image(self.paths[image_id]).shape[:2]
        return self.shapes[image_id]

    def _all_windows(self, image_id: str) -> torch.Tensor:
        image, boxes = self._image(image_id, self.windows[image_id], False)
        return self.features(image, torch.from_numpy(boxes))

    def _kept(self, image_id: str, name: str, compute) -> torch.Tensor:
        """The fp16-rounded result of compute(image_id), computed once (cache) -> float32."""
        if self.cache == "none":
            return compute(image_id).half().float()
        key = (image_id, name)
        value = self.memory.get(key)
        if value is None and self.cache == "disk":
            path = self.folder / f"{stable_hash(image_id, length=10)}-{name}-" \
                                 f"{file_signature(self.paths[image_id])}.pt"
            if path.is_file():
                try:
                    value = load_verified(path, weights_only=True)
                except CorruptFileError as e:
                    get_logger().warning(f"feature cache: {e}; recomputing it")
            if value is None:
                value = compute(image_id).half().cpu()
                save_verified(value, path)
        elif value is None:
            value = compute(image_id).half().cpu()
            self.memory[key] = value
        return value.to(self.device).float()
