"""One file per trained detector: config, class names, network, SVMs, box regressors.

Everything lives in the detector's state dict (fc head, SVM weights/bias/feature scale and the
box regressors are buffers), plus the resolved config to rebuild it. Written atomically; loads
on CPU; a file of another format version, or a truncated one, is one clear error.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .config import Config, config_from_dict
from .utils import SppdetError, atomic_path

FORMAT_VERSION = 1
KINDS = {"SPPDetector": "spp", "RCNNDetector": "rcnn"}  # saved class name -> build_detector kind


def save_checkpoint(path: str | Path, detector, cfg: Config, classes, extra: dict | None = None) -> None:
    """Write `detector` (SPPDetector or RCNNDetector; tensors saved as they are, loaded on CPU),
    its resolved config and its class names (labels 1..K) to `path`, atomically."""
    if type(detector).__name__ not in KINDS:
        raise TypeError(f"save_checkpoint: cannot save a {type(detector).__name__}")
    payload = {
        "format_version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "classes": list(classes),
        "detector": type(detector).__name__,
        "model": detector.state_dict(),
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path: str | Path) -> dict:
    """The raw payload of a checkpoint (tensors on CPU), checked for format and version."""
    path = Path(path)
    if not path.is_file():
        raise SppdetError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, ...
        raise SppdetError(f"{path}: not a readable sppdet checkpoint ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:120] if str(e) else 'truncated?'})") from None
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise SppdetError(f"{path}: not an sppdet checkpoint (no format_version)")
    if payload["format_version"] != FORMAT_VERSION:
        raise SppdetError(f"{path}: checkpoint format version {payload['format_version']}, this sppdet "
                          f"reads version {FORMAT_VERSION}; retrain or use a matching sppdet release")
    missing = [k for k in ("config", "classes", "detector", "model") if k not in payload]
    if missing:
        raise SppdetError(f"{path}: incomplete sppdet checkpoint (no {', '.join(missing)})")
    if payload["detector"] not in KINDS:
        raise SppdetError(f"{path}: unknown detector type {payload['detector']!r} "
                          f"(expected {' or '.join(KINDS)})")
    return payload


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the detector saved at `path` -> (detector in eval mode on `device`, Config,
    class names). No pretrained weights are fetched: the file holds every parameter."""
    payload = read_checkpoint(path)  # first: a bad path fails before the heavy imports
    from .engine import build_detector  # the engine builds detectors from configs

    try:
        cfg = config_from_dict(payload["config"])
    except SppdetError as e:
        raise SppdetError(f"{path}: its config does not fit this sppdet ({e})") from None
    detector = build_detector(cfg, num_classes=len(payload["classes"]), weights="none",
                              kind=KINDS[payload["detector"]])
    try:
        detector.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise SppdetError(f"{path}: network weights do not match its config ({str(e).splitlines()[0]})") from None
    return detector.to(device).eval(), cfg, list(payload["classes"])
