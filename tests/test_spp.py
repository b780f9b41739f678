"""spp: window projection (paper and official-code rules), scale choice, pyramid max pooling."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sppdet.spp import (SpatialPyramidPool, _plan, bin_bounds, choose_scales, project_boxes,
                        resize_factor, spp_output_dim, spp_pool, spp_pool_maps,
                        spp_pool_reference)

# ZF-5 geometry: conv5 unit i is centred on pixel 20 + 16 i; a 688x917 image gives a 42x56 map.
S, C0 = 16, 20.0
H5, W5 = 42, 56


def windows_of(boxes, rule="paper", map_h=H5, map_w=W5):
    return project_boxes(torch.tensor(boxes, dtype=torch.float32), S, C0, map_h, map_w,
                         rule=rule).tolist()


# ----------------------------------------------------------------------------- geometry

def test_resize_factor():
    assert resize_factor(375, 500, 688) == 688 / 375
    assert resize_factor(500, 375, 688, max_size=2000) == 688 / 375   # long side 917, no cap
    assert resize_factor(100, 1000, 688, max_size=2000) == 2000 / 1000  # 6880 > 2000: capped
    assert resize_factor(100, 1000, 200, max_size=2000) == 2.0          # exactly 2000: allowed
    assert resize_factor(100, 1000, 201, max_size=2000) == 2.0          # 2010 > 2000: capped


@pytest.mark.parametrize("box, expected", [
    ([20, 36, 52, 68], [0, 1, 2, 3]),          # edges exactly on unit centres: both kept
    ([21, 37, 51, 67], [1, 2, 1, 2]),          # one pixel inside the centres: only the inner unit
    ([40, 40, 47, 47], [1, 1, 1, 1]),          # between centres 36 and 52: nearest to 43.5 is 36
    ([45, 45, 50, 50], [2, 2, 2, 2]),          # centre 47.5: unit 2 (52) is nearer
    ([0, 0, 916, 687], [0, 0, 55, 41]),        # the whole 688x917 image, clipped to the map
    ([0, 0, 15, 15], [0, 0, 0, 0]),            # top-left corner, left of unit 0: clipped
    ([900, 670, 916, 687], [55, 41, 55, 41]),  # bottom-right corner
    ([100.6, 20.0, 132.0, 20.4], [6, 0, 7, 0]),  # centres 116, 132 in [100.1, 132.5]; 100 not
])
def test_project_paper_hand_cases(box, expected):
    assert windows_of([box])[0] == expected


@pytest.mark.parametrize("box, expected", [
    ([20, 36, 52, 68], [0, 1, 2, 3]),
    ([21, 21, 51, 51], [0, 0, 2, 2]),          # keeps units up to 1.5 px outside (paper: [1,1,1,1])
    ([22, 22, 50, 50], [1, 1, 1, 1]),          # 2 px outside: dropped
    ([40, 40, 47, 47], [1, 1, 1, 1]),          # left 3 > right 2 (1-based): floor(2.5) = 2
    ([45, 45, 50, 50], [1, 1, 1, 1]),          # midpoint rule, unlike the paper's nearest unit 2
    ([0, 0, 916, 687], [0, 0, 55, 41]),
    ([900, 670, 916, 687], [55, 41, 55, 41]),
])
def test_project_code_hand_cases(box, expected):
    assert windows_of([box], rule="code")[0] == expected


def _centre_rule(lo, hi, n_units, margin):
    """Brute force on one axis: units whose centre c has lo - margin < c < hi + margin, else the
    nearest to the box centre (paper) - None when empty; clipped to the map."""
    inside = [i for i in range(-3, n_units + 3) if lo - margin < C0 + S * i < hi + margin]
    if not inside:
        return None
    return min(max(inside[0], 0), n_units - 1), min(max(inside[-1], 0), n_units - 1)


def test_project_paper_is_the_centre_rule():
    rng = np.random.default_rng(0)
    x1 = rng.uniform(-5, 1000, 500)
    x2 = x1 + rng.uniform(0, 300, 500)
    boxes = np.stack([x1, x1, x2, x2], 1).astype(np.float64)
    wins = project_boxes(boxes, S, C0, 60, 60).numpy()
    for (lo, _, hi, _), (a, _, b, _) in zip(boxes, wins):
        ref = _centre_rule(lo, hi, 60, margin=0.5)
        if ref is None:   # no centre inside: the unit nearest the box centre
            near = min(max(int(np.floor(((lo + hi) / 2 - C0) / S + 0.5)), 0), 59)
            ref = (near, near)
        assert (a, b) == ref, (lo, hi)


def test_project_code_keeps_centres_within_1_5_px():
    rng = np.random.default_rng(1)
    x1 = rng.integers(0, 1000, 500)
    x2 = x1 + rng.integers(0, 300, 500)
    boxes = np.stack([x1, x1, x2, x2], 1).astype(np.float32)
    wins = project_boxes(boxes, S, C0, 80, 80, rule="code").numpy()
    for (lo, _, hi, _), (a, _, b, _) in zip(boxes, wins):
        ref = _centre_rule(lo, hi, 80, margin=1.5)
        if ref is not None:
            assert (a, b) == ref, (lo, hi)
        else:
            assert a == b


def test_project_always_valid_windows():
    rng = np.random.default_rng(2)
    x1, y1 = rng.uniform(-50, 700, (2, 1000))
    boxes = np.stack([x1, y1, x1 + rng.uniform(0, 400, 1000), y1 + rng.uniform(0, 400, 1000)], 1)
    for rule in ("paper", "code"):
        w = project_boxes(boxes, S, C0, 7, 11, rule=rule)
        assert w.dtype == torch.int64 and w.shape == (1000, 4)
        assert (w[:, :2] >= 0).all() and (w[:, 2] < 11).all() and (w[:, 3] < 7).all()
        assert (w[:, :2] <= w[:, 2:]).all()
    with pytest.raises(ValueError, match="rule"):
        project_boxes(boxes, S, C0, 7, 11, rule="nearest")


def test_project_code_constants_are_parameters():
    box = torch.tensor([[21.0, 21.0, 51.0, 51.0]])   # [0, 0, 2, 2] with the defaults
    assert project_boxes(box, S, C0, H5, W5, rule="code", offset=10.0).tolist() == [[1, 1, 1, 1]]
    assert project_boxes(box, S, C0, H5, W5, rule="code", offset0=37.0).tolist() == [[0, 0, 1, 1]]
    # offset0 defaults to center0 + 1
    assert project_boxes(box, S, 36.0, H5, W5, rule="code").tolist() == [[0, 0, 1, 1]]


# ----------------------------------------------------------------------------- scale choice

SCALES_PAPER = (480, 576, 688, 864, 1200)
SCALES_CODE = (480, 576, 688, 874, 1200)


def test_choose_scales_paper():
    # 375x500 image: factors 1.28, 1.536, 1.835, 2.304, 3.2.
    boxes = torch.tensor([[0, 0, 174, 174],    # 175 * 1.28 = 224 exactly -> 480
                          [0, 0, 99, 99],      # 100 px: 230.4 at 864 is nearest to 224
                          [10, 10, 59, 59],    # 50 px: even 3.2x gives 160 -> 1200
                          [0, 0, 499, 374]],   # the whole image -> 480
                         dtype=torch.float32)
    assert choose_scales(boxes, SCALES_PAPER, 375, 500).tolist() == [0, 3, 4, 0]
    # target is a parameter: 100 px at 1200 is 320 px
    assert choose_scales(boxes[1:2], SCALES_PAPER, 375, 500, target=320).tolist() == [4]


def test_choose_scales_code():
    boxes = torch.tensor([[0, 0, 99, 99],      # expected round(208*375/100) = 780
                          [0, 0, 122, 123],    # 208*375/sqrt(123*124) = 631.59 -> 632: tie
                          [0, 0, 499, 374]],   # 208*375/433.0 = 180 -> 480
                         dtype=torch.float32)
    # 780: |864-780| = 84 < |688-780| = 92, but |874-780| = 94 > 92.
    assert choose_scales(boxes, SCALES_PAPER, 375, 500, rule="code").tolist() == [3, 1, 0]
    assert choose_scales(boxes, SCALES_CODE, 375, 500, rule="code").tolist() == [2, 1, 0]
    # 208 * 375 / 96 = 812.5: MATLAB rounds half away from zero, to 813 (not half-to-even 812).
    assert choose_scales(torch.tensor([[0.0, 0, 95, 95]]), (812, 813), 375, 500,
                         rule="code").tolist() == [1]
    # 100x1000 image, cap 2000: scale 480 is capped to a short side of 200, 190 is not; a
    # 100 px box expects 208, nearer 200 than 190 (the nominal 480 would lose).
    assert choose_scales(boxes[:1], (190, 480), 100, 1000, max_size=2000,
                         rule="code").tolist() == [1]


def test_choose_scales_single_scale_and_errors():
    boxes = torch.rand(5, 4) * 100
    boxes[:, 2:] += boxes[:, :2]
    for rule in ("paper", "code"):
        assert choose_scales(boxes, (688,), 375, 500, rule=rule).tolist() == [0] * 5
    assert choose_scales(torch.zeros(0, 4), SCALES_PAPER, 375, 500).shape == (0,)
    with pytest.raises(ValueError, match="rule"):
        choose_scales(boxes, SCALES_PAPER, 375, 500, rule="area")


# ----------------------------------------------------------------------------- pooling

def random_windows(gen, n, map_h, map_w):
    """Windows of every kind: arbitrary, single cells, thin (< 6 cells), and the full map."""
    ys = torch.randint(0, map_h, (n, 2), generator=gen).sort(1).values
    xs = torch.randint(0, map_w, (n, 2), generator=gen).sort(1).values
    w = torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], 1)
    q = n // 4
    w[:q, 2:] = w[:q, :2]                                               # 1x1
    extra = torch.randint(0, 5, (q, 2), generator=gen)                  # 1..5 cells wide/high
    w[q:2 * q, 2] = (w[q:2 * q, 0] + extra[:, 0]).clamp(max=map_w - 1)
    w[q:2 * q, 3] = (w[q:2 * q, 1] + extra[:, 1]).clamp(max=map_h - 1)
    w[-1] = torch.tensor([0, 0, map_w - 1, map_h - 1])                 # the whole map
    return w


@pytest.mark.parametrize("shape", [(7, 1, 1), (5, 3, 17), (6, 23, 9), (4, 42, 56)])
@pytest.mark.parametrize("levels", [(6, 3, 2, 1), (1, 2, 3, 6), (4, 2, 1), (5,), (7, 6, 3, 6)])
def test_spp_pool_equals_reference(shape, levels):
    gen = torch.Generator().manual_seed(hash((shape, levels)) % 2**31)
    feature = torch.randn(shape, generator=gen)
    windows = random_windows(gen, 40, shape[1], shape[2])
    expected = spp_pool_reference(feature, windows, levels)
    assert expected.shape == (40, spp_output_dim(shape[0], levels))
    assert torch.equal(spp_pool(feature, windows, levels), expected)
    assert torch.equal(spp_pool(feature, windows, levels, chunk=3), expected)   # ragged chunks


def test_spp_pool_relu_map_with_ties_and_noncontiguous_input():
    gen = torch.Generator().manual_seed(5)
    feature = torch.relu(torch.randn(13, 30, 8, generator=gen)).permute(2, 1, 0)  # (8, 30, 13)
    windows = random_windows(gen, 60, 30, 13)
    assert torch.equal(spp_pool(feature, windows), spp_pool_reference(feature, windows))


@pytest.mark.parametrize("threads", [2, 3])
def test_spp_pool_split_between_threads_and_in_bf16(monkeypatch, threads):
    """Enough windows for every thread to take a share (ragged shares, a partial last chunk):
    the same bits as the reference; bf16 pooling equals fp32 pooling rounded to bf16."""
    import sppdet.spp as spp_module

    monkeypatch.setattr(spp_module, "_POOL_SPLIT", 50)
    started = []
    real_thread = spp_module.threading.Thread
    monkeypatch.setattr(spp_module.threading, "Thread",
                        lambda *a, **k: started.append(1) or real_thread(*a, **k))
    gen = torch.Generator().manual_seed(11)
    feature = torch.relu(torch.randn(16, 42, 56, generator=gen))
    windows = random_windows(gen, 3 * 50 + 7, 42, 56)
    expected = spp_pool_reference(feature, windows)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = spp_pool(feature, windows, chunk=16)
        got_bf16 = spp_pool(feature.bfloat16(), windows, chunk=16)
        assert torch.get_num_threads() == threads   # restored after the one-thread block
    finally:
        torch.set_num_threads(before)
    assert len(started) == 2 * (threads - 1)      # the calling thread takes one share itself
    assert torch.equal(got, expected)
    assert got_bf16.dtype == torch.bfloat16 and torch.equal(got_bf16, expected.bfloat16())


def test_reference_bins_match_adaptive_max_pool():
    """The reference's floor/ceil bins are those of adaptive max pooling on the cropped window."""
    gen = torch.Generator().manual_seed(6)
    feature = torch.randn(3, 20, 25, generator=gen)
    windows = random_windows(gen, 30, 20, 25)
    for (c1, r1, c2, r2), row in zip(windows.tolist(), spp_pool_reference(feature, windows)):
        crop = feature[:, r1:r2 + 1, c1:c2 + 1]
        expected = torch.cat([F.adaptive_max_pool2d(crop, n).reshape(-1) for n in (6, 3, 2, 1)])
        assert torch.equal(row, expected)


def test_output_dim_and_layout_on_a_hand_built_map():
    assert spp_output_dim(256) == 12800 == SpatialPyramidPool().output_dim(256)
    # value = 1000 c + 6 y + x grows along x and y, so a bin's max is its bottom-right cell.
    c, y, x = torch.meshgrid(torch.arange(2), torch.arange(6), torch.arange(6), indexing="ij")
    feature = (1000 * c + 6 * y + x).float()
    out = spp_pool(feature, torch.tensor([[0, 0, 5, 5]]))[0]

    def level(n, last):  # (C, n, n) order; bin (i, j) ends at cell (last(i), last(j))
        return [1000 * ch + 6 * last(i) + last(j) for ch in range(2)
                for i in range(n) for j in range(n)]

    expected = (level(6, lambda i: i) + level(3, lambda i: 2 * i + 1)
                + level(2, lambda i: 3 * i + 2) + level(1, lambda i: 5))
    assert out.tolist() == expected
    # A 2-cell-wide window still fills all 6 bins: bins 0-2 see cell 0, bins 3-5 cell 1.
    row = spp_pool(feature[:1], torch.tensor([[3, 4, 4, 4]]), levels=(6,))[0].view(6, 6)
    assert row[0].tolist() == [27, 27, 27, 28, 28, 28] and (row == row[0]).all()


def test_bin_bounds_and_level_nesting():
    # Hand-worked: 7 cells in 3 bins -> [0, 3), [2, 5), [4, 7).
    s, e = bin_bounds(torch.tensor([10]), torch.tensor([16]), 3)
    assert s.tolist() == [[10, 12, 14]] and e.tolist() == [[13, 15, 17]]
    assert _plan((6, 3, 2, 1)) == {6: None, 3: 6, 2: 6, 1: 2}
    assert _plan((4, 3)) == {4: None, 3: None}
    # Bins f k .. f k + f - 1 of level f n cover bin k of level n exactly, for every length.
    lengths = torch.arange(1, 300)
    zero = torch.zeros_like(lengths)
    for n, f in [(3, 2), (2, 3), (1, 2), (1, 6), (2, 2)]:
        fs, fe = bin_bounds(zero, lengths - 1, n * f)
        cs, ce = bin_bounds(zero, lengths - 1, n)
        for k in range(n):
            group = slice(f * k, f * k + f)
            assert torch.equal(fs[:, group].min(1).values, cs[:, k])
            assert torch.equal(fe[:, group].max(1).values, ce[:, k])
            # consecutive bins touch or overlap, so the union has no hole
            assert (fs[:, f * k + 1:f * k + f] <= fe[:, f * k:f * k + f - 1]).all()


def test_spp_pool_gradients():
    gen = torch.Generator().manual_seed(7)
    feature = torch.randn(2, 9, 13, dtype=torch.float64, generator=gen, requires_grad=True)
    windows = torch.tensor([[0, 0, 12, 8], [2, 1, 4, 3], [5, 5, 5, 5], [0, 3, 12, 4], [1, 0, 9, 8]])
    assert torch.autograd.gradcheck(lambda f: spp_pool(f, windows), (feature,))
    out = spp_pool(feature, windows)
    ref = spp_pool_reference(feature, windows)
    assert torch.equal(out, ref)
    with torch.no_grad():  # the buffer-reusing path gives the same values
        assert torch.equal(spp_pool(feature, windows), out)
    g = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    (grad,) = torch.autograd.grad(out, feature, g)
    (grad_ref,) = torch.autograd.grad(ref, feature, g)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-12)


def test_spp_pool_maps_and_module():
    gen = torch.Generator().manual_seed(8)
    maps = torch.randn(5, 4, 13, 11, generator=gen)
    full = torch.tensor([[0, 0, 10, 12]])
    expected = torch.cat([spp_pool_reference(m, full) for m in maps])
    assert torch.equal(spp_pool_maps(maps), expected)
    pool = SpatialPyramidPool((6, 3, 2, 1))
    assert torch.equal(pool(maps), expected)
    assert torch.equal(pool(maps[2]), expected[2:3])
    windows = random_windows(gen, 10, 13, 11)
    assert torch.equal(pool(maps[0], windows), spp_pool_reference(maps[0], windows))


def test_spp_pool_bad_input():
    feature = torch.randn(3, 5, 6)
    assert spp_pool(feature, torch.zeros(0, 4, dtype=torch.int64)).shape == (0, 150)
    with pytest.raises(ValueError, match="outside"):
        spp_pool(feature, torch.tensor([[0, 0, 6, 4]]))     # x2 = 6 on a 6-wide map
    with pytest.raises(ValueError, match="outside"):
        spp_pool(feature, torch.tensor([[3, 0, 2, 4]]))     # empty
    with pytest.raises(ValueError, match="integer"):
        spp_pool(feature, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="levels"):
        spp_pool(feature, torch.tensor([[0, 0, 1, 1]]), levels=(6, 0))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        spp_pool(feature[None], torch.tensor([[0, 0, 1, 1]]))
