"""rcnn: the R-CNN baseline's crop geometry (context dilation, bilinear warp) and its features."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sppdet.backbones import build_backbone
from sppdet.rcnn import RCNNFeatures, context_boxes, warp_windows
from sppdet.spp import spp_pool_maps


def test_context_boxes_hand_worked():
    # Box 0..99 (100 px, continuous [0, 100)), input 224, context 16: the box must fill the
    # inner 192 px, so the crop spans 224 / 192 = 7/6 of it about the centre 50:
    # half-width 50 * 7/6 = 58.333 -> [-8.333, 108.333).
    got = context_boxes(torch.tensor([[0.0, 0.0, 99.0, 99.0]]), 224, 16)
    half = 50 * 224 / 192
    assert torch.allclose(got, torch.tensor([[50 - half, 50 - half, 50 + half, 50 + half]]), atol=1e-5)
    # anisotropic box: 40 x 80 px at x 10..49, y 20..99 -> centre (30, 60), halves 20 and 40 x 7/6
    got = context_boxes(torch.tensor([[10.0, 20.0, 49.0, 99.0]]), 224, 16)
    assert torch.allclose(got, torch.tensor([[30 - 20 * 7 / 6, 60 - 40 * 7 / 6,
                                              30 + 20 * 7 / 6, 60 + 40 * 7 / 6]]), atol=1e-5)
    # no context: the box itself in continuous coordinates (inclusive end + 1)
    assert torch.allclose(context_boxes(torch.tensor([[3.0, 4.0, 10.0, 20.0]]), 224, 0),
                          torch.tensor([[3.0, 4.0, 11.0, 21.0]]))


def coordinate_image(height: int, width: int) -> torch.Tensor:
    """(3, H, W): channel 0 = x + 1, channel 1 = y + 1, channel 2 = 1 (pixel indices, so a
    sample inside the image reads >= 1 in every channel and one outside reads 0)."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32),
                            torch.arange(width, dtype=torch.float32), indexing="ij")
    return torch.stack([xs + 1, ys + 1, torch.ones_like(xs)])


def expected_samples(lo: float, hi: float, size: int, extent: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference warp along one axis: cell j samples the continuous point lo + (j + 0.5) (hi - lo)
    / size, i.e. pixel coordinate that - 0.5 (pixel i covers [i, i + 1)); a linear image reads
    it back exactly, clamped to the edge pixels; points outside [0, extent) are padding."""
    c = lo + (np.arange(size) + 0.5) * (hi - lo) / size
    return np.clip(c - 0.5, 0, extent - 1), (c >= 0) & (c < extent)


@pytest.mark.parametrize("box", [[0, 0, 99, 99], [10, 20, 49, 99], [70, 5, 119, 30]])
def test_warp_samples_the_expected_coordinates(box):
    H, W, S, ctx = 110, 120, 224, 16
    image = coordinate_image(H, W)
    crop = warp_windows(image, torch.tensor([box], dtype=torch.float32), S, ctx)[0].double().numpy()
    assert crop.shape == (3, S, S)
    x1, y1, x2, y2 = context_boxes(torch.tensor([box], dtype=torch.float64), S, ctx)[0].tolist()
    ex, in_x = expected_samples(x1, x2, S, W)
    ey, in_y = expected_samples(y1, y2, S, H)
    inside = in_y[:, None] & in_x[None, :]
    assert inside.any()
    # every sample inside the image reads its coordinate; every one outside reads 0 (the mean)
    np.testing.assert_allclose(crop[0][inside], np.broadcast_to(ex[None] + 1, (S, S))[inside], atol=1e-3)
    np.testing.assert_allclose(crop[1][inside], np.broadcast_to(ey[:, None] + 1, (S, S))[inside], atol=1e-3)
    np.testing.assert_allclose(crop[2][inside], 1.0, atol=1e-5)
    assert np.all(crop[:, ~inside] == 0)

    # the inner (S - 2 ctx)^2 region maps back onto the box's own edge pixels (within 1 px)
    inner = slice(ctx, S - ctx)
    xs, ys = crop[0][ctx, inner] - 1, crop[1][inner, ctx] - 1
    for value, edge, seen in ((xs[0], box[0], in_x[ctx]), (xs[-1], box[2], in_x[S - ctx - 1]),
                              (ys[0], box[1], in_y[ctx]), (ys[-1], box[3], in_y[S - ctx - 1])):
        assert seen and abs(value - edge) <= 1
    # the two centre cells straddle the box centre (x1 + x2) / 2 in pixel coordinates
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    assert (crop[0, S // 2, S // 2 - 1] + crop[0, S // 2, S // 2]) / 2 - 1 == pytest.approx(cx, abs=1e-3)
    assert (crop[1, S // 2 - 1, S // 2] + crop[1, S // 2, S // 2]) / 2 - 1 == pytest.approx(cy, abs=1e-3)


def test_warp_box_0_99_hand_worked():
    """Box 0..99 in a 120 x 120 image, 224 / 16: cell width 116.67 / 224 = 0.5208 px. Cells
    0..15 sample x < 0 (cell 15 at -0.26 px, just outside): padding; cell 16 samples 0.26, the
    first pixel; cell 207 samples 99.74, the last box pixel; cell 223 reaches 108.07."""
    crop = warp_windows(coordinate_image(120, 120), torch.tensor([[0.0, 0.0, 99.0, 99.0]]), 224, 16)[0]
    row = crop[0, 120]  # channel 0 (x + 1) along one row inside the image
    assert torch.all(row[:16] == 0)
    assert row[16].item() == pytest.approx(1.0)          # 0.26 - 0.5 < 0: the edge pixel 0
    assert row[207].item() - 1 == pytest.approx(99.74 - 0.5, abs=0.01)
    assert row[223].item() - 1 == pytest.approx(-8.3333 + 223.5 * 116.6667 / 224 - 0.5, abs=0.01)
    assert torch.all(crop[:, :16] == 0) and torch.all(crop[:, 16:, 16:] > 0)


def test_rcnn_features_match_a_manual_warp_conv_pool_path():
    torch.manual_seed(0)
    net = RCNNFeatures(build_backbone("zf5", width=0.125), levels=(3, 1), input_size=96, context=8,
                       batch=2).eval()
    image = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    boxes = torch.tensor([[0, 0, 69, 49], [10, 5, 30, 40], [60, 40, 69, 49]], dtype=torch.float32)
    with torch.no_grad():
        got = net(image, boxes)
        x = net.backbone.preprocess(image)
        want = torch.cat([spp_pool_maps(net.backbone(warp_windows(x, boxes[i:i + 1], 96, 8)), (3, 1))
                          for i in range(len(boxes))])
    assert got.shape == (3, net.output_dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert net(image, torch.zeros(0, 4)).shape == (0, net.output_dim)
