"""Conv trunks (conv1..conv5, total stride 16) that produce the map SPP pools from.

`build_backbone(name, width, weights)` returns a `Backbone`:
    preprocess(image_bgr uint8 (H, W, 3) or (N, H, W, 3)) -> float32 (3, H, W) or (N, 3, H, W)
    forward(x (B, 3, H, W)) -> conv5 (B, C, H5, W5), contiguous
and the geometry the window projection needs: unit i of conv5 (0-based) has its receptive field
(`receptive_field` pixels wide) centred on image pixel `center0 + stride * i` (0-based). The
geometry is derived by walking the trunk's conv/pool layers, never typed in by hand.

Families: "zf5" (the paper's ZF-5, PAPER.md 1.1), "caffenet" (R-CNN's released CaffeNet, the
BVLC reference AlexNet variant), and torchvision "alexnet", "vgg16", "resnet50" (C4) cut at
stride 16. State-dict keys of the torchvision trunks are torchvision's own (`features.0.weight`,
`layer3.5.bn3.running_var`, ...), so a full torchvision checkpoint loads directly with its
classifier ignored; ZF-5 and CaffeNet keys are Caffe's layer names (`conv1.weight`, ...).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .utils import SppdetError

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
# Per-channel (B, G, R) average of Caffe's ILSVRC-2012 mean image (ilsvrc_2012_mean), 0..255:
# the constant BVLC publishes for models trained with that mean (CaffeNet, R-CNN).
CAFFE_ILSVRC12_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)

# (kernel, stride, padding, ceil_mode) of one conv or pool along the trunk's main path.
Layer = tuple[int, int, int, bool]


# ----------------------------------------------------------------------------- geometry

def trunk_layers(module: nn.Module) -> list[Layer]:
    """The convs and pools of `module` in registration (= data-flow) order, skipping ResNet
    `downsample` shortcuts (they share the main path's centres and have a smaller field)."""
    layers = []
    for name, m in module.named_modules():
        if "downsample" in name.split("."):
            continue
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            k, s, p = (_square(getattr(m, a), name) for a in ("kernel_size", "stride", "padding"))
            if _square(getattr(m, "dilation", 1), name) != 1:
                raise ValueError(f"{name}: dilated layers are not supported")
            layers.append((k, s, p, bool(getattr(m, "ceil_mode", False))))
    return layers


def _square(v, name: str) -> int:
    v = (v, v) if isinstance(v, int) else tuple(v)
    if v[0] != v[1]:
        raise ValueError(f"{name}: non-square kernel/stride/padding {v}")
    return int(v[0])


def conv_geometry(layers: list[Layer]) -> tuple[int, float, int]:
    """(stride, center0, receptive_field) of the last layer's units, in input pixels (0-based).

    Per layer (k, s, p): centre of unit 0 moves by ((k - 1) / 2 - p) * jump, the field grows by
    (k - 1) * jump, and the jump multiplies by s. Ceil-mode pooling only adds units at the end,
    so it changes no centre. ZF-5: (16, 20.0, 139).
    """
    jump, center0, rf = 1, 0.0, 1
    for k, s, p, _ in layers:
        center0 += ((k - 1) / 2 - p) * jump
        rf += (k - 1) * jump
        jump *= s
    return jump, center0, rf


def map_size(layers: list[Layer], n: int) -> int:
    """Output length of the layer stack for input length `n` (conv: floor; ceil-mode pool: ceil,
    with PyTorch's rule that the last window must start inside the input or left padding)."""
    for k, s, p, ceil in layers:
        out = (math.ceil if ceil else math.floor)((n + 2 * p - k) / s) + 1
        if ceil and (out - 1) * s >= n + p:
            out -= 1
        n = out
    return n


# ----------------------------------------------------------------------------- base class

# State-dict keys of the pixel preprocessing (part of a backbone's state, so checkpoints and
# converted weights carry it; optional when a plain trunk state dict is loaded).
PREPROCESS_KEYS = ("pixel_mean", "pixel_std", "pixel_bgr")


class Backbone(nn.Module):
    """A conv trunk plus its preprocessing and geometry; subclasses build the layers.

    Attributes: name, out_channels, stride (16), center0, receptive_field, rcnn_input_size,
    layers (list of (kernel, stride, pad, ceil_mode)), channels_last (see use_channels_last).
    Buffers `pixel_mean` (3,), `pixel_std` (3,) in 0..255 units and `pixel_bgr` (): the input is
    (pixel - mean) / std with channels in BGR (else RGB) order; the class defaults `bgr`, `mean`,
    `std` initialise them (`set_preprocessing` changes them, e.g. for converted Caffe weights).
    """

    name: str
    out_channels: int
    rcnn_input_size: int = 224
    bgr: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def _finish(self) -> None:
        """Derive the geometry from the layers; call at the end of a subclass __init__."""
        self.layers = trunk_layers(self)
        self.stride, self.center0, self.receptive_field = conv_geometry(self.layers)
        assert self.stride == 16, (self.name, self.stride)
        self.register_buffer("pixel_mean", torch.tensor(self.mean, dtype=torch.float64))
        self.register_buffer("pixel_std", torch.tensor(self.std, dtype=torch.float64))
        self.register_buffer("pixel_bgr", torch.tensor(self.bgr))
        self.use_channels_last(True)

    def set_preprocessing(self, bgr: bool | None = None, mean=None, std=None) -> "Backbone":
        """Change the pixel preprocessing (None keeps a value); mean/std: 3 values or one."""
        if bgr is not None:
            self.pixel_bgr.fill_(bool(bgr))
        for buffer, value in ((self.pixel_mean, mean), (self.pixel_std, std)):
            if value is not None:
                buffer.copy_(torch.as_tensor(value, dtype=torch.float64).expand(3))
        if bool((self.pixel_std <= 0).any()):
            raise SppdetError(f"{self.name}: pixel std must be positive, got {self.pixel_std.tolist()}")
        return self

    def preprocessing(self) -> dict:
        """{"bgr": bool, "mean": [3 floats], "std": [3 floats]} in 0..255 units."""
        return {"bgr": bool(self.pixel_bgr), "mean": self.pixel_mean.tolist(), "std": self.pixel_std.tolist()}

    def use_channels_last(self, on: bool = True) -> "Backbone":
        """Run the trunk in NHWC (channels_last) memory format, weights and input (default on).

        With oneDNN on CPU this is ~1.8x faster for ZF-5 (a 688x917 image and 224x224 window
        batches alike) and faster for the torchvision trunks; values agree up to float rounding.
        Converting only the input leaves oneDNN reordering the weights on every call.
        """
        self.channels_last = on
        return self.to(memory_format=torch.channels_last if on else torch.contiguous_format)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) float32 from `preprocess` -> conv5 (B, out_channels, H5, W5),
        with H5 = map_size(H) (ZF-5: 224 -> 13, 180 -> 10); returned contiguous (NCHW)."""
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return self.trunk(x.contiguous(memory_format=memory_format)).contiguous()

    def map_size(self, height: int, width: int) -> tuple[int, int]:
        """(H5, W5) of conv5 for an (height, width) input, without running the network."""
        return map_size(self.layers, height), map_size(self.layers, width)

    def preprocess(self, image_bgr: np.ndarray) -> torch.Tensor:
        """uint8 BGR image (H, W, 3), or a stack (N, H, W, 3) -> float32 (3, H, W) / (N, 3, H, W).

        ZF-5: BGR minus 128, no scaling (the paper's Caffe input). torchvision trunks: RGB in
        [0, 1] normalised with the ImageNet mean/std. Both as the `pixel_*` buffers say. The
        result is a view in HWC memory order (channels_last once batched), which `forward` uses
        on CPU without a copy.
        """
        if image_bgr.dtype != np.uint8 or image_bgr.ndim not in (3, 4) or image_bgr.shape[-1] != 3:
            raise ValueError(f"expected a uint8 (H, W, 3) or (N, H, W, 3) BGR image, "
                             f"got {image_bgr.dtype} {image_bgr.shape}")
        shape = image_bgr.shape
        img = np.ascontiguousarray(image_bgr).reshape(-1, shape[-2], 3)  # cv2 takes (rows, W, 3)
        if not bool(self.pixel_bgr):
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        # A per-channel 256-entry table: ~30x faster than float arithmetic on the image, and
        # each value is (v - mean) / std computed in float64, then rounded once.
        lut = (np.arange(256.0)[:, None] - self.pixel_mean.cpu().numpy()) / self.pixel_std.cpu().numpy()
        out = cv2.LUT(img, lut.astype(np.float32).reshape(1, 256, 3))
        return torch.from_numpy(out.reshape(shape)).movedim(-1, -3)

    def extra_repr(self) -> str:
        return (f"name={self.name}, out_channels={self.out_channels}, stride={self.stride}, "
                f"center0={self.center0}, receptive_field={self.receptive_field}")


class _TorchvisionBackbone(Backbone):
    bgr = False
    mean = tuple(255 * m for m in IMAGENET_MEAN_RGB)
    std = tuple(255 * s for s in IMAGENET_STD_RGB)
    weights_name: str  # the torchvision.models WeightsEnum with IMAGENET1K_V1

    @property
    def weights_enum(self):
        import torchvision  # only the torchvision trunks import it: ZF-5 detection starts faster
        return getattr(torchvision.models, self.weights_name)


# ----------------------------------------------------------------------------- ZF-5

class WithinChannelLRN(nn.Module):
    """Caffe's LRN with norm_region WITHIN_CHANNEL: y = x * (1 + alpha * avg_{size x size}(x^2))^-beta.

    The average divides by size^2 everywhere, padded cells included (Caffe's AVE pooling), which
    is avg_pool2d with count_include_pad=True. Not torch's cross-channel nn.LocalResponseNorm.
    """

    def __init__(self, size: int = 3, alpha: float = 5e-5, beta: float = 0.75) -> None:
        super().__init__()
        self.size, self.alpha, self.beta = size, alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = F.avg_pool2d(x * x, self.size, stride=1, padding=self.size // 2, count_include_pad=True)
        # In place: on a full image each fresh buffer costs more than the arithmetic on it.
        return avg.mul_(self.alpha).add_(1).pow_(-self.beta).mul_(x)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}"


class ZF5(Backbone):
    """ZF-5 conv1..conv5 of the released SPP_net Caffe model (PAPER.md 1.1).

    conv1 7x7/2 pad 1 (96) -> ReLU -> LRN -> max 3x3/2 ceil; conv2 5x5/2 pad 0 (256) -> ReLU ->
    LRN -> max 3x3/2 ceil; conv3, conv4 3x3 pad 1 (384); conv5 3x3 pad 1 (256); ReLU after each.
    `width` scales every channel count (rounded, at least 8) for small demo/test variants.
    Geometry: stride 16, center0 20, receptive field 139.
    """

    bgr = True
    mean = (128.0, 128.0, 128.0)
    std = (1.0, 1.0, 1.0)

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = (max(8, round(c * width)) for c in (96, 256, 384, 384, 256))
        self.name, self.out_channels, self.width = "zf5", c5, width
        # Attribute names are the Caffe layer names, so converted weights map one to one.
        self.conv1 = nn.Conv2d(3, c1, 7, stride=2, padding=1)
        self.norm1 = WithinChannelLRN()
        self.pool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = nn.Conv2d(c1, c2, 5, stride=2, padding=0)
        self.norm2 = WithinChannelLRN()
        self.pool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.conv4 = nn.Conv2d(c3, c4, 3, padding=1)
        self.conv5 = nn.Conv2d(c4, c5, 3, padding=1)
        self._finish()

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.norm1(F.relu(self.conv1(x), inplace=True)))
        x = self.pool2(self.norm2(F.relu(self.conv2(x), inplace=True)))
        for conv in (self.conv3, self.conv4, self.conv5):
            x = F.relu(conv(x), inplace=True)
        return x


# ----------------------------------------------------------------------------- CaffeNet

class CrossChannelLRN(nn.LocalResponseNorm):
    """Caffe's LRN with norm_region ACROSS_CHANNELS (its default):
    y = x * (k + alpha / size * sum of x^2 over the `size` channels centred on x's)^-beta, channels
    outside the map counting as 0 and the sum always divided by `size`. That is torch's
    nn.LocalResponseNorm (same parameters and repr); this forward adds shifted channel slices
    instead of torch's avg_pool3d, ~3x faster on CPU in channels_last, the trunk's format.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return super().forward(x)
        c, n = x.shape[1], self.size
        sq = F.pad(x * x, (0, 0, 0, 0, n // 2, (n - 1) // 2))  # torch's (and, n odd, Caffe's) padding
        total = sq[:, :c] + sq[:, 1:c + 1] if n > 1 else sq.clone()
        for i in range(2, n):
            total += sq[:, i:i + c]
        return total.mul_(self.alpha / n).add_(self.k).pow_(-self.beta).mul_(x)


class CaffeNetTrunk(Backbone):
    """conv1..conv5 of R-CNN's released CaffeNet (BVLC reference CaffeNet layout; R-CNN's
    ImageNet model ilsvrc_2012_train_iter_310k and its VOC fine-tuned models).

    conv1 11x11/4 (96) -> ReLU -> max 3x3/2 ceil -> LRN; conv2 5x5 pad 2 group 2 (256) -> ReLU ->
    max 3x3/2 ceil -> LRN; conv3 3x3 pad 1 (384); conv4 3x3 pad 1 group 2 (384); conv5 3x3 pad 1
    group 2 (256); ReLU after each; pool5 dropped (SPP replaces it). Unlike ZF-5 the LRNs come
    AFTER the pools and normalise across channels (local_size 5, alpha 1e-4, beta 0.75, k 1),
    Caffe's x / (1 + alpha / 5 * sum of x^2 over 5 neighbouring channels)^0.75 (CrossChannelLRN,
    = torch's nn.LocalResponseNorm). Grouped convs split input and output channels into two
    consecutive halves, as Caffe does, so Caffe's (out, in / 2, k, k) blobs load as they are.
    Input: BGR minus the ILSVRC-2012 per-channel mean, no scaling (R-CNN subtracts the mean
    image; its per-channel average is what a window of any size can use).
    Geometry: stride 16, center0 17, receptive field 163; 227 -> 13x13, so the one-level
    pyramid {6} (adaptive bins on 13 cells: starts 0, 2, 4, 6, 8, 10, 3 wide) is Caffe's pool5
    3x3/2 exactly and R-CNN's fc6 (256 x 6 x 6 = 9216 inputs) fits.
    """

    rcnn_input_size = 227  # R-CNN's warp
    bgr = True
    mean = CAFFE_ILSVRC12_MEAN_BGR
    std = (1.0, 1.0, 1.0)

    def __init__(self) -> None:
        super().__init__()
        self.name, self.out_channels = "caffenet", 256
        # Attribute names are the Caffe layer names, registered in data-flow order (the
        # geometry walk reads them in this order; the LRNs are not part of it).
        self.conv1 = nn.Conv2d(3, 96, 11, stride=4)
        self.pool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.norm1 = CrossChannelLRN(5, alpha=1e-4, beta=0.75, k=1.0)
        self.conv2 = nn.Conv2d(96, 256, 5, padding=2, groups=2)
        self.pool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.norm2 = CrossChannelLRN(5, alpha=1e-4, beta=0.75, k=1.0)
        self.conv3 = nn.Conv2d(256, 384, 3, padding=1)
        self.conv4 = nn.Conv2d(384, 384, 3, padding=1, groups=2)
        self.conv5 = nn.Conv2d(384, 256, 3, padding=1, groups=2)
        self._finish()

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.pool1(F.relu(self.conv1(x), inplace=True)))
        x = self.norm2(self.pool2(F.relu(self.conv2(x), inplace=True)))
        for conv in (self.conv3, self.conv4, self.conv5):
            x = F.relu(conv(x), inplace=True)
        return x


# ----------------------------------------------------------------------------- torchvision

class _FeaturesTrunk(_TorchvisionBackbone):
    """A torchvision classifier's `features` Sequential without its last max-pool."""

    def __init__(self, name: str, out_channels: int, features: nn.Sequential) -> None:
        super().__init__()
        self.name, self.out_channels = name, out_channels
        self.features = features[:-1]
        self._finish()

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class AlexNetTrunk(_FeaturesTrunk):
    """torchvision AlexNet `features` up to conv5's ReLU (the last max-pool dropped): stride 16,
    256 channels, center0 15, receptive field 163; 224 -> 13x13."""

    weights_name = "AlexNet_Weights"

    def __init__(self) -> None:
        import torchvision
        super().__init__("alexnet", 256, torchvision.models.alexnet(weights=None).features)


class VGG16Trunk(_FeaturesTrunk):
    """torchvision VGG16 `features` up to conv5_3's ReLU (pool5 dropped): stride 16, 512
    channels, center0 7.5, receptive field 196; 224 -> 14x14."""

    weights_name = "VGG16_Weights"

    def __init__(self) -> None:
        import torchvision
        super().__init__("vgg16", 512, torchvision.models.vgg16(weights=None).features)


class ResNet50C4(_TorchvisionBackbone):
    """torchvision ResNet-50 up to layer3 (C4): stride 16, 1024 channels, center0 0, receptive
    field 267; 224 -> 14x14. BatchNorm is frozen (FrozenBatchNorm2d): the trunk is never trained
    here, and train() on the detector must not touch its statistics."""

    weights_name = "ResNet50_Weights"

    def __init__(self) -> None:
        super().__init__()
        self.name, self.out_channels = "resnet50", 1024
        import torchvision
        from torchvision.ops import FrozenBatchNorm2d
        net = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
        for key in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"):
            setattr(self, key, getattr(net, key))  # same names as torchvision: same state-dict keys
        self._finish()

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


# ----------------------------------------------------------------------------- building, weights

BACKBONES = {"zf5": ZF5, "caffenet": CaffeNetTrunk, "alexnet": AlexNetTrunk, "vgg16": VGG16Trunk,
             "resnet50": ResNet50C4}


def build_backbone(name: str, width: float = 1.0, weights: str = "none") -> Backbone:
    """Backbone `name` in BACKBONES with `weights`: "none" (random init, reproducible under
    torch.manual_seed), "imagenet" (torchvision's ImageNet weights; not for zf5 or caffenet,
which take converted Caffe weights: scripts/convert_caffe.py), or the path of
    a weights file (see `read_weights`; the trunk's own keys or a full torchvision model's,
    optionally under a key prefix like "module."). `width` (zf5 only) scales the channel counts;
    a weights file must match it (shapes are checked).
    """
    if name not in BACKBONES:
        raise SppdetError(f"model.backbone={name!r} is unknown; choose one of {sorted(BACKBONES)}")
    if name != "zf5" and width != 1.0:
        raise SppdetError(f"model.width={width} is only supported for zf5, not {name}")
    net = BACKBONES[name](width) if name == "zf5" else BACKBONES[name]()
    if weights == "imagenet":
        load_state_dict_checked(net, imagenet_state_dict(net), f"torchvision {name} ImageNet weights")
    elif weights != "none":
        load_weights_file(net, weights)
    return net


def imagenet_state_dict(net: Backbone) -> dict:
    """torchvision's ImageNet state dict of the classifier `net` is cut from (downloaded once,
    then read from torch's cache), classifier included."""
    if not isinstance(net, _TorchvisionBackbone):
        raise SppdetError(
            f"model.weights=imagenet: torchvision has no {net.name} weights; convert the released "
            f"{'R-CNN' if net.name == 'caffenet' else 'SPP_net'} Caffe model with "
            f"scripts/convert_caffe.py and pass model.weights=/path/to/file.pth")
    spec = net.weights_enum.IMAGENET1K_V1
    try:
        return spec.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError, ValueError) as e:  # URLError/HTTPError are OSErrors
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise SppdetError(
            f"model.weights=imagenet: could not download {net.name} weights from {spec.url} "
            f"({reason}); download that file elsewhere and pass model.weights=/path/to/file.pth") from e


def read_weights(path: str | os.PathLike) -> tuple[dict, dict]:
    """(state dict, meta) of a weights file: a torch.save'd state dict (name -> tensor), optionally
    wrapped as {"state_dict": ..., "meta": {...}} (what scripts/pretrain.py and
    scripts/convert_caffe.py write) or {"model": ...}. meta may hold "input": {"bgr", "mean", "std"}
    (the preprocessing the weights expect) and "levels" (the pyramid their fc6 saw). Every
    problem is a SppdetError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SppdetError(f"model.weights={str(path)!r}: no such file (use 'none', 'imagenet' or "
                          f"the path of a .pth state dict)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors all mean "not a readable state dict"
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise SppdetError(f"{path}: cannot read as a torch state dict ({reason})") from e
    if isinstance(obj, dict) and "sppdet_digest" in obj:  # written by sppdet with a content digest
        from .utils import content_digest
        if content_digest(obj.get("content")) != obj["sppdet_digest"]:
            raise SppdetError(f"{path}: content does not match its digest (the file was changed or "
                              f"damaged after it was written)")
        obj = obj["content"]
    meta = obj.get("meta") if isinstance(obj, dict) and isinstance(obj.get("meta"), dict) else {}
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SppdetError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    return obj, meta


def load_weights_file(net: Backbone, path: str | os.PathLike) -> tuple[dict, dict]:
    """Load the trunk of the weights file at `path` into `net`, with the preprocessing its meta
    names; returns the file's (state dict, meta) for what else it holds (fc6/fc7)."""
    state, meta = read_weights(path)
    load_state_dict_checked(net, state, str(path))
    if isinstance(meta.get("input"), dict):
        i = meta["input"]
        net.set_preprocessing(bgr=i.get("bgr"), mean=i.get("mean"), std=i.get("std"))
    return state, meta


def load_state_dict_checked(net: Backbone, state: dict, source: str) -> None:
    """Copy the trunk's tensors from `state` into `net`; extra keys (a classifier, layer4) are
    ignored. Missing keys or shape mismatches -> SppdetError naming `source` and the first few."""
    own = net.state_dict()
    # Find the prefix (e.g. "module.", "backbone.") under which `state` holds the trunk: the
    # shortest key ending with our first layer's key.
    first = next(k for k in own if k not in PREPROCESS_KEYS)
    hits = sorted((k for k in state if k == first or k.endswith("." + first)), key=len)
    prefix = hits[0][: -len(first)] if hits else ""
    picked = {k: state[prefix + k] for k in own if prefix + k in state}
    # FrozenBatchNorm2d has no num_batches_tracked; plain BN buffers of that name are optional,
    # and so is the preprocessing (a plain trunk state dict keeps the backbone's own).
    missing = [k for k in own if k not in picked and not k.endswith("num_batches_tracked")
               and k not in PREPROCESS_KEYS]
    bad = [f"{k}: expected {tuple(own[k].shape)}, found {tuple(v.shape)}"
           for k, v in picked.items() if v.shape != own[k].shape]
    if missing or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({', '.join(missing[:4])}"
                         f"{', ...' if len(missing) > 4 else ''})")
        if bad:
            parts.append(f"{len(bad)} shape mismatches ({'; '.join(bad[:3])}"
                         f"{'; ...' if len(bad) > 3 else ''})")
        raise SppdetError(f"{source}: does not fit backbone {net.name} "
                          f"(out_channels {net.out_channels}): {' and '.join(parts)}")
    net.load_state_dict(picked, strict=False)
