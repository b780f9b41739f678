"""Selective search proposals (Uijlings et al., IJCV 2013) on OpenCV contrib, ranked, filtered
and cached per image.

Modes (PAPER.md 1.6 and 3.5):

- ``fast`` (default): the paper's configuration, as in the original ``selective_search_boxes.m``:
  colour spaces HSV and Lab x k in {50, 100} (minSize = k, sigma = 0.8) x similarities
  C+T+S+F and T+S+F = 8 hierarchies.
- ``quality``: Uijlings' 'quality': HSV, Lab, rgI, H, I x k in {50, 100, 150, 300} x
  C+T+S+F, T+S+F, F, S = 80 hierarchies (about 4-5x the CPU time of ``fast``: 20
  segmentations against 4; the segmentation and histograms are shared by the strategies).
- ``opencv_fast`` / ``opencv_quality``: OpenCV's stock ``switchToSelectiveSearchFast/Quality``
  (other colour spaces and k = 150, 300, 450 / 150..750), boxes kept in OpenCV's own order.

Grouping and ranking. The original gives the merged boxes of each hierarchy a position i
(1 = the last merge, the whole image; the initial regions, listed once per segmentation, come
after all merges), draws ``priority = i * U(0, 1)``, sorts all hierarchies' boxes by priority,
ascending, then drops small boxes and duplicates keeping the best-ranked. OpenCV's ``process()``
cannot give that order: it pools its hierarchies and sorts them by ``rand() * level`` (level =
height in the merge tree, small regions first: "inverted from the paper", says its source), with
the C library's unseeded rand(). So for our modes we run the greedy merging loop here
(`group_hierarchies`) on OpenCV's graph segmentation, which gives each hierarchy's exact merge
order; the random factor comes from a seeded generator, so the output is a deterministic
function of the image and the parameters. The stock modes keep OpenCV's order (with rand()
seeded, see `_seed_libc_rand`).

Similarities. They are OpenCV's strategies' (SelectiveSearchSegmentationStrategyColor, Texture,
Size, Fill, summed with equal weights by Multiple), computed here for all regions and pairs at
once with numpy and OpenCV array calls, in float32 in OpenCV's order of operations, so that
every similarity, and so every merge and box, is bit for bit what OpenCV's strategy objects give
(`group_regions_reference` keeps the loop that calls them once per pair from Python: the slow
reference the tests compare with). What OpenCV computes, against the paper [SS]:

- colour: 25 bins per channel over [0, 256) (bin floor(25 v / 256)), the channels' histograms
  side by side and L1-normalised together; intersection = sum of the bin-wise minima. As [SS].
- texture: per channel, the paper's Gaussian derivatives (sigma 1, 8 orientations) are
  approximated by 3x3 Scharr derivatives in x and y, and in x and y of the image rotated by 45
  degrees (bilinear warp into the rotated bounding box, derivative, warped back, cropped), each
  split into its positive and negative part (8 responses); each response is stretched to 0..255
  by its own minimum and maximum over the whole image, rounded, and binned in 10 bins of 25.6;
  a region's 80 C bins are divided by its count of (pixel, response). No Gaussian smoothing, so
  these are not the original's sigma-1 derivatives: the difference is OpenCV's, and ours is the
  same.
- size: 1 - (|a| + |b|) / |image|; fill: 1 - (|bbox(a u b)| - |a| - |b|) / |image|. As [SS].
- a merged region's histograms: the size-weighted average of its parts'. As [SS].

Speed. The 4 segmentations of `fast` (2 colour spaces x 2 ks; 20 in `quality`) are independent:
searching one image alone, they run in a thread pool while this thread groups the hierarchies
of those already segmented (`ranked_search`; OpenCV and numpy release the GIL in their heavy
calls). In compute_proposals' process pool each search runs single-threaded
(`default_threads`). `time_against_stock` times ours against OpenCV's stock fast mode.

Scale. The search is not scale invariant (k, minSize and the minimum box size are pixels). The
functions here search at the size they are given unless told to `resize`; the pipeline
(`ProposalConfig.resize`) searches a copy with a 500-px short side and maps the boxes back, which
measured better recall on VOC photographs than the original size (README).

Boxes are float32 ``[x1, y1, x2, y2]``, 0-based, x2/y2 inclusive, in original-image pixels.
"""
from __future__ import annotations

import ctypes
import heapq
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import cv2
import numpy as np

from .utils import SppdetError, atomic_path, content_digest, file_digest, get_logger, stable_hash, \
    write_json_atomic
from .voc import load_image

MODES = ("fast", "quality", "opencv_fast", "opencv_quality")

# Bump when a change in this file changes the boxes it produces: old caches are then never read.
CODE_VERSION = 1

SIGMA = 0.8  # Felzenszwalb-Huttenlocher smoothing, minSize = k [SS]

# Similarity strategies by name: C colour, T texture, S size, F fill [SS].
_STRATEGIES = {
    "CTSF": ("color", "texture", "size", "fill"),
    "TSF": ("texture", "size", "fill"),
    "F": ("fill",),
    "S": ("size",),
}

# (colour spaces, k values, strategies) of our modes; the hierarchies are their product.
_CONFIGS = {
    "fast": (("hsv", "lab"), (50, 100), ("CTSF", "TSF")),
    "quality": (("hsv", "lab", "rgi", "h", "i"), (50, 100, 150, 300), ("CTSF", "TSF", "F", "S")),
}


def colour_image(bgr: np.ndarray, space: str) -> np.ndarray:
    """BGR uint8 (H, W, 3) -> the uint8 image the search groups in: hsv, lab, rgi, h or i.

    HSV uses OpenCV's full 0..255 hue range, so the 25-bin colour histograms cover hue evenly as
    the original's [0, 1] hue does. rgI is normalised r = R/(R+G+B), g = G/(R+G+B) (scaled to
    0..255) plus intensity, as in [SS] (OpenCV's stock quality mode uses raw R, G instead).
    """
    if space == "hsv":
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV_FULL)
    if space == "lab":
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2Lab)
    if space == "h":
        return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV_FULL)[:, :, 0])
    if space == "i":
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    if space == "rgi":
        f = bgr.astype(np.float32)
        total = f.sum(axis=2) + 1e-6
        r = f[:, :, 2] / total * 255.0
        g = f[:, :, 1] / total * 255.0
        gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(np.float32)
        return np.clip(np.stack([r, g, gray], axis=2) + 0.5, 0, 255).astype(np.uint8)
    raise ValueError(f"unknown colour space {space!r}")


def _xywh_to_xyxy(rects) -> np.ndarray:
    r = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
    return np.stack([r[:, 0], r[:, 1], r[:, 0] + r[:, 2] - 1, r[:, 1] + r[:, 3] - 1], axis=1)


def initial_regions(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sizes (n,) int32, boxes (n, 4) xyxy inclusive and 8-connected neighbour pairs (P, 2)
    with i < j of a label image (H, W) int32 with labels 0..n-1 (each present)."""
    from scipy.ndimage import find_objects

    n = int(labels.max()) + 1
    sizes = np.bincount(labels.ravel(), minlength=n).astype(np.int32)
    slices = find_objects(labels + 1)
    boxes = np.array([(s[1].start, s[0].start, s[1].stop - 1, s[0].stop - 1) for s in slices],
                     dtype=np.float64).reshape(-1, 4)
    # Pair (i, j), i < j, coded as i * n + j; flagged in an n x n table when that is small
    # (then the flags' positions are the unique codes, sorted), else sorted and made unique.
    table = np.zeros(n * n, np.bool_) if n <= 8192 else None
    codes = []
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :]),
                 (labels[:-1, :-1], labels[1:, 1:]), (labels[:-1, 1:], labels[1:, :-1])):
        touch = a != b
        x, y = a[touch].astype(np.int64), b[touch].astype(np.int64)
        code = np.minimum(x, y) * n + np.maximum(x, y)
        if table is not None:
            table[code] = True
        else:
            codes.append(code)
    codes = np.flatnonzero(table) if table is not None else np.unique(np.concatenate(codes))
    pairs = np.stack([codes // n, codes % n], axis=1)
    return sizes, boxes, pairs


# ---------------------------------------------------------------------------------------------
# Region features: OpenCV's colour and texture histograms, computed for all regions at once


def colour_bins(image: np.ndarray) -> np.ndarray:
    """uint8 image (H, W) or (H, W, C) -> its 25-bin colour bin per pixel and channel (H, W, C)
    uint8: floor(v * 25 / 256), the bins of OpenCV's colour strategy (calcHist, range [0, 256))."""
    image = image.reshape(image.shape[:2] + (-1,))
    lut = ((np.arange(256) * 25) >> 8).astype(np.uint8)
    # Stored channel by channel (a transposed view is returned): each channel's plane is
    # contiguous, as the per-region counting reads it.
    return np.stack([cv2.LUT(np.ascontiguousarray(image[:, :, c]), lut)
                     for c in range(image.shape[2])]).transpose(1, 2, 0)


# OpenCV's texture strategy bins a 0..255 derivative value v as (int)((float)v / (256.0f / 10)).
_TEXTURE_LUT = (np.arange(256, dtype=np.float32)
                / (np.float32(256.0) / np.float32(10))).astype(np.uint8)


def texture_bins(image: np.ndarray) -> np.ndarray:
    """uint8 image (H, W) or (H, W, C) -> its 10-bin texture bin per pixel and derivative
    (H, W, 8C) uint8, computed as OpenCV's texture strategy does (same calls, same order).

    Per channel: Scharr derivatives in x and y, and in x and y of the image rotated by 45 degrees
    (warpAffine into the rotated image's bounding box, derivative, rotated back and cropped);
    each split into its positive and its negative part (8 images); each of those stretched to
    0..255 by its own minimum and maximum over the image and rounded to uint8; then binned.
    """
    image = image.reshape(image.shape[:2] + (-1,))
    height, width = image.shape[:2]
    center = (width / 2.0, height / 2.0)
    # cv::RotatedRect(center, size, 45).boundingRect(): floor of the corners' minimum, ceil of
    # their maximum, both ends included.
    corners = cv2.boxPoints((center, (float(width), float(height)), 45.0))
    low, high = np.floor(corners.min(axis=0)), np.ceil(corners.max(axis=0))
    box_w, box_h = int(high[0] - low[0]) + 1, int(high[1] - low[1]) + 1
    rotate = cv2.getRotationMatrix2D(center, 45.0, 1.0)
    rotate[0, 2] += box_w / 2.0 - center[0]
    rotate[1, 2] += box_h / 2.0 - center[1]
    back = cv2.getRotationMatrix2D((float(int(box_w / 2.0)), float(int(box_h / 2.0))), -45.0, 1.0)
    x0, y0 = (box_w - width) // 2, (box_h - height) // 2
    out = np.empty((8 * image.shape[2], height, width), np.uint8)  # returned transposed
    i = 0
    for p in range(image.shape[2]):
        plane = np.ascontiguousarray(image[:, :, p])
        rotated = cv2.warpAffine(plane, rotate, (box_w, box_h))
        derivatives = [cv2.Scharr(plane, cv2.CV_32F, 1, 0), cv2.Scharr(plane, cv2.CV_32F, 0, 1)]
        for dx, dy in ((1, 0), (0, 1)):
            turned = cv2.warpAffine(cv2.Scharr(rotated, cv2.CV_32F, dx, dy), back, (box_w, box_h))
            derivatives.append(turned[y0:y0 + height, x0:x0 + width])
        for d in derivatives:
            for kind in (cv2.THRESH_TOZERO, cv2.THRESH_TOZERO_INV):
                part = cv2.threshold(d, 0, 0, kind)[1]
                low_v, high_v = cv2.minMaxLoc(part)[:2]
                # convertTo(CV_8U, 255 / (max - min), -255 * min / (max - min)); the values are
                # >= 0 there, so convertScaleAbs (the same scaling kernel, then |.|) gives the same.
                alpha = 255.0 / (high_v - low_v) if high_v > low_v else 0.0
                beta = -255.0 * low_v / (high_v - low_v) if high_v > low_v else 0.0
                scaled = cv2.convertScaleAbs(part, alpha=alpha, beta=beta)
                out[i] = cv2.LUT(scaled, _TEXTURE_LUT)
                i += 1
    return out.transpose(1, 2, 0)


def _region_counts(labels: np.ndarray, bins: np.ndarray, nbins: int, n: int) -> np.ndarray:
    """Per-region histograms of each channel of `bins` (H, W, K), values < nbins: (n, K nbins)
    int64, one bincount per channel (fastest when each channel's plane is contiguous)."""
    labels_x = labels.ravel().astype(np.intp) * nbins
    k = bins.shape[2]
    out = np.empty((n, k, nbins), np.int64)
    for c in range(k):
        code = labels_x + bins[:, :, c].ravel()
        out[:, c] = np.bincount(code, minlength=n * nbins).reshape(n, nbins)
    return out.reshape(n, k * nbins)


def colour_histograms(bins: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """(n, 25 C) float32: each region's 25-bin histograms of its C channels (`colour_bins`)
    side by side, L1-normalised over all of them together, as OpenCV's colour strategy
    (float32 counts divided by their float32 sum, summed in order)."""
    bins = bins.reshape(bins.shape[:2] + (-1,))
    counts = _region_counts(labels, bins, 25, n).astype(np.float32)
    return counts / np.cumsum(counts, axis=1)[:, -1:]


def texture_histograms(bins: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """(n, 80 C) float32: each region's 10-bin histograms of its 8 C derivatives
    (`texture_bins`), divided by the region's count of (pixel, derivative), as OpenCV."""
    counts = _region_counts(labels, bins, 10, n)
    totals = np.bincount(labels.ravel(), minlength=n) * bins.shape[2]
    return counts.astype(np.float32) / totals.astype(np.float32)[:, None]


# ---------------------------------------------------------------------------------------------
# Greedy hierarchical grouping


# The similarity terms, in the order OpenCV's Multiple strategy sums them for our strategies.
_TERMS = ("color", "texture", "size", "fill")


class Grouping(NamedTuple):
    """One hierarchy to build with `group_hierarchies`: the initial regions (`initial_regions`),
    the similarity terms summed (a subset of _TERMS), the regions' colour / texture histograms
    (`colour_histograms`, `texture_histograms`; needed when their term is) and the image size
    (None: the sum of the sizes)."""

    sizes: np.ndarray
    boxes: np.ndarray
    pairs: np.ndarray
    parts: tuple
    colour: np.ndarray | None = None
    texture: np.ndarray | None = None
    n_pixels: int | None = None


def group_regions(sizes: np.ndarray, boxes: np.ndarray, pairs: np.ndarray, parts: Sequence[str],
                  colour: np.ndarray | None = None, texture: np.ndarray | None = None,
                  n_pixels: int | None = None) -> np.ndarray:
    """Greedy hierarchical grouping [SS] of one hierarchy: the merged regions' boxes (n - 1, 4)
    float64 in merge order; see `Grouping` for the arguments and `group_hierarchies`."""
    grouping = Grouping(sizes, boxes, pairs, tuple(parts), colour, texture, n_pixels)
    return group_hierarchies([grouping])[0]


def _checked(groupings: Sequence) -> list[Grouping]:
    groupings = [g if isinstance(g, Grouping) else Grouping(*g) for g in groupings]
    for g in groupings:
        if not g.parts or set(g.parts) - set(_TERMS):
            raise ValueError(f"grouping: parts must be among {_TERMS}, got {g.parts!r}")
        for name, h in (("color", g.colour), ("texture", g.texture)):
            if name in g.parts and h is None:
                raise ValueError(f"grouping: the {name} term needs the {name} histograms")
    return groupings


class _RegionBank:
    """The regions of several hierarchies, one row each (a hierarchy's n initial regions, then
    room for its n - 1 merged ones, in merge order), and OpenCV's similarity of row pairs."""

    def __init__(self, groupings: Sequence[Grouping]):
        counts = [len(g.sizes) for g in groupings]
        self.offsets = np.concatenate([[0], np.cumsum([2 * n - 1 for n in counts])])[:-1].tolist()
        self.rows = rows = sum(2 * n - 1 for n in counts)
        # The colour and texture histograms side by side (zero where a hierarchy lacks the
        # term, so that term is an exact 0 there; zero-padded to the widest colour space).
        wc = max((np.shape(g.colour)[1] for g in groupings if "color" in g.parts), default=0)
        wt = max((np.shape(g.texture)[1] for g in groupings if "texture" in g.parts), default=0)
        self.hist = np.zeros((rows, wc + wt), np.float32) if wc + wt else None
        self.spans = [(lo, hi) for lo, hi in ((0, wc), (wc, wc + wt)) if hi > lo]
        # Per region: its size, then its box as (-x1, -y1, x2 + 1, y2 + 1): the union of two
        # boxes is their maximum, and its width and height are sums.
        self.geom = np.zeros((rows, 5), np.int64)
        pixels = np.zeros(rows, np.float32)   # per row: its image's size ...
        divisor = np.zeros(rows, np.float32)  # ... and its hierarchy's number of terms
        use = {name: np.zeros(rows, np.float32) for name in ("size", "fill")}
        for g, o, n in zip(groupings, self.offsets, counts):
            end = o + 2 * n - 1
            if "color" in g.parts:
                c = np.asarray(g.colour, dtype=np.float32)
                self.hist[o:o + n, :c.shape[1]] = c
            if "texture" in g.parts:
                t = np.asarray(g.texture, dtype=np.float32)
                self.hist[o:o + n, wc:wc + t.shape[1]] = t
            self.geom[o:o + n, 0] = g.sizes
            boxes = np.asarray(g.boxes, dtype=np.int64).reshape(-1, 4)
            self.geom[o:o + n, 1:] = boxes * (-1, -1, 1, 1) + (0, 0, 1, 1)
            image_size = g.n_pixels if g.n_pixels is not None else int(np.sum(g.sizes))
            pixels[o:end] = np.float32(image_size)
            divisor[o:end] = len(set(g.parts))
            for name in use:
                use[name][o:end] = name in g.parts
        # A per-row value that is the same for all rows becomes a scalar (a gather less).
        self.pixels = pixels[0] if rows and (pixels == pixels[0]).all() else pixels
        self.divisor = divisor[0] if rows and (divisor == divisor[0]).all() else divisor
        self.terms = [name for name in ("size", "fill") if use[name].any()]
        self.mask = {name: None if use[name].all() else use[name] for name in self.terms}

    def similarity(self, ra: np.ndarray, rb: np.ndarray) -> np.ndarray:
        """float32 similarity of the regions in rows ra[i] and rb[i] (int64 arrays), computed
        as OpenCV's Multiple strategy (see `group_hierarchies`)."""
        f32 = np.float32
        total = None
        if self.hist is not None:
            # Bin-wise minima, one column per pair; cv2.reduce down the rows adds each column
            # bin by bin in float32, as OpenCV's loop.
            minima = cv2.transpose(np.minimum(self.hist[ra], self.hist[rb]))
            for lo, hi in self.spans:
                term = cv2.reduce(minima[lo:hi], 0, cv2.REDUCE_SUM, dtype=cv2.CV_32F).reshape(-1)
                total = term if total is None else total + term
        if self.terms:
            ga, gb = self.geom[ra], self.geom[rb]
            both = ga[:, 0] + gb[:, 0]
            image = self.pixels if np.ndim(self.pixels) == 0 else self.pixels[ra]
            for name in self.terms:
                if name == "size":
                    term = f32(1) - both.astype(np.float32) / image
                else:
                    span = np.maximum(ga, gb)
                    span = span[:, 1:3] + span[:, 3:5]  # width, height of the union
                    term = f32(1) - (span[:, 0] * span[:, 1] - both).astype(np.float32) / image
                if self.mask[name] is not None:
                    term = term * self.mask[name][ra]  # x * 0 = +0 where the term is not used
                total = term if total is None else total + term
        return total / (self.divisor if np.ndim(self.divisor) == 0 else self.divisor[ra])


def pair_similarities(grouping: Grouping, pairs: np.ndarray | None = None) -> np.ndarray:
    """float32 similarities of pairs (P, 2) of a grouping's initial regions (default: its
    neighbour pairs), bit for bit as OpenCV's Multiple strategy of its parts gives them."""
    (grouping,) = _checked([grouping])
    pairs = np.asarray(grouping.pairs if pairs is None else pairs, dtype=np.int64).reshape(-1, 2)
    return _RegionBank([grouping]).similarity(pairs[:, 0], pairs[:, 1])


def group_hierarchies(groupings: Sequence[Grouping], trace: list | None = None) -> list[np.ndarray]:
    """Greedy hierarchical grouping [SS] of several independent hierarchies: in each, merge the
    most similar neighbouring pair until one region is left.

    The arithmetic is OpenCV's strategies' (SelectiveSearchSegmentationStrategyColor, Texture,
    Size, Fill, and Multiple with weights 1), in float32 in the same order, so each similarity is
    bit for bit what `group_regions_reference` gets from OpenCV, and the merge order (ties
    broken by the region ids, as there) is the same:

    - colour, texture: histogram intersection, the sum of the bin-wise minima added bin by bin
      (cv2.reduce down the columns of the transposed minima: sequential in float32, as
      OpenCV's loop; np.sum would add pairwise, and np.cumsum is the same sequence but slow);
    - size: 1 - (float)(|a| + |b|) / (float)|image|;
    - fill: 1 - (float)(|bbox(a u b)| - |a| - |b|) / (float)|image| (size and fill lie in [0, 1]
      exactly, so OpenCV's clamp to [0, 1] changes nothing);
    - similarity: ((colour + texture) + size) + fill, of the terms present (in this order,
      whatever the order of `parts`), divided by their count;
    - a merged region's histograms: (h_a * (float)|a| + h_b * (float)|b|) / (float)(|a| + |b|).

    The hierarchies advance in lockstep, one merge each per round, so the numpy/OpenCV work of a
    round (the merged histograms, and the similarities of each new region to all its
    neighbours) is done in one batch for all of them; a term a hierarchy lacks is an exact 0
    there. Each heap holds one integer per pair that sorts as (-similarity, id, id); the pairs
    of merged-away regions are skipped when popped, or dropped in bulk when they outnumber the
    live ones.

    trace: a list, to which one list per grouping is appended: every similarity computed, as
    (region id, region id, similarity) in the order computed (ids: the initial regions 0..n-1,
    then the merged ones n, n + 1, ... in merge order, as `group_regions_reference` numbers
    them), for tests.

    Returns, per grouping, the merged regions' boxes (n - 1, 4) float64 xyxy inclusive in merge
    order (the last is the whole image).
    """
    groupings = _checked(groupings)
    if trace is not None:
        traces = [[] for _ in groupings]
        trace.extend(traces)
    counts = [len(g.sizes) for g in groupings]
    live = [h for h, g in enumerate(groupings) if counts[h] >= 2 and len(g.pairs)]
    out = [np.zeros((0, 4)) for _ in groupings]
    if not live:
        return out
    bank = _RegionBank([groupings[h] for h in live])
    offsets = dict(zip(live, bank.offsets))
    rows, geom, hist = bank.rows, bank.geom, bank.hist
    similarity = bank.similarity
    if trace is not None:
        starts = np.array(bank.offsets)

        def similarity(ra, rb):
            sim = bank.similarity(ra, rb)
            which = np.searchsorted(starts, ra, side="right") - 1
            for i, a, b, x in zip(which.tolist(), ra.tolist(), rb.tolist(), sim.tolist()):
                traces[live[i]].append((a - starts[i], b - starts[i], x))
            return sim
    bits = max(1, (rows - 1).bit_length())  # row ids < 2**bits
    id_mask = (1 << bits) - 1

    def keys(sim: np.ndarray, a: np.ndarray, b: np.ndarray) -> list:
        """Integers that sort as (-sim, a, b): sim >= +0, so its float32 bits sort as it does."""
        inverse = np.uint32(0xFFFFFFFF) - np.ascontiguousarray(sim).view(np.uint32)
        if 32 + 2 * bits <= 63:
            return ((inverse.astype(np.int64) << (2 * bits)) | (a << bits) | b).tolist()
        return [(i << (2 * bits)) | (x << bits) | y
                for i, x, y in zip(inverse.tolist(), a.tolist(), b.tolist())]

    # The initial pairs of all hierarchies at once (row ids: i < j within a hierarchy, as the
    # reference's region ids, so the ties break the same way).
    pa = np.concatenate([np.asarray(groupings[h].pairs)[:, 0] + offsets[h] for h in live])
    pb = np.concatenate([np.asarray(groupings[h].pairs)[:, 1] + offsets[h] for h in live])
    pa, pb = pa.astype(np.int64), pb.astype(np.int64)
    all_keys = keys(similarity(pa, pb), pa, pb)
    alive = bytearray(rows)
    near: list = [None] * rows
    heaps, next_row, end_row = {}, {}, {}
    start = 0
    for h in live:
        o, n, m = offsets[h], counts[h], len(groupings[h].pairs)
        heaps[h] = all_keys[start:start + m]
        heapq.heapify(heaps[h])
        alive[o:o + n] = b"\x01" * n
        near[o:o + n] = [set() for _ in range(n)]
        for a, b in zip(pa[start:start + m].tolist(), pb[start:start + m].tolist()):
            near[a].add(b)
            near[b].add(a)
        next_row[h], end_row[h] = o + n, o + 2 * n - 1
        start += m

    # Merged-away regions leave their pairs in the heaps (lazy deletion); when a heap holds
    # twice as many entries as live pairs, the dead ones are dropped in one numpy pass.
    live_pairs = {h: len(groupings[h].pairs) for h in live}
    alive_now = np.frombuffer(alive, dtype=np.uint8)  # a view: follows `alive`
    purge = 32 + 2 * bits <= 63  # keys fit in int64

    def purged(heap: list) -> list:
        k = np.array(heap, dtype=np.int64)
        keep = k[(alive_now[(k >> bits) & id_mask] & alive_now[k & id_mask]).astype(bool)]
        heap = keep.tolist()
        heapq.heapify(heap)
        return heap

    pop, push = heapq.heappop, heapq.heappush
    active = list(live)
    while active:
        merged_h, new_rows, a_rows, b_rows, degrees, around_rows = [], [], [], [], [], []
        for h in active:
            heap = heaps[h]
            while heap:
                key = pop(heap)
                a, b = (key >> bits) & id_mask, key & id_mask
                if alive[a] and alive[b]:
                    break
            else:  # no pair left (a region graph in several pieces): this hierarchy is done
                continue
            new = next_row[h]
            next_row[h] = new + 1
            alive[a] = alive[b] = 0
            alive[new] = 1
            around = near[a] | near[b]
            around.discard(a)
            around.discard(b)
            near[new] = around
            live_pairs[h] += len(around) - len(near[a]) - len(near[b]) + 1
            near[a] = near[b] = None
            for r in around:
                others = near[r]
                others.discard(a)
                others.discard(b)
                others.add(new)
            merged_h.append(h)
            new_rows.append(new)
            a_rows.append(a)
            b_rows.append(b)
            degrees.append(len(around))
            around_rows.extend(around)
        if not merged_h:
            break
        rn, ra, rb = np.array((new_rows, a_rows, b_rows), np.int64)
        ga, gb = geom[ra], geom[rb]
        merged = np.maximum(ga, gb)
        merged[:, 0] = ga[:, 0] + gb[:, 0]
        if hist is not None:
            sizes_ab = np.float32(ga[:, :1]), np.float32(gb[:, :1]), np.float32(merged[:, :1])
            hist[rn] = (hist[ra] * sizes_ab[0] + hist[rb] * sizes_ab[1]) / sizes_ab[2]
        geom[rn] = merged
        if around_rows:
            first = np.repeat(rn, degrees)
            second = np.array(around_rows, np.int64)
            new_keys = keys(similarity(first, second), first, second)
            start = 0
            for h, m in zip(merged_h, degrees):
                heap = heaps[h]
                for key in new_keys[start:start + m]:
                    push(heap, key)
                start += m
        if purge:
            for h in merged_h:
                if len(heaps[h]) > 2 * live_pairs[h] + 256:
                    heaps[h] = purged(heaps[h])
        active = [h for h in merged_h if next_row[h] < end_row[h]]

    for h in live:
        o, n = offsets[h], counts[h]
        out[h] = ((geom[o + n:next_row[h], 1:] - (0, 0, 1, 1)) * (-1, -1, 1, 1)).astype(np.float64)
    return out


def group_regions_reference(strategy, image: np.ndarray, labels: np.ndarray, sizes: np.ndarray,
                            boxes: np.ndarray, pairs: np.ndarray,
                            trace: list | None = None) -> np.ndarray:
    """The slow reference of `group_regions`: the same greedy loop, with the similarities and
    the merge updates done by an OpenCV SelectiveSearchSegmentationStrategy (its get/merge,
    called once per pair from Python).

    trace: a list, to which every similarity got is appended as (region id, region id,
    similarity) (see `group_hierarchies`).

    Returns the merged regions' boxes (n - 1, 4) in merge order (the last is the whole image).
    """
    n = len(sizes)

    def similarity(ids: tuple, rows: tuple) -> float:  # region ids, their rows in the strategy
        sim = strategy.get(*rows)
        if trace is not None:
            trace.append((*ids, sim))
        return sim

    # OpenCV's strategies read region sizes from this array and expect the caller to update it
    # in place after each merge (both working ids then hold the merged size), as its C++ does.
    work_sizes = sizes.astype(np.int32).reshape(-1, 1).copy()
    strategy.setImage(image, labels, work_sizes, 0)
    working_id = list(range(n))         # row of a region's features in the strategy
    region_boxes = [tuple(b) for b in boxes]
    neighbours = [set() for _ in range(n)]
    for a, b in pairs.tolist():
        neighbours[a].add(b)
        neighbours[b].add(a)
    alive = [True] * n
    # Max-heap by similarity (ties broken by region ids, so the grouping is deterministic).
    heap = [(-similarity((a, b), (a, b)), a, b) for a, b in pairs.tolist()]
    heapq.heapify(heap)
    merged = []
    while heap:
        _, a, b = heapq.heappop(heap)
        if not (alive[a] and alive[b]):  # a pair whose region was merged away meanwhile
            continue
        wa, wb = working_id[a], working_id[b]
        strategy.merge(wa, wb)
        work_sizes[wa] += work_sizes[wb]
        work_sizes[wb] = work_sizes[wa]
        new = len(alive)
        alive[a] = alive[b] = False
        alive.append(True)
        working_id.append(min(wa, wb))
        ba, bb = region_boxes[a], region_boxes[b]
        box = (min(ba[0], bb[0]), min(ba[1], bb[1]), max(ba[2], bb[2]), max(ba[3], bb[3]))
        region_boxes.append(box)
        merged.append(box)
        around = (neighbours[a] | neighbours[b]) - {a, b}
        neighbours.append(around)
        for r in around:
            neighbours[r].discard(a)
            neighbours[r].discard(b)
            neighbours[r].add(new)
            sim = similarity((new, r), (working_id[new], working_id[r]))
            heapq.heappush(heap, (-sim, new, r))
    return np.asarray(merged, dtype=np.float64).reshape(-1, 4)


def segment(image: np.ndarray, k: int, sigma: float = SIGMA) -> np.ndarray:
    """Felzenszwalb-Huttenlocher graph segmentation (OpenCV's, minSize = k) of a uint8 image:
    labels (H, W) int32, 0..n-1, each present."""
    seg = cv2.ximgproc.segmentation
    labels = seg.createGraphSegmentation(sigma, float(k), int(k)).processImage(image)
    if np.bincount(labels.ravel()).min() == 0:  # keep labels 0..n-1 all present
        labels = np.unique(labels, return_inverse=True)[1].reshape(labels.shape).astype(np.int32)
    return labels


def _groupings(image: np.ndarray, k: int, strategies: Sequence[str], sigma: float = SIGMA,
               features: tuple | None = None,
               labels: np.ndarray | None = None) -> tuple[list[Grouping], np.ndarray]:
    """Segment one colour image with one k (unless its `labels` are given): a Grouping per
    strategy, and the initial boxes. features: (`colour_bins`, `texture_bins`) of the image, or
    None (computed here when a strategy needs them)."""
    labels = segment(image, k, sigma) if labels is None else labels
    sizes, blobs, pairs = initial_regions(labels)
    needed = {part for name in strategies for part in _STRATEGIES[name]}
    cbins, tbins = features if features is not None else (None, None)
    colour = texture = None
    if "color" in needed:
        cbins = colour_bins(image) if cbins is None else cbins
        colour = colour_histograms(cbins, labels, len(sizes))
    if "texture" in needed:
        tbins = texture_bins(image) if tbins is None else tbins
        texture = texture_histograms(tbins, labels, len(sizes))
    groupings = [Grouping(sizes, blobs, pairs, _STRATEGIES[name], colour, texture, labels.size)
                 for name in strategies]
    return groupings, blobs


def _as_hierarchies(merged: Sequence[np.ndarray],
                    blobs: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Merged boxes per strategy, then the initial regions, with the original's positions."""
    out = [(m, np.arange(len(m), 0, -1, dtype=np.float64)) for m in merged]
    return out + [(blobs, np.full(len(blobs), len(blobs), dtype=np.float64))]


def search_hierarchies(image: np.ndarray, k: int, strategies: Sequence[str],
                       sigma: float = SIGMA, reference: bool = False,
                       features: tuple | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """The hierarchies of one colour image (uint8, 1 or 3 channels) and one k, as the original
    lists them: the merged boxes of each strategy with their positions (1 = the last merge, the
    whole image), then the initial regions once, all at position (number of merges + 1).

    reference: group with OpenCV's strategy objects (`group_regions_reference`, slow) instead of
    `group_hierarchies` (the same boxes). features: (`colour_bins`, `texture_bins`) of `image`
    if already computed (either may be None: computed here when a strategy needs it).

    Returns a list of (boxes (M, 4) xyxy inclusive float64, positions (M,) float64).
    """
    if not reference:
        groupings, blobs = _groupings(image, k, strategies, sigma, features)
        return _as_hierarchies(group_hierarchies(groupings), blobs)
    labels = segment(image, k, sigma)
    sizes, blobs, pairs = initial_regions(labels)
    seg = cv2.ximgproc.segmentation
    # One set of parts for all strategies: OpenCV caches the colour and texture histograms
    # under the image id, and each setImage restarts them from the initial regions.
    parts = {
        "color": seg.createSelectiveSearchSegmentationStrategyColor(),
        "texture": seg.createSelectiveSearchSegmentationStrategyTexture(),
        "size": seg.createSelectiveSearchSegmentationStrategySize(),
        "fill": seg.createSelectiveSearchSegmentationStrategyFill(),
    }
    merged = []
    for name in strategies:
        multiple = seg.createSelectiveSearchSegmentationStrategyMultiple()
        for part in _STRATEGIES[name]:
            multiple.addStrategy(parts[part], 1.0)  # equal weights: the original sums the terms
        merged.append(group_regions_reference(multiple, image, labels, sizes, blobs, pairs))
    return _as_hierarchies(merged, blobs)


# Set in the processes of compute_proposals_with_stats's pool: there, one search runs per
# process, single-threaded, so the pool's processes do not oversubscribe the cores.
_IN_POOL = False


def default_threads() -> int:
    """Segmentation threads one search uses by default (`ranked_search`; the calling thread
    works beside them): 1 (no pool) in compute_proposals' worker processes, else the cores this
    process may run on, at most 4 (fast mode has 4 independent segmentations)."""
    if _IN_POOL:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def _space_features(image: np.ndarray, colour: bool, texture: bool) -> tuple:
    return (colour_bins(image) if colour else None, texture_bins(image) if texture else None)


def ranked_search(image: np.ndarray, spaces: Sequence[str], ks: Sequence[int],
                  strategies: Sequence[str], rng: np.random.Generator,
                  threads: int | None = 1, reference: bool = False, progress: bool = False) -> np.ndarray:
    """Selective search over colour spaces x ks x strategies on a BGR uint8 image, pooled and
    ranked as the original (`rank_boxes`). Boxes (N, 4) xyxy inclusive float64, unfiltered.

    threads: 1: everything in this thread, all hierarchies grouped together at the end. More
    (None: `default_threads()`): the segmentations (colour space x k; one OpenCV call each,
    without the GIL) run in a pool of that many threads while this thread does the rest: the
    colour spaces' features, then, each time, the regions, histograms and grouping (in lockstep,
    `group_hierarchies`) of all the segmentations ready so far. The boxes do not depend on
    `threads`.
    reference: OpenCV's strategy objects do the grouping, in this thread (slow; the same boxes).
    progress: a bar over the segmentations grouped.
    """
    from tqdm import tqdm

    colours = {space: colour_image(image, space) for space in spaces}
    order = [(k, space) for k in ks for space in spaces]  # the original's loop order
    bar = tqdm(total=len(order), desc=f"selective search {image.shape[1]}x{image.shape[0]}", unit="seg",
               leave=False, disable=not progress)
    if reference:
        hierarchies = []
        for k, space in order:
            hierarchies += search_hierarchies(colours[space], k, strategies, reference=True)
        return rank_boxes(hierarchies, rng)
    threads = default_threads() if threads is None else max(1, int(threads))
    needed = {part for name in strategies for part in _STRATEGIES[name]}
    wanted = ("color" in needed, "texture" in needed)
    if threads == 1:
        features = {space: _space_features(colours[space], *wanted) for space in spaces}
        prepared = [_groupings(colours[space], k, strategies, features=features[space])
                    for k, space in order]
        merged = iter(group_hierarchies([g for groupings, _ in prepared for g in groupings]))
        results = [[next(merged) for _ in groupings] for groupings, _ in prepared]
        bar.update(len(order))
    else:
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        results = [None] * len(order)
        prepared = [None] * len(order)
        # The pool only segments (one OpenCV call, without the GIL); this thread does all the
        # Python and numpy work meanwhile, so the threads do not queue for the GIL (which,
        # on a loaded machine, a descheduled thread may be holding).
        with ThreadPoolExecutor(min(threads, len(order))) as pool:
            jobs = {pool.submit(segment, colours[space], k): i
                    for i, (k, space) in enumerate(order)}
            features = {space: _space_features(colours[space], *wanted) for space in spaces}
            # Then, each time, the hierarchies of all the segmentations ready so far, together.
            while jobs:
                done, _ = wait(jobs, return_when=FIRST_COMPLETED)
                labels = {jobs.pop(job): job.result() for job in done}
                wave = sorted(labels)
                for i in wave:
                    k, space = order[i]
                    prepared[i] = _groupings(colours[space], k, strategies, SIGMA,
                                             features[space], labels[i])
                merged = iter(group_hierarchies([g for i in wave for g in prepared[i][0]]))
                for i in wave:
                    results[i] = [next(merged) for _ in prepared[i][0]]
                bar.update(len(wave))
    bar.close()
    hierarchies = []
    for (groupings, blobs), merged in zip(prepared, results):
        hierarchies += _as_hierarchies(merged, blobs)
    return rank_boxes(hierarchies, rng)


def rank_boxes(hierarchies: Sequence[tuple[np.ndarray, np.ndarray]],
               rng: np.random.Generator) -> np.ndarray:
    """Pool hierarchies as the original does: priority = position * U(0, 1), ascending (stable).

    hierarchies: list of (boxes (M, 4), positions (M,)) -> boxes (sum M, 4) float64, best first.
    """
    if not hierarchies:
        return np.zeros((0, 4))
    boxes = np.concatenate([np.asarray(b, dtype=np.float64).reshape(-1, 4) for b, _ in hierarchies])
    positions = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1) for _, p in hierarchies])
    return boxes[np.argsort(positions * rng.random(len(positions)), kind="stable")]


def filter_proposals(boxes: np.ndarray, min_size: int = 20, max_boxes: int | None = 2000) -> np.ndarray:
    """Drop boxes narrower or shorter than `min_size` px (width x2 - x1 + 1), then exact
    duplicates keeping the first, then keep the first `max_boxes` (None: all). Order is kept."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    wh = boxes[:, 2:4] - boxes[:, 0:2] + 1
    boxes = boxes[(wh >= min_size).all(axis=1)]
    if len(boxes):
        _, first = np.unique(boxes, axis=0, return_index=True)
        boxes = boxes[np.sort(first)]
    return boxes if max_boxes is None else boxes[:max_boxes]


def _seed_libc_rand(seed: int) -> None:
    """OpenCV's stock ranking calls C rand(): seed it so the stock modes are reproducible too."""
    try:
        libc = ctypes.CDLL(None) if sys.platform != "win32" else ctypes.cdll.msvcrt
        libc.srand(ctypes.c_uint(seed))
    except (OSError, AttributeError):  # no C library to seed: the stock order stays random
        pass


def _stock_boxes(image: np.ndarray, mode: str, seed: int) -> np.ndarray:
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(image)
    if mode == "opencv_fast":
        ss.switchToSelectiveSearchFast()
    else:
        ss.switchToSelectiveSearchQuality()
    _seed_libc_rand(seed)
    return _xywh_to_xyxy(ss.process())


def _check_params(mode: str, max_boxes: int | None, min_size: int, resize: int | None) -> None:
    if mode not in MODES:
        raise SppdetError(f"proposal mode {mode!r} is not one of {', '.join(MODES)}")
    if max_boxes is not None and (not isinstance(max_boxes, (int, np.integer)) or max_boxes < 1):
        raise SppdetError(f"proposal max_boxes must be a positive integer or None, got {max_boxes!r}")
    if not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise SppdetError(f"proposal min_size must be a non-negative integer, got {min_size!r}")
    if resize is not None and (not isinstance(resize, (int, np.integer)) or resize < 1):
        raise SppdetError(f"proposal resize must be a positive integer or None, got {resize!r}")


def search_scale(shape: tuple[int, ...], resize: int | None, max_side: int | None = None) -> float:
    """The factor `search_image` resizes an image of `shape` by."""
    height, width = shape[:2]
    scale = 1.0 if resize is None else resize / min(height, width)
    if max_side is not None and max(height, width) * scale > max_side:
        scale = max_side / max(height, width)
    return scale


def search_image(image: np.ndarray, resize: int | None, max_side: int | None = None) -> np.ndarray:
    """The copy of a BGR image the search runs on: short side `resize` px (INTER_AREA when
    shrinking, INTER_LINEAR when enlarging), or the image itself (None, or already that size);
    its long side capped at `max_side` (None: no cap), which bounds the search time."""
    scale = search_scale(image.shape, resize, max_side)
    if scale == 1.0:
        return image
    height, width = image.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interp)


def selective_search(image: np.ndarray, mode: str = "fast", max_boxes: int | None = 2000,
                     min_size: int = 20, resize: int | None = None, seed: int = 0,
                     threads: int | None = None, reference: bool = False,
                     max_side: int | None = None, progress: bool | None = None) -> np.ndarray:
    """Selective search boxes for one BGR uint8 image (H, W, 3), best-ranked first.

    resize: search on a copy whose short side is `resize` px (None: the original size, as the
    paper); max_side caps that copy's long side (a note says so); boxes are mapped back to the
    original pixels and clipped. min_size (original pixels) and max_boxes are applied after the
    mapping, as the original filters after rescaling. progress: a bar over the segmentations
    (None: for a search of over 2 megapixels, which takes a while).
    threads: our modes' segmentations run in a thread pool of this size (None:
    `default_threads()`: up to 4 alone, 1 in compute_proposals' process pool); the boxes do not
    depend on it. reference: group with OpenCV's strategy objects (slow; the same boxes).
    Returns float32 (N, 4) [x1, y1, x2, y2], 0-based, inclusive, N <= max_boxes.
    """
    _check_params(mode, max_boxes, min_size, resize)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a BGR uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    work = search_image(image, resize, max_side)
    if search_scale(image.shape, resize, max_side) != search_scale(image.shape, resize):
        get_logger().info(f"proposals: a {width}x{height} image is searched at {work.shape[1]}x{work.shape[0]} "
                          f"(proposals.max_side {max_side})")
    if progress is None:
        progress = work.shape[0] * work.shape[1] > 2_000_000
    if mode.startswith("opencv_"):
        boxes = _stock_boxes(work, mode, seed)
    else:
        spaces, ks, strategies = _CONFIGS[mode]
        boxes = ranked_search(work, spaces, ks, strategies, np.random.default_rng(seed),
                              threads=threads, reference=reference, progress=progress)
    if work is not image:
        # Map pixel edges: pixels x1..x2 of the search image span [x1, x2 + 1) there.
        sx, sy = width / work.shape[1], height / work.shape[0]
        boxes = np.round(np.stack([boxes[:, 0] * sx, boxes[:, 1] * sy,
                                   (boxes[:, 2] + 1) * sx - 1, (boxes[:, 3] + 1) * sy - 1], axis=1))
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width - 1)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height - 1)
    return filter_proposals(boxes, min_size, max_boxes).astype(np.float32)


def time_against_stock(images: Iterable[np.ndarray], mode: str = "fast", resize: int | None = 500,
                       stock: str = "opencv_fast", repeats: int = 1, threads: int | None = None,
                       max_boxes: int | None = 2000, min_size: int = 20) -> dict:
    """Wall-clock seconds per image of our `mode` and of OpenCV's stock mode (default
    `switchToSelectiveSearchFast`) on the same images, side by side in this process.

    Each image is first resized as the pipeline does (short side `resize`; None: as given), then
    searched by both, one image at a time, alternately (which goes first alternates from image
    to image, and between repeats), so load on the machine falls on both alike. The time is of
    `selective_search` on the resized image (search, ranking and filtering; no resizing).
    threads: ours' thread pool (None: `default_threads()`).

    Returns {"ours": [s, ...], "stock": [s, ...]} (per image, the minimum over `repeats`),
    "ratio" (sum of ours / sum of stock), "median_ratio" (median of the per-image ratios),
    "ours_per_image", "stock_per_image" (means), the same for the process's CPU time (all its
    threads: "ours_cpu", "stock_cpu", "cpu_ratio"), "images" and "threads".
    """
    if mode not in MODES or stock not in MODES:
        raise SppdetError(f"time_against_stock: modes must be among {', '.join(MODES)}")
    threads = default_threads() if threads is None else max(1, int(threads))
    wall = {"ours": [], "stock": []}
    cpu = {"ours": [], "stock": []}
    for i, image in enumerate(images):
        work = search_image(image, resize)
        best = {name: [float("inf"), float("inf")] for name in wall}  # wall, CPU
        for r in range(repeats):
            runs = [("ours", mode, threads), ("stock", stock, 1)]
            for name, m, t in (runs if (i + r) % 2 == 0 else runs[::-1]):
                start, start_cpu = time.perf_counter(), time.process_time()
                selective_search(work, m, max_boxes, min_size, threads=t)
                best[name][0] = min(best[name][0], time.perf_counter() - start)
                best[name][1] = min(best[name][1], time.process_time() - start_cpu)
        for name in wall:
            wall[name].append(best[name][0])
            cpu[name].append(best[name][1])
    if not wall["ours"]:
        raise SppdetError("time_against_stock: no images")
    ours, theirs = np.array(wall["ours"]), np.array(wall["stock"])
    return {"ours": wall["ours"], "stock": wall["stock"], "ratio": float(ours.sum() / theirs.sum()),
            "median_ratio": float(np.median(ours / theirs)),
            "ours_per_image": float(ours.mean()), "stock_per_image": float(theirs.mean()),
            "ours_cpu": cpu["ours"], "stock_cpu": cpu["stock"],
            "cpu_ratio": float(sum(cpu["ours"]) / max(sum(cpu["stock"]), 1e-9)),
            "images": len(ours), "threads": threads}


# ---------------------------------------------------------------------------------------------
# Many images: process pool + per-image cache


@dataclass
class ProposalRun:
    """What `compute_proposals_with_stats` returns; dicts are keyed by image id, in input order."""

    boxes: dict[str, np.ndarray]      # (N, 4) float32; (0, 4) for a failed image
    seconds: dict[str, float]         # search time when computed (read from the cache if cached)
    failures: dict[str, str] = field(default_factory=dict)  # image id -> error (not cached)
    cached: int = 0                   # how many images came from the cache
    cache_dir: Path | None = None     # folder of this parameter set's cache files


def _params(mode: str, max_boxes: int | None, min_size: int, resize: int | None, seed: int,
            max_side: int | None = None) -> dict:
    out = {"mode": mode, "max_boxes": max_boxes, "min_size": min_size, "resize": resize,
           "seed": seed, "sigma": SIGMA, "code_version": CODE_VERSION, "opencv": cv2.__version__}
    if max_side is not None:  # absent when unset, so the caches made before it stay valid
        out["max_side"] = max_side
    return out


def _cache_file(folder: Path, image_id: str, digest: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", image_id)
    if safe != image_id:  # keep ids that differ only in odd characters apart
        safe = f"{safe}.{stable_hash(image_id, length=8)}"
    return folder / f"{safe}-{digest}.npz"


def _load_cached(path: Path, key: str):
    """(boxes, seconds) from a cache file, or None if it is missing, corrupt or for another key."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            boxes, seconds, stored = z["boxes"], float(z["seconds"]), str(z["key"])
            digest = str(z["digest"]) if "digest" in z.files else None
        if stored != key or boxes.dtype != np.float32 or boxes.ndim != 2 or boxes.shape[1] != 4 \
                or not np.isfinite(boxes).all():
            raise ValueError("contents do not match")
        if digest != content_digest(boxes):
            raise ValueError("the boxes do not match their digest")
    except Exception as e:  # any unreadable cache file is recomputed, never trusted
        get_logger().warning(f"proposals: ignoring bad cache file {path} ({e})")
        return None
    return boxes, seconds


def _save_cached(path: Path, key: str, boxes: np.ndarray, seconds: float) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, boxes=boxes, seconds=np.float64(seconds), key=np.str_(key),
                     digest=np.str_(content_digest(boxes)))


def _init_worker() -> None:
    global _IN_POOL
    _IN_POOL = True  # one search thread per process: the pool provides the parallelism
    cv2.setNumThreads(1)


def _search_task(task: tuple) -> tuple:
    image_id, path, params = task
    start = time.perf_counter()
    try:
        boxes = selective_search(load_image(path), params["mode"], params["max_boxes"],
                                 params["min_size"], params["resize"], params["seed"],
                                 max_side=params.get("max_side"))
    except Exception as e:  # one bad image must not stop the run; the caller logs it
        return image_id, None, 0.0, f"{type(e).__name__}: {e}".strip()
    return image_id, boxes, time.perf_counter() - start, None


def _as_pairs(items) -> list[tuple[str, Path]]:
    pairs = []
    for item in items:
        if hasattr(item, "image_id") and hasattr(item, "path"):
            pairs.append((str(item.image_id), Path(item.path)))
        else:
            image_id, path = item
            pairs.append((str(image_id), Path(path)))
    ids = [i for i, _ in pairs]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise SppdetError(f"proposals: duplicate image ids {', '.join(dup[:5])}")
    return pairs


def compute_proposals_with_stats(items: Iterable, mode: str = "fast", max_boxes: int | None = 2000,
                                 min_size: int = 20, resize: int | None = None,
                                 cache_dir: str | os.PathLike | None = None, workers: int = 1,
                                 seed: int = 0, rebuild: bool = False,
                                 progress: bool = True, max_side: int | None = None) -> ProposalRun:
    """Selective search over many images, cached per image and computed in a process pool.

    items: ImageRecords (anything with .image_id and .path) or (image_id, image_path) pairs.
    cache_dir: None = no cache. Files live in ``cache_dir/<mode>-<hash>/<id>-<digest>.npz``: the
    hash covers every parameter, CODE_VERSION and the OpenCV version, the digest is the image
    file's content, so a changed parameter or image is recomputed, never read stale; a corrupt
    file (unreadable, or boxes not matching their stored digest) is recomputed with a warning.
    Rerunning computes only what is missing. rebuild: ignore existing files.
    workers: processes (0 or 1: in this process). max_side: see `selective_search`.
    A failing image (unreadable, OpenCV error) is logged with its id, gets a (0, 4) array, is
    listed in `failures` and is not cached, so a rerun tries it again.
    """
    _check_params(mode, max_boxes, min_size, resize)
    pairs = _as_pairs(items)
    params = _params(mode, max_boxes, min_size, resize, seed, max_side)
    log = get_logger()
    folder = None
    if cache_dir is not None:
        folder = Path(cache_dir) / f"{mode}-{stable_hash(params, length=12)}"
        if not (folder / "params.json").is_file():
            write_json_atomic(folder / "params.json", params)
    run = ProposalRun(boxes={}, seconds={}, cache_dir=folder)
    todo = []
    cache_entry = {}  # image id -> (cache file, key) of the images to compute
    for image_id, path in pairs:
        run.boxes[image_id] = np.zeros((0, 4), np.float32)  # input order; filled in below
        try:
            digest = file_digest(path)
        except OSError as e:
            run.failures[image_id] = f"{path}: {e.strerror or e}"
            log.warning(f"proposals: {image_id} failed: {run.failures[image_id]}")
            continue
        if folder is not None:
            file, key = _cache_file(folder, image_id, digest), stable_hash(params, digest, length=40)
            hit = None if rebuild else _load_cached(file, key)
            if hit is not None:
                run.boxes[image_id], run.seconds[image_id] = hit
                run.cached += 1
                continue
            cache_entry[image_id] = (file, key)
        todo.append((image_id, path, params))

    def results():
        if workers <= 1 or len(todo) <= 1:
            yield from map(_search_task, todo)
            return
        import multiprocessing

        # "spawn", not fork: a forked child of a process whose OpenMP pool is running (torch)
        # can deadlock in its first parallel region.
        context = multiprocessing.get_context("spawn")
        with context.Pool(min(workers, len(todo)), initializer=_init_worker) as pool:
            yield from pool.imap_unordered(_search_task, todo)

    if todo:
        from tqdm import tqdm

        bar = tqdm(results(), total=len(todo), desc=f"proposals ({mode})", unit="img",
                   disable=not progress, dynamic_ncols=True)
        for image_id, boxes, seconds, error in bar:
            if error is not None:
                run.failures[image_id] = error
                log.warning(f"proposals: {image_id} failed: {error}")
                continue
            run.boxes[image_id], run.seconds[image_id] = boxes, seconds
            if image_id in cache_entry:
                _save_cached(*cache_entry[image_id], boxes, seconds)
    return run


def compute_proposals(items: Iterable, mode: str = "fast", max_boxes: int | None = 2000,
                      min_size: int = 20, resize: int | None = None,
                      cache_dir: str | os.PathLike | None = None, workers: int = 1,
                      seed: int = 0, rebuild: bool = False,
                      progress: bool = True, max_side: int | None = None) -> dict[str, np.ndarray]:
    """image id -> (N, 4) float32 proposals; see `compute_proposals_with_stats` for the rest.
    A failed image maps to an empty (0, 4) array (and is logged)."""
    return compute_proposals_with_stats(items, mode, max_boxes, min_size, resize, cache_dir,
                                        workers, seed, rebuild, progress, max_side).boxes


# ---------------------------------------------------------------------------------------------
# Quality of a proposal set


def proposal_recall(records: Sequence, proposals: dict[str, np.ndarray],
                    thresholds: Sequence[float] = (0.5, 0.7)) -> dict:
    """Recall and best overlaps of proposals against the non-difficult ground truth.

    records: ImageRecords (image_id, boxes, labels, difficult); proposals: id -> (N, 4) xyxy.
    IoU uses VOC's +1 pixel widths. Returns ``recall@<t>`` (fraction of ground-truth objects
    with a proposal of IoU >= t), ``mabo`` (mean over objects of the best IoU), ``mabo_class``
    (the mean over classes of that mean: [SS]'s MABO), ``boxes_per_image``, ``num_gt`` and
    ``num_images``. With no ground truth the overlap figures are NaN.
    """
    from .boxes import iou

    best, labels, counts = [], [], []
    for r in records:
        if r.image_id not in proposals:
            raise SppdetError(f"proposals: no proposals for image {r.image_id}")
        boxes = np.asarray(proposals[r.image_id], dtype=np.float32).reshape(-1, 4)
        counts.append(len(boxes))
        keep = ~np.asarray(r.difficult, dtype=bool)
        gt = np.asarray(r.boxes, dtype=np.float32).reshape(-1, 4)[keep]
        if len(gt) == 0:
            continue
        best.append(iou(gt, boxes).max(axis=1) if len(boxes) else np.zeros(len(gt), np.float32))
        labels.append(np.asarray(r.labels)[keep])
    best = np.concatenate(best).astype(np.float64) if best else np.zeros(0)
    labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    nan = float("nan")
    out = {f"recall@{t:g}": float((best >= t).mean()) if len(best) else nan for t in thresholds}
    out["mabo"] = float(best.mean()) if len(best) else nan
    out["mabo_class"] = (float(np.mean([best[labels == c].mean() for c in np.unique(labels)]))
                         if len(best) else nan)
    out["boxes_per_image"] = float(np.mean(counts)) if counts else 0.0
    out["num_gt"] = int(len(best))
    out["num_images"] = len(counts)
    return out


def report_split(voc_root, year: str = "2007", split: str = "test", classes: Sequence[str] | None = None,
                 mode: str = "fast", max_boxes: int | None = 2000, min_size: int = 20, resize: int | None = 500,
                 max_side: int | None = None, cache_dir=None, workers: int = 1, rebuild: bool = False,
                 compare_stock: bool = False) -> dict:
    """scripts/proposals.py: proposals of a VOC-format split (computed or read from the cache) and
    their quality (`proposal_recall`), plus "seconds_per_image" (the search's wall-clock time per
    image in the process that searched it, stored with the cache) and, with `compare_stock`, ours
    against OpenCV's stock fast mode side by side on the same resized images (`time_against_stock`).
    classes: None reads the classes the annotations name."""
    from .voc import VOCDataset, annotation_classes

    classes = tuple(classes) if classes else annotation_classes(voc_root, year, split)
    dataset = VOCDataset(voc_root, year, split, classes=classes or ("object",), other_classes="ignore")
    dataset.check_not_empty()
    run = compute_proposals_with_stats(dataset.records, mode=mode, max_boxes=max_boxes, min_size=min_size,
                                       resize=resize, cache_dir=cache_dir, workers=workers, rebuild=rebuild,
                                       max_side=max_side)
    stats = proposal_recall(dataset.records, run.boxes)
    seconds = list(run.seconds.values())
    stats.update(seconds_per_image=float(np.mean(seconds)) if seconds else float("nan"), run=run,
                 classes=classes, images=len(dataset))
    if compare_stock:
        stats["stock"] = time_against_stock([load_image(r.path) for r in dataset.records], mode=mode,
                                            resize=resize, max_boxes=max_boxes, min_size=min_size)
    return stats
