"""Caffe models in, sppdet weights out, without Caffe installed.

    read_caffemodel(path)    .caffemodel (binary NetParameter) -> CaffeModel (layers with numpy blobs)
    read_blobproto(path)     .binaryproto (one BlobProto, e.g. a mean image) -> numpy array
    read_prototxt(path)      deploy .prototxt (protobuf text format) -> NetDef
    convert(model, arch)     -> (state_dict with sppdet's keys, meta)
    convert_file(...)        the above from files to `torch.save({"state_dict", "meta"})`
    PrototxtNet(net, sd)     a small runner for checking a conversion in PyTorch

Three generations of the binary format are read (layers keep their order):
  V0 (2013/early 2014, R-CNN release 1): NetParameter.layers entries hold a nested layer message
     with a string type ("conv", "innerproduct", ...);
  V1 (2014, `layers` with an enum type: SPP_net, R-CNN, Fast R-CNN era Caffe);
  V2 (2015+, `layer` with a string type "Convolution", ...).
Blob shapes come either from the legacy num/channels/height/width fields (always 4-D: an
InnerProduct weight is (1, 1, out, in), a bias (1, 1, 1, out)) or from BlobShape (true rank);
data is float32 (packed or not) or float64.

Field numbers of caffe.proto used here (read from BVLC caffe's src/caffe/proto/caffe.proto as
stored in a public index; facts only, nothing copied). Wire types: 0 varint, 1 fixed64,
2 length-delimited, 5 fixed32.
  NetParameter:      name 1, layers 2 (V1/V0), input 3, input_dim 4, layer 100 (V2)
  LayerParameter:    name 1, type 2 (string), bottom 3, top 4, blobs 7            (V2)
  V1LayerParameter:  layer 1 (a V0 message), bottom 2, top 3, name 4, type 5 (enum), blobs 6
  V0LayerParameter:  name 1, type 2 (string), blobs 50
  BlobProto:         num 1, channels 2, height 3, width 4, data 5 (float), diff 6 (skipped),
                     shape 7 (BlobShape), double_data 8, double_diff 9 (skipped)
  BlobShape:         dim 1 (int64, packed or not)
  V1 LayerType enum: see V1_TYPES below.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .utils import SppdetError, atomic_path

# V1LayerParameter.LayerType values -> the V2 type string of the same layer.
V1_TYPES = {
    0: "None", 1: "Accuracy", 2: "BNLL", 3: "Concat", 4: "Convolution", 5: "Data", 6: "Dropout",
    7: "EuclideanLoss", 8: "Flatten", 9: "HDF5Data", 10: "HDF5Output", 11: "Im2col",
    12: "ImageData", 13: "InfogainLoss", 14: "InnerProduct", 15: "LRN",
    16: "MultinomialLogisticLoss", 17: "Pooling", 18: "ReLU", 19: "Sigmoid", 20: "Softmax",
    21: "SoftmaxWithLoss", 22: "Split", 23: "TanH", 24: "WindowData", 25: "Eltwise", 26: "Power",
    27: "SigmoidCrossEntropyLoss", 28: "HingeLoss", 29: "MemoryData", 30: "ArgMax",
    31: "Threshold", 32: "DummyData", 33: "Slice", 34: "MVN", 35: "AbsVal", 36: "Silence",
    37: "ContrastiveLoss", 38: "Exp", 39: "Deconvolution",
}
# The same enum by name, as V1 prototxts spell it (type: CONVOLUTION).
V1_TYPE_NAMES = {re.sub(r"[^A-Z0-9]", "", v.upper()): v for v in V1_TYPES.values()}
V1_TYPE_NAMES.update({"INNERPRODUCT": "InnerProduct", "SOFTMAXLOSS": "SoftmaxWithLoss"})
# V0 type strings (R-CNN release 1, SPP_net's model-defs) -> V2.
V0_TYPES = {
    "conv": "Convolution", "pool": "Pooling", "innerproduct": "InnerProduct",
    "inner_product": "InnerProduct", "relu": "ReLU", "lrn": "LRN", "dropout": "Dropout",
    "softmax": "Softmax", "softmax_loss": "SoftmaxWithLoss", "concat": "Concat",
    "flatten": "Flatten", "padding": "Padding", "data": "Data", "images": "ImageData",
    "window_data": "WindowData", "accuracy": "Accuracy", "split": "Split", "sigmoid": "Sigmoid",
    "tanh": "TanH", "euclidean_loss": "EuclideanLoss", "multinomial_logistic_loss":
    "MultinomialLogisticLoss", "infogain_loss": "InfogainLoss", "bnll": "BNLL",
}


# ============================================================================ binary reader

@dataclass
class CaffeLayer:
    """One layer of a caffemodel: its V2 type name and its blobs (numpy, float32 or float64).

    `legacy` is True when the blob shapes came from the 4-D num/channels/height/width fields."""
    name: str
    type: str
    bottoms: list[str] = field(default_factory=list)
    tops: list[str] = field(default_factory=list)
    blobs: list[np.ndarray] = field(default_factory=list)
    legacy: bool = False


@dataclass
class CaffeModel:
    """A parsed NetParameter: `format` is "V0", "V1" or "V2"; layers in file order."""
    name: str
    format: str
    layers: list[CaffeLayer]
    source: str = "<bytes>"

    def layer(self, name: str) -> CaffeLayer | None:
        """The last layer called `name` (Caffe lets a later definition win), or None."""
        found = [l for l in self.layers if l.name == name]
        return found[-1] if found else None


class _Corrupt(Exception):
    """Raised inside the reader; turned into one SppdetError line naming the file."""


class _Wire:
    """Cursor over protobuf wire format in buf[pos:end] (a bytes-like object, never copied)."""

    def __init__(self, buf, pos: int = 0, end: int | None = None) -> None:
        self.buf, self.pos, self.end = buf, pos, len(buf) if end is None else end

    def done(self) -> bool:
        return self.pos >= self.end

    def varint(self) -> int:
        result, shift, buf = 0, 0, self.buf
        while True:
            if self.pos >= self.end:
                raise _Corrupt(f"truncated varint at byte {self.pos}")
            b = buf[self.pos]
            self.pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result
            shift += 7
            if shift > 63:
                raise _Corrupt(f"varint longer than 10 bytes at byte {self.pos}")

    def key(self) -> tuple[int, int]:
        """(field number, wire type) of the next field."""
        k = self.varint()
        field_no, wire = k >> 3, k & 7
        if field_no == 0 or wire not in (0, 1, 2, 5):  # 3/4 are groups, never used by Caffe
            raise _Corrupt(f"invalid field key {k} at byte {self.pos}")
        return field_no, wire

    def span(self) -> tuple[int, int]:
        """(start, end) of a length-delimited payload; the cursor moves past it."""
        n = self.varint()
        start = self.pos
        if start + n > self.end:
            raise _Corrupt(f"field of {n} bytes at byte {start} runs past the end "
                           f"({self.end - start} bytes left)")
        self.pos += n
        return start, start + n

    def sub(self) -> "_Wire":
        start, end = self.span()
        return _Wire(self.buf, start, end)

    def string(self) -> str:
        start, end = self.span()
        return bytes(self.buf[start:end]).decode("utf-8", errors="replace")

    def skip(self, wire: int) -> None:
        if wire == 0:
            self.varint()
        elif wire == 2:
            self.span()
        else:
            n = 8 if wire == 1 else 4
            if self.pos + n > self.end:
                raise _Corrupt(f"truncated fixed{8 * n} at byte {self.pos}")
            self.pos += n

    def fixed_run(self, tag: int, size: int, dtype: str) -> np.ndarray:
        """Values of an unpacked repeated fixed32/64 field whose one-byte key `tag` was just
        read: the run of consecutive [tag, value] records, read as one strided numpy view (a
        Python loop over millions of floats would take seconds)."""
        first, stride = self.pos, size + 1
        if first + size > self.end:
            raise _Corrupt(f"truncated fixed{8 * size} at byte {first}")
        avail = (self.end - first - size) // stride + 1  # complete records, the first included
        # Record i has its key at first - 1 + i * stride; the run ends at the first other key.
        keys = np.frombuffer(self.buf, np.uint8, count=(avail - 1) * stride + 1, offset=first - 1)[::stride]
        same = keys == tag
        n = avail if same.all() else int(np.argmin(same))
        values = np.ndarray((n,), dtype=dtype, buffer=self.buf, offset=first, strides=(stride,))
        self.pos = first + n * stride - 1  # the next key
        return values


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _read_blob(w: _Wire) -> tuple[np.ndarray, bool]:
    """BlobProto -> (array of its shape, legacy-shape flag). float data stays float32, double
    data float64; arrays are views into the file buffer (copy before writing to them)."""
    legacy = [0, 0, 0, 0]
    shape: list[int] | None = None
    chunks: list[np.ndarray] = []
    while not w.done():
        f, wire = w.key()
        if f in (1, 2, 3, 4) and wire == 0:           # num, channels, height, width
            legacy[f - 1] = _signed64(w.varint())
        elif f == 5 and wire == 2:                      # data, packed float
            s, e = w.span()
            if (e - s) % 4:
                raise _Corrupt(f"packed float data of {e - s} bytes at byte {s}")
            chunks.append(np.frombuffer(w.buf, "<f4", count=(e - s) // 4, offset=s))
        elif f == 5 and wire == 5:                      # data, unpacked float: key 0x2D each
            chunks.append(w.fixed_run(0x2D, 4, "<f4"))
        elif f == 8 and wire == 2:                      # double_data, packed
            s, e = w.span()
            if (e - s) % 8:
                raise _Corrupt(f"packed double data of {e - s} bytes at byte {s}")
            chunks.append(np.frombuffer(w.buf, "<f8", count=(e - s) // 8, offset=s))
        elif f == 8 and wire == 1:                      # double_data, unpacked: key 0x41 each
            chunks.append(w.fixed_run(0x41, 8, "<f8"))
        elif f == 7 and wire == 2:                      # shape: BlobShape
            shape, sw = [], w.sub()
            while not sw.done():
                sf, swire = sw.key()
                if sf == 1 and swire == 2:              # dim, packed int64
                    pw = sw.sub()
                    while not pw.done():
                        shape.append(_signed64(pw.varint()))
                elif sf == 1 and swire == 0:
                    shape.append(_signed64(sw.varint()))
                else:
                    sw.skip(swire)
        else:
            w.skip(wire)
    data = chunks[0] if len(chunks) == 1 else (
        np.concatenate(chunks) if chunks else np.zeros(0, np.float32))
    is_legacy = shape is None
    dims = tuple(legacy) if is_legacy else tuple(shape)
    if is_legacy and dims == (0, 0, 0, 0):
        dims = (data.size,)  # no shape at all: a flat vector
    if math.prod(dims) != data.size:
        raise _Corrupt(f"blob of shape {dims} holds {data.size} values")
    return data.reshape(dims), is_legacy


def _read_layer_v2(w: _Wire) -> CaffeLayer:
    layer = CaffeLayer("", "")
    flags = []
    while not w.done():
        f, wire = w.key()
        if wire == 2 and f == 1:
            layer.name = w.string()
        elif wire == 2 and f == 2:
            layer.type = w.string()
        elif wire == 2 and f == 3:
            layer.bottoms.append(w.string())
        elif wire == 2 and f == 4:
            layer.tops.append(w.string())
        elif wire == 2 and f == 7:
            arr, legacy = _read_blob(w.sub())
            layer.blobs.append(arr)
            flags.append(legacy)
        else:
            w.skip(wire)
    layer.legacy = any(flags)
    return layer


def _read_layer_v0(w: _Wire, layer: CaffeLayer) -> None:
    """The nested V0 layer message: name, type string, blobs."""
    flags = []
    while not w.done():
        f, wire = w.key()
        if wire == 2 and f == 1:
            layer.name = w.string()
        elif wire == 2 and f == 2:
            t = w.string()
            layer.type = V0_TYPES.get(t.lower(), t)
        elif wire == 2 and f == 50:
            arr, legacy = _read_blob(w.sub())
            layer.blobs.append(arr)
            flags.append(legacy)
        else:
            w.skip(wire)
    layer.legacy = any(flags)


def _read_layer_v1(w: _Wire) -> tuple[CaffeLayer, bool]:
    """A NetParameter.layers entry: V1 (enum type) or V0 (nested layer in field 1).
    Returns (layer, is_v0)."""
    layer = CaffeLayer("", "")
    flags, is_v0 = [], False
    while not w.done():
        f, wire = w.key()
        if wire == 2 and f == 1:
            _read_layer_v0(w.sub(), layer)
            is_v0 = True
        elif wire == 2 and f == 2:
            layer.bottoms.append(w.string())
        elif wire == 2 and f == 3:
            layer.tops.append(w.string())
        elif wire == 2 and f == 4:
            layer.name = w.string()
        elif wire == 0 and f == 5:
            t = w.varint()
            layer.type = V1_TYPES.get(t, f"V1:{t}")
        elif wire == 2 and f == 6:
            arr, legacy = _read_blob(w.sub())
            layer.blobs.append(arr)
            flags.append(legacy)
        else:
            w.skip(wire)
    layer.legacy = layer.legacy or any(flags)
    return layer, is_v0


def parse_caffemodel(data, source: str = "<bytes>") -> CaffeModel:
    """Binary NetParameter bytes -> CaffeModel. Any malformation -> SppdetError naming `source`."""
    try:
        w = _Wire(data)
        name, layers, kinds = "", [], set()
        while not w.done():
            f, wire = w.key()
            if f == 1 and wire == 2:
                name = w.string()
            elif f == 100 and wire == 2:
                layers.append(_read_layer_v2(w.sub()))
                kinds.add("V2")
            elif f == 2 and wire == 2:
                layer, is_v0 = _read_layer_v1(w.sub())
                layers.append(layer)
                kinds.add("V0" if is_v0 else "V1")
            else:
                w.skip(wire)
    except _Corrupt as e:
        raise SppdetError(f"{source}: truncated or not a Caffe model ({e})") from None
    if not layers:
        raise SppdetError(f"{source}: not a Caffe model (no layers found in it)")
    if any(not l.name or not l.type for l in layers):
        raise SppdetError(f"{source}: not a Caffe model (a layer without a name or type)")
    fmt = "V2" if "V2" in kinds else ("V0" if kinds == {"V0"} else "V1")
    return CaffeModel(name, fmt, layers, source)


def _read_bytes(path: str | os.PathLike, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise SppdetError(f"{path}: no such {what} file")
    return path.read_bytes()


def read_caffemodel(path: str | os.PathLike) -> CaffeModel:
    """Read a .caffemodel (any of V0/V1/V2) from `path`."""
    return parse_caffemodel(_read_bytes(path, "caffemodel"), str(path))


def read_blobproto(path: str | os.PathLike) -> np.ndarray:
    """A .binaryproto holding one BlobProto (Caffe's mean files) -> float32 array of its shape
    (legacy files: (num, channels, height, width), e.g. (1, 3, 32, 32))."""
    data = _read_bytes(path, "binaryproto")
    try:
        arr, _ = _read_blob(_Wire(data))
    except _Corrupt as e:
        raise SppdetError(f"{path}: truncated or not a BlobProto ({e})") from None
    if arr.size == 0:
        raise SppdetError(f"{path}: not a BlobProto (no data in it)")
    return arr.astype(np.float32)


# ============================================================================ prototxt (text)

# A text-format message: field name -> list of values (str, int, float, bool or Message).
Message = dict

_TOKEN = re.compile(r"""\s+|\#[^\n]*|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|[{}\[\]:<>,;]|[^\s{}\[\]:<>,;"'\#]+""")
_PUNCT = set("{}[]:<>,;")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r"}


def _tokens(text: str, source: str) -> list[str]:
    """Tokens of protobuf text format: punctuation, quoted strings, bare words; no comments."""
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            line = text.count("\n", 0, pos) + 1
            raise SppdetError(f"{source}: line {line}: cannot read prototxt near {text[pos:pos + 20]!r}")
        tok = m.group()
        if not tok[0].isspace() and tok[0] != "#":
            out.append(tok)
        pos = m.end()
    return out


def _scalar(tok: str):
    """A token's value: quoted string, bool, int, float, or (anything else) an enum name."""
    if tok[0] in "\"'":
        return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), tok[1:-1])
    if tok in ("true", "false", "True", "False"):
        return tok in ("true", "True")
    for kind in (lambda t: int(t, 0), float):
        try:
            return kind(tok)
        except ValueError:
            pass
    return tok  # an enum name such as MAX or WITHIN_CHANNEL


def parse_prototxt(text: str, source: str = "<prototxt>") -> Message:
    """Protobuf text format -> nested dicts of lists (every field may repeat; `_get` takes the
    last, as protobuf does for a singular field)."""
    toks = _tokens(text, source)
    pos = 0

    def peek() -> str:
        return toks[pos] if pos < len(toks) else ""

    def fail(msg: str):
        raise SppdetError(f"{source}: {msg} at {peek() or 'the end of the file'!r}")

    def message(close: str) -> Message:
        nonlocal pos
        msg: Message = {}
        while peek() != close:
            name = peek()
            if not name:
                fail(f"missing {close!r}")
            if name in _PUNCT or name[0] in "\"'":
                fail("expected a field name")
            pos += 1
            colon = peek() == ":"
            pos += colon
            if peek() in ("{", "<"):
                pos += 1
                msg.setdefault(name, []).append(message("}" if toks[pos - 1] == "{" else ">"))
            elif colon and peek() == "[":  # a list: [v, v, ...]
                pos += 1
                while peek() != "]":
                    msg.setdefault(name, []).append(value())
                    pos += peek() == ","
                pos += 1
            elif colon:
                msg.setdefault(name, []).append(value())
            else:
                fail(f"expected ':' or '{{' after {name!r}")
            pos += peek() in (",", ";")
        pos += 1
        return msg

    def value():
        nonlocal pos
        tok = peek()
        if not tok or tok in _PUNCT:
            fail("expected a value")
        pos += 1
        if tok[0] not in "\"'":
            return _scalar(tok)
        parts = [_scalar(tok)]  # adjacent strings concatenate
        while peek()[:1] in ("\"", "'"):
            parts.append(_scalar(peek()))
            pos += 1
        return "".join(parts)

    return message("")


def _get(msg: Message, key: str, default=None):
    vals = msg.get(key)
    return vals[-1] if vals else default


@dataclass
class LayerDef:
    """A prototxt layer: V2 type name, and its parameters flattened into one dict of lists
    (convolution_param / pooling_param / ... and V0's inline fields merged; V0 spellings such
    as kernelsize are renamed)."""
    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    params: Message

    def p(self, key: str, default=None):
        return _get(self.params, key, default)


@dataclass
class NetDef:
    """A parsed deploy prototxt: inputs (name -> shape) and layers in order."""
    name: str
    inputs: dict[str, tuple[int, ...]]
    layers: list[LayerDef]


_V0_RENAMES = {"kernelsize": "kernel_size", "biasterm": "bias_term"}  # V0 inline spellings
_DATA_TYPES = {"Input", "Data", "ImageData", "WindowData", "MemoryData", "DummyData", "HDF5Data"}


def _flatten_params(msg: Message, skip: set[str]) -> Message:
    out: Message = {}
    for key, vals in msg.items():
        if key in skip:
            continue
        if key.endswith("_param") and vals and isinstance(vals[-1], dict):
            for k, v in vals[-1].items():  # nested *_param: its fields, last message wins
                out[_V0_RENAMES.get(k, k)] = v
        else:
            out[_V0_RENAMES.get(key, key)] = vals
    return out


def _test_phase(msg: Message) -> bool:
    """False for layers only in the TRAIN phase (include { phase: TRAIN })."""
    inc = [_get(r, "phase") for r in msg.get("include", [])]
    exc = [_get(r, "phase") for r in msg.get("exclude", [])]
    return not (inc and all(p in ("TRAIN", 0) for p in inc)) and "TEST" not in exc and 1 not in exc


def netdef_from_message(msg: Message, source: str = "<prototxt>") -> NetDef:
    """A parsed prototxt message (see parse_prototxt) -> NetDef; V0, V1 and V2 layouts."""
    inputs: dict[str, tuple[int, ...]] = {}
    names = [n for n in msg.get("input", [])]
    dims = [int(d) for d in msg.get("input_dim", [])]
    shapes = [tuple(int(d) for d in s.get("dim", [])) for s in msg.get("input_shape", [])]
    for i, n in enumerate(names):
        inputs[n] = shapes[i] if i < len(shapes) else tuple(dims[4 * i: 4 * i + 4])
    layers = []
    structural = {"name", "type", "bottom", "top", "include", "exclude", "layer", "param",
                  "blobs_lr", "weight_decay", "loss_weight", "phase", "propagate_down", "blobs"}
    for key in ("layer", "layers"):
        for lm in msg.get(key, []):
            inner = _get(lm, "layer")
            if isinstance(inner, dict):  # V0: layers { layer { name type ... } bottom top }
                t = str(_get(inner, "type", ""))
                ltype, body = V0_TYPES.get(t.lower(), t), inner
            else:
                t, body = _get(lm, "type", ""), lm
                if key == "layer":  # V2: the type string itself
                    ltype = str(t)
                elif isinstance(t, int):  # V1 enum written as its number
                    ltype = V1_TYPES.get(t, f"V1:{t}")
                else:  # V1 enum name: INNER_PRODUCT -> InnerProduct
                    ltype = V1_TYPE_NAMES.get(str(t).replace("_", ""), str(t))
            if not _test_phase(lm):
                continue
            ld = LayerDef(str(_get(body, "name", "")), ltype, [str(b) for b in lm.get("bottom", [])],
                          [str(t) for t in lm.get("top", [])], _flatten_params(body, structural))
            if ltype == "Input":
                for top, s in zip(ld.tops, lm.get("input_param", [{}])[-1].get("shape", [])):
                    inputs[top] = tuple(int(d) for d in s.get("dim", []))
            layers.append(ld)
    if not layers:
        raise SppdetError(f"{source}: no layers in this prototxt")
    return NetDef(str(_get(msg, "name", "")), inputs, layers)


def read_prototxt(path: str | os.PathLike) -> NetDef:
    """Read a deploy/test .prototxt (V0, V1 or V2 layout)."""
    path = Path(path)
    if not path.is_file():
        raise SppdetError(f"{path}: no such prototxt file")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise SppdetError(f"{path}: not a prototxt (binary; the .caffemodel goes first on the "
                          f"command line)") from None
    return netdef_from_message(parse_prototxt(text, str(path)), str(path))


# ============================================================================ runner

def _pair(ld: LayerDef, name: str, default: int) -> tuple[int, int]:
    """(h, w) of a conv/pool size parameter: name_h/name_w, or name (repeated: h, w)."""
    h, w = ld.p(name + "_h"), ld.p(name + "_w")
    if h is not None and w is not None:
        return int(h), int(w)
    vals = ld.params.get(name) or [default]
    return (int(vals[0]), int(vals[-1])) if len(vals) <= 2 else (int(vals[0]), int(vals[1]))


class PrototxtNet(nn.Module):
    """Runs a NetDef in PyTorch (test phase) with weights keyed `<layer>.weight` / `<layer>.bias`
    (what `convert(..., arch="raw")` writes). Layer types: Convolution (groups, dilation),
    Pooling (MAX/AVE with Caffe's ceil rounding, global), InnerProduct, ReLU, LRN (across and
    within channels), Softmax, Dropout (identity), Flatten, Concat, Split, Padding (V0),
    Sigmoid, TanH. Data layers only name the inputs; losses and Accuracy are skipped.

    forward(*inputs) -> the last layer's top; blobs(*inputs) -> {blob name: tensor}.
    Inputs are (N, C, H, W) float tensors, in the order of the prototxt's inputs.
    """

    _SKIP = {"Accuracy", "Silence", "SoftmaxWithLoss", "EuclideanLoss", "HingeLoss",
             "InfogainLoss", "MultinomialLogisticLoss", "SigmoidCrossEntropyLoss", "ContrastiveLoss"}

    def __init__(self, net: NetDef, weights: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        from .backbones import WithinChannelLRN  # the same Caffe WITHIN_CHANNEL LRN as ZF-5's

        self.net = net
        self.input_names = list(net.inputs) or [
            l.tops[0] for l in net.layers if l.type in _DATA_TYPES and l.tops][:1]
        self._params: dict[str, list[str]] = {}
        self._lrn_within: dict[str, nn.Module] = {}
        for i, ld in enumerate(net.layers):
            if ld.type in ("Convolution", "InnerProduct"):
                names = []
                for part in ("weight", "bias"):
                    key = f"{ld.name}.{part}"
                    if key in weights:
                        self.register_buffer(f"p{i}_{part}", weights[key].detach().float().clone())
                        names.append(f"p{i}_{part}")
                    elif part == "weight" or ld.p("bias_term", True):
                        raise SppdetError(f"layer {ld.name}: no {key} in the weights")
                self._params[ld.name] = names
            elif ld.type == "LRN" and str(ld.p("norm_region", "ACROSS_CHANNELS")) in ("WITHIN_CHANNEL", "1"):
                self._lrn_within[ld.name] = WithinChannelLRN(
                    int(ld.p("local_size", 5)), float(ld.p("alpha", 1.0)), float(ld.p("beta", 0.75)))

    def _tensors(self, ld: LayerDef) -> list[torch.Tensor]:
        return [getattr(self, n) for n in self._params[ld.name]]

    def _run(self, ld: LayerDef, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        t, x = ld.type, xs[0]
        if t == "Convolution":
            w, *b = self._tensors(ld)
            return [F.conv2d(x, w, b[0] if b else None, _pair(ld, "stride", 1), _pair(ld, "pad", 0),
                             _pair(ld, "dilation", 1), int(ld.p("group", 1)))]
        if t == "Pooling":
            k = tuple(x.shape[-2:]) if ld.p("global_pooling", False) else _pair(ld, "kernel_size", 1)
            s, p = _pair(ld, "stride", 1), _pair(ld, "pad", 0)
            ceil = str(ld.p("round_mode", "CEIL")) in ("CEIL", "0")  # Caffe's default: ceil
            if str(ld.p("pool", "MAX")) in ("MAX", "0"):
                return [F.max_pool2d(x, k, s, p, ceil_mode=ceil)]
            if str(ld.p("pool")) in ("AVE", "1"):
                # Caffe divides by the window clipped to the padded input: count_include_pad.
                return [F.avg_pool2d(x, k, s, p, ceil_mode=ceil, count_include_pad=True)]
            raise SppdetError(f"layer {ld.name}: pooling {ld.p('pool')} is not supported")
        if t == "InnerProduct":
            w, *b = self._tensors(ld)
            axis = int(ld.p("axis", 1))
            w = w.t() if ld.p("transpose", False) else w
            return [F.linear(x.flatten(axis), w.reshape(w.shape[0], -1), b[0] if b else None)]
        if t == "ReLU":
            slope = float(ld.p("negative_slope", 0.0))
            return [F.leaky_relu(x, slope) if slope else F.relu(x)]
        if t == "LRN":
            if ld.name in self._lrn_within:
                return [self._lrn_within[ld.name](x)]
            # Caffe ACROSS_CHANNELS: x / (k + alpha / n * sum over n channels of x^2)^beta,
            # which is torch's local_response_norm.
            return [F.local_response_norm(x, int(ld.p("local_size", 5)), float(ld.p("alpha", 1.0)),
                                          float(ld.p("beta", 0.75)), float(ld.p("k", 1.0)))]
        if t == "Softmax":
            return [F.softmax(x, dim=int(ld.p("axis", 1)))]
        if t == "Dropout":
            return [x]  # test phase: Caffe's dropout scales at training time, identity here
        if t == "Flatten":
            return [x.flatten(int(ld.p("axis", 1)))]
        if t == "Concat":
            return [torch.cat(xs, dim=int(ld.p("axis", ld.p("concat_dim", 1))))]
        if t == "Split":
            return [x] * len(ld.tops)
        if t == "Padding":
            p = int(ld.p("pad", 0))
            return [F.pad(x, (p, p, p, p))]
        if t == "Sigmoid":
            return [torch.sigmoid(x)]
        if t == "TanH":
            return [torch.tanh(x)]
        raise SppdetError(f"layer {ld.name}: type {t} is not supported by PrototxtNet")

    def blobs(self, *inputs: torch.Tensor, stop_after: str | None = None) -> dict[str, torch.Tensor]:
        """Every blob the net computes, by name; `stop_after`: the last layer to run."""
        if len(inputs) != len(self.input_names):
            raise SppdetError(f"{len(inputs)} inputs given, the net has {self.input_names}")
        env = dict(zip(self.input_names, inputs))
        self._last = self.input_names[0]
        for ld in self.net.layers:
            if ld.type in _DATA_TYPES or ld.type in self._SKIP:
                continue  # data layers only name inputs; losses and accuracy need labels
            if not all(b in env for b in ld.bottoms):
                missing = [b for b in ld.bottoms if b not in env]
                raise SppdetError(f"layer {ld.name}: input blob(s) {missing} are never produced")
            for top, y in zip(ld.tops, self._run(ld, [env[b] for b in ld.bottoms])):
                env[top] = y
            self._last = ld.tops[0] if ld.tops else self._last
            if ld.name == stop_after:
                break
        return env

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        env = self.blobs(*inputs)
        return env[self._last]


# ============================================================================ conversion

def _vgg16_names() -> dict[str, str]:
    """conv1_1 .. conv5_3 -> torchvision's features indices (each conv is followed by a ReLU,
    each block by a max pool): 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28."""
    out, idx = {}, 0
    for block, convs in enumerate((2, 2, 3, 3, 3), start=1):
        for i in range(1, convs + 1):
            out[f"conv{block}_{i}"] = f"features.{idx}"
            idx += 2
        idx += 1
    return out


# Caffe layer name -> sppdet trunk module name.
TRUNK_NAMES = {
    "zf5": {f"conv{i}": f"conv{i}" for i in range(1, 6)},
    "caffenet": {f"conv{i}": f"conv{i}" for i in range(1, 6)},
    "alexnet": {"conv1": "features.0", "conv2": "features.3", "conv3": "features.6",
                "conv4": "features.8", "conv5": "features.10"},
    "vgg16": _vgg16_names(),
}
# Pixel preprocessing each release expects, BGR means in 0..255 units, no std scaling:
#   zf5: SPP_net subtracts a constant 128 (PAPER.md 1.6, utils/caffe_anysize_test.m);
#   caffenet: R-CNN subtracts Caffe's ILSVRC-2012 mean image; these are its per-channel
#     averages (B, G, R), the constant BVLC publishes for models trained with it
#     (sppdet.backbones.CAFFE_ILSVRC12_MEAN_BGR, the caffenet trunk's default);
#   alexnet: the same mean, for a Caffe AlexNet that happens to fit torchvision's layout;
#   vgg16: Fast R-CNN's cfg.PIXEL_MEANS (lib/fast_rcnn/config.py).
INPUT_MEANS = {
    "zf5": [128.0, 128.0, 128.0],
    "caffenet": [104.00698793, 116.66876762, 122.67891434],
    "alexnet": [104.00698793, 116.66876762, 122.67891434],
    "vgg16": [102.9801, 115.9465, 122.7717],
}
# The SPP concat order of the released ZF-5 prototxt (model-defs/Zeiler_conv5.prototxt:
# spm1, spm2, spm3, spm6), used for a 12800-wide fc6 when no prototxt says otherwise.
ZF5_SPP_ORDER = (1, 2, 3, 6)
FC_NAMES = ("fc6", "fc7")


def _param_array(layer: CaffeLayer, index: int) -> np.ndarray:
    """Blob `index` of `layer` in torch's layout (a view where possible): conv weights 4-D
    (out, in/groups, kh, kw) as stored; InnerProduct weights (out, in) (legacy blobs are
    (1, 1, out, in)); conv/fc biases 1-D; other legacy blobs lose their leading 1s."""
    arr = layer.blobs[index]
    if layer.type in ("Convolution", "InnerProduct", "Deconvolution") and index == 1:
        arr = arr.reshape(-1)
    elif layer.type == "InnerProduct" and index == 0:
        if layer.legacy and arr.ndim == 4 and arr.shape[0] * arr.shape[1] == 1:
            arr = arr.reshape(arr.shape[2], arr.shape[3])
        elif arr.ndim != 2:
            arr = arr.reshape(arr.shape[0], -1)
    elif layer.type not in ("Convolution", "Deconvolution") and layer.legacy:
        while arr.ndim > 1 and arr.shape[0] == 1:
            arr = arr[0]
    return arr


def _param_tensor(layer: CaffeLayer, index: int) -> torch.Tensor:
    """_param_array as a float32 tensor that owns its memory (never the file buffer)."""
    return torch.from_numpy(np.array(_param_array(layer, index), dtype=np.float32))


def raw_state_dict(model: CaffeModel) -> dict[str, torch.Tensor]:
    """Every layer with blobs as `<layer>.weight`, `<layer>.bias` (and `<layer>.blob<i>` for
    any further blobs), in torch layout (see _param_tensor)."""
    sd = {}
    for layer in model.layers:
        for i in range(len(layer.blobs)):
            part = ("weight", "bias")[i] if i < 2 else f"blob{i}"
            sd[f"{layer.name}.{part}"] = _param_tensor(layer, i)
    return sd


def _trunk_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of sppdet's trunk `arch`, built on the meta device (no init cost)."""
    from .backbones import build_backbone

    with torch.device("meta"):
        net = build_backbone(arch, weights="none")
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _fits(model: CaffeModel, arch: str) -> bool:
    """Whether every trunk layer `arch` needs is in `model` with the shapes sppdet's trunk has."""
    want = _trunk_shapes(arch)
    for caffe_name, key in TRUNK_NAMES[arch].items():
        layer = model.layer(caffe_name)
        if layer is None or len(layer.blobs) < 2:
            return False
        if any(tuple(_param_array(layer, i).shape) != want[f"{key}.{part}"]
               for i, part in enumerate(("weight", "bias"))):
            return False
    return True


def detect_arch(model: CaffeModel) -> str:
    """"zf5", "caffenet", "alexnet" or "vgg16" from the layer names and conv1's kernel, else
    "unknown". An 11x11 conv1 is R-CNN's CaffeNet when the shapes fit sppdet's caffenet trunk
    (96-256-384-384-256, grouped conv2/4/5), else AlexNet; for the others whether the shapes
    fit is checked by `convert`."""
    with_blobs = {l.name: l for l in model.layers if l.blobs}
    if all(n in with_blobs for n in TRUNK_NAMES["vgg16"]):
        return "vgg16"
    if all(f"conv{i}" in with_blobs for i in range(1, 6)):
        k = with_blobs["conv1"].blobs[0].shape[-1]
        if k == 11:
            return "caffenet" if _fits(model, "caffenet") else "alexnet"
        return {7: "zf5"}.get(k, "unknown")
    return "unknown"


def _spp_order_from_net(net: NetDef, model: CaffeModel, fc6: CaffeLayer) -> tuple[int, ...] | None:
    """The pyramid levels feeding fc6, in the order of the prototxt's concat: traced from fc6's
    bottom through the Concat to each input's (N, C, n, n) shape, found by running the net on
    the meta device (shapes only) up to that concat. None when fc6 is not fed by a Concat."""
    producers = {t: ld for ld in net.layers for t in ld.tops if t not in ld.bottoms}
    ld6 = next((ld for ld in net.layers if ld.name == fc6.name), None)
    concat = producers.get(ld6.bottoms[0]) if ld6 and ld6.bottoms else None
    if concat is None or concat.type != "Concat" or not net.inputs:
        return None
    srcs = []
    for b in concat.bottoms:  # step back through Flatten layers to the pooled map
        while b in producers and producers[b].type == "Flatten":
            b = producers[b].bottoms[0]
        srcs.append(b)
    upto = net.layers.index(concat)
    sub = NetDef(net.name, net.inputs, net.layers[:upto])
    weights = {f"{l.name}.{('weight', 'bias')[i]}": torch.empty(_param_array(l, i).shape, device="meta")
               for l in model.layers for i in range(min(2, len(l.blobs)))}  # shapes only, no copies
    runner = PrototxtNet(sub, weights)
    shapes = [tuple(net.inputs[n]) for n in runner.input_names]
    if any(len(s) != 4 for s in shapes):
        return None
    env = runner.blobs(*(torch.empty(s, device="meta") for s in shapes))
    levels = []
    for b in srcs:
        s = tuple(env[b].shape)
        if len(s) != 4 or s[2] != s[3]:
            raise SppdetError(f"layer {concat.name}: input {b} has shape {s}, not a square pyramid level")
        levels.append(s[2])
    return tuple(levels)


def _reorder_columns(w: torch.Tensor, channels: int, src: Sequence[int], dst: Sequence[int]) -> torch.Tensor:
    """fc6 weight (out, C * sum n^2) with level blocks in order `src` (each block (C, n, n)
    flattened) -> the same weight with its blocks in order `dst`."""
    blocks, start = {}, 0
    for n in src:
        blocks[n] = w[:, start:start + channels * n * n]
        start += channels * n * n
    return torch.cat([blocks[n] for n in dst], dim=1).contiguous()


def convert(model: CaffeModel, arch: str = "auto", net: NetDef | None = None,
            spp_order: Sequence[int] | None = None, mean: Sequence[float] | None = None,
            log: Callable[[str], None] = print) -> tuple[dict[str, torch.Tensor], dict]:
    """CaffeModel -> (state_dict, meta) in the format `model.weights` reads.

    arch: "zf5" | "caffenet" | "alexnet" | "vgg16" map conv layers onto sppdet's trunk keys (zf5,
    caffenet: conv1..conv5; alexnet (torchvision's layout): features.0/3/6/8/10; vgg16:
    features.0 .. features.28) plus fc6/fc7 as torch Linear (out, in) when present; every shape
    is checked against sppdet's trunk and a misfit is one SppdetError naming the layer (and the
    --arch that would fit, e.g. caffenet for R-CNN's CaffeNet given as alexnet). "auto" picks by
    names and shapes and falls back to "raw" (with a note) when the shapes do not fit; "raw"
    writes `<layer>.weight` / `.bias` for every layer with blobs.

    A ZF-5 fc6 is reordered from the Caffe concat order (from `net`, or `spp_order`, or the
    released Zeiler_conv5 order 1, 2, 3, 6) to sppdet's (6, 3, 2, 1); meta["levels"] records the
    pyramid fc6 expects (caffenet/alexnet/vgg16: the one level n with C * n^2 = fc6's input, e.g.
    CaffeNet's 9216 = 256 x 6 x 6: Caffe flattens pool5 in (C, H, W) order, sppdet's order for a
    one-level pyramid, so no column reordering).
    Channel order stays Caffe's BGR; meta["input"] gives the mean to subtract (0..255 units).
    """
    if arch not in ("auto", "raw", *TRUNK_NAMES):
        raise SppdetError(f"--arch {arch!r} is unknown; choose auto, raw, {', '.join(TRUNK_NAMES)}")
    meta: dict = {"source": "caffe", "arch": "unknown", "caffemodel": Path(model.source).name,
                  "format": model.format, "input": None, "levels": None}
    chosen = detect_arch(model) if arch == "auto" else arch
    if chosen == "unknown":
        log(f"architecture not recognised (layers: {', '.join(l.name for l in model.layers if l.blobs)})")
    if chosen in TRUNK_NAMES:
        try:
            sd, levels, spp_meta = _convert_known(model, chosen, net, spp_order, log)
        except SppdetError as e:
            if arch != "auto":
                other = detect_arch(model)
                if other != arch and other in TRUNK_NAMES and _fits(model, other):
                    hint = ("R-CNN's CaffeNet (grouped 96-256-384-384-256 convs)" if other == "caffenet"
                            else other)
                    raise SppdetError(f"{e}; this model's layers fit {hint}: use --arch {other}") from None
                raise
            log(f"note: the layer names look like {chosen}, but {e}; writing Caffe's own names (raw)")
            mean = mean or INPUT_MEANS[chosen]  # the release's preprocessing is still known
            chosen = "unknown"
        else:
            meta.update(arch=chosen, levels=levels, **spp_meta)
            meta["input"] = {"bgr": True, "mean": list(mean or INPUT_MEANS[chosen]), "std": [1.0, 1.0, 1.0]}
            return sd, meta
    sd = raw_state_dict(model)
    for layer in model.layers:
        parts = [f"{k} {tuple(v.shape)}" for k, v in sd.items() if k.rsplit(".", 1)[0] == layer.name]
        if parts:
            log(f"  {layer.name} -> {', '.join(parts)}")
    if mean is not None:
        meta["input"] = {"bgr": True, "mean": list(mean), "std": [1.0, 1.0, 1.0]}
    return sd, meta


def _convert_known(model: CaffeModel, arch: str, net: NetDef | None,
                   spp_order: Sequence[int] | None, log) -> tuple[dict, list | None, dict]:
    want = _trunk_shapes(arch)
    names = TRUNK_NAMES[arch]
    sd: dict[str, torch.Tensor] = {}
    lines = []
    for caffe_name, key in names.items():
        layer = model.layer(caffe_name)
        if layer is None or not layer.blobs:
            raise SppdetError(f"layer {caffe_name}: not in {model.source} (needed for {arch})")
        for i, part in enumerate(("weight", "bias")):
            if i >= len(layer.blobs):
                raise SppdetError(f"layer {caffe_name}: has no {part} blob")
            t = _param_tensor(layer, i)
            if tuple(t.shape) != want[f"{key}.{part}"]:
                raise SppdetError(f"layer {caffe_name}: {part} shape {tuple(t.shape)} does not fit "
                                  f"{arch} {key}.{part} {want[f'{key}.{part}']}")
            sd[f"{key}.{part}"] = t
        lines.append(f"  {caffe_name} -> {key}.weight {tuple(sd[key + '.weight'].shape)}, "
                     f"{key}.bias {tuple(sd[key + '.bias'].shape)}")
    channels = want[f"{names[list(names)[-1]]}.weight"][0]  # conv5's output channels
    levels, spp_meta = None, {}
    fc6, fc7 = model.layer("fc6"), model.layer("fc7")
    if fc6 is not None and len(fc6.blobs) >= 2:
        w6, b6 = _param_tensor(fc6, 0), _param_tensor(fc6, 1)
        if w6.ndim != 2 or b6.shape[0] != w6.shape[0]:
            raise SppdetError(f"layer fc6: weight {tuple(w6.shape)} and bias {tuple(b6.shape)} "
                              f"are not an InnerProduct's")
        n_in = w6.shape[1]
        if arch == "zf5" and n_in != channels * 36:  # 36: a lone 6x6 level needs no reordering
            src = tuple(spp_order) if spp_order else (
                _spp_order_from_net(net, model, fc6) if net is not None else None)
            how = "--spp-order" if spp_order else "the prototxt's concat"
            if src is None:
                src, how = ZF5_SPP_ORDER, "the released Zeiler_conv5 concat"
            if channels * sum(n * n for n in src) != n_in:
                raise SppdetError(f"layer fc6: input width {n_in} is not {channels} channels x the "
                                  f"pyramid {list(src)} ({channels * sum(n * n for n in src)}); "
                                  f"pass --spp-order")
            levels = sorted(set(src), reverse=True)
            if len(levels) != len(src):
                raise SppdetError(f"layer fc6: pyramid order {list(src)} repeats a level")
            w6 = _reorder_columns(w6, channels, src, levels)
            spp_meta = {"spp_source_order": list(src)}
            note = f"    (input columns: levels {list(src)}, from {how}, reordered to sppdet's {levels})"
        else:
            n = math.isqrt(n_in // channels) if n_in % channels == 0 else 0
            if n * n * channels != n_in:
                raise SppdetError(f"layer fc6: input width {n_in} is not {channels} channels x n x n")
            levels, note = [n], f"    (input: one {n}x{n} level)"
        sd["fc6.weight"], sd["fc6.bias"] = w6, b6
        lines += [f"  fc6 -> fc6.weight {tuple(w6.shape)}, fc6.bias {tuple(b6.shape)}", note]
        if fc7 is not None and len(fc7.blobs) >= 2:
            w7, b7 = _param_tensor(fc7, 0), _param_tensor(fc7, 1)
            if w7.ndim != 2 or w7.shape[1] != w6.shape[0] or b7.shape[0] != w7.shape[0]:
                raise SppdetError(f"layer fc7: weight {tuple(w7.shape)} does not follow fc6 "
                                  f"({w6.shape[0]} outputs)")
            sd["fc7.weight"], sd["fc7.bias"] = w7, b7
            lines.append(f"  fc7 -> fc7.weight {tuple(w7.shape)}, fc7.bias {tuple(b7.shape)}")
    used = set(names) | {fc for fc in FC_NAMES if f"{fc}.weight" in sd}
    for line in lines:
        log(line)
    skipped = [f"{l.name} ({l.type}, {len(l.blobs)} blobs)" for l in model.layers
               if l.blobs and l.name not in used]
    if skipped:
        log(f"  skipped: {', '.join(skipped)}")
    return sd, levels, spp_meta


def convert_file(caffemodel: str | os.PathLike, out: str | os.PathLike,
                 prototxt: str | os.PathLike | None = None, arch: str = "auto",
                 spp_order: Sequence[int] | None = None, mean: Sequence[float] | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """Read `caffemodel` (+ optional deploy `prototxt`), convert, and write
    torch.save({"state_dict": sd, "meta": meta}) to `out` atomically. Returns meta."""
    net = read_prototxt(prototxt) if prototxt else None
    model = read_caffemodel(caffemodel)
    blobs = sum(len(l.blobs) for l in model.layers)
    log(f"{caffemodel}: {model.format} NetParameter {model.name!r}, {len(model.layers)} layers, "
        f"{blobs} blobs")
    sd, meta = convert(model, arch, net, spp_order, mean, log)
    with atomic_path(out) as tmp:
        torch.save({"state_dict": sd, "meta": meta}, tmp)
    log(f"wrote {out}: arch {meta['arch']}, {len(sd)} tensors"
        + (f", fc6 levels {meta['levels']}" if meta["levels"] else ""))
    return meta
