"""Caffe importer: the binary reader against a writer of our own (V0, V1, V2 layouts), ZF-5 and
R-CNN CaffeNet conversion into sppdet's trunks, the real LeNet / CIFAR-10 models, and bad input."""
from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision

from sppdet import caffe
from sppdet.backbones import ZF5, CaffeNetTrunk, build_backbone
from sppdet.spp import spp_pool_maps
from sppdet.utils import SppdetError, run_cli

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "convert_caffe.py"
CAFFE_DATA = REPO.parent / "shared" / "data" / "caffe"

# ----------------------------------------------------------------------------- a tiny writer
# Protobuf wire format by hand: key = field << 3 | wire type (0 varint, 1 fixed64,
# 2 length-delimited, 5 fixed32). Field numbers as documented in sppdet/caffe.py.


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _ld(field: int, payload: bytes | str) -> bytes:
    payload = payload.encode() if isinstance(payload, str) else payload
    return _key(field, 2) + _varint(len(payload)) + payload


def _vi(field: int, n: int) -> bytes:
    return _key(field, 0) + _varint(n)


def _unpacked(field: int, wire: int, arr: np.ndarray, dtype: str) -> bytes:
    """Each value as its own [key, value] record, the way a non-packed repeated field is written."""
    vals = np.ascontiguousarray(arr, dtype=dtype).reshape(-1).view(np.uint8).reshape(arr.size, -1)
    key = np.frombuffer(_key(field, wire), np.uint8)
    return np.hstack([np.tile(key, (arr.size, 1)), vals]).tobytes()


def blob(arr: np.ndarray, form: str) -> bytes:
    """BlobProto for `arr`. form: "legacy" (num/channels/height/width, packed floats),
    "packed", "unpacked" (BlobShape, floats), "double", "double_unpacked" (BlobShape, doubles);
    the unpacked forms put the shape after the data, so the reader must find the run's end."""
    if form == "legacy":
        dims = (1,) * (4 - arr.ndim) + arr.shape
        head = b"".join(_vi(f, d) for f, d in zip((1, 2, 3, 4), dims))
        return head + _ld(5, arr.astype("<f4").tobytes())
    shape = _ld(7, _ld(1, b"".join(_varint(d) for d in arr.shape)))
    if form == "packed":
        return shape + _ld(5, arr.astype("<f4").tobytes())
    if form == "unpacked":
        dims_unpacked = _ld(7, b"".join(_vi(1, d) for d in arr.shape))  # BlobShape dims unpacked too
        return _unpacked(5, 5, arr, "<f4") + dims_unpacked
    if form == "double":
        return shape + _ld(8, arr.astype("<f8").tobytes())
    if form == "double_unpacked":
        return _unpacked(8, 1, arr, "<f8") + shape
    raise ValueError(form)


def layer_v2(name, type_, blobs=(), bottoms=(), tops=(), form="packed") -> bytes:
    body = _ld(1, name) + _ld(2, type_) + b"".join(_ld(3, b) for b in bottoms) + b"".join(_ld(4, t) for t in tops)
    forms = form if isinstance(form, (list, tuple)) else [form] * len(blobs)
    return _ld(100, body + b"".join(_ld(7, blob(a, f)) for a, f in zip(blobs, forms)))


def layer_v1(name, type_enum, blobs=(), bottoms=(), tops=()) -> bytes:
    body = b"".join(_ld(2, b) for b in bottoms) + b"".join(_ld(3, t) for t in tops)
    body += _ld(4, name) + _vi(5, type_enum) + b"".join(_ld(6, blob(a, "legacy")) for a in blobs)
    return _ld(2, body)


def layer_v0(name, type_, blobs=(), bottoms=(), tops=()) -> bytes:
    inner = _ld(1, name) + _ld(2, type_) + b"".join(_ld(50, blob(a, "legacy")) for a in blobs)
    return _ld(2, _ld(1, inner) + b"".join(_ld(2, b) for b in bottoms) + b"".join(_ld(3, t) for t in tops))


def netparam(layers: list[bytes], name: str = "net") -> bytes:
    return _ld(1, name) + b"".join(layers)


CONV, INNER_PRODUCT, RELU = 4, 14, 18  # V1LayerParameter.LayerType values


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


# ----------------------------------------------------------------------------- round trips

def _special(shape, dtype, seed) -> np.ndarray:
    """Random values with the awkward ones in front: -0.0, inf, nan, a denormal."""
    a = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    flat = a.reshape(-1)
    flat[:4] = [-0.0, np.inf, np.nan, np.finfo(dtype).smallest_subnormal]
    return a


def test_v2_round_trip_all_blob_forms():
    w = _special((5, 3, 2, 2), np.float32, 0)
    ip = _special((7, 12), np.float32, 1)
    d = _special((4, 3), np.float64, 2)
    data = netparam([
        layer_v2("data", "Input", tops=["data"]),
        layer_v2("c1", "Convolution", [w, w[:, 0, 0, 0]], ["data"], ["c1"], form=["packed", "unpacked"]),
        layer_v2("fc", "InnerProduct", [ip, d, d[0]], ["c1"], ["fc"], form=["unpacked", "double", "double_unpacked"]),
    ], name="v2net")
    m = caffe.parse_caffemodel(data)
    assert (m.format, m.name) == ("V2", "v2net")
    assert [(l.name, l.type, l.bottoms, l.tops, l.legacy) for l in m.layers] == [
        ("data", "Input", [], ["data"], False), ("c1", "Convolution", ["data"], ["c1"], False),
        ("fc", "InnerProduct", ["c1"], ["fc"], False)]
    got = m.layer("c1").blobs + m.layer("fc").blobs
    for a, b in zip(got, [w, w[:, 0, 0, 0], ip, d, d[0]]):
        assert _bits_equal(a, np.ascontiguousarray(b)), (a.shape, b.shape, a.dtype)


def test_v1_round_trip_legacy_dims_and_enum_types():
    w = _special((6, 2, 3, 3), np.float32, 3)
    ip = _special((4, 54), np.float32, 4)
    data = netparam([
        layer_v1("conv1", CONV, [w, w[:, 0, 0, 0]], ["data"], ["conv1"]),
        layer_v1("relu1", RELU, [], ["conv1"], ["conv1"]),
        layer_v1("fc", INNER_PRODUCT, [ip, ip[:, 0]], ["conv1"], ["fc"]),
    ])
    m = caffe.parse_caffemodel(data)
    assert m.format == "V1"
    assert [(l.name, l.type) for l in m.layers] == [("conv1", "Convolution"), ("relu1", "ReLU"), ("fc", "InnerProduct")]
    conv, fc = m.layer("conv1"), m.layer("fc")
    assert conv.legacy and [b.shape for b in conv.blobs] == [(6, 2, 3, 3), (1, 1, 1, 6)]
    assert [b.shape for b in fc.blobs] == [(1, 1, 4, 54), (1, 1, 1, 4)]
    # Torch layout: fc weight (out, in), biases 1-D; values bit-exact.
    sd = caffe.raw_state_dict(m)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "conv1.weight": (6, 2, 3, 3), "conv1.bias": (6,), "fc.weight": (4, 54), "fc.bias": (4,)}
    for key, ref in [("conv1.weight", w), ("conv1.bias", w[:, 0, 0, 0]), ("fc.weight", ip), ("fc.bias", ip[:, 0])]:
        assert _bits_equal(sd[key].numpy(), np.ascontiguousarray(ref))


def test_v0_round_trip_nested_layers():
    """R-CNN / SPP_net 2014 releases: layers { layer { name type blobs } bottom top }."""
    w = _special((3, 1, 2, 2), np.float32, 5)
    m = caffe.parse_caffemodel(netparam([layer_v0("conv1", "conv", [w, w[:, 0, 0, 0]], ["data"], ["conv1"]),
                                         layer_v0("fc6", "innerproduct", [w.reshape(3, 4)], ["conv1"], ["fc6"])]))
    assert m.format == "V0"
    assert [(l.name, l.type, l.bottoms, l.tops) for l in m.layers] == [
        ("conv1", "Convolution", ["data"], ["conv1"]), ("fc6", "InnerProduct", ["conv1"], ["fc6"])]
    assert _bits_equal(m.layer("conv1").blobs[0], w)
    assert tuple(caffe.raw_state_dict(m)["fc6.weight"].shape) == (3, 4)


def test_binaryproto_mean(tmp_path):
    mean = _special((1, 3, 4, 5), np.float32, 6)
    (tmp_path / "mean.binaryproto").write_bytes(blob(mean, "legacy"))
    assert _bits_equal(caffe.read_blobproto(tmp_path / "mean.binaryproto"), mean)


def test_prototxt_text_parser():
    """V1 (enum types) and V0 (nested layer, inline params) entries; V2 in a second file
    (Caffe refuses a net mixing `layer` and `layers`)."""
    old = caffe.netdef_from_message(caffe.parse_prototxt('''
        name: "n"  # comment
        input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
        layers { name: "c" type: CONVOLUTION bottom: "data" top: "c"
                 convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 1e-2 } } }
        layers { layer { name: "p" type: "pool" pool: MAX kernelsize: 3 stride: 2 } bottom: "c" top: "p" }
        layers { name: "t" type: DROPOUT bottom: "p" top: "t" include { phase: TRAIN } }
    '''))
    assert old.inputs == {"data": (1, 3, 8, 8)}
    assert [(l.name, l.type, l.bottoms, l.tops) for l in old.layers] == [
        ("c", "Convolution", ["data"], ["c"]), ("p", "Pooling", ["c"], ["p"])]
    c, p = old.layers
    assert (c.p("num_output"), c.p("pad"), c.p("weight_filler")["std"]) == (4, 1, [0.01])
    assert (p.p("pool"), p.p("kernel_size"), p.p("stride")) == ("MAX", 3, 2)
    new = caffe.netdef_from_message(caffe.parse_prototxt('''
        layer { name: "in" type: "Input" top: "x" input_param { shape: { dim: 2 dim: 5 } } }
        layer { name: "s" type: "Softmax" bottom: "x" top: "s" softmax_param: { axis: 1 } include { phase: TEST } }
        layer { name: "m" type: 'Dropout' bottom: "s" top: "s" dropout_param { dropout_ratio: 0.5; } }
    '''))
    assert new.inputs == {"x": (2, 5)}
    assert [(l.name, l.type) for l in new.layers] == [("in", "Input"), ("s", "Softmax"), ("m", "Dropout")]
    assert new.layers[1].p("axis") == 1 and new.layers[2].p("dropout_ratio") == 0.5


def _caffe_pool(x: np.ndarray, k: int, s: int, pad: int, ave: bool) -> np.ndarray:
    """Caffe's pooling written out: ceil output size (minus one when the last window would start
    in the padding), AVE divided by the window clipped to the padded input, MAX over real cells."""
    def size(n: int) -> int:
        last = int(np.ceil((n + 2 * pad - k) / s))  # index of the last window
        return last + 1 - (pad > 0 and last * s >= n + pad)

    c, h, w = x.shape
    out = np.zeros((c, size(h), size(w)))
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            y0, x0 = i * s - pad, j * s - pad
            y1, x1 = min(y0 + k, h + pad), min(x0 + k, w + pad)
            area = (y1 - y0) * (x1 - x0)
            win = x[:, max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)]
            out[:, i, j] = win.sum((1, 2)) / area if ave else win.max((1, 2))
    return out


def _caffe_lrn(x: np.ndarray, n: int, alpha: float, beta: float, k: float, within: bool) -> np.ndarray:
    c, h, w = x.shape
    sq, r = x.astype(np.float64) ** 2, (n - 1) // 2
    if within:  # 1 + alpha * mean of x^2 over an n x n zero-padded window
        p = np.pad(sq, ((0, 0), (r, r), (r, r)))
        avg = sum(p[:, dy:dy + h, dx:dx + w] for dy in range(n) for dx in range(n)) / n ** 2
        return x * (1 + alpha * avg) ** -beta
    scale = np.stack([k + alpha / n * sq[max(0, i - r):i + r + 1].sum(0) for i in range(c)])
    return x * scale ** -beta


def test_runner_pooling_lrn_softmax_match_caffe_formulas():
    net = caffe.netdef_from_message(caffe.parse_prototxt('''
        input: "x" input_shape { dim: 1 dim: 5 dim: 7 dim: 8 }
        layer { name: "mp" type: "Pooling" bottom: "x" top: "mp"
                pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
        layer { name: "ap" type: "Pooling" bottom: "x" top: "ap"
                pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
        layer { name: "ap0" type: "Pooling" bottom: "x" top: "ap0" pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
        layer { name: "la" type: "LRN" bottom: "x" top: "la" lrn_param { local_size: 3 alpha: 0.3 beta: 0.75 k: 2 } }
        layer { name: "lw" type: "LRN" bottom: "x" top: "lw"
                lrn_param { local_size: 3 alpha: 0.3 beta: 0.75 norm_region: WITHIN_CHANNEL } }
        layer { name: "sm" type: "Softmax" bottom: "x" top: "sm" }
    '''))
    x = np.random.default_rng(9).standard_normal((5, 7, 8)).astype(np.float32) * 2
    with torch.no_grad():
        got = caffe.PrototxtNet(net, {}).blobs(torch.from_numpy(x)[None])
    want = {"mp": _caffe_pool(x, 3, 2, 1, False), "ap": _caffe_pool(x, 3, 2, 1, True),
            "ap0": _caffe_pool(x, 2, 2, 0, True), "la": _caffe_lrn(x, 3, 0.3, 0.75, 2.0, False),
            "lw": _caffe_lrn(x, 3, 0.3, 0.75, 1.0, True),
            "sm": np.exp(x) / np.exp(x).sum(0, keepdims=True)}
    assert want["ap0"].shape == (5, 4, 4)  # ceil: the last window overhangs the 7 rows
    for name, ref in want.items():
        np.testing.assert_allclose(got[name][0].double().numpy(), ref, rtol=1e-5, atol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------- ZF-5

ZF5_SHAPES = {"conv1": (96, 3, 7, 7), "conv2": (256, 96, 5, 5), "conv3": (384, 256, 3, 3),
              "conv4": (384, 384, 3, 3), "conv5": (256, 384, 3, 3)}
FC6_OUT = 16  # a narrow fc6 (the real one is 4096 wide) keeps the file small


@pytest.fixture(scope="module")
def zf5_caffe(tmp_path_factory):
    """A V1 caffemodel with the released ZF-5's layer names and conv shapes, random weights,
    and an fc6 (FC6_OUT x 12800) / fc7 whose fc6 sees the pyramid in Caffe's order 1, 2, 3, 6."""
    rng = np.random.default_rng(7)
    tensors = {}
    layers = []
    for name, shape in ZF5_SHAPES.items():
        w = (rng.standard_normal(shape) * (2 / np.prod(shape[1:])) ** 0.5).astype(np.float32)
        b = rng.standard_normal(shape[0]).astype(np.float32) * 0.1
        tensors[name] = (w, b)
        layers.append(layer_v1(name, CONV, [w, b], [], [name]))
        layers.append(layer_v1(name.replace("conv", "relu"), RELU, [], [name], [name]))
    for name, shape in (("fc6", (FC6_OUT, 12800)), ("fc7", (8, FC6_OUT)), ("fc8", (5, 8))):
        w, b = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape[0]).astype(np.float32)
        tensors[name] = (w, b)
        layers.append(layer_v1(name, INNER_PRODUCT, [w, b], [], [name]))
    path = tmp_path_factory.mktemp("zf5") / "Zeiler_conv5.caffemodel"
    path.write_bytes(netparam(layers, "ImageNet_Zeiler"))
    return path, tensors


def test_zf5_conversion_gives_the_same_conv5(zf5_caffe, tmp_path):
    path, tensors = zf5_caffe
    out = tmp_path / "zf5.pth"
    lines = []
    meta = caffe.convert_file(path, out, arch="auto", log=lines.append)
    assert meta["arch"] == "zf5" and meta["input"] == {"bgr": True, "mean": [128.0] * 3, "std": [1.0] * 3}
    assert any("skipped: fc8" in line for line in lines)
    saved = torch.load(out, weights_only=True)
    assert set(saved["state_dict"]) == {f"conv{i}.{p}" for i in range(1, 6) for p in ("weight", "bias")} | {
        "fc6.weight", "fc6.bias", "fc7.weight", "fc7.bias"}

    loaded = build_backbone("zf5", weights=str(out)).eval()  # the file model.weights reads
    ref = ZF5().eval()
    missing, unexpected = ref.load_state_dict(
        {f"{n}.{p}": torch.from_numpy(t[i]) for n, t in tensors.items() if n.startswith("conv")
         for i, p in enumerate(("weight", "bias"))}, strict=False)
    assert not unexpected and all(k.startswith("pixel_") for k in missing)  # only preprocessing buffers
    x = ref.preprocess(np.random.default_rng(8).integers(0, 256, (1, 100, 120, 3), dtype=np.uint8))
    with torch.no_grad():
        a, b = loaded(x), ref(x)
    assert a.shape == (1, 256, 5, 6) and torch.equal(a, b)


def test_zf5_fc6_sees_sppdet_pyramid_order(zf5_caffe, tmp_path):
    """fc6 on sppdet's (6, 3, 2, 1) pooling equals Caffe's fc6 on its spm1, spm2, spm3, spm6 concat."""
    path, tensors = zf5_caffe
    sd, meta = caffe.convert(caffe.read_caffemodel(path), "zf5", log=lambda s: None)
    assert meta["levels"] == [6, 3, 2, 1] and meta["spp_source_order"] == [1, 2, 3, 6]
    conv5 = torch.randn(2, 256, 13, 13)
    caffe_x = torch.cat([spp_pool_maps(conv5, (n,)) for n in (1, 2, 3, 6)], dim=1)
    ours_x = spp_pool_maps(conv5, (6, 3, 2, 1))
    w6, b6 = (torch.from_numpy(t).double() for t in tensors["fc6"])
    # float64: the two sums run over the 12800 columns in different orders
    torch.testing.assert_close(ours_x.double() @ sd["fc6.weight"].double().T + sd["fc6.bias"].double(),
                               caffe_x.double() @ w6.T + b6)
    assert torch.equal(sd["fc7.weight"], torch.from_numpy(tensors["fc7"][0]))


def _zf5_prototxt(concat_order) -> str:
    """The released Zeiler_conv5.prototxt's layout (V0: layers { layer { ... } bottom top }),
    with the SPP concat in `concat_order`."""
    convs = [("conv1", 96, 7, 1, 2), ("conv2", 256, 5, 0, 2), ("conv3", 384, 3, 1, 1),
             ("conv4", 384, 3, 1, 1), ("conv5", 256, 3, 1, 1)]
    text, prev = 'input: "data"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 224\ninput_dim: 224\n', "data"
    for i, (name, n, k, pad, stride) in enumerate(convs, start=1):
        text += (f'layers {{ layer {{ name: "{name}" type: "conv" conv_param {{ num_output: {n} kernel_size: {k} '
                 f'pad: {pad} stride: {stride} }} }} bottom: "{prev}" top: "{name}" }}\n'
                 f'layers {{ layer {{ name: "relu{i}" type: "relu" }} bottom: "{name}" top: "{name}" }}\n')
        prev = name
        if i <= 2:
            text += (f'layers {{ layer {{ name: "norm{i}" type: "lrn" lrn_param {{ local_size: 3 alpha: 0.00005 '
                     f'beta: 0.75 norm_region: WITHIN_CHANNEL }} }} bottom: "{prev}" top: "norm{i}" }}\n'
                     f'layers {{ layer {{ name: "pool{i}" type: "pool" pool_param {{ kernel_size: 3 stride: 2 '
                     f'pool: MAX }} }} bottom: "norm{i}" top: "pool{i}" }}\n')
            prev = f"pool{i}"
    spm = {6: (3, 2), 3: (5, 4), 2: (7, 7), 1: (13, 13)}
    for n, (k, s) in spm.items():
        text += (f'layers {{ layer {{ name: "pool5_spm{n}" type: "pool" pool_param {{ kernel_size: {k} '
                 f'stride: {s} pool: MAX }} }} bottom: "conv5" top: "pool5_spm{n}" }}\n'
                 f'layers {{ layer {{ name: "pool5_spm{n}_flatten" type: "flatten" }} bottom: "pool5_spm{n}" '
                 f'top: "pool5_spm{n}_flatten" }}\n')
    text += ('layers { layer { name: "pool5_spm" type: "concat" concat_param { concat_dim: 1 } } '
             + "".join(f'bottom: "pool5_spm{n}_flatten" ' for n in concat_order) + 'top: "pool5_spm" }\n')
    text += 'layers { layer { name: "fc6" type: "inner_product" } bottom: "pool5_spm" top: "fc6" }\n'
    return text


@pytest.mark.parametrize("order", [(1, 2, 3, 6), (2, 6, 1, 3)])
def test_zf5_spp_order_read_from_the_prototxt(zf5_caffe, tmp_path, order):
    path, tensors = zf5_caffe
    (tmp_path / "deploy.prototxt").write_text(_zf5_prototxt(order))
    net = caffe.read_prototxt(tmp_path / "deploy.prototxt")
    sd, meta = caffe.convert(caffe.read_caffemodel(path), "auto", net, log=lambda s: None)
    assert meta["spp_source_order"] == list(order) and meta["levels"] == [6, 3, 2, 1]
    if order == (1, 2, 3, 6):  # the released V0 prototxt's layout runs as sppdet's ZF-5 does
        raw = caffe.raw_state_dict(caffe.read_caffemodel(path))
        zf5 = ZF5().eval()
        zf5.load_state_dict({k: v for k, v in raw.items() if k.startswith("conv")}, strict=False)
        x = torch.randn(1, 3, 100, 120) * 50  # smaller than the prototxt's 224: conv5 only
        with torch.no_grad():
            blobs, ref = caffe.PrototxtNet(net, raw).blobs(x, stop_after="relu5"), zf5(x)
        # float rounding only (sppdet runs channels-last): 1e-5 of the map's range
        torch.testing.assert_close(blobs["conv5"], ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    conv5 = torch.randn(1, 256, 13, 13)
    caffe_x = torch.cat([spp_pool_maps(conv5, (n,)) for n in order], dim=1)
    w6 = torch.from_numpy(tensors["fc6"][0]).double()
    torch.testing.assert_close(spp_pool_maps(conv5, (6, 3, 2, 1)).double() @ sd["fc6.weight"].double().T,
                               caffe_x.double() @ w6.T)


def test_vgg16_names_and_levels():
    """Fast R-CNN's VGG16 layer names map to torchvision's features.<i>; fc6 (512 x 7 x 7 wide)
    is the one-level pyramid {7}. Shapes only matter here: zero-size-cheap constant blobs."""
    widths = [(64, 3), (64, 64), (128, 64), (128, 128), (256, 128), (256, 256), (256, 256),
              (512, 256), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
    names = list(caffe.TRUNK_NAMES["vgg16"])
    zeros = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    layers = [caffe.CaffeLayer(n, "Convolution", blobs=[zeros(o, i, 3, 3), zeros(o)]) for n, (o, i) in zip(names, widths)]
    layers.append(caffe.CaffeLayer("fc6", "InnerProduct", blobs=[zeros(4, 25088), zeros(4)]))
    model = caffe.CaffeModel("VGG16", "V2", layers, "VGG16.v2.caffemodel")
    sd, meta = caffe.convert(model, "auto", log=lambda s: None)
    assert meta["arch"] == "vgg16" and meta["levels"] == [7]
    assert meta["input"]["mean"] == [102.9801, 115.9465, 122.7717]
    assert [k for k in sd if k.endswith("weight")] == [f"features.{i}.weight" for i in
                                                       (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)] + ["fc6.weight"]


# ----------------------------------------------------------------------------- real models

def _require(folder: str) -> Path:
    if not (CAFFE_DATA / folder).is_dir():
        pytest.skip(f"{CAFFE_DATA / folder} not present")
    return CAFFE_DATA / folder


def _load_pth(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def test_lenet_classifies_every_mnist_sample(tmp_path):
    d = _require("lenet_mnist")
    meta = caffe.convert_file(d / "lenet_iter_10000.caffemodel", tmp_path / "lenet.pth", log=lambda s: None)
    assert meta["arch"] == "unknown" and meta["format"] == "V2"
    net = caffe.PrototxtNet(caffe.read_prototxt(d / "mnist_deploy.prototxt"), _load_pth(tmp_path / "lenet.pth"))
    samples = sorted((d / "samples").glob("img_*.png"))
    x = torch.stack([torch.from_numpy(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 256)
                     for p in samples])[:, None]
    labels = [int(p.stem.split("_")[1]) for p in samples]
    with torch.no_grad():
        assert net(x).argmax(1).tolist() == labels and len(labels) == 10


def test_lenet_v1_encoding_converts_identically(tmp_path):
    """The same tensors re-encoded as a V1 file (legacy dims, enum types) convert to the same
    state dict as the V2 original."""
    d = _require("lenet_mnist")
    v2 = caffe.read_caffemodel(d / "lenet_iter_10000.caffemodel")
    enum = {"Convolution": CONV, "InnerProduct": INNER_PRODUCT}
    v1 = [layer_v1(l.name, enum[l.type], l.blobs, l.bottoms, l.tops) for l in v2.layers if l.blobs]
    (tmp_path / "lenet_v1.caffemodel").write_bytes(netparam(v1, "LeNet"))
    caffe.convert_file(d / "lenet_iter_10000.caffemodel", tmp_path / "a.pth", log=lambda s: None)
    meta = caffe.convert_file(tmp_path / "lenet_v1.caffemodel", tmp_path / "b.pth", log=lambda s: None)
    assert meta["format"] == "V1"
    a, b = _load_pth(tmp_path / "a.pth"), _load_pth(tmp_path / "b.pth")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_cifar10_quick_calls_dog4_a_dog(tmp_path):
    d = _require("cifar10_quick")
    caffe.convert_file(d / "cifar10_quick_iter_5000.caffemodel", tmp_path / "c.pth", log=lambda s: None)
    net = caffe.PrototxtNet(caffe.read_prototxt(d / "cifar10_quick.prototxt"), _load_pth(tmp_path / "c.pth"))
    mean = caffe.read_blobproto(d / "mean.binaryproto")
    assert mean.shape == (1, 3, 32, 32)
    img = cv2.imread(str(d / "dog4.png"))  # BGR, as SOURCES.md prescribes
    x = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)[None] - torch.from_numpy(mean)
    with torch.no_grad():
        prob = net(x)[0]
    assert prob.argmax().item() == 5 and prob[5] > 0.9  # CIFAR-10 class 5: dog
    assert abs(prob.sum().item() - 1) < 1e-5  # the prototxt's Softmax ran


# ----------------------------------------------------------------------------- bad input

def _script():
    spec = importlib.util.spec_from_file_location("convert_caffe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(capsys, *args) -> tuple[int, str, str]:
    """The script's main as `python scripts/convert_caffe.py ARGS` runs it (through run_cli):
    (exit status, stdout, stderr). In-process: a subprocess would spend seconds importing torch."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(_script().main, [str(a) for a in args])
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def _one_error_line(result: tuple[int, str, str]) -> str:
    code, _, err = result
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_script_bad_inputs(zf5_caffe, tmp_path, capsys):
    path, _ = zf5_caffe
    data = path.read_bytes()
    (tmp_path / "cut.caffemodel").write_bytes(data[: len(data) // 2])
    line = _one_error_line(_run(capsys, tmp_path / "cut.caffemodel", "--out", tmp_path / "x.pth"))
    assert "cut.caffemodel" in line and "truncated" in line

    (tmp_path / "deploy.prototxt").write_text(_zf5_prototxt((1, 2, 3, 6)))
    line = _one_error_line(_run(capsys, tmp_path / "deploy.prototxt", "--out", tmp_path / "x.pth"))
    assert "not a Caffe model" in line

    line = _one_error_line(_run(capsys, path, "--arch", "vgg16", "--out", tmp_path / "x.pth"))
    assert "conv1_1" in line  # names the layer vgg16 needs and this model lacks

    # A net with VGG16's names but a layer of the wrong width: one line naming that layer.
    model = caffe.read_caffemodel(path)
    wrong = netparam([layer_v1(l.name, CONV, l.blobs) for l in model.layers if l.type == "Convolution"]
                     + [layer_v1("conv3", CONV, [np.zeros((300, 256, 3, 3), np.float32), np.zeros(300, np.float32)])])
    (tmp_path / "wrong.caffemodel").write_bytes(wrong)
    line = _one_error_line(_run(capsys, tmp_path / "wrong.caffemodel", "--arch", "zf5", "--out", tmp_path / "x.pth"))
    assert "layer conv3" in line and "(300, 256, 3, 3)" in line and "(384, 256, 3, 3)" in line
    assert not (tmp_path / "x.pth").exists()


def test_script_converts_and_prints_the_mapping(tmp_path, capsys):
    w = np.ones((2, 3, 1, 1), np.float32)
    (tmp_path / "tiny.caffemodel").write_bytes(netparam([layer_v1("mix", CONV, [w, w[:, 0, 0, 0]])]))
    code, out, err = _run(capsys, tmp_path / "tiny.caffemodel", "--mean", "1,2,3", "--out", tmp_path / "t.pth")
    assert code == 0, err
    assert "mix -> mix.weight (2, 3, 1, 1)" in out
    saved = torch.load(tmp_path / "t.pth", weights_only=True)
    assert saved["meta"]["arch"] == "unknown" and saved["meta"]["input"]["mean"] == [1.0, 2.0, 3.0]
    assert torch.equal(saved["state_dict"]["mix.weight"], torch.from_numpy(w))


def test_script_as_main(tmp_path, capsys, monkeypatch):
    """The file run as __main__ (runpy, in-process: a new interpreter spends seconds importing torch)."""
    argv = [str(SCRIPT), str(tmp_path / "missing.caffemodel"), "--out", str(tmp_path / "x.pth")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'missing.caffemodel'}: no such caffemodel file"]


# ----------------------------------------------------------------------------- R-CNN's CaffeNet

# R-CNN release 1's model-defs layout (V0: inline params, padding layers before the padded convs),
# the same layers as BVLC's reference CaffeNet deploy.prototxt, cut after fc7.
RCNN_V0_PROTOTXT = """
input: "data" input_dim: 2 input_dim: 3 input_dim: 227 input_dim: 227
layers { layer { name: "conv1" type: "conv" num_output: 96 kernelsize: 11 stride: 4 } bottom: "data" top: "conv1" }
layers { layer { name: "relu1" type: "relu" } bottom: "conv1" top: "conv1" }
layers { layer { name: "pool1" type: "pool" pool: MAX kernelsize: 3 stride: 2 } bottom: "conv1" top: "pool1" }
layers { layer { name: "norm1" type: "lrn" local_size: 5 alpha: 0.0001 beta: 0.75 } bottom: "pool1" top: "norm1" }
layers { layer { name: "pad2" type: "padding" pad: 2 } bottom: "norm1" top: "pad2" }
layers { layer { name: "conv2" type: "conv" num_output: 256 group: 2 kernelsize: 5 } bottom: "pad2" top: "conv2" }
layers { layer { name: "relu2" type: "relu" } bottom: "conv2" top: "conv2" }
layers { layer { name: "pool2" type: "pool" pool: MAX kernelsize: 3 stride: 2 } bottom: "conv2" top: "pool2" }
layers { layer { name: "norm2" type: "lrn" local_size: 5 alpha: 0.0001 beta: 0.75 } bottom: "pool2" top: "norm2" }
layers { layer { name: "pad3" type: "padding" pad: 1 } bottom: "norm2" top: "pad3" }
layers { layer { name: "conv3" type: "conv" num_output: 384 kernelsize: 3 } bottom: "pad3" top: "conv3" }
layers { layer { name: "relu3" type: "relu" } bottom: "conv3" top: "conv3" }
layers { layer { name: "pad4" type: "padding" pad: 1 } bottom: "conv3" top: "pad4" }
layers { layer { name: "conv4" type: "conv" num_output: 384 group: 2 kernelsize: 3 } bottom: "pad4" top: "conv4" }
layers { layer { name: "relu4" type: "relu" } bottom: "conv4" top: "conv4" }
layers { layer { name: "pad5" type: "padding" pad: 1 } bottom: "conv4" top: "pad5" }
layers { layer { name: "conv5" type: "conv" num_output: 256 group: 2 kernelsize: 3 } bottom: "pad5" top: "conv5" }
layers { layer { name: "relu5" type: "relu" } bottom: "conv5" top: "conv5" }
layers { layer { name: "pool5" type: "pool" kernelsize: 3 pool: MAX stride: 2 } bottom: "conv5" top: "pool5" }
layers { layer { name: "fc6" type: "innerproduct" num_output: 16 } bottom: "pool5" top: "fc6" }
layers { layer { name: "relu6" type: "relu" } bottom: "fc6" top: "fc6" }
layers { layer { name: "fc7" type: "innerproduct" num_output: 8 } bottom: "fc6" top: "fc7" }
layers { layer { name: "relu7" type: "relu" } bottom: "fc7" top: "fc7" }
"""


def _bvlc_caffenet_prototxt() -> str:
    """BVLC's models/bvlc_reference_caffenet/deploy.prototxt layout (V2: pad and group inside
    convolution_param, LRN after the pools), cut after relu5."""
    text = 'input: "data" input_shape { dim: 1 dim: 3 dim: 227 dim: 227 }\n'
    prev = "data"
    for i, (n, k, s, pad, group) in enumerate([(96, 11, 4, 0, 1), (256, 5, 1, 2, 2), (384, 3, 1, 1, 1),
                                                (384, 3, 1, 1, 2), (256, 3, 1, 1, 2)], start=1):
        text += (f'layer {{ name: "conv{i}" type: "Convolution" bottom: "{prev}" top: "conv{i}" '
                 f'convolution_param {{ num_output: {n} kernel_size: {k} stride: {s} pad: {pad} group: {group} }} }}\n'
                 f'layer {{ name: "relu{i}" type: "ReLU" bottom: "conv{i}" top: "conv{i}" }}\n')
        prev = f"conv{i}"
        if i <= 2:
            text += (f'layer {{ name: "pool{i}" type: "Pooling" bottom: "conv{i}" top: "pool{i}" '
                     f'pooling_param {{ pool: MAX kernel_size: 3 stride: 2 }} }}\n'
                     f'layer {{ name: "norm{i}" type: "LRN" bottom: "pool{i}" top: "norm{i}" '
                     f'lrn_param {{ local_size: 5 alpha: 0.0001 beta: 0.75 }} }}\n')
            prev = f"norm{i}"
    return text


# CaffeNet's blob shapes: grouped conv2/4/5 hold (out, in / 2, k, k).
CAFFENET_SHAPES = {"conv1": (96, 3, 11, 11), "conv2": (256, 48, 5, 5), "conv3": (384, 256, 3, 3),
                   "conv4": (384, 192, 3, 3), "conv5": (256, 192, 3, 3)}


@pytest.fixture(scope="module")
def caffenet_caffe(tmp_path_factory):
    """A V0 caffemodel (R-CNN release 1's format) with CaffeNet's layer names and conv shapes,
    He-scaled random weights (so the LRNs act on pixel-sized inputs), and a narrow fc6
    (FC6_OUT x 9216), fc7 and fc8."""
    rng = np.random.default_rng(10)
    tensors, layers = {}, []
    shapes = {**CAFFENET_SHAPES, "fc6": (FC6_OUT, 9216), "fc7": (8, FC6_OUT), "fc8": (5, 8)}
    for name, shape in shapes.items():
        w = (rng.standard_normal(shape) * (2 / np.prod(shape[1:])) ** 0.5).astype(np.float32)
        b = rng.standard_normal(shape[0]).astype(np.float32) * 0.1
        tensors[name] = (w, b)
        layers.append(layer_v0(name, "conv" if name.startswith("conv") else "innerproduct", [w, b]))
    path = tmp_path_factory.mktemp("caffenet") / "caffe_nets_ilsvrc_2012_train_iter_310k"
    path.write_bytes(netparam(layers, "CaffeNet"))
    return path, tensors


def test_caffenet_conversion_runs_as_the_rcnn_prototxt(caffenet_caffe, tmp_path):
    """auto recognises the CaffeNet; the converted file loads into build_backbone("caffenet")
    and gives the conv5 PrototxtNet computes from the raw Caffe blobs on R-CNN's prototxt (and
    on BVLC's deploy layout); fc6/fc7 on sppdet's one-level pyramid {6} give Caffe's fc6/fc7."""
    path, tensors = caffenet_caffe
    lines = []
    meta = caffe.convert_file(path, tmp_path / "caffenet.pth", log=lines.append)
    assert (meta["arch"], meta["format"], meta["levels"]) == ("caffenet", "V0", [6])
    assert meta["input"] == {"bgr": True, "mean": caffe.INPUT_MEANS["caffenet"], "std": [1.0] * 3}
    assert tuple(meta["input"]["mean"]) == CaffeNetTrunk.mean  # the trunk's own default
    assert any("skipped: fc8" in line for line in lines)
    saved = torch.load(tmp_path / "caffenet.pth", weights_only=True)["state_dict"]
    assert set(saved) == {f"{n}.{p}" for n in (*CAFFENET_SHAPES, "fc6", "fc7") for p in ("weight", "bias")}
    for name, (w, b) in tensors.items():
        if name != "fc8":
            assert torch.equal(saved[f"{name}.weight"], torch.from_numpy(w)), name
            assert torch.equal(saved[f"{name}.bias"], torch.from_numpy(b)), name

    trunk = build_backbone("caffenet", weights=str(tmp_path / "caffenet.pth")).eval()
    assert trunk.preprocessing() == meta["input"]
    image = np.random.default_rng(11).integers(0, 256, (2, 227, 227, 3), dtype=np.uint8)
    x = trunk.preprocess(image)
    raw = caffe.raw_state_dict(caffe.read_caffemodel(path))  # Caffe's names, an independent path
    rcnn = caffe.netdef_from_message(caffe.parse_prototxt(RCNN_V0_PROTOTXT))
    with torch.no_grad():
        conv5 = trunk(x)
        blobs = caffe.PrototxtNet(rcnn, raw).blobs(x.contiguous())
        bvlc = caffe.PrototxtNet(caffe.netdef_from_message(caffe.parse_prototxt(_bvlc_caffenet_prototxt())),
                                 raw).blobs(x[:1].contiguous())
    assert conv5.shape == (2, 256, 13, 13) and blobs["pool5"].shape == (2, 256, 6, 6)
    tol = 1e-5 * conv5.abs().max().item()  # float rounding only (sppdet runs channels-last)
    torch.testing.assert_close(conv5, blobs["conv5"], rtol=0, atol=tol)
    torch.testing.assert_close(conv5[:1], bvlc["conv5"], rtol=0, atol=tol)
    # The LRNs matter at these magnitudes (a trunk without them would fail the check above).
    assert (blobs["norm1"] - blobs["pool1"]).abs().max() > 100 * tol
    # pool5 is the pyramid {6}; fc6 reads it in Caffe's (C, H, W) order, no reordering.
    pooled = spp_pool_maps(conv5, (6,))
    torch.testing.assert_close(pooled, blobs["pool5"].flatten(1), rtol=0, atol=tol)
    fc6 = torch.relu(pooled.double() @ saved["fc6.weight"].double().T + saved["fc6.bias"].double())
    fc7 = torch.relu(fc6 @ saved["fc7.weight"].double().T + saved["fc7.bias"].double())
    torch.testing.assert_close(fc6, blobs["fc6"].double(), rtol=1e-4, atol=1e-4 * fc6.abs().max().item())
    torch.testing.assert_close(fc7, blobs["fc7"].double(), rtol=1e-4, atol=1e-4 * fc7.abs().max().item())


def test_caffenet_weights_give_the_detector_its_fc6_fc7(caffenet_caffe, tmp_path):
    """model.weights = the converted file: trunk + fc6/fc7 + the pyramid {6} they were trained on."""
    from sppdet.config import ModelConfig
    from sppdet.model import build_backbone as build_model_backbone

    path, tensors = caffenet_caffe
    caffe.convert_file(path, tmp_path / "caffenet.pth", log=lambda s: None)
    m = ModelConfig(backbone="caffenet", weights=str(tmp_path / "caffenet.pth"), levels=(6,), rcnn_input_size=227)
    trunk, pretrained = build_model_backbone(m)
    assert trunk.name == "caffenet" and pretrained.levels == (6,)
    assert sorted(pretrained.fc) == ["fc6.bias", "fc6.weight", "fc7.bias", "fc7.weight"]
    assert torch.equal(pretrained.fc["fc6.weight"], torch.from_numpy(tensors["fc6"][0]))


def test_caffenet_and_alexnet_arch_errors_name_the_other(caffenet_caffe, tmp_path, capsys):
    """--arch alexnet (torchvision's 64-192-384-256-256 layout) on R-CNN's CaffeNet is one error
    line that names conv1 and suggests --arch caffenet; the converse suggests --arch alexnet."""
    path, _ = caffenet_caffe
    model = caffe.read_caffemodel(path)
    with pytest.raises(SppdetError, match=r"layer conv1: weight shape \(96, 3, 11, 11\) does not fit alexnet "
                                          r"features\.0\.weight \(64, 3, 11, 11\).*use --arch caffenet"):
        caffe.convert(model, "alexnet", log=lambda s: None)
    line = _one_error_line(_run(capsys, path, "--arch", "alexnet", "--out", tmp_path / "x.pth"))
    assert "--arch caffenet" in line and not (tmp_path / "x.pth").exists()
    code, out, err = _run(capsys, path, "--out", tmp_path / "auto.pth")  # the script's default: auto
    assert code == 0, err
    assert "conv2 -> conv2.weight (256, 48, 5, 5)" in out and "fc6 levels [6]" in out

    tv = torchvision.models.alexnet(weights=None).features  # a Caffe AlexNet in torchvision's layout
    convs = [m for m in tv if isinstance(m, torch.nn.Conv2d)]
    alex = caffe.CaffeModel("AlexNet", "V2", [
        caffe.CaffeLayer(f"conv{i}", "Convolution", blobs=[np.zeros(c.weight.shape, np.float32),
                                                           np.zeros(c.out_channels, np.float32)])
        for i, c in enumerate(convs, start=1)], "alexnet.caffemodel")
    assert caffe.detect_arch(alex) == "alexnet" and caffe.detect_arch(model) == "caffenet"
    with pytest.raises(SppdetError, match=r"layer conv1: .* does not fit caffenet .*use --arch alexnet"):
        caffe.convert(alex, "caffenet", log=lambda s: None)
    sd, meta = caffe.convert(alex, "auto", log=lambda s: None)
    assert meta["arch"] == "alexnet" and "features.10.weight" in sd


def test_caffenet_shaped_wrong_falls_back_to_raw(caffenet_caffe):
    """AlexNet's names with shapes that fit neither trunk: auto writes Caffe's names and says why."""
    path, tensors = caffenet_caffe
    model = caffe.read_caffemodel(path)
    model.layer("conv3").blobs[0] = np.zeros((300, 256, 3, 3), np.float32)
    lines = []
    sd, meta = caffe.convert(model, "auto", log=lines.append)
    assert meta["arch"] == "unknown" and meta["input"]["mean"] == caffe.INPUT_MEANS["alexnet"]
    assert any("look like alexnet" in line and "layer conv1" in line for line in lines)
    assert tuple(sd["conv3.weight"].shape) == (300, 256, 3, 3)
