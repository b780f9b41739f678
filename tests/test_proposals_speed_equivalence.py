"""The fast grouping (numpy/OpenCV batches, threads) against the slow reference that calls
OpenCV's strategy objects once per pair: the same similarities bit for bit, the same hierarchies
and the same ranked boxes, on genuine VOC photographs searched at a reduced size."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

import sppdet.proposals as P
from sppdet.voc import load_image

seg = cv2.ximgproc.segmentation

# Photographs of voc07-mini's test split (short sides 353, 406, 332 px), searched smaller.
PHOTOS = ("000001", "000004", "000393")


def photo(root, image_id: str, short_side: int) -> np.ndarray:
    path = root / "VOC2007" / "JPEGImages" / f"{image_id}.jpg"
    return P.search_image(load_image(path), short_side)


def strategy_gets(strategy, image, labels, sizes, pairs) -> np.ndarray:
    """OpenCV's similarity of every pair, as the reference grouping gets it."""
    strategy.setImage(image, labels, sizes.astype(np.int32).reshape(-1, 1).copy(), 0)
    return np.array([strategy.get(int(a), int(b)) for a, b in pairs], np.float32)


@pytest.mark.parametrize("space", ["hsv", "lab"])
def test_histograms_and_similarities_are_opencv_bit_for_bit(voc07_mini, space):
    img = P.colour_image(photo(voc07_mini, PHOTOS[0], 160), space)
    labels = P.segment(img, 50)
    sizes, boxes, pairs = P.initial_regions(labels)
    n = len(sizes)
    a, b = pairs[:, 0], pairs[:, 1]
    colour = P.colour_histograms(P.colour_bins(img), labels, n)
    texture = P.texture_histograms(P.texture_bins(img), labels, n)
    # One set of OpenCV parts (they cache their histograms under the image id, as the reference).
    parts = [seg.createSelectiveSearchSegmentationStrategyColor(),
             seg.createSelectiveSearchSegmentationStrategyTexture(),
             seg.createSelectiveSearchSegmentationStrategySize(),
             seg.createSelectiveSearchSegmentationStrategyFill()]
    # Intersections summed bin by bin in float32 (cumsum is sequential), as OpenCV's loop.
    np.testing.assert_array_equal(np.minimum(colour[a], colour[b]).cumsum(axis=1)[:, -1],
                                  strategy_gets(parts[0], img, labels, sizes, pairs))
    np.testing.assert_array_equal(np.minimum(texture[a], texture[b]).cumsum(axis=1)[:, -1],
                                  strategy_gets(parts[1], img, labels, sizes, pairs))
    # The whole similarity of every initial pair, as the grouping computes it.
    for name, used in (("CTSF", parts), ("TSF", parts[1:])):
        multiple = seg.createSelectiveSearchSegmentationStrategyMultiple()
        for part in used:
            multiple.addStrategy(part, 1.0)
        want = strategy_gets(multiple, img, labels, sizes, pairs)
        got = P.pair_similarities(P.Grouping(sizes, boxes, pairs, P._STRATEGIES[name], colour,
                                             texture, labels.size))
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("image_id, short_side", [(PHOTOS[0], 140), (PHOTOS[1], 160)])
def test_hierarchies_equal_the_reference_on_photographs(voc07_mini, image_id, short_side):
    image = photo(voc07_mini, image_id, short_side)
    for space in ("hsv", "lab"):
        img = P.colour_image(image, space)
        for k in (50, 100):
            fast = P.search_hierarchies(img, k, ("CTSF", "TSF"))
            slow = P.search_hierarchies(img, k, ("CTSF", "TSF"), reference=True)
            assert len(fast) == len(slow) == 3
            for (boxes, positions), (want_boxes, want_positions) in zip(fast, slow):
                assert len(want_boxes) > 20
                np.testing.assert_array_equal(boxes, want_boxes)
                np.testing.assert_array_equal(positions, want_positions)


def reference_parts(names):
    multiple = seg.createSelectiveSearchSegmentationStrategyMultiple()
    parts = {"color": seg.createSelectiveSearchSegmentationStrategyColor(),
             "texture": seg.createSelectiveSearchSegmentationStrategyTexture(),
             "size": seg.createSelectiveSearchSegmentationStrategySize(),
             "fill": seg.createSelectiveSearchSegmentationStrategyFill()}
    for name in names:
        multiple.addStrategy(parts[name], 1.0)
    return multiple


@pytest.mark.parametrize("strategy", ["CTSF", "TSF"])
def test_every_similarity_of_the_grouping_is_opencvs(voc07_mini, strategy):
    """Not only the merge order: every similarity computed along the way, merged regions'
    (their histograms updated by the size-weighted average) included, equals OpenCV's."""
    img = P.colour_image(photo(voc07_mini, PHOTOS[1], 140), "lab")
    labels = P.segment(img, 50)
    sizes, boxes, pairs = P.initial_regions(labels)
    (grouping,), _ = P._groupings(img, 50, (strategy,))
    fast_trace, slow_trace = [], []
    fast = P.group_hierarchies([grouping], trace=fast_trace)[0]
    slow = P.group_regions_reference(reference_parts(P._STRATEGIES[strategy]), img, labels, sizes,
                                     boxes, pairs, trace=slow_trace)
    np.testing.assert_array_equal(fast, slow)
    assert len(slow_trace) > 3 * len(pairs)  # the merged regions' similarities are in it
    assert sorted(fast_trace[0]) == sorted(slow_trace)


def test_ties_are_broken_as_the_reference():
    # A flat picture cut into 42 equal tiles: the initial pairs tie exactly (the texture terms
    # differ only near the picture's border, where the rotated derivatives see its edge), and
    # so do many later ones, so the merge order is the tie-break's (by region ids, as the
    # reference's heap).
    image = np.full((36, 42, 3), 120, np.uint8)
    labels = (np.arange(6).repeat(6)[:, None] * 7 + np.arange(7).repeat(6)[None, :])
    labels = labels.astype(np.int32)
    sizes, boxes, pairs = P.initial_regions(labels)
    n = len(sizes)
    colour = P.colour_histograms(P.colour_bins(image), labels, n)
    texture = P.texture_histograms(P.texture_bins(image), labels, n)
    for name in ("CTSF", "F", "S"):
        g = P.Grouping(sizes, boxes, pairs, P._STRATEGIES[name], colour, texture, labels.size)
        assert len(np.unique(P.pair_similarities(g))) < len(pairs) / 3
        want = P.group_regions_reference(reference_parts(g.parts), image, labels, sizes, boxes,
                                         pairs)
        np.testing.assert_array_equal(P.group_hierarchies([g])[0], want)


def test_ranked_boxes_equal_the_reference_and_do_not_depend_on_threads(voc07_mini):
    image = photo(voc07_mini, PHOTOS[2], 150)
    want = P.selective_search(image, max_boxes=None, min_size=0, seed=3, reference=True)
    assert len(want) > 300
    for threads in (1, 3):
        got = P.selective_search(image, max_boxes=None, min_size=0, seed=3, threads=threads)
        np.testing.assert_array_equal(got, want)


def test_quality_mode_strategies_equal_the_reference(voc07_mini):
    # 5 colour spaces (one and three channels) x 4 ks x CTSF, TSF, F, S: 80 hierarchies grouped
    # in lockstep, where the single-term strategies mask the others out.
    image = photo(voc07_mini, PHOTOS[1], 72)
    want = P.selective_search(image, "quality", max_boxes=None, min_size=0, reference=True)
    got = P.selective_search(image, "quality", max_boxes=None, min_size=0, threads=2)
    np.testing.assert_array_equal(got, want)


def test_lockstep_grouping_equals_one_at_a_time(voc07_mini):
    image = photo(voc07_mini, PHOTOS[0], 120)
    groupings = []
    for space, k in (("hsv", 50), ("lab", 100), ("i", 50)):
        found, _ = P._groupings(P.colour_image(image, space), k, ("CTSF", "TSF", "F", "S"))
        groupings += found
    together = P.group_hierarchies(groupings)
    for g, merged in zip(groupings, together):
        alone = P.group_regions(g.sizes, g.boxes, g.pairs, g.parts, g.colour, g.texture, g.n_pixels)
        np.testing.assert_array_equal(merged, alone)
        assert len(merged) == len(g.sizes) - 1


def test_degenerate_groupings_match_the_reference():
    # One region: nothing to merge. Two separate pairs (a region graph in two pieces, which a
    # segmentation never gives but a caller may): each pair merges, and the grouping stops there.
    one = P.Grouping(np.array([12]), np.array([[0, 0, 3, 2]]), np.zeros((0, 2), np.int64), ("fill",))
    labels = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]], np.int32)
    sizes, boxes, _ = P.initial_regions(labels)
    apart = np.array([[0, 1], [2, 3]])
    two = P.Grouping(sizes, boxes, apart, ("size",), n_pixels=16)
    got = P.group_hierarchies([one, two])
    assert got[0].shape == (0, 4)
    want = P.group_regions_reference(seg.createSelectiveSearchSegmentationStrategySize(),
                                     np.zeros((4, 4, 3), np.uint8), labels, sizes, boxes, apart)
    np.testing.assert_array_equal(got[1], want)
    assert want.tolist() == [[0, 0, 3, 1], [0, 2, 3, 3]]
    with pytest.raises(ValueError, match="parts"):
        P.group_hierarchies([one._replace(parts=("colour",))])
    with pytest.raises(ValueError, match="texture histograms"):
        P.group_hierarchies([two._replace(parts=("texture",))])


def test_flat_channels_match_opencv_texture():
    # A grey picture: its HSV hue and saturation are flat, so their derivatives are all zero
    # (OpenCV's stretch divides 0 by 0 there and gets bin 0; so must we).
    rng = np.random.default_rng(0)
    blocks = cv2.resize(rng.integers(0, 255, (5, 7), dtype=np.uint8), (56, 40),
                        interpolation=cv2.INTER_NEAREST)
    grey = np.clip(blocks + rng.normal(0, 3, blocks.shape), 0, 255).astype(np.uint8)
    img = P.colour_image(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), "hsv")
    assert (img[:, :, 1] == 0).all()
    labels = P.segment(img, 20)
    sizes, _, pairs = P.initial_regions(labels)
    assert len(pairs) > 3
    texture = P.texture_histograms(P.texture_bins(img), labels, len(sizes))
    np.testing.assert_array_equal(
        np.minimum(texture[pairs[:, 0]], texture[pairs[:, 1]]).cumsum(axis=1)[:, -1],
        strategy_gets(seg.createSelectiveSearchSegmentationStrategyTexture(), img, labels, sizes,
                      pairs))


def test_pool_workers_search_single_threaded(monkeypatch):
    # Searched alone, an image's segmentations use the cores; in compute_proposals' process
    # pool (whose workers start with _init_worker) each search keeps to one thread.
    monkeypatch.setattr(P, "_IN_POOL", False)  # restored after the test
    assert 1 <= P.default_threads() <= 4
    opencv_threads = cv2.getNumThreads()
    try:
        P._init_worker()
        assert P.default_threads() == 1 and cv2.getNumThreads() == 1
    finally:
        cv2.setNumThreads(opencv_threads)


def test_timing_helper_reports_both_side_by_side():
    rng = np.random.default_rng(1)
    images = [cv2.GaussianBlur(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), (0, 0), 1.5)
              for _ in range(2)]
    res = P.time_against_stock(images, resize=40, repeats=1, threads=1)
    assert res["images"] == 2 and len(res["ours"]) == len(res["stock"]) == 2
    assert all(t > 0 for t in res["ours"] + res["stock"])
    assert res["ratio"] == pytest.approx(sum(res["ours"]) / sum(res["stock"]))
    assert len(res["ours_cpu"]) == 2 and res["cpu_ratio"] > 0
    with pytest.raises(P.SppdetError, match="no images"):
        P.time_against_stock([])
