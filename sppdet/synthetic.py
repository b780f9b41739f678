"""The embedded demo dataset: cluttered synthetic shape scenes written in the VOC devkit layout.

Five shape families are the object classes (``SYNTHETIC_CLASSES``). Colour and texture are
drawn independently of the class, and the same colours and textures also paint distractors
(rectangles, frames, potato blobs, crescents, strokes, arcs, letters), so only shape tells the
classes apart and proposals on distractors are real negatives. Objects vary in size, aspect,
rotation and texture, occlude each other, are occluded by distractors, and are cut by the
image border, so AP on it is informative for a small network trained from scratch.

Layout written by `generate` (exactly the devkit's)::

    <root>/VOC2007/JPEGImages/<id>.jpg          ids are 6-digit strings, "000001", ...
    <root>/VOC2007/Annotations/<id>.xml         VOC XML, boxes 1-based inclusive
    <root>/VOC2007/ImageSets/Main/{trainval,train,val,test}.txt and <class>_<split>.txt
    <root>/sppdet_synthetic.json                parameters; written last (marks completeness)

Box of an object: the tight box of its own drawn mask (alpha >= 0.5) clipped to the image,
occluded parts included. truncated=1 when more than 5% of the mask lies outside the image;
difficult=1 when less than 45% of the mask is visible (occluded or outside) or fewer than
100 of its pixels are visible.

Same parameters, same seed -> byte-identical files (numpy PCG64 per image, OpenCV drawing,
JPEG at a fixed quality).
"""
from __future__ import annotations

import colorsys
import json
import math
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from .utils import SppdetError, current_umask, get_logger, write_json_atomic

SYNTHETIC_CLASSES = ("disk", "ring", "triangle", "cross", "star")
FORMAT_VERSION = 1          # bump whenever the rendering changes, so cached datasets regenerate
MARKER_NAME = "sppdet_synthetic.json"
JPEG_QUALITY = 90
DEFAULTS = dict(seed=0, num_trainval=200, num_test=100, min_size=16, max_size=120)

_SUB = 8                    # fillPoly sub-pixel precision: coordinates carry 3 fractional bits
_TRUNCATED_OUTSIDE = 0.05   # mask fraction outside the image that makes an object truncated
_DIFFICULT_VISIBLE = 0.45   # visible mask fraction below which an object is difficult
_DIFFICULT_PIXELS = 100     # visible pixels below which an object is difficult
_NUM_OBJECTS_P = (0.04, 0.26, 0.28, 0.22, 0.14, 0.06)  # P(0..5 objects in an image)
_DISTRACTORS = ("rect", "frame", "blob", "crescent", "stroke", "arc", "glyph")
_GLYPHS = "BEFJKLMNPRSUZ2345679"  # no O/0/C/G/A/V/X/T/Y/+: they would pass for a class shape


# --------------------------------------------------------------------------- shapes

def _ellipse(n: int = 64) -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _object_shape(family: str, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Polygons of one class shape in unit coordinates (radius ~1) as [(points (N, 2), fill)]:
    fill 255 paints, 0 cuts a hole (drawn in order)."""
    if family == "disk":
        return [(_ellipse(), 255)]
    if family == "ring":
        return [(_ellipse(), 255), (_ellipse() * rng.uniform(0.45, 0.7), 0)]
    if family == "triangle":
        ang = np.deg2rad(-90 + np.array([0, 120, 240]) + rng.uniform(-12, 12, 3))
        r = rng.uniform(0.85, 1.0, 3)
        return [(np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1), 255)]
    if family == "cross":
        t = rng.uniform(0.18, 0.32)               # half-width of an arm
        a = rng.uniform(0.8, 1.0, 4)              # arm lengths: right, down, left, up
        pts = [(t, -t), (a[0], -t), (a[0], t), (t, t), (t, a[1]), (-t, a[1]), (-t, t),
               (-a[2], t), (-a[2], -t), (-t, -t), (-t, -a[3]), (t, -a[3])]
        return [(np.array(pts, dtype=np.float64), 255)]
    if family == "star":
        n = 5 if rng.random() < 0.7 else 6
        inner = rng.uniform(0.38, 0.52)
        ang = -np.pi / 2 + np.arange(2 * n) * np.pi / n
        r = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
        return [(np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1), 255)]
    if family in EXTRA_FAMILIES:
        return _extra_shape(family, rng)
    raise ValueError(family)


# Further shape families: the classification (pretraining) set holds PRETRAIN_EXTRA among its
# classes, as ImageNet holds many classes besides VOC's; HELDOUT_FAMILIES appear in neither set
# (they make held-out detection sets for testing how features transfer). Unit coordinates, radius ~1.
PRETRAIN_EXTRA = ("pentagon", "hexagon", "semicircle", "lshape", "tee", "trapezoid", "star4",
                  "gear", "tri_ring", "horseshoe", "drop", "chevron", "keyhole", "dumbbell")
HELDOUT_FAMILIES = ("heart", "arrow", "bowtie", "flower")
EXTRA_FAMILIES = PRETRAIN_EXTRA + HELDOUT_FAMILIES


def _regular(n: int, rng: np.random.Generator, jitter: float = 0.08) -> np.ndarray:
    ang = -np.pi / 2 + np.arange(n) * 2 * np.pi / n + rng.uniform(-jitter, jitter, n)
    r = rng.uniform(0.9, 1.0, n)
    return np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1)


def _extra_shape(family: str, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    P = lambda pts: np.array(pts, dtype=np.float64)  # noqa: E731
    if family == "pentagon":
        return [(_regular(5, rng), 255)]
    if family == "hexagon":
        return [(_regular(6, rng), 255)]
    if family == "semicircle":
        t = np.linspace(0, np.pi, 33)
        pts = np.stack([np.cos(t), -np.sin(t)], axis=1) + (0, 0.4)
        return [(pts, 255)]
    if family == "lshape":
        t = rng.uniform(0.3, 0.45)
        return [(P([(-1, -1), (-1 + 2 * t, -1), (-1 + 2 * t, 1 - 2 * t), (1, 1 - 2 * t), (1, 1), (-1, 1)]) * 0.8, 255)]
    if family == "tee":
        t = rng.uniform(0.16, 0.26)
        bar = rng.uniform(0.3, 0.45)
        return [(P([(-1, -1), (1, -1), (1, -1 + bar), (t, -1 + bar), (t, 1), (-t, 1), (-t, -1 + bar),
                    (-1, -1 + bar)]) * 0.85, 255)]
    if family == "trapezoid":
        top = rng.uniform(0.2, 0.55)
        return [(P([(-top, -0.7), (top, -0.7), (1, 0.7), (-1, 0.7)]), 255)]
    if family == "star4":
        inner = rng.uniform(0.25, 0.4)
        ang = -np.pi / 2 + np.arange(8) * np.pi / 4
        r = np.where(np.arange(8) % 2 == 0, 1.0, inner)
        return [(np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1), 255)]
    if family == "gear":
        n = int(rng.integers(7, 11))
        t = np.linspace(0, 2 * np.pi, n * 8, endpoint=False)
        r = np.where((np.arange(n * 8) // 4) % 2 == 0, 1.0, rng.uniform(0.72, 0.82))
        return [(np.stack([r * np.cos(t), r * np.sin(t)], axis=1), 255),
                (_ellipse() * rng.uniform(0.2, 0.35), 0)]
    if family == "tri_ring":
        ang = np.deg2rad(-90 + np.array([0, 120, 240]))
        tri = np.stack([np.cos(ang), np.sin(ang)], axis=1)
        return [(tri, 255), (tri * rng.uniform(0.4, 0.6) + (0, 0.05), 0)]
    if family == "horseshoe":
        t0 = np.linspace(np.pi, 2 * np.pi, 24)
        inner = rng.uniform(0.4, 0.6)
        outer = np.concatenate([np.stack([np.cos(t0), np.sin(t0)], 1), P([(1, 0.9), (inner, 0.9)]),
                                np.stack([inner * np.cos(t0[::-1]), inner * np.sin(t0[::-1])], 1),
                                P([(-inner, 0.9), (-1, 0.9)])])
        return [(outer, 255)]
    if family == "drop":  # teardrop, tip up: x = sin t sin(t / 2)^m, y = -cos t
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        m = rng.uniform(0.9, 1.4)
        return [(np.stack([1.1 * np.sin(t) * np.sin(t / 2) ** m, -np.cos(t)], 1), 255)]
    if family == "chevron":
        t = rng.uniform(0.3, 0.45)
        return [(P([(-1, -0.6), (0, 0.4), (1, -0.6), (1, -0.6 + 2 * t), (0, 0.4 + 2 * t), (-1, -0.6 + 2 * t)]) * 0.95, 255)]
    if family == "keyhole":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        circ = np.stack([0.55 * np.cos(t), 0.55 * np.sin(t) - 0.4], 1)
        return [(circ, 255), (P([(-0.3, 0.0), (0.3, 0.0), (0.55, 1.0), (-0.55, 1.0)]), 255)]
    if family == "dumbbell":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        r = rng.uniform(0.35, 0.45)
        bw = rng.uniform(0.1, 0.18)
        c = np.stack([r * np.cos(t), r * np.sin(t)], 1)
        return [(c + (-1 + r, 0), 255), (c + (1 - r, 0), 255), (P([(-0.6, -bw), (0.6, -bw), (0.6, bw), (-0.6, bw)]), 255)]
    if family == "heart":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [(np.stack([x, y + 2.5], 1) / 17.0, 255)]
    if family == "arrow":
        t = rng.uniform(0.15, 0.25)
        head = rng.uniform(0.4, 0.6)
        hx = 1 - 2 * head * 0.9
        return [(P([(-1, -t), (hx, -t), (hx, -head), (1, 0), (hx, head), (hx, t), (-1, t)]), 255)]
    if family == "bowtie":
        w = rng.uniform(0.1, 0.25)
        return [(P([(-1, -0.8), (-w, -0.1), (w, -0.1), (1, -0.8), (1, 0.8), (w, 0.1), (-w, 0.1), (-1, 0.8)]), 255)]
    if family == "flower":
        n = int(rng.integers(5, 7))
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        r = 0.65 + 0.35 * np.abs(np.cos(n * t / 2))
        return [(np.stack([r * np.cos(t), r * np.sin(t)], 1), 255)]
    raise ValueError(family)


def _distractor_shape(kind: str, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Polygons of a filled non-class distractor, as `_object_shape`."""
    square = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64) * 0.8
    if kind == "rect":
        return [(square, 255)]
    if kind == "frame":
        return [(square, 255), (square * rng.uniform(0.45, 0.75), 0)]
    if kind == "blob":   # potato: a few strong low harmonics on the radius
        t = np.linspace(0.0, 2 * np.pi, 64, endpoint=False)
        r = np.ones_like(t)
        for k in (2, 3, 4):
            r += rng.uniform(0.1, 0.25) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
        r /= r.max()
        return [(np.stack([r * np.cos(t), r * np.sin(t)], axis=1), 255)]
    if kind == "crescent":
        off = rng.uniform(0.35, 0.7)
        return [(_ellipse(), 255), (_ellipse() * rng.uniform(0.8, 1.0) + (off, 0.0), 0)]
    raise ValueError(kind)


def _transform(points: np.ndarray, size: float, aspect: float, angle: float,
               center: tuple[float, float]) -> np.ndarray:
    """Unit shape -> image coordinates: stretch (diameter `size`, width/height `aspect`),
    rotate by `angle` radians, move to `center`."""
    s = np.array([math.sqrt(aspect), 1.0 / math.sqrt(aspect)]) * size / 2
    c, si = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -si], [si, c]])
    return (points * s) @ rot.T + np.asarray(center)


def _polygon_mask(polys: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, int, int]:
    """Rasterise image-coordinate polygons (anti-aliased) into a float32 alpha mask over their
    own bounding region. Returns (alpha (h, w) in [0, 1], x0, y0): the region's top-left pixel,
    which may lie outside the image."""
    allp = np.concatenate([p for p, _ in polys])
    x0, y0 = np.floor(allp.min(axis=0)).astype(int) - 1
    x1, y1 = np.ceil(allp.max(axis=0)).astype(int) + 2
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    for pts, fill in polys:
        q = np.round((pts - (x0, y0)) * _SUB).astype(np.int32)
        cv2.fillPoly(mask, [q], fill, cv2.LINE_AA, shift=3)
    return mask.astype(np.float32) / 255.0, int(x0), int(y0)


def _stroke_mask(kind: str, rng: np.random.Generator, size: float,
                 center: tuple[float, float]) -> tuple[np.ndarray, int, int]:
    """Alpha mask of a line-like distractor: a polyline stroke, an open elliptic arc or a
    rotated letter, `size` pixels across, as `_polygon_mask`."""
    half = int(math.ceil(size * 0.75)) + 4
    side = 2 * half + 1
    mask = np.zeros((side, side), np.uint8)
    thick = int(rng.integers(2, 2 + max(1, int(size / 10))))
    if kind == "stroke":
        n = int(rng.integers(2, 5))
        pts = half + rng.uniform(-0.5, 0.5, (n, 2)) * size
        cv2.polylines(mask, [np.round(pts * _SUB).astype(np.int32)], False, 255, thick,
                      cv2.LINE_AA, shift=3)
    elif kind == "arc":
        axes = (max(2, int(size / 2 * rng.uniform(0.6, 1.0))), max(2, int(size / 2 * rng.uniform(0.6, 1.0))))
        start = rng.uniform(0, 360)
        cv2.ellipse(mask, (half, half), axes, rng.uniform(0, 180), start,
                    start + rng.uniform(40, 200), 255, thick, cv2.LINE_AA)
    else:  # glyph: a letter rendered upright, then rotated
        font = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_TRIPLEX)[
            int(rng.integers(3))]
        text = _GLYPHS[int(rng.integers(len(_GLYPHS)))]
        (tw, th), _ = cv2.getTextSize(text, font, 1.0, 1)
        scale = size * 0.8 / max(tw, th)
        thick = max(1, int(round(scale * rng.uniform(1.5, 3.5))))
        (tw, th), base = cv2.getTextSize(text, font, scale, thick)
        cv2.putText(mask, text, (half - tw // 2, half + th // 2), font, scale, 255, thick, cv2.LINE_AA)
        rot = cv2.getRotationMatrix2D((half, half), rng.uniform(-60, 60), 1.0)
        mask = cv2.warpAffine(mask, rot, (side, side), flags=cv2.INTER_LINEAR)
    x0 = int(round(center[0])) - half
    y0 = int(round(center[1])) - half
    return mask.astype(np.float32) / 255.0, x0, y0


# --------------------------------------------------------------------------- appearance

def _random_colour(rng: np.random.Generator) -> np.ndarray:
    h, s, v = rng.uniform(0, 1), rng.uniform(0.1, 1.0), rng.uniform(0.15, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255


def _texture(rng: np.random.Generator, h: int, w: int, c1: np.ndarray) -> np.ndarray:
    """A (h, w, 3) float32 fill around colour c1: flat, gradient, stripes, spots or mottled."""
    if rng.random() < 0.5:
        c2 = _random_colour(rng)
    else:
        c2 = np.clip(c1 * rng.uniform(0.45, 1.6), 0, 255)
    kind = int(rng.integers(5))
    if kind == 0:
        t = np.zeros((h, w, 1), np.float32)
    elif kind in (1, 2):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        a = rng.uniform(0, 2 * np.pi)
        proj = xx * math.cos(a) + yy * math.sin(a)
        if kind == 1:
            t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
        else:
            t = 0.5 + 0.5 * np.sin(proj * (2 * np.pi / rng.uniform(3.0, 10.0)))
        t = t[..., None]
    elif kind == 3:
        spots = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(3, 6 + h * w // 60))):
            cv2.circle(spots, (int(rng.integers(w)), int(rng.integers(h))),
                       int(rng.integers(1, 4)), 255, -1, cv2.LINE_AA)
        t = (spots.astype(np.float32) / 255.0)[..., None]
    else:
        grid = rng.uniform(0, 1, (h // 6 + 2, w // 6 + 2)).astype(np.float32)
        t = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1)[..., None]
    return c1 * (1 - t) + c2 * t


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Cluttered (h, w, 3) float32 background: gradient, low-frequency colour noise, an
    optional stripe/grid texture and a few large soft-edged regions."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    proj = xx * math.cos(a) + yy * math.sin(a)
    t = ((proj - proj.min()) / max(float(np.ptp(proj)), 1.0))[..., None]
    img = _random_colour(rng) * (1 - t) + _random_colour(rng) * t
    grid = rng.normal(0, rng.uniform(10, 30), (int(rng.integers(3, 7)), int(rng.integers(3, 7)), 3))
    img += cv2.resize(grid.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    if rng.random() < 0.35:
        b = rng.uniform(0, 2 * np.pi)
        period = rng.uniform(6, 30)
        wave = np.sin((xx * math.cos(b) + yy * math.sin(b)) * (2 * np.pi / period))
        if rng.random() < 0.5:  # a grid rather than stripes
            wave = np.maximum(wave, np.sin((-xx * math.sin(b) + yy * math.cos(b)) * (2 * np.pi / period)))
        img += (rng.uniform(8, 25) * wave)[..., None]
    for _ in range(int(rng.integers(0, 4))):
        region = np.zeros((h, w), np.uint8)
        cv2.ellipse(region, (int(rng.integers(w)), int(rng.integers(h))),
                    (int(rng.uniform(0.15, 0.5) * w), int(rng.uniform(0.15, 0.5) * h)),
                    rng.uniform(0, 180), 0, 360, 255, -1)
        alpha = cv2.GaussianBlur(region.astype(np.float32) / 255, (0, 0), rng.uniform(3, 12))[..., None]
        img = img * (1 - alpha) + _random_colour(rng) * alpha
    return img


class _Scene:
    """The image being painted, plus which object (index >= 0) or nothing (-1) is on top at
    every pixel, to measure occlusion."""

    def __init__(self, canvas: np.ndarray) -> None:
        self.canvas = canvas
        self.h, self.w = canvas.shape[:2]
        self.owner = np.full((self.h, self.w), -1, np.int32)

    def clip(self, alpha: np.ndarray, x0: int, y0: int):
        """Image slices and mask slices of a region mask, or None when it misses the image."""
        ah, aw = alpha.shape
        ix0, iy0 = max(x0, 0), max(y0, 0)
        ix1, iy1 = min(x0 + aw, self.w), min(y0 + ah, self.h)
        if ix0 >= ix1 or iy0 >= iy1:
            return None
        return (slice(iy0, iy1), slice(ix0, ix1)), (slice(iy0 - y0, iy1 - y0), slice(ix0 - x0, ix1 - x0))

    def contrast_colour(self, rng: np.random.Generator, alpha: np.ndarray, x0: int, y0: int) -> np.ndarray:
        """A random colour kept at least ~50 (RGB distance) away from the mean colour beneath
        the mask, so objects are not invisible; the best of a few draws otherwise."""
        sl = self.clip(alpha, x0, y0)
        colour = _random_colour(rng)
        if sl is None:
            return colour
        a = alpha[sl[1]][..., None]
        under = (self.canvas[sl[0]] * a).sum(axis=(0, 1)) / max(float(a.sum()), 1e-6)
        best, best_d = colour, float(np.linalg.norm(colour - under))
        for _ in range(8):
            if best_d >= 50:
                break
            colour = _random_colour(rng)
            d = float(np.linalg.norm(colour - under))
            if d > best_d:
                best, best_d = colour, d
        return best

    def paint(self, rng: np.random.Generator, alpha: np.ndarray, x0: int, y0: int,
              owner: int, opacity: float = 1.0) -> None:
        """Composite a textured layer with mask `alpha` at (x0, y0); pixels it covers with
        alpha*opacity >= 0.5 now belong to `owner` (-1 for a distractor)."""
        sl = self.clip(alpha, x0, y0)
        if sl is None:
            return
        a = alpha[sl[1]] * opacity
        hh, ww = a.shape
        tex = _texture(rng, hh, ww, self.contrast_colour(rng, alpha, x0, y0))
        if rng.random() < 0.25:  # a dark or light outline
            edge = a - cv2.erode(a, np.ones((3, 3), np.uint8))
            tex = tex * (1 - edge[..., None]) + (tex * rng.choice([0.35, 1.8])).clip(0, 255) * edge[..., None]
        region = self.canvas[sl[0]]
        self.canvas[sl[0]] = region * (1 - a[..., None]) + tex * a[..., None]
        self.owner[sl[0]][a >= 0.5] = owner


# --------------------------------------------------------------------------- one image

def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(max(hi, lo)))))


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _place_distractor(scene: _Scene, rng: np.random.Generator, size: float,
                      center: tuple[float, float]) -> None:
    kind = _DISTRACTORS[int(rng.integers(len(_DISTRACTORS)))]
    if kind in ("stroke", "arc", "glyph"):
        alpha, x0, y0 = _stroke_mask(kind, rng, size, center)
    else:
        polys = _distractor_shape(kind, rng)
        aspect = _log_uniform(rng, 1 / 2.5, 2.5)
        angle = rng.uniform(0, 2 * np.pi)
        alpha, x0, y0 = _polygon_mask([(_transform(p, size, aspect, angle, center), f) for p, f in polys])
    opacity = 1.0 if rng.random() < 0.8 else rng.uniform(0.55, 0.9)
    scene.paint(rng, alpha, x0, y0, owner=-1, opacity=opacity)


def render_image(rng: np.random.Generator, families: Sequence[str] = SYNTHETIC_CLASSES,
                 min_size: float = DEFAULTS["min_size"], max_size: float = DEFAULTS["max_size"]):
    """Render one scene with objects drawn from the shape `families` (SYNTHETIC_CLASSES names).

    Returns (image BGR uint8 (H, W, 3), objects): each object a dict with `label` (0-based
    index into `families`), `box` (x1, y1, x2, y2) 0-based inclusive ints,
    `truncated`, `difficult` (bool) and `visible` (visible fraction of its mask).
    """
    short = int(rng.integers(160, 241))
    aspect = _log_uniform(rng, 0.75, 4 / 3)
    w, h = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
    scene = _Scene(_background(rng, h, w).astype(np.float32))
    top = min(max_size, 0.6 * min(w, h))

    def rand_size(scale: float = 1.0) -> float:
        return _log_uniform(rng, min_size * scale, top * scale)

    for _ in range(int(rng.integers(3, 9))):  # distractors behind the objects
        _place_distractor(scene, rng, rand_size(1.1), (rng.uniform(0, w), rng.uniform(0, h)))

    n_obj = int(rng.choice(len(_NUM_OBJECTS_P), p=_NUM_OBJECTS_P))
    objects, masks = [], []
    for k in range(n_obj):
        label = int(rng.integers(len(families)))
        polys = _object_shape(families[label], rng)
        size = rand_size()
        shape_aspect = _log_uniform(rng, 1 / 1.7, 1.7)
        angle = rng.uniform(0, 2 * np.pi)
        cut_border = rng.random() < 0.15
        for _ in range(10):  # avoid heavy overlap with earlier objects, if possible
            half = size / 2
            if cut_border:  # centre just inside or outside one border: 0.3..0.9 of it inside
                side = int(rng.integers(4))
                d = rng.uniform(-0.2, 0.4) * size
                cx, cy = rng.uniform(0, w), rng.uniform(0, h)
                cx, cy = ((d, cy), (w - 1 - d, cy), (cx, d), (cx, h - 1 - d))[side]
            else:
                cx = rng.uniform(min(half, w / 2), max(w - half, w / 2))
                cy = rng.uniform(min(half, h / 2), max(h - half, h / 2))
            placed = [(_transform(p, size, shape_aspect, angle, (cx, cy)), f) for p, f in polys]
            allp = np.concatenate([p for p, _ in placed])
            approx = np.r_[allp.min(axis=0), allp.max(axis=0)]
            if all(_box_iou(approx, o["approx"]) < 0.3 for o in objects):
                break
        alpha, x0, y0 = _polygon_mask(placed)
        scene.paint(rng, alpha, x0, y0, owner=k)
        objects.append(dict(label=label, approx=approx))
        masks.append((alpha >= 0.5, x0, y0))
        if rng.random() < 0.3:  # an occluder on the object's edge
            t = rng.uniform(0, 2 * np.pi)
            r = rng.uniform(0.3, 0.6) * size
            _place_distractor(scene, rng, size * rng.uniform(0.3, 0.7),
                              (cx + r * math.cos(t), cy + r * math.sin(t)))

    for _ in range(int(rng.integers(0, 3))):  # distractors in front
        _place_distractor(scene, rng, rand_size(0.8), (rng.uniform(0, w), rng.uniform(0, h)))

    img = scene.canvas
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 0.9))
    img = img + rng.normal(0, rng.uniform(2, 7), img.shape).astype(np.float32)
    image = np.clip(img + 0.5, 0, 255).astype(np.uint8)

    out = []
    for k, (obj, (mask, x0, y0)) in enumerate(zip(objects, masks)):
        total = int(mask.sum())
        sl = scene.clip(mask.astype(np.float32), x0, y0)
        inside = mask[sl[1]] if sl is not None else np.zeros((0, 0), bool)
        if total == 0 or not inside.any():
            continue  # nothing of it is in the image: not annotated
        ys, xs = np.nonzero(inside)
        ox, oy = sl[0][1].start, sl[0][0].start
        visible = int((scene.owner[sl[0]][inside] == k).sum())
        out.append(dict(
            label=obj["label"],
            box=(int(xs.min()) + ox, int(ys.min()) + oy, int(xs.max()) + ox, int(ys.max()) + oy),
            truncated=bool(inside.sum() < (1 - _TRUNCATED_OUTSIDE) * total),
            difficult=bool(visible < _DIFFICULT_VISIBLE * total or visible < _DIFFICULT_PIXELS),
            visible=visible / total,
        ))
    return image, out


# --------------------------------------------------------------------------- dataset files

def _resolve_classes(classes: Sequence[str] | Mapping[str, str]) -> list[tuple[str, str]]:
    """[(class name, shape family)]: a mapping name -> family; a sequence of family names (a
    subset, in any order); or a sequence of other names, labelling the families in order."""
    families = set(SYNTHETIC_CLASSES) | set(EXTRA_FAMILIES)
    if isinstance(classes, Mapping):
        pairs = [(str(n), str(f)) for n, f in classes.items()]
    else:
        names = [str(n) for n in classes]
        known = [n in families for n in names]
        if all(known):
            pairs = [(n, n) for n in names]
        elif not any(known):
            if len(names) > len(SYNTHETIC_CLASSES):
                raise SppdetError(
                    f"synthetic classes: {len(names)} names given, but there are only "
                    f"{len(SYNTHETIC_CLASSES)} shape families ({', '.join(SYNTHETIC_CLASSES)})")
            pairs = list(zip(names, SYNTHETIC_CLASSES))
        else:
            raise SppdetError(
                f"synthetic classes {names}: mixes shape family names ({', '.join(SYNTHETIC_CLASSES)}) "
                f"with other names; use only family names, only new names, or a name->family mapping")
    if not pairs:
        raise SppdetError("synthetic classes: at least one class is needed")
    for name, fam in pairs:
        if fam not in families:
            raise SppdetError(f"synthetic classes: {fam!r} (for {name!r}) is not a shape family "
                              f"({', '.join(SYNTHETIC_CLASSES)})")
        if not name or any(c.isspace() for c in name) or "/" in name:
            raise SppdetError(f"synthetic classes: {name!r} is not a valid class name "
                              f"(non-empty, no spaces or '/')")
    if len({n for n, _ in pairs}) != len(pairs) or len({f for _, f in pairs}) != len(pairs):
        raise SppdetError(f"synthetic classes {pairs}: names and shape families must be distinct")
    return pairs


def _annotation_xml(image_id: str, w: int, h: int, objects: list[tuple[str, dict]]) -> str:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    ET.SubElement(ET.SubElement(root, "source"), "database").text = "sppdet synthetic"
    size = ET.SubElement(root, "size")
    for tag, v in (("width", w), ("height", h), ("depth", 3)):
        ET.SubElement(size, tag).text = str(v)
    ET.SubElement(root, "segmented").text = "0"
    for name, obj in objects:
        o = ET.SubElement(root, "object")
        ET.SubElement(o, "name").text = name
        ET.SubElement(o, "pose").text = "Unspecified"
        ET.SubElement(o, "truncated").text = str(int(obj["truncated"]))
        ET.SubElement(o, "difficult").text = str(int(obj["difficult"]))
        bb = ET.SubElement(o, "bndbox")
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), obj["box"]):
            ET.SubElement(bb, tag).text = str(v + 1)  # VOC XML is 1-based
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="unicode") + "\n"


def _params(seed, num_trainval, num_test, classes, min_size, max_size) -> dict:
    """Validated, JSON-ready generation parameters (what the marker records)."""
    for key, v, lo in (("num_trainval", num_trainval, 0), ("num_test", num_test, 0),
                       ("seed", seed, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise SppdetError(f"synthetic {key}: expected an integer >= {lo}, got {v!r}")
    if num_trainval + num_test > 999999:
        raise SppdetError("synthetic num_trainval + num_test: at most 999999 images (6-digit ids)")
    if not 4 <= min_size <= max_size:
        raise SppdetError(f"synthetic min_size/max_size: need 4 <= min_size <= max_size, "
                          f"got {min_size!r}, {max_size!r}")
    return dict(seed=int(seed), num_trainval=int(num_trainval), num_test=int(num_test),
                classes=[list(p) for p in _resolve_classes(classes)],
                min_size=float(min_size), max_size=float(max_size))


def generate(root: str | os.PathLike, seed: int = DEFAULTS["seed"],
             num_trainval: int = DEFAULTS["num_trainval"], num_test: int = DEFAULTS["num_test"],
             classes: Sequence[str] | Mapping[str, str] = SYNTHETIC_CLASSES,
             min_size: float = DEFAULTS["min_size"], max_size: float = DEFAULTS["max_size"],
             progress: bool = True) -> Path:
    """Write the dataset into `root` (new or empty: files of an earlier, larger dataset there
    would stay) and return the `root/VOC2007` folder. Prefer `ensure_dataset`, which caches
    and writes atomically.

    seed: the dataset's seed (image i draws from PCG64([seed, i])).
    num_trainval / num_test: images per split; ids 000001.. are trainval, then test.
    classes: class names; a sequence of shape-family names (a subset of SYNTHETIC_CLASSES),
        or other names that label the families in order (("apple", "pear") -> disk, ring),
        or a mapping name -> family. Only the listed families are drawn.
    min_size / max_size: object diameter range in pixels, before the aspect stretch (log-uniform;
        max_size is also capped at 0.6 x the image's short side).
    """
    params = _params(seed, num_trainval, num_test, classes, min_size, max_size)
    pairs = params["classes"]
    folder = Path(root) / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    n_total = num_trainval + num_test
    ids = [f"{i + 1:06d}" for i in range(n_total)]
    # presence[image][class]: 1 a non-difficult object, 0 only difficult ones, -1 none (devkit)
    presence = np.full((n_total, len(pairs)), -1, np.int8)
    for i in tqdm(range(n_total), desc="synthetic VOC", leave=False, disable=None if progress else True):
        rng = np.random.Generator(np.random.PCG64([params["seed"], i]))
        image, objects = render_image(rng, [f for _, f in pairs], min_size, max_size)
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise SppdetError(f"{folder}/JPEGImages/{ids[i]}.jpg: JPEG encoding failed")
        (folder / "JPEGImages" / f"{ids[i]}.jpg").write_bytes(buf.tobytes())
        named = [(pairs[o["label"]][0], o) for o in objects]
        (folder / "Annotations" / f"{ids[i]}.xml").write_text(
            _annotation_xml(ids[i], image.shape[1], image.shape[0], named))
        for o in objects:
            presence[i, o["label"]] = max(presence[i, o["label"]], 0 if o["difficult"] else 1)

    order = np.random.Generator(np.random.PCG64([params["seed"], n_total, 1])).permutation(num_trainval)
    train = sorted(order[: (num_trainval + 1) // 2].tolist())
    splits = {"trainval": list(range(num_trainval)), "train": train,
              "val": sorted(set(range(num_trainval)) - set(train)),
              "test": list(range(num_trainval, n_total))}
    main = folder / "ImageSets" / "Main"
    for split, idx in splits.items():
        (main / f"{split}.txt").write_text("".join(f"{ids[i]}\n" for i in idx))
        for c, (name, _) in enumerate(pairs):
            (main / f"{name}_{split}.txt").write_text(
                "".join(f"{ids[i]} {presence[i, c]:2d}\n" for i in idx))
    # the marker goes last: its presence means every other file is complete
    write_json_atomic(Path(root) / MARKER_NAME, {"format_version": FORMAT_VERSION, "params": params})
    return folder



def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _remove_stale_temps(root: Path) -> None:
    """Delete temporaries (`.<name>.tmp-<pid>-*`) left by interrupted runs whose process is gone."""
    prefix = f".{root.name}.tmp-"
    for path in root.parent.glob(prefix + "*"):
        pid = path.name[len(prefix):].split("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue            # its generator is still running
        except ProcessLookupError:
            pass
        except OSError:         # e.g. PermissionError: alive, owned by someone else
            continue
        shutil.rmtree(path, ignore_errors=True)


def ensure_dataset(root: str | os.PathLike, seed: int = DEFAULTS["seed"],
                   num_trainval: int = DEFAULTS["num_trainval"], num_test: int = DEFAULTS["num_test"],
                   classes: Sequence[str] | Mapping[str, str] = SYNTHETIC_CLASSES,
                   min_size: float = DEFAULTS["min_size"], max_size: float = DEFAULTS["max_size"],
                   progress: bool = True) -> Path:
    """Return `root/VOC2007` of a complete synthetic dataset made with these parameters (see
    `generate`), generating it first when it is missing or was made with other parameters.

    Generation goes into a temporary sibling of `root` whose marker file is written last, and
    is then renamed onto `root`, so an interrupted run never leaves a dataset that looks
    complete. `root` is replaced only when it is empty or holds a synthetic dataset (has the
    marker); anything else is a SppdetError, never overwritten.
    """
    root = Path(root)
    params = _params(seed, num_trainval, num_test, classes, min_size, max_size)
    want = json.loads(json.dumps({"format_version": FORMAT_VERSION, "params": params}))
    marker = _read_marker(root)
    main = root / "VOC2007" / "ImageSets" / "Main"
    if marker == want and (main / "trainval.txt").is_file() and (main / "test.txt").is_file():
        return root / "VOC2007"
    if root.exists() and not (root / MARKER_NAME).exists():
        if not root.is_dir() or any(root.iterdir()):
            raise SppdetError(
                f"{root}: exists but is not an sppdet synthetic dataset (no {MARKER_NAME}); "
                f"refusing to overwrite it, choose a new or empty folder for the synthetic data")
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    get_logger().info(f"generating the synthetic VOC dataset ({num_trainval} trainval + "
                      f"{num_test} test images) in {root}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-{os.getpid()}-", dir=root.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700: the dataset gets the usual mode
    old = tmp.with_name(tmp.name + "-old")
    try:
        generate(tmp, progress=progress, **{k: params[k] for k in DEFAULTS}, classes=dict(params["classes"]))
        if root.exists():
            os.rename(root, old)  # an existing dataset with other parameters (or an empty folder)
        try:
            os.rename(tmp, root)
        except OSError:
            # another process finished the same dataset first: use it if it is what we want
            if _read_marker(root) != want:
                raise
    finally:
        for path in (tmp, old):
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
    return root / "VOC2007"


# --------------------------------------------------------------------------- classification set
#
# The embedded pretraining set (ImageFolder layout), what ImageNet is to VOC: one shape per image
# on clutter, with MORE classes than the detection set: its 5 object families, the 7 distractor
# families and further shape families, drawn by the same renderer. Image i of class c in split s
# draws from PCG64([seed, 1000 + s, c, i]), so no image can be one of the detection set's (those
# draw from PCG64([seed, i])) and a process pool changes nothing.
#
#     <root>/train/<class>/<class>_<i:05d>.jpg
#     <root>/val/<class>/<class>_<i:05d>.jpg
#     <root>/sppdet_classification.json     parameters; written last (marks completeness)

CLASSIFICATION_MARKER = "sppdet_classification.json"
CLASSIFICATION_FORMAT = 1   # bump whenever this rendering changes
CLASSIFICATION_CLASSES = SYNTHETIC_CLASSES + _DISTRACTORS + PRETRAIN_EXTRA


def _shape_alpha(family: str, rng: np.random.Generator, size: float, aspect: float, angle: float,
                 center: tuple[float, float]):
    """Alpha mask (and its top-left corner) of any family, object or distractor."""
    if family in ("stroke", "arc", "glyph"):
        return _stroke_mask(family, rng, size, center)
    polys = _distractor_shape(family, rng) if family in _DISTRACTORS else _object_shape(family, rng)
    return _polygon_mask([(_transform(p, size, aspect, angle, center), f) for p, f in polys])


def render_example(rng: np.random.Generator, family: str, image_size: int, obj_range=(0.3, 0.85),
                   clutter: int = 3, jitter: float = 0.15, occluder: float = 0.3) -> np.ndarray:
    """One (image_size, image_size, 3) BGR uint8 image of `family` on clutter: diameter
    log-uniform in obj_range x image_size, aspect log-uniform in [1/1.7, 1.7], any rotation,
    centre within +-jitter x image_size of the middle; up to `clutter` smaller distractors behind
    it, an occluder on its edge with probability `occluder`; blur and noise as the detection
    images. family "background": clutter only, a few distractors and no main shape."""
    n = image_size
    scene = _Scene(_background(rng, n, n).astype(np.float32))
    size = _log_uniform(rng, obj_range[0] * n, obj_range[1] * n)
    for _ in range(int(rng.integers(0, clutter + 1))):
        _place_distractor(scene, rng, size * rng.uniform(0.2, 0.6), (rng.uniform(0, n), rng.uniform(0, n)))
    if family == "background":
        for _ in range(int(rng.integers(1, 4))):
            _place_distractor(scene, rng, size * rng.uniform(0.3, 1.0), (rng.uniform(0, n), rng.uniform(0, n)))
    else:
        cx, cy = n / 2 + rng.uniform(-jitter, jitter, 2) * n
        alpha, x0, y0 = _shape_alpha(family, rng, size, _log_uniform(rng, 1 / 1.7, 1.7),
                                     rng.uniform(0, 2 * np.pi), (cx, cy))
        scene.paint(rng, alpha, x0, y0, owner=0)
        if rng.random() < occluder:
            t, r = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.6) * size
            _place_distractor(scene, rng, size * rng.uniform(0.3, 0.6), (cx + r * math.cos(t), cy + r * math.sin(t)))
    img = scene.canvas
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 0.9))
    img = img + rng.normal(0, rng.uniform(2, 7), img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _render_classification_chunk(task: tuple) -> int:
    root, split, split_id, c, family, start, stop, p = task
    folder = Path(root) / split / family
    for i in range(start, stop):
        rng = np.random.Generator(np.random.PCG64([p["seed"], 1000 + split_id, c, i]))
        image = render_example(rng, family, p["image_size"], tuple(p["object_range"]), p["clutter"],
                               occluder=p["occluder"])
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise SppdetError(f"{folder}/{family}_{i:05d}.jpg: JPEG encoding failed")
        (folder / f"{family}_{i:05d}.jpg").write_bytes(buf.tobytes())
    return stop - start


def classification_params(seed: int = 0, train_per_class: int = 400, val_per_class: int = 50,
                          image_size: int = 112, classes=CLASSIFICATION_CLASSES,
                          object_range=(0.35, 0.9), clutter: int = 1, occluder: float = 0.15) -> dict:
    for key, v in (("train_per_class", train_per_class), ("val_per_class", val_per_class)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise SppdetError(f"classification set {key}: expected an integer >= 1, got {v!r}")
    unknown = [c for c in classes if c not in CLASSIFICATION_CLASSES + HELDOUT_FAMILIES + ("background",)]
    if unknown:
        raise SppdetError(f"classification set: unknown families {unknown}")
    return {"format_version": CLASSIFICATION_FORMAT, "seed": int(seed), "classes": list(classes),
            "train_per_class": int(train_per_class), "val_per_class": int(val_per_class),
            "image_size": int(image_size), "object_range": [float(v) for v in object_range],
            "clutter": int(clutter), "occluder": float(occluder)}


def ensure_classification_set(root: str | os.PathLike, workers: int = 2, progress: bool = True,
                              **params) -> Path:
    """Return `root` holding a complete classification set made with these parameters
    (`classification_params`), generating it first (into a temporary sibling, renamed at the
    end: an interrupted run never leaves one that looks complete). `root` is replaced only when
    it is empty or holds a generated set; anything else is a SppdetError, never overwritten."""
    root = Path(root)
    want = classification_params(**params)
    marker = root / CLASSIFICATION_MARKER
    try:
        if json.loads(marker.read_text()) == want:
            return root
    except (OSError, ValueError):
        pass
    if root.exists() and not marker.exists() and (not root.is_dir() or any(root.iterdir())):
        raise SppdetError(f"{root}: exists but is not an sppdet classification set (no {CLASSIFICATION_MARKER}); "
                          f"refusing to overwrite it, choose a new or empty folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    n = len(want["classes"]) * (want["train_per_class"] + want["val_per_class"])
    get_logger().info(f"generating the synthetic classification set ({len(want['classes'])} classes, "
                      f"{n} images) in {root}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-{os.getpid()}-", dir=root.parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    old = tmp.with_name(tmp.name + "-old")
    try:
        tasks = []
        for split, split_id, count in (("train", 0, want["train_per_class"]), ("val", 1, want["val_per_class"])):
            for c, family in enumerate(want["classes"]):
                (tmp / split / family).mkdir(parents=True)
                step = max(1, min(100, count // 2))
                tasks += [(str(tmp), split, split_id, c, family, s, min(s + step, count), want)
                          for s in range(0, count, step)]
        bar = tqdm(total=n, desc="synthetic classification set", leave=False, disable=None if progress else True)
        if workers > 1:
            import multiprocessing
            # spawn, not fork: torch's OpenMP pool may be running in this process
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for done in pool.imap_unordered(_render_classification_chunk, tasks):
                    bar.update(done)
        else:
            for task in tasks:
                bar.update(_render_classification_chunk(task))
        bar.close()
        write_json_atomic(tmp / CLASSIFICATION_MARKER, want)  # last: marks the set complete
        if root.exists():
            os.rename(root, old)
        os.rename(tmp, root)
    finally:
        for path in (tmp, old):
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
    return root
