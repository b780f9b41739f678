"""Typed configuration: YAML files in configs/ -> frozen dataclasses, strict merging.

Defaults live here, one line of meaning and source per field ([P] the paper, PAPER.md section;
[C] the official SPP_net code; [R] R-CNN; [ours] this project). A YAML file holds only deltas,
optionally on top of one ``base:`` file. Command-line overrides are ``key.sub=value`` pairs
parsed as YAML. An unknown key, a wrong type or a value outside its range (`RULES`) is a
SppdetError naming the dotted key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .utils import SppdetError, write_text_atomic
from .voc import VOC_CLASSES

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"


def resolve(path: str | Path) -> Path:
    """Relative paths in configs are relative to the repository (where configs/ lives)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO / p


@dataclass(frozen=True)
class DataConfig:
    root: str = "data/VOCdevkit"          # devkit folder (VOCdevkit or VOC2007); relative to the repo [ours]
    year: str = "2007"                    # VOC<year> sub-folder [ours]
    train_split: str = "trainval"         # ImageSets/Main/<split>.txt used for training [P 2.4]
    test_split: str = "test"              # split evaluated at the end of training [P 2.4]
    classes: tuple[str, ...] = VOC_CLASSES  # object classes, labels 1..K in this order; 0 = background. A list other
                                          # than VOC's 20 may be a subset: objects of other classes are ignored [ours]
    synthetic: bool = False               # generate the embedded synthetic dataset into `root` on first use (a devkit of your own there is used as is) [ours]
    synthetic_seed: int = 0               # seed of the synthetic dataset [ours]
    synthetic_trainval: int = 200         # synthetic dataset: images in trainval [ours]
    synthetic_test: int = 100             # synthetic dataset: images in test [ours]
    synthetic_train_per_class: int = 400  # synthetic classification set (pretraining): train images per class [ours]
    synthetic_val_per_class: int = 50     # synthetic classification set: val images per class [ours]
    synthetic_image_size: int = 144       # synthetic classification set: image side in pixels [ours]
    synthetic_background_class: bool = False  # synthetic classification set: a "background" class of clutter only [ours]
    max_images: int = 0                   # use only the first N images of each split (0 = all; smoke runs) [ours]
    damaged_images: str = "use"           # a truncated JPEG/PNG is named in one warning, then: use (what decodes) | skip [ours]


@dataclass(frozen=True)
class ProposalConfig:
    mode: str = "fast"                    # selective search: fast | quality | opencv_fast | opencv_quality [P 1.6]
    max_boxes: int = 2000                 # keep the best-ranked boxes per image [P 4.1 "about 2,000"]
    min_size: int = 20                    # drop boxes narrower or shorter than this, original pixels [C/SS]
    resize: Optional[int] = 500           # short side the search runs at, boxes mapped back; null: the original
                                          # size (the paper). Selective search is not scale invariant: a canonical
                                          # size, as R-CNN's wrapper (width 500); recall figures in README [ours]
    max_side: Optional[int] = 4000        # cap on the long side the search runs at (a 6000x4000 photo at its own
                                          # size takes a quarter of an hour); null: no cap [ours]
    cache_dir: str = "cache/proposals"    # per-image cache, keyed on parameters and image content [ours]
    workers: int = 2                      # processes for the search [ours]


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "zf5"                 # zf5 (paper) | alexnet | caffenet (R-CNN's) | vgg16 | resnet50 [P 1.1]
    width: float = 1.0                    # channel multiplier for small, fast variants (1.0 = the real net) [ours]
    weights: str = "imagenet"             # imagenet (torchvision) | none (random) | path to a local state dict [P 1.1]
    levels: tuple[int, ...] = (6, 3, 2, 1)  # pyramid levels, 50 bins -> 12800-d for ZF-5 [P 1.2]
    fc_dim: int = 4096                    # fc6 / fc7 width [P 1.1]
    dropout: float = 0.5                  # dropout on fc6 / fc7 in training [P 2.1]
    scales: tuple[int, ...] = (688,)      # short side(s); five scales: 480, 576, 688, 864, 1200 [P 1.5]
    max_size: int = 2000                  # cap on the resized long side, bounds memory [ours]
    projection: str = "paper"             # window -> conv5 rule: paper (App. A floor/ceil) | code (offset0 21, 6.5) [P/C 1.4]
    scale_rule: str = "paper"             # per-window scale: paper (area closest to 224^2) | code (208, scale units) [P/C 1.5]
    scale_target: Optional[float] = None  # the rule's target size; null: 224 (paper) / 208 (code), ImageNet's crop.
                                          # A net pretrained at another crop (the demo's 96) has its own [ours]
    lrn: bool = True                      # ZF-5's within-channel LRN after conv1/conv2 (zf5 only) (alpha 5e-5: close to the
                                          # identity for unit-scale inputs, and 40% of a small ZF-5's training time) [P 1.1]
    pixel_std: Optional[float] = None     # divide mean-subtracted pixels by this (None: the backbone's own, 1 for ZF-5 as the paper); from scratch wants unit-scale input [ours]
    rcnn_input_size: int = 224            # R-CNN baseline: fixed warp size of a window [R 4]
    rcnn_context: int = 16                # R-CNN baseline: context pixels around the warped box [R 4]
    chunk: int = 512                      # windows per chunk through SPP + fc, bounds memory [ours]


@dataclass(frozen=True)
class FinetuneConfig:
    iterations: int = 300000              # minibatches in all: 250k at 1e-4 then 50k at 1e-5 [P 2.1]
    lr: float = 1e-4                      # base learning rate [P 2.1]; code: 1e-3 [C]
    lr_steps: tuple[int, ...] = (250000,)  # iterations at which lr is multiplied by gamma [P 2.1]
    gamma: float = 0.1                    # lr decay factor [P 2.1]
    momentum: float = 0.9                 # SGD momentum [C]
    weight_decay: float = 5e-4            # SGD weight decay [C]
    batch_size: int = 128                 # windows per minibatch [C]
    images_per_batch: int = 2             # images the windows of one minibatch are drawn from [ours; C: a pool]
    fg_fraction: float = 0.25             # positives per minibatch [P 2.1]
    fg_iou: float = 0.5                   # positive if IoU >= this with a ground-truth box [P 2.1]
    bg_iou: tuple[float, float] = (0.1, 0.5)  # background if IoU in [lo, hi) [P 2.1]
    fc8_std: float = 0.01                 # Gaussian init of the new (K+1)-way fc8 [P 2.1]
    fc8_bias: float = 0.0                 # initial fc8 bias [ours; C: 1]
    bias_lr_mult: float = 1.0             # lr multiplier of every bias [ours; C: 2]
    fc8_bias_decay: bool = True           # weight decay on the fc8 bias [ours; C: false]
    flip: bool = False                    # also train on horizontally flipped images [C]
    random_scale: bool = False            # random scale per window instead of the best one [C]
    train_conv: bool = False              # also fine-tune conv1..conv5 through the pyramid pooling [ours]
    conv_lr_mult: float = 1.0             # lr multiplier of the conv layers when train_conv [ours]
    feature_cache: str = "memory"         # frozen conv, features computed once and reused by every training stage
                                          # (SPP: conv5 maps per image and scale; R-CNN: pooled windows), fp16:
                                          # memory | disk (under the run folder) | none (recompute) [ours]
    checkpoint_every: int = 500           # iterations between resumable snapshots [ours]


@dataclass(frozen=True)
class SVMConfig:
    C: float = 1e-3                       # liblinear -c [C 2.2]
    pos_weight: float = 2.0               # liblinear -w1 [C 2.2]
    bias_mult: float = 10.0               # liblinear -B (intercept scaling) [C 2.2]
    neg_iou: float = 0.3                  # negatives: IoU < this with every ground truth of the class [P 2.2]
    neg_overlap_prune: Optional[float] = 0.7  # drop a negative overlapping a kept negative above this (None: off) [P 2.2]
    dedup_conv5: bool = False             # drop negatives that map to the same conv5 window at the same scale
                                          # as an earlier one of the image (SPP only) [C 2.2]
    scale_sample: str = "first"           # feature-scale sample: first (200 proposals of each of the first 200
                                          # images, plus the ground truth) | random (200 random boxes of 200
                                          # random images, spp_feature_stats.m) [ours | C 2.2]
    retrain_strict: bool = False          # retrain a class when its new negatives exceed (true) rather than
                                          # reach retrain_every [ours | C]
    hard_thresh: float = -1.0001          # mining keeps negatives scoring above this [C 2.2]
    evict_thresh: float = -1.2            # evict cached negatives scoring below this [C 2.2]
    retrain_every: int = 2000             # retrain a class after this many new negatives [C 2.2]
    target_norm: float = 20.0             # fc7 features scaled to this mean L2 norm [C 2.2]


@dataclass(frozen=True)
class BBoxRegConfig:
    enabled: bool = True                  # apply box regression to detections [P 2.3]
    min_iou: float = 0.5                  # training windows overlap a ground truth by at least this [P 2.3]; R-CNN 0.6
    lam: float = 4000.0                   # ridge lambda [C 2.3]; R-CNN 1000
    max_per_image: int = 16               # training windows kept per image, bounds memory [ours]
    include_gt: bool = False              # the ground-truth boxes themselves among the training windows [ours | C]
    penalize_bias: bool = False           # ridge on [X, 1] with the bias penalised like the weights, targets
                                          # mean-centred, as spp_train_bbox_regressor.m [ours | C 2.3]


@dataclass(frozen=True)
class TestConfig:
    scorer: str = "svm"                   # svm: per-class linear SVM margins on fc7 [P 2.4] | softmax: the fine-tuned
                                          # fc8's class probabilities (Fast R-CNN found them about as good) [ours]
    nms: float = 0.3                      # per-class NMS IoU [P 2.4]
    score_thresh: float = -1.5            # candidates: windows scoring below this are dropped before NMS, for
                                          # evaluation (SVM margin; softmax: use 0.0..0.05) [C 2.4]
    draw_thresh: Optional[float] = None   # detections the Predictor / detect.py report and draw; null: the
                                          # scorer's decision boundary (SVM margin 0, softmax probability 0.5) [ours]
    max_per_class: int = 100              # detections kept per image and class [C 2.4]
    max_per_image: int = 100              # detections kept per image, all classes together [ours]
    metric: str = "voc07"                 # voc07 (11-point, MATLAB thresholds) | voc07_py | voc10 (area) [P 2.4]
    svd_fc6: float = 1024                 # truncated SVD of fc6 at test time: a rank (>= 1), a fraction of
                                          # min(in, out) (0.25: 1024 for 4096-wide layers), or 0 (off); applied
                                          # only where it makes the layer cheaper (not the demo's 512-wide) [F 3.1]
    svd_fc7: float = 256                  # the same for fc7 (Fast R-CNN's 1024 / 256) [F 3.1]
    precision: str = "auto"               # fc layers in: auto (bf16 where the device computes it natively,
                                          # else fp32) | bf16 | fp32 [ours]
    conv_precision: str = "fp32"          # conv layers at test time: fp32 (the features the heads were trained
                                          # on) | bf16 (1.4x faster ZF-5 on AVX-512 BF16, conv5 within ~1%) [ours]
    exact: bool = False                   # true: the exact network (fp32 everywhere, no SVD), whatever the keys
                                          # above say [ours]


@dataclass(frozen=True)
class PretrainConfig:
    """The SPP classification network's training (scripts/pretrain.py) on an ImageFolder dataset
    (`data.root`: train/<class>/*.jpg, val/<class>/*.jpg) [P 1.7]."""
    epochs: int = 70                      # full passes over the training images [P 1.1: 70 for ZF-5]
    batch_size: int = 128                 # images per step, all processes together [ours]
    optimizer: str = "sgd"                # sgd (momentum) [P 1.1] | adamw [ours]
    lr: float = 0.01                      # base learning rate [P 1.1]
    momentum: float = 0.9                 # SGD momentum [P 1.1]
    weight_decay: float = 5e-4            # weight decay [P 1.1]
    lr_schedule: str = "step"             # step (x gamma at lr_steps) [P 1.1: /10 twice] | cosine [ours]
    lr_steps: tuple[int, ...] = (40, 60)  # epochs at which the step schedule multiplies lr by gamma [P 1.1]
    gamma: float = 0.1                    # step schedule factor [P 1.1]
    warmup_epochs: int = 0                # linear lr warm-up from 0 over these epochs [ours]
    resize: int = 256                     # short side images are resized to before cropping [P 1.1]
    crop: int = 224                       # training crop, and the size of the test views [P 1.1]
    multi_size: str = "none"              # none (single-size) | alternate (epochs at crop, then at
                                          # small_size, ...) | random (a size per epoch in [small_size, crop]) [P 1.7]
    small_size: int = 180                 # the other size of multi-size training: the crop resized to it [P 1.7]
    flip: bool = True                     # random horizontal flips [P 1.1]
    color_jitter: float = 0.2             # random brightness / contrast / saturation factors in [1 -+ this] [P 1.1]
    pyramid: str = "spp"                  # spp (model.levels) | none: the trunk's fixed pool (the no-SPP baseline) [P 1.7]
    init: str = "default"                 # initial weights: default (PyTorch's) | kaiming | gabor (kaiming, conv1
                                          # a Gabor bank: learns faster from scratch) [ours]
    batch_norm: bool = False              # batch norm after each conv while pretraining, folded into the
                                          # conv weights in the weights file [ours]
    label_smoothing: float = 0.0          # cross-entropy label smoothing [ours]
    val_every: int = 1                    # validate (centre view) every N epochs; all views at the end [ours]
    workers: int = 0                      # data-loading processes per training process (0: in-process) [ours]
    precision: str = "auto"               # training arithmetic: auto (fp16 autocast + gradient scaling on CUDA,
                                          # fp32 on CPU) | bf16 (bf16 autocast, on CPUs with AVX-512 bf16 too) | fp32 [ours]


@dataclass(frozen=True)
class RunConfig:
    name: str = ""                        # runs/<name>/ (default: the config file's name) [ours]
    output_dir: str = "runs"              # parent folder of every run [ours]
    seed: int = 0                         # python, numpy, torch and SVM seeds [ours]
    device: str = "auto"                  # auto (CUDA if present) | cpu | cuda | cuda:N [ours]
    threads: int = 0                      # torch CPU threads (0 = torch's default) [ours]
    detector: str = "spp"                 # spp | rcnn: which feature path this run trains [ours]
    compare_rcnn: bool = False            # also train the R-CNN baseline on the same conv weights and compare [ours]


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    svm: SVMConfig = field(default_factory=SVMConfig)
    bbox_reg: BBoxRegConfig = field(default_factory=BBoxRegConfig)
    test: TestConfig = field(default_factory=TestConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


CHOICES = {
    "data.damaged_images": ("use", "skip"),
    "proposals.mode": ("fast", "quality", "opencv_fast", "opencv_quality"),
    "model.backbone": ("zf5", "alexnet", "caffenet", "vgg16", "resnet50"),
    "model.projection": ("paper", "code"),
    "model.scale_rule": ("paper", "code"),
    "finetune.feature_cache": ("memory", "disk", "none"),
    "test.scorer": ("svm", "softmax"),
    "svm.scale_sample": ("first", "random"),
    "pretrain.optimizer": ("sgd", "adamw"),
    "pretrain.lr_schedule": ("step", "cosine"),
    "pretrain.multi_size": ("none", "alternate", "random"),
    "pretrain.pyramid": ("spp", "none"),
    "pretrain.init": ("default", "kaiming", "gabor"),
    "test.metric": ("voc07", "voc07_py", "voc10"),
    "test.precision": ("auto", "bf16", "fp32"),
    "pretrain.precision": ("auto", "bf16", "fp32"),
    "test.conv_precision": ("bf16", "fp32"),
    "run.detector": ("spp", "rcnn"),
}

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def _unit(v) -> bool:
    return 0.0 <= v <= 1.0


def _positive_list(v) -> bool:
    return len(v) > 0 and all(x > 0 for x in v)


_AT_LEAST_1 = (lambda v: v >= 1, "an integer >= 1")
_AT_LEAST_0 = (lambda v: v >= 0, "an integer >= 0")

# key -> (test, what is allowed): checked where the config is parsed, one line per bad value
RULES = {
    "data.max_images": (lambda v: v >= 0, "an integer >= 0 (0 = all)"),
    "data.synthetic_trainval": _AT_LEAST_1,
    "data.synthetic_test": _AT_LEAST_1,
    "data.synthetic_train_per_class": _AT_LEAST_1,
    "data.synthetic_val_per_class": _AT_LEAST_1,
    "data.synthetic_image_size": (lambda v: v >= 32, "an integer >= 32"),
    "proposals.max_boxes": _AT_LEAST_1,
    "proposals.min_size": _AT_LEAST_0,
    "proposals.resize": (lambda v: v is None or v >= 1, "null or an integer >= 1"),
    "proposals.workers": _AT_LEAST_0,
    "proposals.max_side": (lambda v: v is None or v >= 32, "null or an integer >= 32"),
    "model.width": (lambda v: 0 < v <= 4, "in (0, 4]"),
    "model.levels": (_positive_list, "a non-empty list of positive integers"),
    "model.fc_dim": _AT_LEAST_1,
    "model.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "model.scales": (_positive_list, "a non-empty list of positive integers"),
    "model.scale_target": (lambda v: v is None or v > 0, "> 0, or null for the rule's own"),
    "model.max_size": _AT_LEAST_1,
    "model.pixel_std": (lambda v: v is None or v > 0, "null or > 0"),
    "model.rcnn_input_size": (lambda v: v >= 16, "an integer >= 16"),
    "model.rcnn_context": _AT_LEAST_0,
    "model.chunk": _AT_LEAST_1,
    "finetune.iterations": _AT_LEAST_0,
    "finetune.lr": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "finetune.lr_steps": (lambda v: all(x >= 0 for x in v), "a list of integers >= 0"),
    "finetune.gamma": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "finetune.momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "finetune.weight_decay": (lambda v: v >= 0, ">= 0"),
    "finetune.batch_size": _AT_LEAST_1,
    "finetune.images_per_batch": _AT_LEAST_1,
    "finetune.fg_fraction": (_unit, "in [0, 1]"),
    "finetune.fg_iou": (_unit, "in [0, 1]"),
    "finetune.bg_iou": (lambda v: 0 <= v[0] <= v[1] <= 1, "two values lo <= hi in [0, 1]"),
    "finetune.fc8_std": (lambda v: v > 0, "> 0"),
    "finetune.conv_lr_mult": (lambda v: v >= 0, ">= 0"),
    "finetune.checkpoint_every": _AT_LEAST_1,
    "finetune.bias_lr_mult": (lambda v: v >= 0, ">= 0"),
    "svm.C": (lambda v: v > 0, "> 0"),
    "svm.pos_weight": (lambda v: v > 0, "> 0"),
    "svm.bias_mult": (lambda v: v > 0, "> 0"),
    "svm.neg_iou": (_unit, "in [0, 1]"),
    "svm.neg_overlap_prune": (lambda v: v is None or _unit(v), "null or in [0, 1]"),
    "svm.retrain_every": _AT_LEAST_1,
    "svm.target_norm": (lambda v: v > 0, "> 0"),
    "bbox_reg.min_iou": (_unit, "in [0, 1]"),
    "bbox_reg.lam": (lambda v: v >= 0, ">= 0"),
    "bbox_reg.max_per_image": _AT_LEAST_1,
    "test.nms": (_unit, "in [0, 1]"),
    "test.max_per_class": _AT_LEAST_1,
    "test.max_per_image": _AT_LEAST_1,
    "test.svd_fc6": (lambda v: v >= 0, ">= 0 (0: off)"),
    "test.svd_fc7": (lambda v: v >= 0, ">= 0 (0: off)"),
    "pretrain.epochs": _AT_LEAST_1,
    "pretrain.batch_size": _AT_LEAST_1,
    "pretrain.lr": (lambda v: 0 < v <= 10, "in (0, 10]"),
    "pretrain.momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "pretrain.weight_decay": (lambda v: v >= 0, ">= 0"),
    "pretrain.gamma": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "pretrain.warmup_epochs": _AT_LEAST_0,
    "pretrain.resize": (lambda v: v >= 16, "an integer >= 16"),
    "pretrain.crop": (lambda v: v >= 16, "an integer >= 16"),
    "pretrain.small_size": (lambda v: v >= 16, "an integer >= 16"),
    "pretrain.color_jitter": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "pretrain.label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "pretrain.val_every": _AT_LEAST_1,
    "pretrain.workers": _AT_LEAST_0,
    "run.seed": _AT_LEAST_0,
    "run.device": (lambda v: DEVICE_PATTERN.fullmatch(v) is not None, "auto, cpu, cuda or cuda:N"),
    "run.threads": (lambda v: v >= 0, "an integer >= 0 (0 = torch's default)"),
    "run.name": (lambda v: "/" not in v and v not in (".", ".."), "a folder name (no '/')"),
}


def _plain(obj):
    """Tuples -> lists recursively, so the dict dumps as plain YAML."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str):
    """Check `value` against the annotation `tp`; lists become tuples; ints are accepted for
    floats; a bool is never accepted as a number."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SppdetError(f"config key {key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise SppdetError(f"config key {key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool) and key.endswith(".year"):
        return str(value)  # `year: 2007` in YAML is an int
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, tp) and not (tp is not bool and isinstance(value, bool)):
        return value
    raise SppdetError(f"config key {key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise SppdetError(f"unknown config key {key}; valid keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in values:
            continue
        tp, key, value = hints[name], f"{prefix}{name}", values[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise SppdetError(f"config key {key}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}")
            kwargs[name] = _build(tp, value, f"{key}.")
        else:
            kwargs[name] = _coerce(value, tp, key)
            if key in CHOICES and kwargs[name] not in CHOICES[key]:
                raise SppdetError(f"config key {key}: {kwargs[name]!r} is not one of {', '.join(CHOICES[key])}")
            if key in RULES and not RULES[key][0](kwargs[name]):
                raise SppdetError(f"config key {key}: {kwargs[name]!r} is not allowed; expected {RULES[key][1]}")
    return cls(**kwargs)


def _merge(base: dict, delta: dict) -> dict:
    out = dict(base)
    for k, v in delta.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def find_config(name: str | Path) -> Path:
    """`name` as a path, else configs/<name>, else configs/<name>.yaml."""
    for cand in (Path(name), CONFIG_DIR / str(name), CONFIG_DIR / f"{name}.yaml"):
        if cand.is_file():
            return cand
    available = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise SppdetError(f"config {name!r} not found (configs/: {available})")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SppdetError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SppdetError(f"{path}: expected a mapping at the top level")
    return data


def parse_override(item: str) -> dict:
    """'a.b=value' -> {'a': {'b': value}} with the value parsed as YAML."""
    if "=" not in item:
        raise SppdetError(f"override {item!r}: expected key.sub=value")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    out: dict = value
    for part in reversed(key.strip().split(".")):
        out = {part: out}
    return out


def _read_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The values of a config file merged on top of its `base:` chain (a base's base first).
    A base path is relative to the file naming it, else found like --config."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(p.name for p in (*seen, path))
        raise SppdetError(f"{path}: circular base: chain ({chain})")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise SppdetError(f"{path}: base: expected a config name or path, got {base!r}")
    beside = path.parent / base
    base_values = _read_chain(find_config(beside if beside.is_file() else base), (*seen, path))
    return _merge(base_values, data)


def load_config(name: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- the `base:` chain <- the config file <- `key=value` overrides."""
    values: dict = {}
    if name is not None:
        path = find_config(name)
        values = _read_chain(path)
        run = values.setdefault("run", {})
        if isinstance(run, dict) and not run.get("name"):
            run["name"] = path.stem
    for item in overrides:
        values = _merge(values, parse_override(item))
    return _build(Config, values, "")


def config_from_dict(values: dict) -> Config:
    """Rebuild a Config saved with `Config.to_dict` (e.g. from a checkpoint)."""
    return _build(Config, values, "")


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
