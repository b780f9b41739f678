"""Box arithmetic shared by every stage.

Boxes are ``[x1, y1, x2, y2]`` in 0-based pixel indices with x2/y2 *inclusive*, so a box's width
is ``x2 - x1 + 1`` (the VOC / R-CNN convention). torchvision.ops uses exclusive ends, so the
helpers here shift by one pixel where that matters instead of re-implementing the ops.
Functions accept and return torch tensors; numpy arrays are converted and returned as numpy.

NMS follows the official SPP-net / R-CNN ``nms_mex.cpp`` exactly (see `nms_exact`): IoU in
float64 with +1 widths and heights, suppression only when IoU > the threshold, greedy by
decreasing score with equal scores taken in decreasing input index.
"""
from __future__ import annotations

import math

import numpy as np
import torch


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
    wh = (torch.minimum(a[:, None, 2:], b[None, :, 2:]) - torch.maximum(a[:, None, :2], b[None, :, :2]) + 1).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a, area_b = (widths_heights(a)).prod(1), (widths_heights(b)).prod(1)
    out = inter / (area_a[:, None] + area_b[None, :] - inter)
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


# --------------------------------------------------------------------------------------------
# NMS as nms_mex.cpp does it
#
# The official code (SPP_net and R-CNN, nms/nms.m -> nms/nms_mex.cpp) casts the boxes and the
# threshold to double and then, until no box is left, picks the remaining box with the highest
# score and deletes every remaining box (the picked one included) whose overlap with it is
# strictly greater than the threshold. The overlap is
#     w = max(0, min(x2) - max(x1) + 1), h likewise, inter = w * h,
#     area = (x2 - x1 + 1) * (y2 - y1 + 1), ov = inter / (area_picked + area_other - inter)
# evaluated in that order in double precision. The remaining boxes live in a std::multimap
# keyed by score, which keeps equal keys in insertion (= input) order, and the pick is its last
# element: among equal scores the box LATER in the input is picked first. (nms.m's pure-MATLAB
# branch for >= 10000 boxes does the same: a stable ascending `sort` and `I(end)`.) Picks come
# out in that order: decreasing score, equal scores by decreasing index.
#
# Degenerate boxes: a box of zero area has overlap 0/0 = NaN with itself and any box of zero
# union; NaN is never > the threshold, so such a box neither suppresses nor is suppressed here
# (nms_mex itself would loop forever on it, never erasing the picked box).


def _nms_order(scores: np.ndarray) -> np.ndarray:
    """nms_mex's processing order: decreasing score, equal scores by decreasing index."""
    n = len(scores)
    return np.lexsort((-np.arange(n), -scores))


def _greedy_exact(b: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS on float64 boxes (N, 4) that are already in processing order; returns the
    kept positions, ascending. nms_mex's arithmetic, one vectorised pass per kept box."""
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    remaining = np.arange(len(b))
    keep = []
    with np.errstate(divide="ignore", invalid="ignore"):
        while remaining.size:
            i, rest = remaining[0], remaining[1:]
            keep.append(i)
            w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
            h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
            inter = w * h
            ov = inter / (area[i] + area[rest] - inter)
            remaining = rest[~(ov > iou_threshold)]
    return np.asarray(keep, dtype=np.int64)


def _numpy64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _check_nms_inputs(b: np.ndarray, s: np.ndarray) -> None:
    if len(b) != len(s):
        raise ValueError(f"nms: {len(b)} boxes but {len(s)} scores")
    if np.isnan(s).any():
        raise ValueError("nms: NaN score")
    if not np.isfinite(b).all():
        raise ValueError("nms: non-finite box coordinate")


def nms_exact(boxes, scores, iou_threshold: float) -> np.ndarray:
    """Single-class NMS exactly as ``nms_mex.cpp`` (the reference implementation).

    boxes (N, 4) inclusive-end xyxy and scores (N,), numpy or torch, any float dtype (taken to
    float64 as nms.m does). Returns the kept indices (numpy int64) in pick order: decreasing
    score, equal scores by decreasing index. Suppresses a box when its IoU with a kept box is
    strictly greater than `iou_threshold`, so two boxes at exactly the threshold both survive.
    """
    b = _numpy64(boxes).reshape(-1, 4)
    s = _numpy64(scores).reshape(-1)
    _check_nms_inputs(b, s)
    order = _nms_order(s)
    return order[_greedy_exact(b[order], float(iou_threshold))]


def _float64_exact(coords: np.ndarray, offset: float = 0.0) -> bool:
    """True when every coordinate (plus an integer offset up to `offset`) is a multiple of a
    power of two 2^-q so fine, and small enough, that every sum and difference nms_mex and
    torchvision form from them (x2 - x1 + 1, x2 + 1 - x1, min - max + 1, the shifted
    coordinates; all at most 2 * (max|x| + offset) + 2 in size) is exact in float64. Then both
    compute the same (exact) widths and heights, hence bit-identical areas, intersections and
    IoUs. Integer boxes pass, and so do float32 ones in {0} and [2^-12, 2^11]."""
    if coords.size == 0:
        return True
    bound = 2.0 * (float(np.abs(coords).max()) + offset) + 2.0
    q = 52 - math.ceil(math.log2(bound))  # bound * 2^q <= 2^52
    if q < 0:  # 1 itself must be a multiple of 2^-q
        return False
    scaled = np.ldexp(coords, q)
    return bool((scaled == np.floor(scaled)).all())


# torchvision's own switch from one call with per-class offsets to a loop over classes
_ONE_CALL_MAX_BOXES = 1000
# below this many boxes the exact greedy loop runs instead of torchvision (identical results)
_EXACT_LOOP_MAX_BOXES = 64


def nms_per_class(boxes, scores, labels, iou_threshold: float):
    """Per-class NMS exactly as ``nms_mex.cpp`` (see `nms_exact`), with torchvision's speed.

    boxes (N, 4) inclusive-end xyxy, scores (N,), labels (N,) -> the kept indices (int64, on
    the input's device; numpy in, numpy out), by decreasing score and, among equal scores, by
    decreasing index; within a class this is nms_mex's pick order for that class's boxes in
    input order. Boxes of different labels never suppress each other.

    How: everything runs on the CPU in float64. The boxes are put in nms_mex's processing order
    and torchvision's C++ nms is given a strictly decreasing rank as the score, so its (unstable)
    sort cannot reorder ties. torchvision computes IoU as nms_mex does (same formula and order of
    operations, IoU > threshold) but on exclusive ends (x2 + 1); when the coordinates pass
    `_float64_exact` (integer proposals, float32 boxes from the detector) every width is exact
    either way and the result is bit-identical. Classes whose boxes do not pass (arbitrary
    float64 coordinates) run the exact greedy loop `nms_exact` uses. Negative thresholds too.
    """
    was_numpy = not isinstance(boxes, torch.Tensor)
    device = torch.device("cpu") if was_numpy else boxes.device
    b = _numpy64(boxes).reshape(-1, 4)
    s = _numpy64(scores).reshape(-1)
    lab = (labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor)
           else np.asarray(labels)).reshape(-1)
    _check_nms_inputs(b, s)
    if len(lab) != len(b):
        raise ValueError(f"nms: {len(b)} boxes but {len(lab)} labels")
    thr = float(iou_threshold)
    n = len(b)
    if n == 0:
        keep = np.zeros(0, np.int64)
    elif n <= _EXACT_LOOP_MAX_BOXES:  # few boxes: the exact loop is as fast (and needs no torchvision)
        order = _nms_order(s)
        mask = np.zeros(n, bool)
        for c in np.unique(lab):
            pos = np.flatnonzero(lab[order] == c)
            mask[pos[_greedy_exact(b[order][pos], thr)]] = True
        keep = order[np.flatnonzero(mask)]
    else:
        from torchvision.ops import nms as _tv_nms  # here: its import costs seconds

        order = _nms_order(s)
        b = b[order]
        classes, inv = np.unique(lab[order], return_inverse=True)
        inv = inv.reshape(-1)
        rank = torch.arange(n, 0, -1, dtype=torch.float64)  # strictly decreasing
        kept = None
        if thr >= 0 and (len(classes) == 1 or n <= _ONE_CALL_MAX_BOXES):
            # one call: classes moved apart by integer offsets so that they cannot overlap
            span = math.floor(float(b.max() - b.min())) + 2
            off = inv.astype(np.float64) * span
            if _float64_exact(b, float(off.max())):
                shifted = b + off[:, None]
                kept = _tv_nms(_exclusive(torch.from_numpy(shifted)), rank, thr).numpy()
        if kept is None:
            mask = np.zeros(n, bool)
            members = np.argsort(inv, kind="stable")  # positions by class, processing order kept
            bounds = np.concatenate(([0], np.cumsum(np.bincount(inv, minlength=len(classes)))))
            for c in range(len(classes)):
                pos = members[bounds[c]:bounds[c + 1]]
                bc = b[pos]
                if thr >= 0 and _float64_exact(bc):
                    k = _tv_nms(_exclusive(torch.from_numpy(bc)), rank[torch.from_numpy(pos)], thr).numpy()
                else:
                    k = _greedy_exact(bc, thr)
                mask[pos[k]] = True
            kept = np.flatnonzero(mask)
        keep = order[np.sort(kept)]
    if was_numpy:
        return keep
    return torch.from_numpy(keep).to(device)
