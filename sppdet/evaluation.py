"""Pascal VOC detection evaluation, exactly as the official devkit scores it, plus COCO AP.

VOC rules (VOC2007 devkit ``VOCevaldet.m``; ``voc10`` swaps in the VOC2010+ area rule):

- Per class, detections are sorted by decreasing score; ties keep their order in the input
  (file order), as MATLAB's stable ``sort`` does.
- Each detection takes the ground-truth box of its class in its image with the highest IoU.
  Difficult and already-matched boxes take part in this argmax; on equal IoU the first box in
  XML order wins.
- IoU uses +1 pixel widths and heights and the coordinates exactly as written (no clipping):
  ``iw = min(x2) - max(x1) + 1``, ``ih`` likewise; boxes overlap only if ``iw > 0 and ih > 0``.
- The best IoU must be ``>= 0.5``. If that box is difficult the detection is ignored (neither
  TP nor FP); if it is not yet matched the detection is a TP and marks it; otherwise it is a
  duplicate, a FP. Everything else is a FP.
- ``npos`` counts the non-difficult boxes of the class over every image of the split (images
  without objects are part of the split). Recall = cumsum(tp) / npos; precision =
  cumsum(tp) / (cumsum(tp) + cumsum(fp)), set to 0 where nothing has counted yet (the devkit
  gets NaN there when the top detections are all ignored).
- ``voc07``: 11-point interpolated AP over recall thresholds ``t = 0:0.1:1`` as MATLAB builds
  them (the official devkit runs under MATLAB): its 0.6 and 0.7 are the doubles nearest 0.6 and
  0.7, so a recall of exactly 0.6 or 0.7 (6/10, 7/10, 3/5, 14/20, ...) reaches them.
  ``voc07_py``: the same with ``numpy.arange(0, 1.1, 0.1)`` as py-faster-rcnn's ``voc_eval.py``
  (and GNU Octave) build them, whose 0.6000000000000001 and 0.7000000000000001 such recalls
  miss; use it to compare with papers evaluated in Python. In both, t[3] is
  0.30000000000000004, so a recall of exactly 0.3 misses 0.3. ``voc10``: area under the
  monotone precision envelope.
- A class with no detections has AP 0. A class with no positives (npos == 0) has AP 0 as well
  (the devkit's recall is 0/0 there); the table flags both, and mAP is the plain mean over all
  the classes asked for.

Box convention in memory: float ``[x1, y1, x2, y2]``, 0-based, x2/y2 inclusive; the official
results files are 1-based (+1 on write, -1 on read). Coordinates are kept in float64.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from .utils import SppdetError, write_text_atomic

METRICS = ("voc07", "voc07_py", "voc10")
METRIC_NAMES = {
    "voc07": "VOC07 11-point AP (devkit thresholds, as MATLAB builds 0:0.1:1), IoU >= 0.5",
    "voc07_py": "VOC07 11-point AP (numpy.arange thresholds, as py-faster-rcnn), IoU >= 0.5",
    "voc10": "VOC10 area AP, IoU >= 0.5",
    "coco": "COCO AP@[.5:.95] (pycocotools)",
}
MIN_OVERLAP = 0.5


def matlab_colon(a: float, d: float, b: float) -> np.ndarray:
    """``a:d:b`` as MATLAB builds it, in float64 (the algorithm MathWorks documents for the
    colon operator, general case, d != 0).

    n = round((b - a) / d) intervals (MATLAB's round: halves away from zero), one fewer if
    a + n*d overshoots b by more than tol = 2 * eps * max(|a|, |b|); the right end c = a + n*d,
    snapped to b when within tol. Element k (0-based) is a + k*d in the first half and
    c - (n-k)*d in the second, so the vector is symmetric about its midpoint, which (n even)
    is exactly (a + c) / 2. Unlike repeated
    addition or numpy.arange (a + k*d throughout), the values near b are b minus a small
    multiple of d: for 0:0.1:1 they are 1 - 0.4 = 0.6 and 1 - 0.3 = 0.7 exactly (as doubles).
    """
    a, d, b = float(a), float(d), float(b)
    if not (math.isfinite(a) and math.isfinite(d) and math.isfinite(b)):
        raise ValueError(f"matlab_colon: non-finite argument {a}:{d}:{b}")
    if d == 0 or (a < b and d < 0) or (b < a and d > 0):
        return np.zeros(0)
    tol = 2.0 * np.finfo(np.float64).eps * max(abs(a), abs(b))
    sig = 1.0 if d > 0 else -1.0
    n = math.floor((b - a) / d + 0.5)  # (b - a) / d >= 0 here
    if sig * (a + n * d - b) > tol:
        n -= 1
    c = a + n * d
    if sig * (c - b) > -tol:
        c = b
    out = np.empty(n + 1)
    for k in range(n // 2 + 1):
        out[k] = a + k * d
        out[n - k] = c - k * d
    if n % 2 == 0:
        out[n // 2] = (a + c) / 2
    return out


# The 11 recall thresholds of VOC07 AP. voc07: the official devkit's `for t=0:0.1:1` as MATLAB
# runs it: 0, 0.1, 0.2, 0.30000000000000004, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1 (0.6 and 0.7 the
# doubles nearest them). voc07_py: numpy.arange(0, 1.1, 0.1), as py-faster-rcnn's voc_eval.py,
# which differs exactly there: 0.6000000000000001 and 0.7000000000000001. A recall of exactly
# 0.6 or 0.7 reaches the first and misses the second; a recall of exactly 0.3 misses
# 0.30000000000000004 in both.
VOC07_THRESHOLDS = matlab_colon(0, 0.1, 1)
VOC07_PY_THRESHOLDS = np.arange(0, 1.1, 0.1)
_THRESHOLDS = {"voc07": VOC07_THRESHOLDS, "voc07_py": VOC07_PY_THRESHOLDS}

RESULTS_FILE = "comp4_det_{split}_{cls}.txt"

# pycocotools' COCOeval.summarize() figures, in the order of its `stats`.
COCO_SUMMARY = (
    "AP @[IoU=0.50:0.95 | area=all | maxDets=100]", "AP @[IoU=0.50 | area=all | maxDets=100]",
    "AP @[IoU=0.75 | area=all | maxDets=100]", "AP @[IoU=0.50:0.95 | area=small | maxDets=100]",
    "AP @[IoU=0.50:0.95 | area=medium | maxDets=100]", "AP @[IoU=0.50:0.95 | area=large | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=all | maxDets=1]", "AR @[IoU=0.50:0.95 | area=all | maxDets=10]",
    "AR @[IoU=0.50:0.95 | area=all | maxDets=100]", "AR @[IoU=0.50:0.95 | area=small | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=medium | maxDets=100]", "AR @[IoU=0.50:0.95 | area=large | maxDets=100]",
)


# --------------------------------------------------------------------------------------------
# Detections


@dataclass
class ClassDetections:
    """The detections of one class, in input (file) order.

    image_ids: D image ids (strings, as in the split file); scores: (D,) float64;
    boxes: (D, 4) float64 ``[x1, y1, x2, y2]``, 0-based, inclusive. `source` names where they
    came from (a results file) for error messages.
    """

    image_ids: list[str] = field(default_factory=list)
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    source: str | None = None

    def __post_init__(self) -> None:
        self.image_ids = [str(i) for i in self.image_ids]
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        if not len(self.image_ids) == len(self.scores) == len(self.boxes):
            raise ValueError(f"ClassDetections: {len(self.image_ids)} image ids, {len(self.scores)} "
                             f"scores and {len(self.boxes)} boxes")
        if not (np.isfinite(self.scores).all() and np.isfinite(self.boxes).all()):
            raise SppdetError(f"{self.source or 'detections'}: non-finite score or box coordinate")

    def __len__(self) -> int:
        return len(self.scores)


def as_class_detections(obj) -> ClassDetections:
    """A ClassDetections from itself, None (no detections), or rows in file order, each
    ``(image_id, score, box)`` or ``(image_id, score, x1, y1, x2, y2)`` (0-based inclusive)."""
    if isinstance(obj, ClassDetections):
        return obj
    if obj is None:
        return ClassDetections()
    rows = list(obj)
    boxes = [r[2] if len(r) == 3 else r[2:] for r in rows]
    return ClassDetections([r[0] for r in rows], [r[1] for r in rows], boxes)


def collect_detections(per_image: Iterable[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
                       classes: Sequence[str]) -> dict[str, ClassDetections]:
    """Regroup per-image detector output by class, keeping the order of images and of rows.

    per_image yields ``(image_id, boxes (N, 4) 0-based inclusive, scores (N,), labels (N,) in
    1..K)``; labels index `classes` (0 would be background and is rejected).
    """
    ids, boxes, scores, labels = [], [], [], []
    for image_id, b, s, lab in per_image:
        b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
        s = np.asarray(s, dtype=np.float64).reshape(-1)
        lab = np.asarray(lab).reshape(-1)
        if not len(b) == len(s) == len(lab):
            raise ValueError(f"image {image_id}: {len(b)} boxes, {len(s)} scores, {len(lab)} labels")
        if len(lab) and (lab.min() < 1 or lab.max() > len(classes)):
            raise ValueError(f"image {image_id}: labels must be in 1..{len(classes)}, "
                             f"got {lab.min()}..{lab.max()}")
        ids.append(np.full(len(lab), image_id, dtype=object))
        boxes.append(b)
        scores.append(s)
        labels.append(lab)
    if not ids:
        return {c: ClassDetections() for c in classes}
    ids, boxes, scores, labels = (np.concatenate(x) for x in (ids, boxes, scores, labels))
    out = {}
    for k, c in enumerate(classes):
        m = labels == k + 1  # a mask keeps image order and row order
        out[c] = ClassDetections(ids[m].tolist(), scores[m], boxes[m])
    return out


class VOCEvaluator:
    """Accumulates per-image detections, then scores them: ``process`` per image, ``evaluate``.

    records: the ImageRecords of the split (VOCDataset(..., strict=False).records);
    metric: voc07, voc07_py, voc10 or coco.
    """

    def __init__(self, records: Sequence, classes: Sequence[str], metric: str = "voc07"):
        _check_metric(metric, allow_coco=True)
        self.records, self.classes, self.metric = list(records), tuple(classes), metric
        self.reset()

    def reset(self) -> None:
        self._per_image: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []

    def process(self, image_id: str, boxes, scores, labels) -> None:
        """boxes (N, 4) 0-based inclusive, scores (N,), labels (N,) in 1..K."""
        self._per_image.append((image_id, np.asarray(boxes), np.asarray(scores), np.asarray(labels)))

    @property
    def detections(self) -> dict[str, ClassDetections]:
        return collect_detections(self._per_image, self.classes)

    def evaluate(self) -> dict:
        if self.metric == "coco":
            return coco_evaluate(self.records, self.detections, self.classes)
        return evaluate_detections(self.records, self.detections, self.classes, self.metric)


# --------------------------------------------------------------------------------------------
# Average precision


def voc_ap(rec, prec, metric: str = "voc07") -> float:
    """AP from recall and precision arrays (D,), in score order.

    voc07: mean over t in VOC07_THRESHOLDS (MATLAB's 0:0.1:1) of max(prec[rec >= t]) (0 if
    none), accumulated as the devkit does (ap += p / 11); voc07_py: the same over
    VOC07_PY_THRESHOLDS (numpy.arange). voc10: area under the precision envelope, with
    mrec = [0, rec, 1], mpre = [0, prec, 0] and the envelope taken from the right.
    `prec` must not hold NaN (evaluate_class writes 0 where nothing has counted yet).
    """
    rec = np.asarray(rec, dtype=np.float64).reshape(-1)
    prec = np.asarray(prec, dtype=np.float64).reshape(-1)
    if metric in _THRESHOLDS:
        ap = 0.0
        for t in _THRESHOLDS[metric]:
            above = rec >= t
            p = float(prec[above].max()) if above.any() else 0.0
            ap = ap + p / 11
        return ap
    if metric == "voc10":
        mrec = np.concatenate(([0.0], rec, [1.0]))
        mpre = np.concatenate(([0.0], prec, [0.0]))
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        i = np.flatnonzero(mrec[1:] != mrec[:-1])
        return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


@dataclass
class ClassResult:
    """One class's evaluation. Arrays are in score order (D,): tp/fp are 0/1 flags per
    detection (both 0 for an ignored one), recall/precision the running curves."""

    ap: float
    npos: int
    num_detections: int
    tp: np.ndarray
    fp: np.ndarray
    recall: np.ndarray
    precision: np.ndarray
    order: np.ndarray  # indices into the input detections, in score order


class _ClassGT:
    """Ground truth of one class over the images of the split, grouped by image (CSR)."""

    def __init__(self, image_ids: Sequence[str], boxes: np.ndarray, difficult: np.ndarray,
                 image_index: np.ndarray):
        # boxes (M, 4) float64 0-based, difficult (M,), image_index (M,) sorted by image, XML order
        self.image_ids = list(image_ids)
        self.index = {i: n for n, i in enumerate(self.image_ids)}
        if len(self.index) != len(self.image_ids):
            raise SppdetError("ground truth: duplicate image ids in the split")
        self.boxes, self.difficult = boxes, difficult
        counts = np.bincount(image_index, minlength=len(self.image_ids))
        self.offsets = np.concatenate(([0], np.cumsum(counts)))
        self.npos = int((~difficult).sum())


def _gt_from_mapping(gt_by_image: Mapping[str, tuple]) -> _ClassGT:
    ids = list(gt_by_image)
    boxes, difficult, image_index = [], [], []
    for n, image_id in enumerate(ids):
        b, d = gt_by_image[image_id]
        b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
        d = np.asarray(d, dtype=bool).reshape(-1)
        if len(b) != len(d):
            raise ValueError(f"image {image_id}: {len(b)} boxes but {len(d)} difficult flags")
        boxes.append(b)
        difficult.append(d)
        image_index.append(np.full(len(b), n, dtype=np.int64))
    return _ClassGT(ids, np.concatenate(boxes) if ids else np.zeros((0, 4)),
                    np.concatenate(difficult) if ids else np.zeros(0, bool),
                    np.concatenate(image_index) if ids else np.zeros(0, np.int64))


def _best_overlaps(det_boxes: np.ndarray, det_image: np.ndarray, gt: _ClassGT):
    """Per detection, the highest IoU with the boxes of its image and that box (global index).

    Without an overlapping box ovmax is -inf (the devkit's start value) and jmax -1.
    """
    d = len(det_boxes)
    ovmax = np.full(d, -np.inf)
    jmax = np.full(d, -1, dtype=np.int64)
    counts = gt.offsets[det_image + 1] - gt.offsets[det_image]
    has = np.flatnonzero(counts > 0)
    if len(has) == 0:
        return ovmax, jmax
    counts = counts[has]
    # one row per (detection, box of its image) pair, boxes in XML order within a detection
    pair_det = np.repeat(has, counts)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    within = np.arange(len(pair_det)) - np.repeat(starts, counts)
    pair_gt = gt.offsets[det_image[pair_det]] + within
    b, g = det_boxes[pair_det], gt.boxes[pair_gt]
    # the devkit's arithmetic, operation for operation
    iw = np.minimum(b[:, 2], g[:, 2]) - np.maximum(b[:, 0], g[:, 0]) + 1
    ih = np.minimum(b[:, 3], g[:, 3]) - np.maximum(b[:, 1], g[:, 1]) + 1
    ok = (iw > 0) & (ih > 0)
    inter = iw * ih
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    area_g = (g[:, 2] - g[:, 0] + 1) * (g[:, 3] - g[:, 1] + 1)
    ua = area_b + area_g - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        ov = np.where(ok, inter / np.where(ok, ua, 1.0), -np.inf)
    seg_max = np.maximum.reduceat(ov, starts)
    # first pair reaching the maximum = the devkit's strict `ov > ovmax` scan in XML order
    at_max = np.flatnonzero(ov == np.repeat(seg_max, counts))
    seg_of = np.repeat(np.arange(len(has)), counts)[at_max]
    first = at_max[np.unique(seg_of, return_index=True)[1]]
    found = seg_max > -np.inf
    ovmax[has[found]] = seg_max[found]
    jmax[has[found]] = pair_gt[first][found]
    return ovmax, jmax


def _image_index(gt: _ClassGT, dets: ClassDetections) -> np.ndarray:
    index = gt.index
    idx = np.fromiter((index.get(i, -1) for i in dets.image_ids), dtype=np.int64, count=len(dets))
    if (idx < 0).any():
        bad = dets.image_ids[int(np.flatnonzero(idx < 0)[0])]
        raise SppdetError(f"{dets.source or 'detections'}: image id {bad!r} is not in the split "
                          f"being evaluated")
    return idx


def _evaluate(gt: _ClassGT, dets: ClassDetections, metric: str) -> ClassResult:
    det_image = _image_index(gt, dets)
    order = np.argsort(-dets.scores, kind="stable")
    ovmax, jmax = _best_overlaps(dets.boxes[order], det_image[order], gt)
    hit = ovmax >= MIN_OVERLAP
    difficult = np.zeros(len(order), dtype=bool)
    difficult[hit] = gt.difficult[jmax[hit]]
    candidate = np.flatnonzero(hit & ~difficult)
    # the first detection (in score order) reaching a box takes it; later ones are duplicates
    first = candidate[np.unique(jmax[candidate], return_index=True)[1]]
    tp = np.zeros(len(order))
    tp[first] = 1
    fp = (~hit).astype(np.float64)
    fp[candidate] = 1
    fp[first] = 0
    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    counted = ctp + cfp
    with np.errstate(divide="ignore", invalid="ignore"):
        prec = np.where(counted > 0, ctp / np.where(counted > 0, counted, 1), 0.0)
        rec = ctp / gt.npos if gt.npos > 0 else np.full(len(order), np.nan)
    ap = voc_ap(rec, prec, metric) if gt.npos > 0 and len(order) else 0.0
    return ClassResult(ap=ap, npos=gt.npos, num_detections=len(order), tp=tp, fp=fp,
                       recall=rec, precision=prec, order=order)


def evaluate_class(gt_by_image: Mapping[str, tuple], detections, metric: str = "voc07") -> ClassResult:
    """Score one class.

    gt_by_image: every image of the split -> (boxes (G, 4) 0-based inclusive, difficult (G,)),
    this class's objects in XML order (G may be 0). detections: a ClassDetections or rows
    (see as_class_detections), in file order.
    AP is 0 with no detections or no positives (then recall is NaN).
    """
    _check_metric(metric, allow_coco=False)
    return _evaluate(_gt_from_mapping(gt_by_image), as_class_detections(detections), metric)


def _gt_per_class(records: Sequence, num_classes: int) -> list[_ClassGT]:
    """Split ImageRecords (labels 1..K) into one _ClassGT per class in one pass."""
    ids = [r.image_id for r in records]
    boxes = np.concatenate([np.asarray(r.boxes, np.float64).reshape(-1, 4) for r in records]) \
        if records else np.zeros((0, 4))
    labels = np.concatenate([np.asarray(r.labels).reshape(-1) for r in records]) \
        if records else np.zeros(0, np.int64)
    difficult = np.concatenate([np.asarray(r.difficult, bool).reshape(-1) for r in records]) \
        if records else np.zeros(0, bool)
    image = np.repeat(np.arange(len(records)), [len(r.labels) for r in records])
    out = []
    for k in range(1, num_classes + 1):
        m = labels == k  # boolean masks keep record order and XML order
        out.append(_ClassGT(ids, boxes[m], difficult[m], image[m]))
    return out


def evaluate_detections(records: Sequence, detections: Mapping[str, ClassDetections | list],
                        classes: Sequence[str], metric: str = "voc07") -> dict:
    """Score every class of `classes` on the images of `records` (ImageRecords, labels 1..K).

    detections: class -> ClassDetections or rows (see as_class_detections); a missing class
    means no detections.
    Returns ``{"metric", "ap": {class: fraction}, "map": fraction, "npos": {class: int},
    "num_detections": {class: int}}``; mAP is the mean over all `classes`.
    """
    _check_metric(metric, allow_coco=False)
    unknown = sorted(set(detections) - set(classes))
    if unknown:
        raise SppdetError(f"detections for unknown class(es) {', '.join(unknown)} "
                          f"(classes: {', '.join(classes)})")
    ap, npos, ndet = {}, {}, {}
    for cls, gt in zip(classes, _gt_per_class(records, len(classes))):
        res = _evaluate(gt, as_class_detections(detections.get(cls)), metric)
        ap[cls], npos[cls], ndet[cls] = res.ap, res.npos, res.num_detections
    return {"metric": metric, "ap": ap, "map": float(np.mean(list(ap.values()))) if ap else 0.0,
            "npos": npos, "num_detections": ndet}


def _check_metric(metric: str, allow_coco: bool) -> None:
    allowed = METRICS + (("coco",) if allow_coco else ())
    if metric not in allowed:
        raise SppdetError(f"metric must be one of {', '.join(allowed)}, got {metric!r}")


# --------------------------------------------------------------------------------------------
# Official results files


def results_path(results_dir: str | os.PathLike, split: str, cls: str) -> Path:
    return Path(results_dir) / RESULTS_FILE.format(split=split, cls=cls)


def _fmt(x: float) -> str:
    # repr() is the shortest text that reads back as the same float64, so scoring the files
    # gives exactly the numbers scored in memory (float32 inputs show their full binary value)
    return repr(float(x))


def write_results_files(out_dir: str | os.PathLike, split: str, classes: Sequence[str],
                        detections: Mapping[str, ClassDetections]) -> list[Path]:
    """Write ``comp4_det_<split>_<class>.txt`` per class (an empty file for a class without
    detections), lines ``image_id score x1 y1 x2 y2`` with 1-based coordinates, in the order
    given. Numbers are written with full float64 precision (see _fmt). Each file is atomic."""
    paths = []
    for cls in classes:
        dets = as_class_detections(detections.get(cls))
        b = dets.boxes + 1.0  # 0-based -> the files' 1-based pixel indices
        lines = [f"{i} {_fmt(s)} {_fmt(x1)} {_fmt(y1)} {_fmt(x2)} {_fmt(y2)}\n"
                 for i, s, (x1, y1, x2, y2) in zip(dets.image_ids, dets.scores.tolist(), b.tolist())]
        path = results_path(out_dir, split, cls)
        write_text_atomic(path, "".join(lines))
        paths.append(path)
    return paths


def read_results_file(path: str | os.PathLike, image_ids: Iterable[str] | None = None) -> ClassDetections:
    """Read one results file (1-based ``image_id score x1 y1 x2 y2`` lines, blank lines
    skipped) into 0-based detections in file order. A malformed line, or with `image_ids` a
    detection on another image, is a SppdetError naming file:line."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SppdetError(f"{path}: cannot read results file ({e})") from None
    rows = [(n, parts) for n, line in enumerate(text.splitlines(), 1) if (parts := line.split())]
    for n, parts in rows:
        if len(parts) != 6:
            raise SppdetError(f"{path}:{n}: expected 'image_id score x1 y1 x2 y2', got {' '.join(parts)!r}")
    try:
        values = np.array([parts[1:] for _, parts in rows], dtype=np.float64).reshape(-1, 5)
    except ValueError:  # find the line for the message
        for n, parts in rows:
            try:
                [float(p) for p in parts[1:]]
            except ValueError:
                raise SppdetError(f"{path}:{n}: non-numeric score or coordinate in "
                                  f"{' '.join(parts)!r}") from None
        raise
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        n, parts = rows[int(np.flatnonzero(bad)[0])]
        raise SppdetError(f"{path}:{n}: non-finite score or coordinate in {' '.join(parts)!r}")
    ids = [parts[0] for _, parts in rows]
    if image_ids is not None:
        known = image_ids if isinstance(image_ids, (set, frozenset, dict)) else set(image_ids)
        for (n, _), i in zip(rows, ids):
            if i not in known:
                raise SppdetError(f"{path}:{n}: image id {i!r} is not in the split being evaluated")
    return ClassDetections(ids, values[:, 0], values[:, 1:] - 1.0, source=str(path))


def read_results_files(results_dir: str | os.PathLike, split: str, classes: Sequence[str],
                       image_ids: Sequence[str] | None = None) -> dict[str, ClassDetections]:
    """Read ``comp4_det_<split>_<class>.txt`` for each class. A missing file means no
    detections for that class (see missing_results_files); if none exists at all it is an
    error (probably the wrong folder or split). With `image_ids` (the split's ids), a
    detection on another image is a SppdetError naming file:line."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise SppdetError(f"{results_dir}: results folder not found")
    if len(missing_results_files(results_dir, split, classes)) == len(classes):
        found = sorted({m.group(1) for p in results_dir.glob("comp4_det_*.txt")
                        for m in [re.match(r"comp4_det_(.+?)_[^_]+\.txt$", p.name)] if m})
        hint = f" (splits found: {', '.join(found)})" if found else ""
        pattern = RESULTS_FILE.format(split=split, cls="<class>")
        raise SppdetError(f"{results_dir}: no results files {pattern} for the {len(classes)} classes{hint}")
    known = set(image_ids) if image_ids is not None else None
    out = {}
    for cls in classes:
        path = results_path(results_dir, split, cls)
        out[cls] = read_results_file(path, known) if path.is_file() else ClassDetections(source=str(path))
    return out


def missing_results_files(results_dir: str | os.PathLike, split: str, classes: Sequence[str]) -> list[str]:
    """The classes whose results file does not exist."""
    return [c for c in classes if not results_path(results_dir, split, c).is_file()]


# --------------------------------------------------------------------------------------------
# Table


def format_ap_table(result: Mapping, context: str | None = None) -> str:
    """Per-class AP in percent (1 decimal) with the metric named, an mAP row, and flags for
    classes without positives or without detections. `result` is evaluate_detections' (or
    coco_evaluate's) dict; npos / num_detections are used when present. `context` (e.g.
    "VOC2007 test, 4952 images") goes into the header line."""
    metric = result["metric"]
    npos = result.get("npos", {})
    ndet = result.get("num_detections", {})
    classes = list(result["ap"])
    width = max([len(c) for c in classes] + [5])
    where = f"{context}: " if context else ""
    lines = [f"{where}average precision per class, {METRIC_NAMES.get(metric, metric)}"]
    head = f"{'class':<{width}}  {'AP %':>6}"
    if npos:
        head += f"  {'positives':>9}  {'detections':>10}"
    lines.append(head)
    lines.append("-" * len(head))
    no_pos, no_det = [], []
    for c in classes:
        row = f"{c:<{width}}  {100 * result['ap'][c]:6.1f}"
        notes = []
        if c in npos:
            row += f"  {npos[c]:9d}  {ndet.get(c, 0):10d}"
            if npos[c] == 0:
                notes.append("no positives")
                no_pos.append(c)
            if ndet.get(c, 0) == 0:
                notes.append("no detections")
                no_det.append(c)
        if notes:
            row += "  (" + ", ".join(notes) + ")"
        lines.append(row)
    lines.append("-" * len(head))
    if metric == "coco" and npos:  # pycocotools averages over the classes it can score
        over = f"mean over the {sum(1 for c in classes if npos.get(c, 0) > 0)} classes with positives"
    else:
        over = f"mean over {len(classes)} classes"
    lines.append(f"{'mAP':<{width}}  {100 * result['map']:6.1f}   ({metric}, {over})")
    if "summary" in result:  # pycocotools' own summary, in its order and words
        lines.append("pycocotools summary (-1: nothing to score):")
        lines += [f"  {name:<42s} {100 * v:6.1f}" if v >= 0 else f"  {name:<42s}   -1" for name, v in
                  result["summary"].items()]
    elif "ap50" in result:
        lines.append(f"{'AP50':<{width}}  {100 * result['ap50']:6.1f}")
    if no_pos:
        zero = "excluded from the COCO mAP" if metric == "coco" else "scored as AP 0 and included in the mAP"
        lines.append(f"note: no positives (no non-difficult objects) for {', '.join(no_pos)}: {zero}")
    if no_det:
        lines.append(f"note: no detections for {', '.join(no_det)} (AP 0)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# COCO


def to_coco_ground_truth(records, classes: Sequence[str] | None = None) -> dict:
    """COCO-format ground truth for ImageRecords (labels 1..K index `classes`), or for a
    VOCDataset (its records and classes).

    Image ids are ints: the 1-based position in the split (id 0 is avoided because
    pycocotools treats a matched id of 0 as "unmatched"); each image also carries its VOC id as
    "voc_id" and "<id>.jpg" as file_name. Category ids are 1..K. bbox = [x1, y1, w, h] with
    w = x2 - x1 + 1 (the continuous box [x1, x2 + 1] has the VOC +1 area). VOC difficult
    objects become iscrowd=1 (also "ignore": 1, "difficult": 1), the only flag stock pycocotools
    honours for ignoring a box: they are not positives and detections on them are ignored, with
    COCO's crowd overlap (intersection over the detection's area).
    """
    if classes is None:
        records, classes = records.records, records.classes
    images, annotations = [], []
    for n, r in enumerate(records):
        images.append({"id": n + 1, "file_name": f"{r.image_id}.jpg", "width": int(r.width),
                       "height": int(r.height), "voc_id": r.image_id})
        boxes = np.asarray(r.boxes, np.float64).reshape(-1, 4)
        labels, difficult = np.asarray(r.labels).tolist(), np.asarray(r.difficult).tolist()
        for b, label, diff in zip(boxes.tolist(), labels, difficult):
            w, h = b[2] - b[0] + 1, b[3] - b[1] + 1
            annotations.append({"id": len(annotations) + 1, "image_id": n + 1, "category_id": int(label),
                                "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": int(diff),
                                "ignore": int(diff), "difficult": int(diff)})
    categories = [{"id": k + 1, "name": c, "supercategory": "voc"} for k, c in enumerate(classes)]
    return {"info": {"description": "Pascal VOC ground truth converted by sppdet"},
            "images": images, "annotations": annotations, "categories": categories}


def to_coco_results(detections: Mapping[str, ClassDetections], classes: Sequence[str],
                    image_ids: Sequence[str]) -> list[dict]:
    """COCO results list: ``{"image_id": int, "category_id": int, "bbox": [x, y, w, h],
    "score": float}`` with the same id mapping and box convention as to_coco_ground_truth
    (`image_ids` is the split's id list, in order)."""
    index = {i: n + 1 for n, i in enumerate(image_ids)}
    out = []
    for k, cls in enumerate(classes):
        dets = as_class_detections(detections.get(cls))
        for i, s, b in zip(dets.image_ids, dets.scores.tolist(), dets.boxes.tolist()):
            if i not in index:
                raise SppdetError(f"{dets.source or 'detections'}: image id {i!r} is not in the split")
            out.append({"image_id": index[i], "category_id": k + 1,
                        "bbox": [b[0], b[1], b[2] - b[0] + 1, b[3] - b[1] + 1], "score": s})
    return out


def coco_ap(coco_gt: dict, coco_results: list[dict]) -> dict:
    """COCO box AP with pycocotools (100 detections per image and class, all areas).

    Returns ``{"ap": {category name: AP@[.5:.95]}, "map": AP@[.5:.95], "ap50": AP50,
    "ap75": AP75, "summary": {name: value}}`` where summary holds pycocotools' twelve
    summary figures (COCO_SUMMARY; -1 where nothing could be scored, as pycocotools prints
    it). A category without positives has AP 0 here, and pycocotools leaves it
    out of "map". No detections at all gives 0 everywhere.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    names = {c["id"]: c["name"] for c in coco_gt["categories"]}
    if not coco_results:
        return {"ap": {n: 0.0 for n in names.values()}, "map": 0.0, "ap50": 0.0, "ap75": 0.0,
                "summary": {k: 0.0 for k in COCO_SUMMARY}}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = copy.deepcopy(coco_gt)  # pycocotools writes flags into annotations
        gt.createIndex()
        dt = gt.loadRes([dict(r) for r in coco_results])  # loadRes edits its input
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # precision: [iou thresholds, recall points, categories, areas, max dets]; -1 = no positives
    precision = ev.eval["precision"][:, :, :, 0, -1]
    ap = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k]
        ap[names[cat_id]] = float(p[p > -1].mean()) if (p > -1).any() else 0.0
    ap_all, ap50, ap75 = (max(float(v), 0.0) for v in ev.stats[:3])  # -1 = nothing to score
    return {"ap": ap, "map": ap_all, "ap50": ap50, "ap75": ap75,
            "summary": dict(zip(COCO_SUMMARY, (float(v) for v in ev.stats)))}


def coco_evaluate(records: Sequence, detections: Mapping[str, ClassDetections],
                  classes: Sequence[str]) -> dict:
    """evaluate_detections' dict for the COCO metric ("map" = AP@[.5:.95], plus "ap50")."""
    gt = to_coco_ground_truth(records, classes)
    res = coco_ap(gt, to_coco_results(detections, classes, [r.image_id for r in records]))
    npos = {c: g.npos for c, g in zip(classes, _gt_per_class(records, len(classes)))}
    ndet = {c: len(as_class_detections(detections.get(c))) for c in classes}
    return {"metric": "coco", "ap": res["ap"], "map": res["map"], "ap50": res["ap50"], "summary": res["summary"],
            "npos": npos, "num_detections": ndet}
