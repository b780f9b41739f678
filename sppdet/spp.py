"""Window -> conv5 projection, per-window scale choice and spatial pyramid max pooling (SPP-net).

Data flow for one image (PAPER.md 1.2-1.5):

    boxes (R, 4) original pixels ──choose_scales──► scale index per window
    resize_boxes(boxes, ...)    ──project_boxes──► windows (R, 4) in conv5 cells
    conv5 (C, H5, W5), windows  ──spp_pool──────► (R, C * sum(n * n)) = (R, 12800) for ZF-5

Boxes are float [x1, y1, x2, y2] in 0-based pixel indices with x2/y2 inclusive. Windows are int64
[c1, r1, c2, r2]: 0-based conv5 column/row indices, both ends inclusive.

Pooling bins (paper App. A, official mex, and PyTorch's adaptive max pooling all agree): along an
axis of L window cells, bin k of n covers cells [floor(k L / n), ceil((k + 1) L / n)) from the
window's first cell; every bin holds at least one cell, bins may overlap by one cell. Outputs are
concatenated level by level in the order given, each level flattened in (C, n, n) order
(channel-major, then y, then x), Caffe's order, so (6, 3, 2, 1) on 256 channels gives 12800.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_LEVELS = (6, 3, 2, 1)


# ----------------------------------------------------------------------------- geometry

def _long_side_capped(height: int, width: int, scale: float, max_size: float | None) -> bool:
    if max_size is None:
        return False
    return round(max(height, width) * scale / min(height, width)) > max_size


def resize_factor(height: int, width: int, scale: float, max_size: float | None = None) -> float:
    """Factor that resizes an (height, width) image so its short side is `scale`, unless the long
    side would then exceed `max_size` (after rounding), in which case the long side becomes
    `max_size`. The resized image is (round(height * f), round(width * f))."""
    if _long_side_capped(height, width, scale, max_size):
        return max_size / max(height, width)
    return scale / min(height, width)


def resize_boxes(boxes, height: int, width: int, scale: float, max_size: float | None = None,
                 rule: str = "paper"):
    """Boxes (R, 4) in 0-based pixels of the original (height, width) image -> pixels of that
    image resized for `scale` (short side `scale`, long side capped at `max_size`).

    rule="paper": boxes * f, f from `resize_factor`, in the boxes' own dtype.
    rule="code" (spp_features_convX_to_poolX.m): the official code maps 1-based corners as
    (b - 1)(s - 1)/(m - 1) + 1, m = min(height, width) of the original image and s the resized
    short side (the scale itself, unless `max_size` capped it: then round(m f), the short side in
    pixels). In 0-based pixels that is b (s - 1)/(m - 1): the first pixel lands on the first and
    the last (m - 1) on the last (s - 1), where boxes * f would put it at (m - 1) s / m. Computed
    in float64, as b * (s - 1) / (m - 1); a one-pixel short side (m = 1) falls back to f.
    """
    f = resize_factor(height, width, scale, max_size)
    if rule == "paper":
        return boxes * f
    if rule != "code":
        raise ValueError(f"projection rule must be 'paper' or 'code', got {rule!r}")
    m = min(height, width)
    b = boxes.astype(np.float64) if isinstance(boxes, np.ndarray) else torch.as_tensor(boxes).double()
    if m <= 1:
        return b * f
    s = round(m * f) if _long_side_capped(height, width, scale, max_size) else scale
    return b * (s - 1) / (m - 1)


def _float64(boxes) -> torch.Tensor:
    if isinstance(boxes, np.ndarray):
        boxes = torch.from_numpy(boxes)
    boxes = torch.as_tensor(boxes)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (R, 4), got {tuple(boxes.shape)}")
    return boxes.to(torch.float64)


def project_boxes(boxes, stride: int, center0: float, map_h: int, map_w: int, rule: str = "paper",
                  offset0: float | None = None, offset: float = 6.5) -> torch.Tensor:
    """Boxes (R, 4) float, 0-based inclusive pixels *of the resized image* -> conv5 windows
    (R, 4) int64 [c1, r1, c2, r2], 0-based inclusive cells, each at least one cell, inside the
    (map_h, map_w) map. Conv5 unit i is centred on pixel `center0 + stride * i` (ZF-5: 20 + 16 i).

    rule="paper" (App. A): the window holds exactly the units whose centre lies inside the box.
    Pixel p covers [p - 0.5, p + 0.5], so the box covers [x1 - 0.5, x2 + 0.5]. With
    u = x - center0, unit i sits at u = S i, the paper's setting, whose formulas
        left  = floor(u / S) + 1   (first unit strictly right of u)
        right = ceil(u / S) - 1    (last unit strictly left of u)
    applied to the edges u1 = x1 - 0.5 - center0 and u2 = x2 + 0.5 - center0 keep the units with
    x1 - 0.5 < centre < x2 + 0.5; for integer boxes: centred on one of the pixels x1..x2. A box
    between two centres holds none; it gets the one unit nearest its centre.

    rule="code" (official mex, PAPER.md 1.4), in 1-based pixels X = x + 1 and 1-based cells:
        left  = floor((X1 - offset0 + offset) / S + 0.5) + 1
        right = ceil((X2 - offset0 - offset) / S - 0.5) + 1
    then left > right -> both floor((left + right) / 2), clip, and shift to 0-based cells. It keeps
    units centred within about 1.5 px of the box. `offset0` defaults to center0 + 1 (the 1-based
    centre of unit 1: 21 for ZF-5); `offset` 6.5 is the released ZF-5 config's value.
    """
    b = _float64(boxes)
    lo, hi = b[:, :2], b[:, 2:]
    cells = response_cells(b, stride, center0, rule, offset0, offset)
    left, right = cells[:, :2], cells[:, 2:]
    empty = left > right
    if rule == "paper":
        # Round half up (not torch.round's half-to-even) so a tie always picks the right unit.
        nearest = torch.floor(((lo + hi) / 2 - center0) / stride + 0.5)
        left = torch.where(empty, nearest, left)
        right = torch.where(empty, nearest, right)
    else:
        # The mex's integer midpoint of 1-based cells, (L + R) / 2, is floor((l + r) / 2) of the
        # 0-based ones l = L - 1, r = R - 1 (C truncates toward zero, but a negative sum is
        # clipped to the first cell either way).
        mid = torch.floor((left + right) / 2)
        left = torch.where(empty, mid, left)
        right = torch.where(empty, mid, right)
    # Clipping after the collapse keeps left <= right (clamping is monotone).
    upper = torch.tensor([map_w - 1, map_h - 1], dtype=torch.float64)
    left = torch.minimum(left.clamp(min=0), upper)
    right = torch.minimum(right.clamp(min=0), upper)
    return torch.cat([left, right], dim=1).to(torch.int64)


def response_cells(boxes, stride: int, center0: float, rule: str = "paper",
                   offset0: float | None = None, offset: float = 6.5) -> torch.Tensor:
    """The conv5 cells a projection rule gives boxes (R, 4) (0-based inclusive pixels of the
    resized image) before an empty window is collapsed and before the clip to the map:
    (R, 4) float64 [c1, r1, c2, r2], 0-based, integer-valued, c1 > c2 (r1 > r2) when the box
    holds no unit centre. For rule="code" this is the official spm_response_boxes.m (shifted to
    0-based), the key the official code de-duplicates hard negatives by; `project_boxes`
    documents both rules and finishes the window."""
    b = _float64(boxes)
    lo, hi = b[:, :2], b[:, 2:]
    if rule == "paper":
        left = torch.floor((lo - 0.5 - center0) / stride) + 1
        right = torch.ceil((hi + 0.5 - center0) / stride) - 1
    elif rule == "code":
        off0 = center0 + 1 if offset0 is None else offset0
        # 1-based pixels X = x + 1, 1-based cells floor(...) + 1 and ceil(...) + 1, minus 1.
        left = torch.floor((lo + 1 - off0 + offset) / stride + 0.5)
        right = torch.ceil((hi + 1 - off0 - offset) / stride - 0.5)
    else:
        raise ValueError(f"projection rule must be 'paper' or 'code', got {rule!r}")
    return torch.cat([left, right], dim=1)


def choose_scales(boxes, scales: Sequence[float], height: int, width: int,
                  max_size: float | None = None, rule: str = "paper",
                  target: float | None = None) -> torch.Tensor:
    """Index into `scales` (R,) int64 of the scale each box (R, 4), in pixels of the original
    (height, width) image, is pooled at. Widths and heights are x2 - x1 + 1.

    rule="paper" (section 4.1): the scale whose resized window area w h f^2, with f from
    `resize_factor`, is closest to target^2 (target default 224).
    rule="code" (spm_expected_scale.m): expected = round(target * m / sqrt(w h)) with m the short
    side and target default 208 = 13 cells * 16 px; pick argmin |s - expected|, where s is the
    short side after resizing (the scale itself unless `max_size` caps it).
    Ties go to the earlier scale. One scale -> all zeros.
    """
    b = _float64(boxes)
    if len(scales) == 1 or len(b) == 0:
        return torch.zeros(len(b), dtype=torch.int64)
    area = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    if rule == "paper":
        t = 224.0 if target is None else float(target)
        factors = torch.tensor([resize_factor(height, width, s, max_size) for s in scales],
                               dtype=torch.float64)
        cost = (area[:, None] * factors[None] ** 2 - t * t).abs()
    elif rule == "code":
        t = 208.0 if target is None else float(target)
        short, long = min(height, width), max(height, width)
        # Short side after resizing: exactly `s` unless capped (no float round trip, so exact
        # ties stay ties).
        eff = torch.tensor([max_size * short / long if _long_side_capped(height, width, s, max_size)
                            else float(s) for s in scales], dtype=torch.float64)
        # MATLAB round = half away from zero; the argument is positive.
        expected = torch.floor(t * short / area.clamp(min=1e-12).sqrt() + 0.5)
        cost = (eff[None] - expected[:, None]).abs()
    else:
        raise ValueError(f"scale rule must be 'paper' or 'code', got {rule!r}")
    # argmin returns the first minimum, so ties pick the earlier scale.
    return cost.argmin(dim=1)


# ----------------------------------------------------------------------------- pooling

def spp_output_dim(channels: int, levels: Sequence[int] = DEFAULT_LEVELS) -> int:
    """Length of one pooled vector: channels * sum(n * n) (256 channels, (6, 3, 2, 1) -> 12800)."""
    return channels * sum(n * n for n in levels)


def _check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    levels = tuple(int(n) for n in levels)
    if not levels or min(levels) < 1:
        raise ValueError(f"pyramid levels must be positive integers, got {levels}")
    return levels


def _check_windows(windows: torch.Tensor, map_h: int, map_w: int) -> torch.Tensor:
    windows = torch.as_tensor(windows)
    if windows.ndim != 2 or windows.shape[1] != 4:
        raise ValueError(f"windows must have shape (R, 4), got {tuple(windows.shape)}")
    if windows.dtype.is_floating_point or windows.dtype == torch.bool:
        raise ValueError(f"windows must be integer conv5 cells, got {windows.dtype}")
    windows = windows.to(torch.int64)
    if len(windows):
        c1, r1, c2, r2 = windows.unbind(1)
        bad = (c1 < 0) | (r1 < 0) | (c2 >= map_w) | (r2 >= map_h) | (c1 > c2) | (r1 > r2)
        if bool(bad.any()):
            w = windows[bad.nonzero()[0, 0]].tolist()
            raise ValueError(f"window {w} is empty or outside the {map_h}x{map_w} map")
    return windows


def bin_bounds(first: torch.Tensor, last: torch.Tensor, n: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cells of the n bins along one axis of windows spanning cells first..last (R,) inclusive:
    (start, end) (R, n), end exclusive; start = first + floor(k L / n), end = first +
    ceil((k + 1) L / n) with L = last - first + 1, in exact integer arithmetic."""
    length = (last - first + 1)[:, None]
    k = torch.arange(n, device=first.device)
    start = first[:, None] + (k * length) // n
    end = first[:, None] - ((-(k + 1) * length) // n)
    return start, end


def _plan(levels: tuple[int, ...]) -> dict[int, int | None]:
    """For each distinct level n: the finer level it is derived from, or None (computed directly).

    Level n is the union of f x f bins of level m = f n: bins f k .. f k + f - 1 of m along an axis
    span [floor(f k L / m), ceil((f k + f) L / m)) = [floor(k L / n), ceil((k + 1) L / n)) exactly,
    because consecutive bins touch or overlap. So 3 and 2 come from 6 and 1 from 2, bit-exact.
    """
    plan: dict[int, int | None] = {}
    for n in sorted(set(levels), reverse=True):
        sources = [m for m in plan if m % n == 0]
        plan[n] = min(sources) if sources else None
    return plan


def _maximum(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """torch.maximum, written into `out` when given (the no-grad path reuses buffers)."""
    return torch.maximum(a, b) if out is None else torch.maximum(a, b, out=out)


def _range_max_tables(feature: torch.Tensor, jy_max: int, jx_max: int, grad: bool) -> torch.Tensor:
    """2-D sparse table of `feature` (C, H, W) in channels-last layout, shape
    (jy_max + 1, jx_max + 1, H, W, C): T[jy, jx, y, x] = max of feature[:, y : y + 2^jy,
    x : x + 2^jx] where that block fits in the map (the other entries are never read).
    T[.., j + 1] = max(T[.., j] at x, T[.., j] at x + 2^j), first along x, then along y."""
    c, h, w = feature.shape
    base = feature.permute(1, 2, 0)
    if grad:  # out-of-place, so autograd sees no overwritten inputs
        rows = [base.contiguous()]
        for j in range(jx_max):
            s, prev = 1 << j, rows[-1]
            rows.append(torch.cat([torch.maximum(prev[:, :-s], prev[:, s:]), prev[:, -s:]], dim=1))
        planes = [torch.stack(rows)]
        for j in range(jy_max):
            s, prev = 1 << j, planes[-1]
            planes.append(torch.cat([torch.maximum(prev[:, :-s], prev[:, s:]), prev[:, -s:]],
                                    dim=1))
        return torch.stack(planes)
    table = feature.new_empty(jy_max + 1, jx_max + 1, h, w, c)
    table[0, 0] = base
    for j in range(jx_max):
        s = 1 << j
        torch.maximum(table[0, j, :, :w - s], table[0, j, :, s:], out=table[0, j + 1, :, :w - s])
    for j in range(jy_max):
        s = 1 << j
        torch.maximum(table[j, :, :h - s], table[j, :, s:], out=table[j + 1, :, :h - s])
    return table


def _floor_log2(x: torch.Tensor) -> torch.Tensor:
    """floor(log2(x)) for int64 x >= 1, exactly (a lookup table of int.bit_length, no floats)."""
    lut = torch.tensor([max(v.bit_length() - 1, 0) for v in range(int(x.max()) + 1)],
                       dtype=torch.int64, device=x.device)
    return lut[x]


def _lookup_rows(windows: torch.Tensor, levels: Sequence[int], map_h: int, map_w: int
                 ) -> tuple[torch.Tensor, int, int]:
    """Rows of the flattened sparse table, (4, R, sum(n * n)), for every bin of `levels`: the
    four (possibly equal) 2^jy x 2^jx blocks anchored at the bin's corners, with 2^j <= bin
    length < 2^(j + 1), whose union is exactly the bin. Also the largest jy and jx used."""
    parts = []
    for n in levels:
        xs, xe = bin_bounds(windows[:, 0], windows[:, 2], n)
        ys, ye = bin_bounds(windows[:, 1], windows[:, 3], n)
        parts.append((n, xs, xe, ys, ye))
    jx_all = _floor_log2(torch.cat([xe - xs for _, xs, xe, _, _ in parts], dim=1))
    jy_all = _floor_log2(torch.cat([ye - ys for _, _, _, ys, ye in parts], dim=1))
    jx_max, jy_max = int(jx_all.max()), int(jy_all.max())
    rows, col = [], 0
    for n, xs, xe, ys, ye in parts:
        jx, jy = jx_all[:, col:col + n], jy_all[:, col:col + n]
        col += n
        plane = (jy * (jx_max + 1))[:, :, None] + jx[:, None, :]        # (R, n_y, n_x)
        base = plane * (map_h * map_w)
        top, bottom = (ys * map_w)[:, :, None], ((ye - (1 << jy)) * map_w)[:, :, None]
        left, right = xs[:, None, :], (xe - (1 << jx))[:, None, :]
        corners = [top + left, top + right, bottom + left, bottom + right]
        rows.append(torch.stack([base + k for k in corners]).reshape(4, len(windows), n * n))
    return torch.cat(rows, dim=2), jy_max, jx_max


def _max_groups(x: torch.Tensor, f: int, tmp: torch.Tensor | None, out: torch.Tensor | None
                ) -> torch.Tensor:
    """(K, m, m, C) -> (K, m/f, m/f, C): max over f x f blocks, by pairwise maxima along y, then
    x (faster than amax over two strided dims). `tmp` (K, m/f, m, C) and `out` are optional
    buffers."""
    k, m, _, c = x.shape
    n = m // f
    v = x.view(k, n, f, m, c)
    rows = _maximum(v[:, :, 0], v[:, :, 1], tmp)
    for i in range(2, f):
        rows = _maximum(rows, v[:, :, i], tmp)
    v = rows.view(k, n, n, f, c)
    res = _maximum(v[:, :, :, 0], v[:, :, :, 1], out)
    for i in range(2, f):
        res = _maximum(res, v[:, :, :, i], out)
    return res


def spp_pool(feature: torch.Tensor, windows, levels: Sequence[int] = DEFAULT_LEVELS,
             chunk: int = 32) -> torch.Tensor:
    """Spatial pyramid max pooling of many windows on one map.

    feature (C, H, W); windows (R, 4) int [c1, r1, c2, r2], inclusive cells inside the map
    -> (R, C * sum(n * n)), levels concatenated in the given order, each in (C, n, n) order.

    Bit-identical to `spp_pool_reference` and differentiable w.r.t. `feature`. Method: a 2-D
    sparse table of range maxima over 2^jy x 2^jx blocks in channels-last layout, so each bin of
    a directly computed level is the max of 4 gathered C-vectors; a level dividing a finer one
    (3 and 2 from 6, 1 from 2) is the max of its bins (exact, see `_plan`). Windows go through
    in chunks of `chunk` so the gathered rows stay in cache. Without autograd, all work buffers
    are allocated once and reused: fresh large allocations cost page faults that can exceed the
    arithmetic (setting THP_MEM_ALLOC_ENABLE=1 before importing torch makes them cheap too).
    On CPU without autograd, each op runs on one intra-op thread (see `_one_thread`) and the
    windows are split between up to torch.get_num_threads() Python threads (`_POOL_SPLIT`).
    """
    levels = _check_levels(levels)
    if feature.ndim != 3:
        raise ValueError(f"feature must be (C, H, W), got shape {tuple(feature.shape)}")
    c, h, w = feature.shape
    windows = _check_windows(windows, h, w).to(feature.device)
    r = len(windows)
    out = feature.new_empty(r, spp_output_dim(c, levels))
    if r == 0:
        return out
    grad = torch.is_grad_enabled() and feature.requires_grad
    if grad or feature.device.type != "cpu":
        return _pool_chunks(feature, windows, levels, chunk, grad, out)
    workers = max(1, min(torch.get_num_threads(), r // _POOL_SPLIT))
    with _one_thread():
        return _pool_chunks(feature, windows, levels, chunk, grad, out, workers)


# windows per Python thread at least: below that a thread's start costs more than it saves
_POOL_SPLIT = 256


@functools.lru_cache(maxsize=None)
def _openmp_backend() -> bool:
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


@contextlib.contextmanager
def _one_thread():
    """Run torch CPU ops on one intra-op thread inside the block (restored afterwards).

    The no-grad pooling is ~1000 short ops (a few MB each, one cache-sized chunk): every one
    is an OpenMP parallel region that ends in a barrier, so on a CPU shared with other
    processes each op waits for a descheduled worker thread. Measured on 2 busy cores, 2000
    windows on a 43x58x256 map: 5.2 s with 2 threads, 0.17 s with one. Only with the OpenMP
    backend: the native one cannot change its thread count once it has run parallel work.
    The cores are used instead by Python threads that each pool a share of the windows: torch
    releases the GIL inside each op and nothing waits on a barrier until the shares are done.
    Threads started inside the block take its one intra-op thread when they first run an op.
    """
    threads = torch.get_num_threads()
    if threads == 1 or not _openmp_backend():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _pool_chunks(feature: torch.Tensor, windows: torch.Tensor, levels: tuple[int, ...], chunk: int,
                 grad: bool, out: torch.Tensor, workers: int = 1) -> torch.Tensor:
    """The body of `spp_pool` on checked inputs: fills and returns `out` (R, D); without
    autograd, `workers` threads take contiguous shares of the windows (one sparse table)."""
    c, h, w = feature.shape
    r = len(windows)
    plan = _plan(levels)
    direct = [n for n, src in plan.items() if src is None]
    idx, jy_max, jx_max = _lookup_rows(windows, direct, h, w)
    table = _range_max_tables(feature, jy_max, jx_max, grad).view(-1, c)
    nbins = idx.shape[2]
    # (level, first column, last column + 1) of each level in the output; a level may repeat.
    offsets = np.cumsum([0] + [c * n * n for n in levels]).tolist()
    targets = [(n, offsets[i], offsets[i + 1]) for i, n in enumerate(levels)]

    def pool_range(lo: int, hi: int, chunk: int) -> None:
        work = {}   # no-grad buffers, reused by every chunk of this range
        if not grad:
            work["rows"] = feature.new_empty(4 * chunk * nbins, c)
            work["bins"] = feature.new_empty(chunk, nbins, c)
            for n, src in plan.items():
                if src is not None:
                    work[n] = (feature.new_empty(chunk, n, src, c), feature.new_empty(chunk, n, n, c))
        for s in range(lo, hi, chunk):
            e = min(s + chunk, hi)
            k = e - s
            index = idx[:, s:e].reshape(-1)
            if grad:
                g = table.index_select(0, index).view(4, k, nbins, c)
                bins = torch.maximum(torch.maximum(g[0], g[1]), torch.maximum(g[2], g[3]))
            else:
                g = torch.index_select(table, 0, index, out=work["rows"][:4 * k * nbins])
                g = g.view(4, k, nbins, c)
                bins = torch.maximum(g[0], g[1], out=work["bins"][:k])
                torch.maximum(bins, g[2], out=bins)
                torch.maximum(bins, g[3], out=bins)
            pooled, col = {}, 0
            for n in direct:
                pooled[n] = bins[:, col:col + n * n].view(k, n, n, c)
                col += n * n
            for n, src in plan.items():   # finer levels first, so sources are ready
                if src is not None:
                    tmp, res = (None, None) if grad else (w[:k] for w in work[n])
                    pooled[n] = _max_groups(pooled[src], src // n, tmp, res)
            for n, a, b in targets:
                # Views made here, not once up front: autograd rejects writes through views of
                # `out` taken before an earlier write when a dimension has size 1.
                out[s:e, a:b].view(k, c, n * n).copy_(pooled[n].reshape(k, n * n, c).transpose(1, 2))

    if grad:  # one pass: each chunk's index_select backward would zero a table-sized grad
        pool_range(0, r, r)
        return out
    chunk = max(1, min(chunk, r))
    bounds = np.linspace(0, r, workers + 1).round().astype(int).tolist()
    errors = []

    def share(lo: int, hi: int) -> None:
        try:
            pool_range(lo, hi, chunk)
        except BaseException as e:  # re-raised in the calling thread, once every share is done
            errors.append(e)

    # the calling thread takes the first share itself (with one worker: all of them)
    helpers = [threading.Thread(target=share, args=(bounds[i], bounds[i + 1]), daemon=True)
               for i in range(1, workers)]
    for t in helpers:
        t.start()
    share(bounds[0], bounds[1])
    for t in helpers:
        t.join()
    if errors:
        raise errors[0]
    return out


def spp_pool_reference(feature: torch.Tensor, windows, levels: Sequence[int] = DEFAULT_LEVELS
                       ) -> torch.Tensor:
    """Slow, obviously correct `spp_pool`: Python loops over windows and bins, each bin the max
    of its slice feature[:, r1 + floor(k H / n) : r1 + ceil((k + 1) H / n), ...]."""
    levels = _check_levels(levels)
    c, h, w = feature.shape
    rows = []
    for c1, r1, c2, r2 in _check_windows(windows, h, w).tolist():
        ww, hh = c2 - c1 + 1, r2 - r1 + 1
        parts = []
        for n in levels:
            level = feature.new_empty(c, n, n)
            for by in range(n):
                y0, y1 = r1 + (by * hh) // n, r1 + -((-(by + 1) * hh) // n)
                for bx in range(n):
                    x0, x1 = c1 + (bx * ww) // n, c1 + -((-(bx + 1) * ww) // n)
                    level[:, by, bx] = feature[:, y0:y1, x0:x1].amax(dim=(1, 2))
            parts.append(level.reshape(-1))
        rows.append(torch.cat(parts))
    if not rows:
        return feature.new_empty(0, spp_output_dim(c, levels))
    return torch.stack(rows)


def spp_pool_maps(features: torch.Tensor, levels: Sequence[int] = DEFAULT_LEVELS) -> torch.Tensor:
    """Pyramid-pool whole maps, one window per map (the R-CNN baseline: each warped window has its
    own conv5): features (R, C, H, W) -> (R, C * sum(n * n)). Same as `spp_pool(features[i],
    full-map window)`: adaptive max pooling uses the same floor/ceil bins."""
    levels = _check_levels(levels)
    if features.ndim != 4:
        raise ValueError(f"features must be (R, C, H, W), got shape {tuple(features.shape)}")
    grad = torch.is_grad_enabled() and features.requires_grad
    # Channels-last: adaptive max pooling of 64 x 256 x 13 x 13 maps is ~5x faster in NHWC than
    # in NCHW, conversion included; one thread for the same reason as in `spp_pool`.
    with _one_thread() if not grad and features.device.type == "cpu" else contextlib.nullcontext():
        x = features.contiguous(memory_format=torch.channels_last)
        return torch.cat([F.adaptive_max_pool2d(x, n).flatten(1) for n in levels], dim=1)


class SpatialPyramidPool(nn.Module):
    """Spatial pyramid max pooling layer.

    forward(feature (C, H, W), windows (R, 4)) -> (R, output_dim(C))      many windows, one map
    forward(feature (C, H, W))                 -> (1, output_dim(C))      the whole map
    forward(features (R, C, H, W))             -> (R, output_dim(C))      one whole map each
    """

    def __init__(self, levels: Sequence[int] = DEFAULT_LEVELS) -> None:
        super().__init__()
        self.levels = _check_levels(levels)

    def output_dim(self, channels: int) -> int:
        return spp_output_dim(channels, self.levels)

    def forward(self, feature: torch.Tensor, windows=None) -> torch.Tensor:
        if windows is not None:
            return spp_pool(feature, windows, self.levels)
        if feature.ndim == 3:
            feature = feature[None]
        return spp_pool_maps(feature, self.levels)

    def extra_repr(self) -> str:
        return f"levels={self.levels}"
