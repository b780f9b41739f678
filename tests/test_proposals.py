"""Selective search proposals: box format, filtering, ranking, grouping against a slow reference,
resize mapping, the per-image cache, recall figures and the script."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import sppdet.proposals as P
from sppdet.boxes import iou
from sppdet.utils import SppdetError
from sppdet.voc import ImageRecord

from conftest import REPO, write_devkit


def scene(width: int = 96, height: int = 72, seed: int = 0) -> np.ndarray:
    """A small BGR picture: a gradient background with noise and a few flat-coloured shapes."""
    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 3), np.uint8)
    img[:] = np.linspace(60, 140, width, dtype=np.uint8)[None, :, None]
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    cv2.rectangle(img, (5, 6), (40, 50), (30, 30, 200), -1)
    cv2.circle(img, (70, 30), 15, (200, 60, 20), -1)
    cv2.rectangle(img, (50, 52), (90, 68), (40, 190, 40), -1)
    return img


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return scene()


@pytest.fixture(scope="module")
def fast_all(image) -> np.ndarray:
    return P.selective_search(image, "fast", max_boxes=None, min_size=0)


# ------------------------------------------------------------------------- boxes of one image

def test_box_format(image, fast_all):
    h, w = image.shape[:2]
    boxes = P.selective_search(image)
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert len(boxes) > 10
    assert (boxes == np.round(boxes)).all()  # integer pixel indices
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= w - 1).all() and (boxes[:, 3] <= h - 1).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    # The whole image is the last merge of every hierarchy: it is always proposed.
    assert [0, 0, w - 1, h - 1] in fast_all.tolist()
    # The rectangles drawn are found exactly (cv2.rectangle's ends are inclusive); the disc
    # loses its one-pixel tips to the segmentation's smoothing.
    assert [5, 6, 40, 50] in fast_all.tolist()
    assert [50, 52, 90, 68] in fast_all.tolist()
    assert iou(np.array([[55, 15, 85, 45]], np.float32), fast_all).max() > 0.85


def test_min_size_max_boxes_and_dedup(image, fast_all):
    assert len(np.unique(fast_all, axis=0)) == len(fast_all)
    small = P.selective_search(image, min_size=20, max_boxes=None)
    wh = small[:, 2:] - small[:, :2] + 1
    assert (wh >= 20).all()
    # Filtering keeps the ranking: the result is fast_all with the small boxes taken out.
    keep = ((fast_all[:, 2:] - fast_all[:, :2] + 1) >= 20).all(axis=1)
    np.testing.assert_array_equal(small, fast_all[keep])
    capped = P.selective_search(image, min_size=20, max_boxes=7)
    np.testing.assert_array_equal(capped, small[:7])


def test_filter_proposals_hand_case():
    boxes = np.array([[0, 0, 9, 9],      # kept
                      [0, 0, 9, 8],      # 9 px tall: dropped at min_size 10
                      [5, 5, 20, 30],    # kept
                      [0, 0, 9, 9],      # duplicate of the first
                      [1, 1, 30, 30]])   # kept, but beyond max_boxes=2
    np.testing.assert_array_equal(P.filter_proposals(boxes, 10, None), boxes[[0, 2, 4]])
    np.testing.assert_array_equal(P.filter_proposals(boxes, 10, 2), boxes[[0, 2]])
    np.testing.assert_array_equal(P.filter_proposals(boxes, 0, None), boxes[[0, 1, 2, 4]])
    assert P.filter_proposals(np.zeros((0, 4)), 20, 5).shape == (0, 4)


def test_rank_boxes_matches_reference():
    rng = np.random.default_rng(3)
    hierarchies = [(rng.integers(0, 50, (n, 4)).astype(float), rng.permutation(n) + 1.0)
                   for n in (5, 8, 1)]
    got = P.rank_boxes(hierarchies, np.random.default_rng(7))
    # Reference: draw one uniform per box in concatenation order, sort by position * draw.
    draws = np.random.default_rng(7).random(14)
    rows = [(pos * draws[i], i, box) for i, (box, pos) in
            enumerate((b, p) for boxes, positions in hierarchies for b, p in zip(boxes, positions))]
    want = np.array([box for _, _, box in sorted(rows, key=lambda r: (r[0], r[1]))])
    np.testing.assert_array_equal(got, want)
    assert P.rank_boxes([], np.random.default_rng(0)).shape == (0, 4)


def test_ranking_is_deterministic_and_seeded(image, fast_all):
    np.testing.assert_array_equal(P.selective_search(image, max_boxes=None, min_size=0), fast_all)
    other = P.selective_search(image, max_boxes=None, min_size=0, seed=1)
    assert not np.array_equal(other, fast_all)  # another order ...
    assert sorted(map(tuple, other)) == sorted(map(tuple, fast_all))  # ... of the same boxes


def test_opencv_stock_modes_are_reproducible(image):
    a = P.selective_search(image, "opencv_fast", min_size=0, max_boxes=None)
    b = P.selective_search(image, "opencv_fast", min_size=0, max_boxes=None)
    assert len(a) > 10
    np.testing.assert_array_equal(a, b)


def test_quality_mode_runs_all_colour_spaces():
    img = scene(48, 40)
    for space in ("hsv", "lab", "rgi", "h", "i"):
        c = P.colour_image(img, space)
        assert c.dtype == np.uint8 and c.shape[:2] == img.shape[:2]
    quality = P.selective_search(img, "quality", max_boxes=None, min_size=0)
    fast = P.selective_search(img, "fast", max_boxes=None, min_size=0)
    assert len(quality) > len(fast)


def test_resize_maps_boxes_back(image):
    # Short side 72 -> 36: the search runs on a half-size copy; each box covering pixels
    # x1..x2 there covers 2*x1 .. 2*x2+1 here.
    half = cv2.resize(image, (48, 36), interpolation=cv2.INTER_AREA)
    small = P.selective_search(half, max_boxes=None, min_size=0)
    want = np.stack([small[:, 0] * 2, small[:, 1] * 2, small[:, 2] * 2 + 1, small[:, 3] * 2 + 1], 1)
    got = P.selective_search(image, max_boxes=None, min_size=0, resize=36)
    np.testing.assert_array_equal(got, want)
    # min_size is in original pixels: the half-size boxes of 10 px become 20 px boxes.
    got20 = P.selective_search(image, max_boxes=None, min_size=20, resize=36)
    assert ((got20[:, 2:] - got20[:, :2] + 1) >= 20).all()
    assert len(got20) == int(((want[:, 2:] - want[:, :2] + 1) >= 20).all(axis=1).sum())


def test_default_search_on_a_genuine_photograph(voc07_mini):
    """The pipeline's default search size on a real VOC photograph (500 x 375: searched upscaled
    to 667 x 500): boxes come back in the photograph's pixels and cover its objects."""
    from sppdet.config import ProposalConfig
    from sppdet.voc import VOCDataset, load_image

    cfg = ProposalConfig()
    record = next(r for r in VOCDataset(voc07_mini, split="test") if r.image_id == "2007_000423")
    img = load_image(record.path)
    height, width = img.shape[:2]
    assert min(height, width) < cfg.resize  # the upscaling path runs
    boxes = P.selective_search(img, cfg.mode, cfg.max_boxes, cfg.min_size, cfg.resize)
    assert 1000 < len(boxes) <= cfg.max_boxes
    assert boxes[:, :2].min() >= 0 and boxes[:, 2].max() <= width - 1 and boxes[:, 3].max() <= height - 1
    assert ((boxes[:, 2:] - boxes[:, :2] + 1) >= cfg.min_size).all()
    assert boxes[:, 2].max() > 0.9 * width and boxes[:, 3].max() > 0.9 * height  # whole image spanned
    gt = np.asarray(record.boxes, np.float32)[~np.asarray(record.difficult, bool)]
    assert len(gt) == 2 and (iou(gt, boxes).max(axis=1) >= 0.7).all()  # measured 0.83 and 0.87


def test_bad_parameters_are_user_errors(image):
    with pytest.raises(SppdetError, match="mode"):
        P.selective_search(image, "slow")
    with pytest.raises(SppdetError, match="max_boxes"):
        P.selective_search(image, max_boxes=0)
    with pytest.raises(SppdetError, match="resize"):
        P.compute_proposals([], resize=-3)


# ------------------------------------------------------------- grouping vs a slow reference

def _reference_regions(labels):
    n = labels.max() + 1
    h, w = labels.shape
    sizes = np.zeros(n, int)
    boxes = np.array([[w, h, -1, -1]] * n)
    pairs = set()
    for y in range(h):
        for x in range(w):
            a = labels[y, x]
            sizes[a] += 1
            boxes[a] = [min(boxes[a, 0], x), min(boxes[a, 1], y), max(boxes[a, 2], x), max(boxes[a, 3], y)]
            for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1), (0, -1), (-1, 0), (-1, -1), (-1, 1)):
                if 0 <= y + dy < h and 0 <= x + dx < w and labels[y + dy, x + dx] != a:
                    pairs.add((min(a, labels[y + dy, x + dx]), max(a, labels[y + dy, x + dx])))
    return sizes, boxes, sorted(pairs)


def test_initial_regions_match_reference():
    rng = np.random.default_rng(0)
    labels = cv2.resize(rng.integers(0, 9, (4, 5)).astype(np.uint8), (23, 17),
                        interpolation=cv2.INTER_NEAREST).astype(np.int32)
    _, labels = np.unique(labels, return_inverse=True)
    labels = labels.reshape(17, 23).astype(np.int32)
    sizes, boxes, pairs = P.initial_regions(labels)
    want_sizes, want_boxes, want_pairs = _reference_regions(labels)
    np.testing.assert_array_equal(sizes, want_sizes)
    np.testing.assert_array_equal(boxes, want_boxes)
    assert [tuple(p) for p in pairs.tolist()] == want_pairs


def test_group_regions_matches_slow_reference():
    # Region i has 2**i pixels (laid out in raster order), so the sizes of any two disjoint
    # unions differ: the size similarity 1 - (|a| + |b|) / |image| never ties and the greedy
    # merge order is unique.
    n, width = 9, 32
    labels = np.repeat(np.arange(n), 2 ** np.arange(n))
    labels = np.concatenate([labels, [n - 1]])  # pad 511 -> 512 pixels, a 16 x 32 image
    labels = labels.reshape(-1, width).astype(np.int32)
    image = np.zeros(labels.shape + (3,), np.uint8)
    sizes, boxes, pairs = P.initial_regions(labels)
    strategy = cv2.ximgproc.segmentation.createSelectiveSearchSegmentationStrategySize()
    got = P.group_regions_reference(strategy, image, labels, sizes, boxes, pairs)
    # The fast grouping (size term computed with numpy) merges in the same order.
    np.testing.assert_array_equal(P.group_regions(sizes, boxes, pairs, ("size",)), got)

    # Slow reference: regions are sets of labels; merge the adjacent pair of smallest total size.
    ref_sizes, _, ref_pairs = _reference_regions(labels)
    regions = [{i} for i in range(n)]
    want = []
    while len(regions) > 1:
        best = None
        for i in range(len(regions)):
            for j in range(i + 1, len(regions)):
                if any((min(a, b), max(a, b)) in ref_pairs for a in regions[i] for b in regions[j]):
                    total = sum(ref_sizes[a] for a in regions[i] | regions[j])
                    if best is None or total < best[0]:
                        best = (total, i, j)
        _, i, j = best
        union = regions[i] | regions[j]
        regions = [r for k, r in enumerate(regions) if k not in (i, j)] + [union]
        ys, xs = np.nonzero(np.isin(labels, list(union)))
        want.append([xs.min(), ys.min(), xs.max(), ys.max()])
    np.testing.assert_array_equal(got, np.array(want, float))
    assert got[-1].tolist() == [0, 0, width - 1, labels.shape[0] - 1]


# --------------------------------------------------------------------------- cache and pool

def _write_images(folder: Path, n: int) -> list[tuple[str, Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        path = folder / f"im{i}.png"
        cv2.imwrite(str(path), scene(48, 40, seed=i))
        items.append((f"im{i}", path))
    return items


@pytest.fixture
def counted(monkeypatch):
    """Counts the searches actually run (compute_proposals in-process calls selective_search)."""
    calls = []
    real = P.selective_search

    def wrapper(image, *args, **kwargs):
        calls.append(image.shape)
        return real(image, *args, **kwargs)

    monkeypatch.setattr(P, "selective_search", wrapper)
    return calls


def test_cache_is_read_back_and_keyed_on_parameters(tmp_path, counted, monkeypatch):
    items = _write_images(tmp_path / "img", 2)
    cache = tmp_path / "cache"
    first = P.compute_proposals_with_stats(items, max_boxes=50, cache_dir=cache, workers=0, progress=False)
    assert len(counted) == 2 and not first.failures and first.cached == 0
    assert all(b.dtype == np.float32 and 0 < len(b) <= 50 for b in first.boxes.values())

    def broken(*args, **kwargs):
        raise AssertionError("searched again instead of reading the cache")

    monkeypatch.setattr(P, "selective_search", broken)
    second = P.compute_proposals_with_stats(items, max_boxes=50, cache_dir=cache, workers=0, progress=False)
    assert second.cached == 2 and not second.failures
    for image_id in first.boxes:
        np.testing.assert_array_equal(second.boxes[image_id], first.boxes[image_id])
        assert second.seconds[image_id] == first.seconds[image_id]  # the time measured then
    # A changed parameter is another key: it searches (and here fails: nothing is cached).
    third = P.compute_proposals_with_stats(items, max_boxes=49, cache_dir=cache, workers=0, progress=False)
    assert set(third.failures) == {"im0", "im1"}
    assert all(len(b) == 0 for b in third.boxes.values())


def test_changed_image_and_corrupt_cache_are_recomputed(tmp_path, counted):
    items = _write_images(tmp_path / "img", 2)
    cache = tmp_path / "cache"
    P.compute_proposals(items, cache_dir=cache, workers=0, progress=False)
    assert len(counted) == 2
    # New bytes under the same name: recomputed, not read stale.
    cv2.imwrite(str(items[0][1]), scene(60, 40, seed=5))
    run = P.compute_proposals_with_stats(items, cache_dir=cache, workers=0, progress=False)
    assert len(counted) == 3 and run.cached == 1
    assert run.boxes["im0"][:, 2].max() > 47  # boxes of the wider image
    # A truncated cache file is ignored and rewritten.
    files = sorted(run.cache_dir.glob("im1-*.npz"))
    assert len(files) == 1
    files[0].write_bytes(files[0].read_bytes()[:40])
    again = P.compute_proposals_with_stats(items, cache_dir=cache, workers=0, progress=False)
    assert len(counted) == 4 and again.cached == 1 and not again.failures
    np.testing.assert_array_equal(again.boxes["im1"], run.boxes["im1"])
    assert P.compute_proposals_with_stats(items, cache_dir=cache, workers=0, progress=False).cached == 2


def test_failing_images_do_not_stop_the_run(tmp_path):
    items = _write_images(tmp_path / "img", 2)
    bad = tmp_path / "img" / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    items += [("bad", bad), ("missing", tmp_path / "img" / "missing.jpg")]
    cache = tmp_path / "cache"
    run = P.compute_proposals_with_stats(items, cache_dir=cache, workers=2, progress=False)
    assert list(run.boxes) == ["im0", "im1", "bad", "missing"]  # input order
    assert set(run.failures) == {"bad", "missing"}
    assert "not a readable image" in run.failures["bad"]
    assert run.boxes["bad"].shape == (0, 4) and run.boxes["missing"].shape == (0, 4)
    assert len(run.boxes["im0"]) > 0 and len(run.boxes["im1"]) > 0
    assert sorted(p.name.split("-")[0] for p in run.cache_dir.glob("*.npz")) == ["im0", "im1"]
    # The pool gives what the in-process run gives.
    serial = P.compute_proposals(items[:2], workers=0, progress=False)
    for image_id in serial:
        np.testing.assert_array_equal(run.boxes[image_id], serial[image_id])


# ------------------------------------------------------------------------------ recall figures

def _record(image_id, boxes, labels, difficult):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return ImageRecord(image_id, Path(f"{image_id}.jpg"), 100, 100, boxes,
                       np.asarray(labels, np.int64), np.asarray(difficult, bool),
                       np.zeros(len(boxes), bool))


def test_proposal_recall_hand_worked():
    records = [
        _record("a", [[0, 0, 9, 9], [10, 10, 19, 19], [50, 50, 60, 60]], [1, 2, 1], [0, 0, 1]),
        _record("b", [[0, 0, 29, 29]], [1], [0]),
    ]
    proposals = {
        # [0,0,9,4] covers half of the first object: IoU 50 / 100 = 0.5 exactly (counts at 0.5).
        "a": np.array([[0, 0, 9, 4], [10, 10, 19, 19], [50, 50, 60, 60]], np.float32),
        "b": np.zeros((0, 4), np.float32),  # no proposals: its object's best overlap is 0
    }
    stats = P.proposal_recall(records, proposals)
    # Best overlaps of the non-difficult objects: 0.5, 1.0, 0.0 (the difficult one is ignored).
    assert stats["recall@0.5"] == pytest.approx(2 / 3)
    assert stats["recall@0.7"] == pytest.approx(1 / 3)
    assert stats["mabo"] == pytest.approx(0.5)
    assert stats["mabo_class"] == pytest.approx(((0.5 + 0.0) / 2 + 1.0) / 2)
    assert stats["boxes_per_image"] == pytest.approx(1.5)
    assert stats["num_gt"] == 3 and stats["num_images"] == 2
    with pytest.raises(SppdetError, match="no proposals for image b"):
        P.proposal_recall(records, {"a": proposals["a"]})


# ----------------------------------------------------------------------------------- script

def _script(*args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "proposals.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_script_json_and_errors(tmp_path):
    root = write_devkit(tmp_path / "devkit", {
        "000001": [("dog", 5, 5, 40, 30, 0)],
        "000002": [("cat", 10, 8, 60, 45, 0), ("cat", 2, 2, 12, 12, 1)],
    }, split="test")
    out = tmp_path / "out.json"
    res = _script("--voc-root", root, "--split", "test", "--cache-dir", tmp_path / "cache",
                  "--workers", 1, "--max-boxes", 100, "--resize", 0, "--json", out)
    assert res.returncode == 0, res.stderr
    assert "recall@0.5" in res.stdout and "resize none (original size)" in res.stdout
    stats = json.loads(out.read_text())
    assert list(stats) == ["recall@0.5", "recall@0.7", "mabo", "boxes_per_image",
                           "seconds_per_image", "num_gt", "num_images"]
    assert stats["num_gt"] == 2 and stats["num_images"] == 2
    assert 0 < stats["boxes_per_image"] <= 100 and stats["seconds_per_image"] > 0

    missing = _script("--voc-root", tmp_path / "nowhere", "--split", "test")
    assert missing.returncode == 1
    assert missing.stderr.strip().count("\n") == 0 and missing.stderr.startswith("error:")
    assert "not a VOC devkit" in missing.stderr
    no_split = _script("--voc-root", root, "--split", "val")
    assert no_split.returncode == 1 and "split file not found" in no_split.stderr
    bad = _script("--voc-root", root, "--split", "test", "--resize", -1)
    assert bad.returncode == 1
    assert bad.stderr.strip() == "error: --max-boxes must be >= 1, --min-size and --resize >= 0"
