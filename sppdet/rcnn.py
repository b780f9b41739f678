"""The R-CNN baseline's feature path (Girshick et al. 2014) on the same network as SPP-net.

Each proposal is dilated so that `context` pixels of image surround it in the warped crop,
warped anisotropically to `input_size` x `input_size`, and run through conv1..conv5 on its own;
the conv5 map of the crop is pooled by the same pyramid and fed to the same fc head, SVMs and
box regression (`sppdet.detector.Detector`). Only the feature path differs from SPP-net's
(`sppdet.features.SPPFeatures`), which is what the paper's Table 10 compares.
"""
from __future__ import annotations

import numpy as np
import torch

from .features import WindowFeatures, timed
from .spp import spp_pool_maps


def context_boxes(boxes: torch.Tensor, input_size: int, context: int) -> torch.Tensor:
    """Dilate boxes (R, 4), 0-based inclusive, about their centres so that after warping to
    `input_size` the original box spans the inner `input_size - 2 * context` pixels.

    Returns continuous-coordinate boxes [x1, y1, x2, y2) (exclusive ends: pixel i covers
    [i, i + 1)), the form roi_align samples from. R-CNN's scale is size / (size - 2 * context).
    """
    scale = input_size / (input_size - 2 * context)
    x1, y1 = boxes[:, 0], boxes[:, 1]
    x2, y2 = boxes[:, 2] + 1, boxes[:, 3] + 1
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half_w, half_h = (x2 - x1) / 2 * scale, (y2 - y1) / 2 * scale
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], 1)


def warp_windows(image: torch.Tensor, boxes: torch.Tensor, input_size: int, context: int) -> torch.Tensor:
    """Crop + warp every window of one preprocessed image (3, H, W) -> (R, 3, S, S).

    Bilinear sampling at the S x S cell centres of each dilated box (roi_align with one sample
    per cell = a plain bilinear warp, no antialiasing, as R-CNN's imresize): cell j samples the
    continuous point x1 + (j + 0.5) (x2 - x1) / S. Samples outside the image [0, W) x [0, H)
    read 0, i.e. the mean after preprocessing: R-CNN pads with the mean as well.
    """
    from torchvision.ops import roi_align  # here: SPP-net detection never imports torchvision

    rois = context_boxes(boxes, input_size, context)
    crops = roi_align(image[None], torch.cat([rois.new_zeros(len(rois), 1), rois], 1),
                      output_size=input_size, spatial_scale=1.0, sampling_ratio=1, aligned=True)
    # roi_align reads the edge pixel for samples up to one pixel outside the image (it clamps
    # there); zero them so the padding starts exactly at the image border.
    frac = (torch.arange(input_size, device=rois.device, dtype=rois.dtype) + 0.5) / input_size
    xs = rois[:, 0:1] + frac * (rois[:, 2:3] - rois[:, 0:1])   # (R, S) sample x per column
    ys = rois[:, 1:2] + frac * (rois[:, 3:4] - rois[:, 1:2])   # (R, S) sample y per row
    height, width = image.shape[-2:]
    inside = ((ys >= 0) & (ys < height))[:, :, None] & ((xs >= 0) & (xs < width))[:, None, :]
    return crops * inside[:, None].to(crops.dtype)


class RCNNFeatures(WindowFeatures):
    """Per-window features: warp -> conv1..conv5 -> pyramid pooling of the fixed-size map."""

    kind = "rcnn"

    def __init__(self, backbone, levels=(6, 3, 2, 1), input_size: int = 224, context: int = 16,
                 batch: int = 64):
        super().__init__(backbone, levels)
        self.input_size = input_size
        self.context = context
        self.batch = batch  # warped windows per conv pass

    def settings(self) -> dict:
        return {**super().settings(), "input_size": self.input_size, "context": self.context}

    def forward(self, image: np.ndarray, boxes: torch.Tensor, timers: dict | None = None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
        """image (H, W, 3) BGR uint8, boxes (R, 4) original pixels -> pooled conv5 (R, D) in
        `dtype` (default: conv5's). Crop + warp is timed as "warp", the conv passes as "conv",
        pooling as "pool"."""
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        with timed(timers, "warp", self.device):
            x = self.backbone.preprocess(image).to(self.device)
        parts = []
        for chunk in boxes.to(self.device).split(self.batch):
            with timed(timers, "warp", self.device):
                crops = warp_windows(x, chunk, self.input_size, self.context)
            with timed(timers, "conv", self.device):
                conv5 = self.backbone(crops)
            with timed(timers, "pool", self.device):
                parts.append(spp_pool_maps(conv5.to(dtype or conv5.dtype), self.levels))
        if not parts:
            return torch.zeros(0, self.output_dim, device=self.device)
        return torch.cat(parts)
