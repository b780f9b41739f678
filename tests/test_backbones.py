"""Backbones: ZF-5 map sizes and LRN, R-CNN's CaffeNet (grouped convs, cross-channel LRN, pool5 =
the pyramid {6}), geometry against a slow reference, preprocessing, torchvision trunks, weight
loading and its errors. Nothing is downloaded."""
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from sppdet.backbones import (BACKBONES, CAFFE_ILSVRC12_MEAN_BGR, CrossChannelLRN, WithinChannelLRN,
                              build_backbone, conv_geometry, trunk_layers)
from sppdet.spp import spp_pool_maps
from sppdet.utils import SppdetError

# Hand-derived (stride, center0, receptive field); ZF-5's are PAPER.md 1.1's (unit i at 16 i + 20).
GEOMETRY = {"zf5": (16, 20.0, 139), "caffenet": (16, 17.0, 163), "alexnet": (16, 15.0, 163),
            "vgg16": (16, 7.5, 196), "resnet50": (16, 0.0, 267)}


@pytest.fixture(scope="module")
def nets():
    """One random-init eval-mode trunk per family (zf5 at width 0.25)."""
    torch.manual_seed(0)
    return {name: build_backbone(name, width=0.25 if name == "zf5" else 1.0).eval()
            for name in BACKBONES}


# ----------------------------------------------------------------------------- ZF-5

@pytest.mark.parametrize("hw, hw5", [((224, 224), (13, 13)), ((180, 180), (10, 10)),
                                     ((100, 260), (5, 15))])
def test_zf5_map_sizes(nets, hw, hw5):
    with torch.no_grad():
        y = nets["zf5"](torch.randn(2, 3, *hw))
    assert y.shape == (2, 64, *hw5)
    assert nets["zf5"].map_size(*hw) == hw5


def test_zf5_map_size_at_detection_scale():
    # PAPER.md 1.1: a 500x375 VOC image at s = 688 (688x917) gives a 42x56 conv5 map.
    assert build_backbone("zf5").map_size(688, 917) == (42, 56)


def test_zf5_architecture_and_width():
    full, small = build_backbone("zf5"), build_backbone("zf5", width=0.25)
    convs = [f"conv{i}" for i in range(1, 6)]
    assert [getattr(full, c).out_channels for c in convs] == [96, 256, 384, 384, 256]
    assert [getattr(small, c).out_channels for c in convs] == [24, 64, 96, 96, 64]
    assert [getattr(build_backbone("zf5", width=0.01), c).out_channels for c in convs] == [8] * 5
    assert (full.out_channels, small.out_channels) == (256, 64)
    # Kernel, stride, pad, ceil of the released prototxt, in order.
    assert trunk_layers(full) == [(7, 2, 1, False), (3, 2, 0, True), (5, 2, 0, False),
                                  (3, 2, 0, True), (3, 1, 1, False), (3, 1, 1, False),
                                  (3, 1, 1, False)]


@pytest.mark.parametrize("alpha", [5e-5, 0.3])
def test_within_channel_lrn_matches_loop(alpha):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64) * 3
    beta = 0.75
    ref = torch.empty_like(x)
    N, C, H, W = x.shape
    for n in range(N):
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    s = sum(x[n, c, a, b] ** 2 for a in range(i - 1, i + 2) for b in range(j - 1, j + 2)
                            if 0 <= a < H and 0 <= b < W)
                    # Caffe AVE pooling divides by 9 even at borders (padded cells count).
                    ref[n, c, i, j] = x[n, c, i, j] * (1 + alpha * s / 9) ** -beta
    out = WithinChannelLRN(3, alpha, beta)(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_within_channel_lrn_gradient():
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(WithinChannelLRN(alpha=0.3), (x,))


# ----------------------------------------------------------------------------- CaffeNet

def test_caffenet_architecture_and_map_sizes(nets):
    """BVLC's reference CaffeNet / R-CNN's model-defs: conv1 11/4 -> pool1 3/2 -> norm1 ->
    conv2 5 pad 2 group 2 -> pool2 3/2 -> norm2 -> conv3, conv4 (group 2), conv5 (group 2)."""
    net = nets["caffenet"]
    convs = [getattr(net, f"conv{i}") for i in range(1, 6)]
    assert [c.out_channels for c in convs] == [96, 256, 384, 384, 256] and net.out_channels == 256
    assert [c.groups for c in convs] == [1, 2, 1, 2, 2]
    assert [tuple(c.weight.shape) for c in convs] == [(96, 3, 11, 11), (256, 48, 5, 5), (384, 256, 3, 3),
                                                      (384, 192, 3, 3), (256, 192, 3, 3)]  # Caffe's blobs
    assert [(m.size, m.alpha, m.beta, m.k) for m in (net.norm1, net.norm2)] == [(5, 1e-4, 0.75, 1.0)] * 2
    assert trunk_layers(net) == [(11, 4, 0, False), (3, 2, 0, True), (5, 1, 2, False), (3, 2, 0, True),
                                 (3, 1, 1, False), (3, 1, 1, False), (3, 1, 1, False)]
    assert net.rcnn_input_size == 227
    # R-CNN's 227 warp: conv1 55, pool1 27, conv2 27, pool2 13, conv3..5 13 (Caffe's shapes).
    for hw, hw5 in [((227, 227), (13, 13)), ((243, 227), (14, 13)), ((224, 224), (13, 13)), ((100, 150), (5, 8))]:
        with torch.no_grad():
            y = net(torch.randn(1, 3, *hw))
        assert tuple(y.shape) == (1, 256, *hw5) == (1, 256, *net.map_size(*hw)), hw


def test_caffenet_pool5_is_the_pyramid_6():
    """Caffe's pool5 (max 3x3/2, ceil) on the 13x13 conv5 of a 227 input has the bins of sppdet's
    adaptive one-level pyramid {6}: both start at 0, 2, 4, 6, 8, 10 and are 3 cells wide."""
    conv5 = torch.randn(2, 256, 13, 13)
    pool5 = F.max_pool2d(conv5, 3, 2, ceil_mode=True)
    assert pool5.shape == (2, 256, 6, 6)
    assert torch.equal(spp_pool_maps(conv5, (6,)), pool5.flatten(1))  # (C, H, W) order: Caffe's fc6 input


def test_caffenet_grouped_convs_match_a_hand_split(nets):
    """group 2 = two convs side by side: the first half of the filters sees the first half of the
    input channels, the second half the second (Caffe's grouping, consecutive halves)."""
    net = nets["caffenet"]
    torch.manual_seed(1)
    for conv, hw in ((net.conv2, 27), (net.conv4, 13), (net.conv5, 13)):
        x = torch.randn(2, conv.in_channels, hw, hw, dtype=torch.float64)
        w, b = conv.weight.double(), conv.bias.double()
        ci, co = conv.in_channels // 2, conv.out_channels // 2
        ref = torch.cat([F.conv2d(x[:, :ci], w[:co], b[:co], padding=conv.padding),
                         F.conv2d(x[:, ci:], w[co:], b[co:], padding=conv.padding)], dim=1)
        with torch.no_grad():
            got = conv.double()(x)
        conv.float()
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def _caffe_across_channel_lrn(x, size, alpha, beta, k):
    """Caffe's CrossChannelForward written out: scale_c = k + alpha / size * sum of x_j^2 over
    j in [c - (size - 1) / 2, c + (size - 1) / 2] inside the channels; y = x * scale^-beta."""
    out = torch.empty_like(x)
    r, C = (size - 1) // 2, x.shape[1]
    for c in range(C):
        s = sum(x[:, j] ** 2 for j in range(max(0, c - r), min(C, c + r + 1)))
        out[:, c] = x[:, c] * (k + alpha / size * s) ** -beta
    return out


@pytest.mark.parametrize("size, alpha, beta, k", [(5, 1e-4, 0.75, 1.0), (3, 0.3, 0.75, 2.0), (5, 0.02, 0.5, 1.0)])
def test_cross_channel_lrn_matches_caffe_formula_and_torch(size, alpha, beta, k):
    torch.manual_seed(0)
    x = torch.randn(2, 9, 4, 5, dtype=torch.float64) * 60  # pixel-sized values: the LRN acts
    ref = _caffe_across_channel_lrn(x, size, alpha, beta, k)
    assert (ref - x).abs().max() > 1  # not the identity at these magnitudes
    ours = CrossChannelLRN(size, alpha, beta, k)
    torch.testing.assert_close(ours(x), ref, rtol=1e-12, atol=1e-12)
    # torch's own nn.LocalResponseNorm divides alpha by size too: the same function.
    torch.testing.assert_close(torch.nn.LocalResponseNorm(size, alpha, beta, k)(x), ref, rtol=1e-12, atol=1e-12)
    xl = x.float().contiguous(memory_format=torch.channels_last)  # the trunk's format
    torch.testing.assert_close(ours(xl).double(), ref, rtol=1e-5, atol=1e-4)


def test_cross_channel_lrn_gradient():
    x = torch.randn(1, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(CrossChannelLRN(5, alpha=0.3, beta=0.75, k=2.0), (x,))


def test_caffenet_preprocess_is_bgr_minus_ilsvrc_mean(nets):
    img = np.random.default_rng(0).integers(0, 256, (2, 3, 3), dtype=np.uint8)
    out = nets["caffenet"].preprocess(img)
    expected = img.transpose(2, 0, 1) - np.array(CAFFE_ILSVRC12_MEAN_BGR)[:, None, None]  # channel 0 blue
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-5)
    assert nets["caffenet"].preprocessing()["std"] == [1.0] * 3


def test_caffenet_has_no_torchvision_weights():
    with pytest.raises(SppdetError, match="torchvision has no caffenet weights; convert the released R-CNN"):
        build_backbone("caffenet", weights="imagenet")
    with pytest.raises(SppdetError, match="only supported for zf5"):
        build_backbone("caffenet", width=0.5)


# ----------------------------------------------------------------------------- geometry

def test_conv_geometry_zf5_prototxt():
    zf5 = [(7, 2, 1, False), (3, 2, 0, True), (5, 2, 0, False), (3, 2, 0, True)] + [(3, 1, 1, False)] * 3
    assert conv_geometry(zf5) == (16, 20.0, 139)
    assert conv_geometry([]) == (1, 0.0, 1)
    assert conv_geometry([(2, 2, 0, False)]) == (2, 0.5, 2)


def _ones_chain_support(layers, length, unit):
    """Slow reference: input pixels that reach `unit` through a 1-D all-ones linear copy of the
    layer stack (every tap connected), as (first, last)."""
    x = torch.zeros(1, 1, length, dtype=torch.float64, requires_grad=True)
    y = x
    for k, s, p, _ in layers:
        y = F.conv1d(F.pad(y, (p, p)), torch.ones(1, 1, k, dtype=torch.float64), stride=s)
    y[0, 0, unit].backward()
    support = torch.nonzero(x.grad[0, 0]).flatten()
    return support.min().item(), support.max().item()


@pytest.mark.parametrize("name", list(BACKBONES))
def test_geometry_matches_receptive_field_reference(nets, name):
    net = nets[name]
    assert (net.stride, net.center0, net.receptive_field) == GEOMETRY[name]
    for unit in (12, 13):  # interior units: their fields do not touch the border
        first, last = _ones_chain_support(net.layers, 800, unit)
        assert last - first + 1 == net.receptive_field
        assert (first + last) / 2 == net.center0 + net.stride * unit


# ----------------------------------------------------------------------------- torchvision trunks

@pytest.mark.parametrize("name, channels", [("alexnet", 256), ("vgg16", 512), ("resnet50", 1024)])
def test_torchvision_trunk_shapes(nets, name, channels):
    net = nets[name]
    assert net.out_channels == channels
    for hw in [(64, 64), (67, 99)]:
        with torch.no_grad():
            y = net(torch.randn(1, 3, *hw))
        assert y.shape == (1, channels, *net.map_size(*hw))
    if name != "alexnet":
        assert net.map_size(224, 224) == (14, 14)


def test_alexnet_stride_16(nets):
    net = nets["alexnet"]
    with torch.no_grad():
        sizes = [net(torch.randn(1, 3, s, s)).shape[-1] for s in (224, 240, 256)]
    assert sizes == [13, 14, 15]  # 16 more input pixels -> one more conv5 unit
    assert sizes == [net.map_size(s, s)[0] for s in (224, 240, 256)]
    # The last unit's centre lies inside the image, the next one would not fit a full stride.
    assert net.center0 + 16 * (sizes[0] - 1) <= 223 < net.center0 + 16 * sizes[0] + 16


def test_resnet_batchnorm_is_frozen(nets):
    net = nets["resnet50"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y_eval = net(x)
        net.train()
        y_train = net(x)
        net.eval()
    torch.testing.assert_close(y_train, y_eval, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["zf5", "caffenet"])
def test_channels_last_matches_contiguous(nets, name):
    net, x = nets[name], torch.randn(2, 3, 100, 120) * 50
    with torch.no_grad():
        y0 = net.use_channels_last(False)(x)
        y1 = net.use_channels_last(True)(x)
    assert net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert y0.is_contiguous() and y1.is_contiguous()
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5 * y0.abs().max().item())


# ----------------------------------------------------------------------------- preprocessing

def test_preprocess_zf5_is_bgr_minus_128(nets):
    img = np.random.default_rng(0).integers(0, 256, (2, 3, 3), dtype=np.uint8)
    out = nets["zf5"].preprocess(img)
    assert out.dtype == torch.float32 and out.shape == (3, 2, 3)
    expected = img.transpose(2, 0, 1).astype(np.float32) - 128  # channel 0 stays blue
    np.testing.assert_array_equal(out.numpy(), expected)
    batch = nets["zf5"].preprocess(np.stack([img, img[::-1]]))
    assert batch.shape == (2, 3, 2, 3)
    np.testing.assert_array_equal(batch[1].numpy(), expected[:, ::-1])


def test_preprocess_torchvision_is_rgb_imagenet_normalised(nets):
    img = np.array([[[0, 128, 255], [10, 20, 30]]], dtype=np.uint8)  # 1x2 BGR
    out = nets["vgg16"].preprocess(img)
    assert out.dtype == torch.float32 and out.shape == (3, 1, 2)
    # Pixel 0 is R=255, G=128, B=0.
    expected0 = [(1 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0 - 0.406) / 0.225]
    np.testing.assert_allclose(out[:, 0, 0].numpy(), expected0, rtol=1e-6)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = (img[..., ::-1] / 255.0 - mean) / std
    np.testing.assert_allclose(out.numpy(), expected.transpose(2, 0, 1), rtol=1e-6, atol=1e-6)


def test_preprocess_rejects_non_uint8(nets):
    with pytest.raises(ValueError, match="uint8"):
        nets["zf5"].preprocess(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        nets["zf5"].preprocess(np.zeros((4, 4), np.uint8))


# ----------------------------------------------------------------------------- weights

def _equal_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_random_init_is_seeded():
    torch.manual_seed(3)
    a = build_backbone("zf5", width=0.25)
    torch.manual_seed(3)
    b = build_backbone("zf5", width=0.25)
    c = build_backbone("zf5", width=0.25)
    assert _equal_state(a, b) and not _equal_state(a, c)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model+module."])
def test_zf5_weights_round_trip(tmp_path, wrap):
    torch.manual_seed(1)
    src = build_backbone("zf5")
    state = src.state_dict()
    obj = {"plain": state, "state_dict": {"state_dict": state, "epoch": 3},
           "model+module.": {"model": {f"module.{k}": v for k, v in state.items()}}}[wrap]
    torch.save(obj, tmp_path / "zf5.pth")
    torch.manual_seed(2)
    net = build_backbone("zf5", weights=str(tmp_path / "zf5.pth"))
    assert _equal_state(net, src)


def test_alexnet_loads_full_torchvision_state_dict(tmp_path, nets):
    torch.manual_seed(4)
    tv = torchvision.models.alexnet(weights=None).eval()
    torch.save(tv.state_dict(), tmp_path / "alexnet.pth")  # includes classifier.*, ignored
    net = build_backbone("alexnet", weights=str(tmp_path / "alexnet.pth")).eval()
    assert torch.equal(net.features[0].weight, tv.features[0].weight)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(net(x), tv.features[:-1](x))


def test_resnet50_loads_torchvision_state_dict_with_batchnorm(tmp_path):
    torch.manual_seed(5)
    tv = torchvision.models.resnet50(weights=None).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a wrong mapping would show
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    torch.save(tv.state_dict(), tmp_path / "r50.pth")
    net = build_backbone("resnet50", weights=str(tmp_path / "r50.pth"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x)))))))
        torch.testing.assert_close(net(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_mismatched_weights_name_file_and_keys(tmp_path):
    state = build_backbone("zf5").state_dict()
    state["conv1.weight"] = torch.zeros(48, 3, 7, 7)
    del state["conv5.bias"]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(SppdetError) as e:
        build_backbone("zf5", weights=str(path))
    msg = str(e.value)
    assert str(path) in msg and "conv5.bias" in msg
    assert "conv1.weight: expected (96, 3, 7, 7), found (48, 3, 7, 7)" in msg
    assert "\n" not in msg


def test_weights_file_errors(tmp_path):
    with pytest.raises(SppdetError, match="no such file"):
        build_backbone("zf5", weights=str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SppdetError, match="junk.pth: cannot read"):
        build_backbone("zf5", weights=str(tmp_path / "junk.pth"))
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(SppdetError, match="list.pth: expected a state dict"):
        build_backbone("zf5", weights=str(tmp_path / "list.pth"))


def test_imagenet_weights_offline_error(monkeypatch):
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.AlexNet_Weights, "get_state_dict", offline)
    with pytest.raises(SppdetError, match=r"model\.weights=/path/to/file\.pth") as e:
        build_backbone("alexnet", weights="imagenet")
    assert "alexnet" in str(e.value) and "\n" not in str(e.value)


def test_imagenet_weights_use_torchvision_state_dict(monkeypatch):
    torch.manual_seed(6)
    tv_state = torchvision.models.alexnet(weights=None).state_dict()
    monkeypatch.setattr(torchvision.models.AlexNet_Weights, "get_state_dict",
                        lambda self, *args, **kwargs: tv_state)
    net = build_backbone("alexnet", weights="imagenet")
    assert torch.equal(net.features[10].bias, tv_state["features.10.bias"])


def test_build_errors():
    with pytest.raises(SppdetError, match="imagenet.*local|convert"):
        build_backbone("zf5", weights="imagenet")
    with pytest.raises(SppdetError, match="only supported for zf5"):
        build_backbone("vgg16", width=0.5)
    with pytest.raises(SppdetError, match="resnet50"):
        build_backbone("zf6")


def test_weights_meta_sets_the_preprocessing_and_a_narrow_zf5_loads(tmp_path):
    torch.manual_seed(7)
    src = build_backbone("zf5", width=0.25)
    meta = {"input": {"bgr": False, "mean": [1.0, 2.0, 3.0], "std": [4.0, 5.0, 6.0]}}
    torch.save({"state_dict": src.state_dict(), "meta": meta}, tmp_path / "w.pth")
    net = build_backbone("zf5", width=0.25, weights=str(tmp_path / "w.pth"))
    assert net.preprocessing() == {"bgr": False, "mean": [1.0, 2.0, 3.0], "std": [4.0, 5.0, 6.0]}
    image = np.array([[[10, 20, 30]]], np.uint8)  # BGR
    np.testing.assert_allclose(net.preprocess(image)[:, 0, 0].numpy(), [(30 - 1) / 4, (20 - 2) / 5, (10 - 3) / 6],
                               rtol=1e-6)
    assert torch.equal(net.conv3.weight, src.conv3.weight)
    with pytest.raises(SppdetError, match="conv1.weight: expected"):  # another width does not fit
        build_backbone("zf5", width=0.5, weights=str(tmp_path / "w.pth"))
