"""Selective search proposals (Uijlings et al., IJCV 2013) on OpenCV contrib, ranked, filtered
and cached per image.

Modes (PAPER.md 1.6 and 3.5):

- ``fast`` (default): the paper's configuration, as in the original ``selective_search_boxes.m``:
  colour spaces HSV and Lab x k in {50, 100} (minSize = k, sigma = 0.8) x similarities
  C+T+S+F and T+S+F = 8 hierarchies.
- ``quality``: Uijlings' 'quality': HSV, Lab, rgI, H, I x k in {50, 100, 150, 300} x
  C+T+S+F, T+S+F, F, S = 80 hierarchies (about 3-4x the time of ``fast``: the
  segmentation and histograms are shared by the strategies).
- ``opencv_fast`` / ``opencv_quality``: OpenCV's stock ``switchToSelectiveSearchFast/Quality``
  (other colour spaces and k = 150, 300, 450 / 150..750), boxes kept in OpenCV's own order.

Grouping and ranking. The original gives the merged boxes of each hierarchy a position i
(1 = the last merge, the whole image; the initial regions, listed once per segmentation, come
after all merges), draws ``priority = i * U(0, 1)``, sorts all hierarchies' boxes by priority,
ascending, then drops small boxes and duplicates keeping the best-ranked. OpenCV's ``process()``
cannot give that order: it pools its hierarchies and sorts them by ``rand() * level`` (level =
height in the merge tree, small regions first: "inverted from the paper", says its source), with
the C library's unseeded rand(). So for our modes we run the greedy merging loop here
(`group_regions`), on OpenCV's graph segmentation and with OpenCV's similarity strategies (their
get/merge do the histogram work), which gives each hierarchy's exact merge order; the random
factor comes from a seeded generator, so the output is a deterministic function of the image
and the parameters. The stock modes keep OpenCV's order (with rand() seeded, see
`_seed_libc_rand`).

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
from typing import Iterable, Sequence

import cv2
import numpy as np

from .utils import SppdetError, atomic_path, file_digest, get_logger, stable_hash, write_json_atomic
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
    codes = []  # pair (i, j), i < j, coded as i * n + j
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :]),
                 (labels[:-1, :-1], labels[1:, 1:]), (labels[:-1, 1:], labels[1:, :-1])):
        touch = a != b
        lo, hi = np.minimum(a[touch], b[touch]), np.maximum(a[touch], b[touch])
        codes.append(lo.astype(np.int64) * n + hi)
    codes = np.unique(np.concatenate(codes))
    pairs = np.stack([codes // n, codes % n], axis=1)
    return sizes, boxes, pairs


def group_regions(strategy, image: np.ndarray, labels: np.ndarray, sizes: np.ndarray,
                  boxes: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Greedy hierarchical grouping [SS]: merge the most similar neighbouring pair until one
    region is left. `strategy` is an OpenCV SelectiveSearchSegmentationStrategy (its get/merge
    give the similarity and update the merged region's features).

    Returns the merged regions' boxes (n - 1, 4) in merge order (the last is the whole image).
    """
    n = len(sizes)
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
    heap = [(-strategy.get(a, b), a, b) for a, b in pairs.tolist()]
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
            heapq.heappush(heap, (-strategy.get(working_id[new], working_id[r]), new, r))
    return np.asarray(merged, dtype=np.float64).reshape(-1, 4)


def search_hierarchies(image: np.ndarray, k: int, strategies: Sequence[str],
                       sigma: float = SIGMA) -> list[tuple[np.ndarray, np.ndarray]]:
    """The hierarchies of one colour image (uint8, 1 or 3 channels) and one k, as the original
    lists them: the merged boxes of each strategy with their positions (1 = the last merge, the
    whole image), then the initial regions once, all at position (number of merges + 1).

    Returns a list of (boxes (M, 4) xyxy inclusive float64, positions (M,) float64).
    """
    seg = cv2.ximgproc.segmentation
    labels = seg.createGraphSegmentation(sigma, float(k), int(k)).processImage(image)
    if np.bincount(labels.ravel()).min() == 0:  # keep labels 0..n-1 all present
        labels = np.unique(labels, return_inverse=True)[1].reshape(labels.shape).astype(np.int32)
    sizes, blobs, pairs = initial_regions(labels)
    # One set of parts for all strategies: OpenCV caches the colour and texture histograms
    # under the image id, and each setImage restarts them from the initial regions.
    parts = {
        "color": seg.createSelectiveSearchSegmentationStrategyColor(),
        "texture": seg.createSelectiveSearchSegmentationStrategyTexture(),
        "size": seg.createSelectiveSearchSegmentationStrategySize(),
        "fill": seg.createSelectiveSearchSegmentationStrategyFill(),
    }
    out = []
    for name in strategies:
        multiple = seg.createSelectiveSearchSegmentationStrategyMultiple()
        for part in _STRATEGIES[name]:
            multiple.addStrategy(parts[part], 1.0)  # equal weights: the original sums the terms
        merged = group_regions(multiple, image, labels, sizes, blobs, pairs)
        out.append((merged, np.arange(len(merged), 0, -1, dtype=np.float64)))
    out.append((blobs, np.full(len(blobs), len(sizes), dtype=np.float64)))
    return out


def ranked_search(image: np.ndarray, spaces: Sequence[str], ks: Sequence[int],
                  strategies: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """Selective search over colour spaces x ks x strategies on a BGR uint8 image, pooled and
    ranked as the original (`rank_boxes`). Boxes (N, 4) xyxy inclusive float64, unfiltered."""
    colours = {space: colour_image(image, space) for space in spaces}
    hierarchies = []
    for k in ks:  # the original's loop order: k, then colour space, then strategy
        for space in spaces:
            hierarchies += search_hierarchies(colours[space], k, strategies)
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


def selective_search(image: np.ndarray, mode: str = "fast", max_boxes: int | None = 2000,
                     min_size: int = 20, resize: int | None = None, seed: int = 0) -> np.ndarray:
    """Selective search boxes for one BGR uint8 image (H, W, 3), best-ranked first.

    resize: search on a copy whose short side is `resize` px (None: the original size, as the
    paper); boxes are mapped back to the original pixels and clipped. min_size (original pixels)
    and max_boxes are applied after the mapping, as the original filters after rescaling.
    Returns float32 (N, 4) [x1, y1, x2, y2], 0-based, inclusive, N <= max_boxes.
    """
    _check_params(mode, max_boxes, min_size, resize)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a BGR uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    work = image
    if resize is not None and resize != min(height, width):
        scale = resize / min(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        work = cv2.resize(image, size, interpolation=interp)
    if mode.startswith("opencv_"):
        boxes = _stock_boxes(work, mode, seed)
    else:
        spaces, ks, strategies = _CONFIGS[mode]
        boxes = ranked_search(work, spaces, ks, strategies, np.random.default_rng(seed))
    if work is not image:
        # Map pixel edges: pixels x1..x2 of the search image span [x1, x2 + 1) there.
        sx, sy = width / work.shape[1], height / work.shape[0]
        boxes = np.round(np.stack([boxes[:, 0] * sx, boxes[:, 1] * sy,
                                   (boxes[:, 2] + 1) * sx - 1, (boxes[:, 3] + 1) * sy - 1], axis=1))
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width - 1)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height - 1)
    return filter_proposals(boxes, min_size, max_boxes).astype(np.float32)


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


def _params(mode: str, max_boxes: int | None, min_size: int, resize: int | None, seed: int) -> dict:
    return {"mode": mode, "max_boxes": max_boxes, "min_size": min_size, "resize": resize,
            "seed": seed, "sigma": SIGMA, "code_version": CODE_VERSION, "opencv": cv2.__version__}


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
        if stored != key or boxes.dtype != np.float32 or boxes.ndim != 2 or boxes.shape[1] != 4 \
                or not np.isfinite(boxes).all():
            raise ValueError("contents do not match")
    except Exception as e:  # any unreadable cache file is recomputed, never trusted
        get_logger().warning(f"proposals: ignoring bad cache file {path} ({e})")
        return None
    return boxes, seconds


def _save_cached(path: Path, key: str, boxes: np.ndarray, seconds: float) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, boxes=boxes, seconds=np.float64(seconds), key=np.str_(key))


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one thread per process: the pool provides the parallelism


def _search_task(task: tuple) -> tuple:
    image_id, path, params = task
    start = time.perf_counter()
    try:
        boxes = selective_search(load_image(path), params["mode"], params["max_boxes"],
                                 params["min_size"], params["resize"], params["seed"])
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
                                 progress: bool = True) -> ProposalRun:
    """Selective search over many images, cached per image and computed in a process pool.

    items: ImageRecords (anything with .image_id and .path) or (image_id, image_path) pairs.
    cache_dir: None = no cache. Files live in ``cache_dir/<mode>-<hash>/<id>-<digest>.npz``: the
    hash covers every parameter, CODE_VERSION and the OpenCV version, the digest is the image
    file's content, so a changed parameter or image is recomputed, never read stale; a corrupt
    file is recomputed. Rerunning computes only what is missing. rebuild: ignore existing files.
    workers: processes (0 or 1: in this process).
    A failing image (unreadable, OpenCV error) is logged with its id, gets a (0, 4) array, is
    listed in `failures` and is not cached, so a rerun tries it again.
    """
    _check_params(mode, max_boxes, min_size, resize)
    pairs = _as_pairs(items)
    params = _params(mode, max_boxes, min_size, resize, seed)
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
                      progress: bool = True) -> dict[str, np.ndarray]:
    """image id -> (N, 4) float32 proposals; see `compute_proposals_with_stats` for the rest.
    A failed image maps to an empty (0, 4) array (and is logged)."""
    return compute_proposals_with_stats(items, mode, max_boxes, min_size, resize, cache_dir,
                                        workers, seed, rebuild, progress).boxes


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
