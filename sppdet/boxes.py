"""Box arithmetic shared by every stage.

Boxes are ``[x1, y1, x2, y2]`` in 0-based pixel indices with x2/y2 *inclusive*, so a box's width
is ``x2 - x1 + 1`` (the VOC / R-CNN convention). torchvision.ops uses exclusive ends, so the
helpers here shift by one pixel where that matters instead of re-implementing the ops.
Functions accept and return torch tensors; numpy arrays are converted and returned as numpy.
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import batched_nms, box_iou


def _as_tensor(x) -> tuple[torch.Tensor, bool]:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x)), True
    return x, False


def _back(x: torch.Tensor, was_numpy: bool):
    return x.numpy() if was_numpy else x


def _exclusive(boxes: torch.Tensor) -> torch.Tensor:
    """Inclusive-end boxes -> exclusive-end boxes (x2 + 1, y2 + 1), as torchvision expects."""
    return torch.cat([boxes[:, :2], boxes[:, 2:] + 1], dim=1)


def iou(boxes_a, boxes_b):
    """IoU matrix (N, M) with VOC's +1 pixel widths and heights. Inputs (N, 4) and (M, 4)."""
    a, was_numpy = _as_tensor(boxes_a)
    b, _ = _as_tensor(boxes_b)
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    out = box_iou(_exclusive(a), _exclusive(b))
    return _back(out.to(torch.float32), was_numpy)


def max_iou(boxes, gt_boxes):
    """For each box (N, 4), its best IoU with `gt_boxes` (M, 4) and that box's index.

    Returns (overlap (N,), index (N,)); with M == 0 the overlap is 0 and the index -1.
    """
    b, was_numpy = _as_tensor(boxes)
    g, _ = _as_tensor(gt_boxes)
    if len(g) == 0:
        ov = torch.zeros(len(b), dtype=torch.float32)
        idx = torch.full((len(b),), -1, dtype=torch.int64)
    else:
        ov, idx = iou(b, g).max(dim=1)
    return _back(ov, was_numpy), _back(idx, was_numpy)


def widths_heights(boxes):
    """(N, 2) widths and heights with the +1 convention."""
    return boxes[:, 2:4] - boxes[:, 0:2] + 1


def encode(proposals, gt_boxes):
    """R-CNN regression targets (dx, dy, log dw, log dh) that move `proposals` onto `gt_boxes`.

    Both (N, 4), inclusive ends; returns (N, 4). Centres are x1 + 0.5 * w (R-CNN's convention).
    """
    p, was_numpy = _as_tensor(proposals)
    g, _ = _as_tensor(gt_boxes)
    p = p.to(torch.float64)
    g = g.to(torch.float64)
    pw, ph = p[:, 2] - p[:, 0] + 1, p[:, 3] - p[:, 1] + 1
    gw, gh = g[:, 2] - g[:, 0] + 1, g[:, 3] - g[:, 1] + 1
    px, py = p[:, 0] + 0.5 * pw, p[:, 1] + 0.5 * ph
    gx, gy = g[:, 0] + 0.5 * gw, g[:, 1] + 0.5 * gh
    out = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], 1)
    return _back(out.to(torch.float32), was_numpy)


# exp() of a larger log-scale change would turn one bad regression into an absurd box.
_MAX_LOG_SCALE = float(np.log(1000.0 / 16))


def decode(proposals, deltas):
    """Inverse of `encode`: apply deltas (N, 4) to proposals (N, 4) -> boxes (N, 4)."""
    p, was_numpy = _as_tensor(proposals)
    d, _ = _as_tensor(deltas)
    p = p.to(torch.float64)
    d = d.to(torch.float64)
    pw, ph = p[:, 2] - p[:, 0] + 1, p[:, 3] - p[:, 1] + 1
    px, py = p[:, 0] + 0.5 * pw, p[:, 1] + 0.5 * ph
    cx, cy = px + d[:, 0] * pw, py + d[:, 1] * ph
    w = pw * torch.exp(d[:, 2].clamp(max=_MAX_LOG_SCALE))
    h = ph * torch.exp(d[:, 3].clamp(max=_MAX_LOG_SCALE))
    x1, y1 = cx - 0.5 * w, cy - 0.5 * h
    out = torch.stack([x1, y1, x1 + w - 1, y1 + h - 1], 1)
    return _back(out.to(torch.float32), was_numpy)


def clip(boxes, height: int, width: int):
    """Clip boxes (N, 4) to an image of `height` x `width` pixels (0..width-1, 0..height-1)."""
    b, was_numpy = _as_tensor(boxes)
    b = b.clone()
    b[:, 0::2] = b[:, 0::2].clamp(0, width - 1)
    b[:, 1::2] = b[:, 1::2].clamp(0, height - 1)
    return _back(b, was_numpy)


def nms_per_class(boxes, scores, labels, iou_threshold: float):
    """Greedy per-class NMS (torchvision.ops.batched_nms) with +1 pixel areas.

    boxes (N, 4), scores (N,), labels (N,) -> indices kept, by decreasing score.
    """
    b, was_numpy = _as_tensor(boxes)
    s, _ = _as_tensor(scores)
    lab, _ = _as_tensor(labels)
    keep = batched_nms(_exclusive(b.float()), s.float(), lab, iou_threshold)
    return _back(keep, was_numpy)
