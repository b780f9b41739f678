"""Building networks from a config: backbones with their pretrained weights, the two feature paths,
and detectors whose fc6/fc7 start from the pretrained classifier when the weights carry them.

A weights file (`model.weights: PATH`, read by `backbones.read_weights`) holds the trunk's keys as
the backbone names them (ZF-5: conv1.weight ... conv5.bias; torchvision trunks: torchvision's own,
features.0.weight, ...), plus optionally `fc6.weight/bias`, `fc7.weight/bias` (torch Linear
layout (out, in)) or a full torchvision classifier's `classifier.*` layers; its meta may name the
pixel preprocessing and the pyramid levels fc6 was trained on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
import torch
from torch import nn

from .backbones import Backbone, build_backbone as build_trunk, imagenet_state_dict, \
    load_state_dict_checked, load_weights_file
from .config import Config, ModelConfig, resolve
from .detector import Detector
from .features import SPPFeatures, WindowFeatures
from .rcnn import RCNNFeatures
from .spp import spp_output_dim
from .utils import SppdetError, get_logger

# torchvision classifiers: the Linear layers that are fc6 and fc7 (after their dropout).
TORCHVISION_FC = {"alexnet": ("classifier.1", "classifier.4"), "vgg16": ("classifier.0", "classifier.3")}


@dataclass
class Pretrained:
    """What a weights source provides besides the trunk: fc6/fc7 tensors (or None) and notes."""

    fc: dict[str, torch.Tensor] | None = None
    levels: tuple[int, ...] | None = None
    source: str = ""


def _fc_layers(state: dict, backbone: str) -> dict[str, torch.Tensor] | None:
    """fc6/fc7 weights and biases of a state dict, under sppdet's names or a torchvision
    classifier's, or None."""
    names = {"fc6": "fc6", "fc7": "fc7"}
    if "fc6.weight" not in state and backbone in TORCHVISION_FC:
        prefix = next((k[: -len("classifier.0.weight")] for k in state if k.endswith("classifier.0.weight")), "")
        names = dict(zip(("fc6", "fc7"), (prefix + n for n in TORCHVISION_FC[backbone])))
    out = {}
    for ours, theirs in names.items():
        for part in ("weight", "bias"):
            if f"{theirs}.{part}" not in state:
                return None
            out[f"{ours}.{part}"] = state[f"{theirs}.{part}"]
    return out


PRETRAIN_PREFIX = "pretrain:"  # model.weights "pretrain:NAME": the weights.pth of pretraining config NAME


def pretrain_config(cfg: Config) -> Config | None:
    """The pretraining config `model.weights: pretrain:NAME` names (configs/NAME), its run under
    this run's output folder; None for other weights."""
    if not cfg.model.weights.startswith(PRETRAIN_PREFIX):
        return None
    from .config import load_config
    return load_config(cfg.model.weights[len(PRETRAIN_PREFIX):], [f"run.output_dir={cfg.run.output_dir}"])


def pretrained_weights_path(pcfg: Config):
    return resolve(pcfg.run.output_dir) / pcfg.run.name / "weights.pth"


def build_backbone(m: ModelConfig, weights: str | None = None) -> tuple[Backbone, Pretrained]:
    """The trunk `m` describes with its weights (`weights` overrides m.weights: "none" when a
    checkpoint will provide them), and the fc6/fc7 the weights source holds."""
    weights = m.weights if weights is None else weights
    if weights.startswith(PRETRAIN_PREFIX):
        raise SppdetError(f"model.weights={weights!r}: run the pretraining first (engine.ensure_pretrained) "
                          f"and pass the weights file")
    source = weights if weights in ("none", "imagenet") else str(resolve(weights))
    backbone = build_trunk(m.backbone, width=m.width, weights="none")
    pretrained = Pretrained(source=source)
    if weights == "imagenet":
        state = imagenet_state_dict(backbone)
        load_state_dict_checked(backbone, state, f"torchvision {m.backbone} ImageNet weights")
        pretrained.fc = _fc_layers(state, m.backbone)
    elif weights != "none":
        state, meta = load_weights_file(backbone, source)
        pretrained.fc = _fc_layers(state, m.backbone)
        if meta.get("levels") is not None:
            pretrained.levels = tuple(int(n) for n in meta["levels"])
    if m.pixel_std is not None:
        backbone.set_preprocessing(std=m.pixel_std)
    if not m.lrn and m.backbone == "zf5":  # ZF-5 without its (near-identity at unit scale) LRN
        backbone.norm1, backbone.norm2 = nn.Identity(), nn.Identity()
    return backbone, pretrained


def build_features(cfg: Config, backbone: Backbone, kind: str) -> WindowFeatures:
    m = cfg.model
    if kind == "rcnn":
        return RCNNFeatures(backbone, m.levels, input_size=m.rcnn_input_size, context=m.rcnn_context)
    return SPPFeatures(backbone, m.levels, scales=m.scales, max_size=m.max_size,
                       projection=m.projection, scale_rule=m.scale_rule, scale_target=m.scale_target)


def build_detector(cfg: Config, num_classes: int, weights: str | None = None, kind: str | None = None,
                   logger: logging.Logger | None = None) -> Detector:
    """The detector a config describes (`kind` overrides run.detector: "spp" or "rcnn"). When
    the weights carry fc6/fc7 whose shapes fit the head, the head starts from them, as the
    paper's does; otherwise fc6/fc7 start random and the log says why. fc8 is new: N(0,
    finetune.fc8_std)."""
    m = cfg.model
    backbone, pretrained = build_backbone(m, weights)
    features = build_features(cfg, backbone, kind or cfg.run.detector)
    detector = Detector(features, num_classes, fc_dim=m.fc_dim, dropout=m.dropout,
                        fc8_std=cfg.finetune.fc8_std, chunk=m.chunk)
    if weights != "none":
        load_pretrained_head(detector, pretrained, logger or get_logger())
    return detector


def load_pretrained_head(detector: Detector, pretrained: Pretrained, logger: logging.Logger) -> bool:
    """Copy pretrained fc6/fc7 into the detector's head when they fit; log what happened."""
    if pretrained.source == "none":
        return False
    head, levels = detector.head, detector.features.levels
    if pretrained.fc is None:
        logger.info(f"model: fc6/fc7 start random ({pretrained.source} holds conv layers only)")
        return False
    want = {k: v.shape for k, v in head.state_dict().items() if k.startswith(("fc6.", "fc7."))}
    got = {k: v.shape for k, v in pretrained.fc.items()}
    if want != got:
        why = f"fc6 input {got['fc6.weight'][1]} vs the pyramid's {want['fc6.weight'][1]}" \
            if got["fc6.weight"][1] != want["fc6.weight"][1] else \
            f"fc width {got['fc6.weight'][0]} vs model.fc_dim {want['fc6.weight'][0]}"
        logger.info(f"model: fc6/fc7 start random: {pretrained.source}'s do not fit ({why}; "
                    f"pyramid levels {list(levels)} on {detector.backbone.out_channels} channels = "
                    f"{spp_output_dim(detector.backbone.out_channels, levels)})")
        return False
    if pretrained.levels is not None and tuple(pretrained.levels) != tuple(levels):
        logger.info(f"model: fc6/fc7 start random: {pretrained.source}'s fc6 was trained on pyramid "
                    f"levels {list(pretrained.levels)}, model.levels is {list(levels)}")
        return False
    head.load_state_dict(pretrained.fc, strict=False)
    logger.info(f"model: fc6/fc7 start from {pretrained.source}")
    return True
