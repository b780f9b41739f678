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


def save_checkpoint(path: str | Path, detector, cfg: Config, classes, extra: dict | None = None) -> None:
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
    return payload


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the detector saved at `path` -> (detector in eval mode, Config, class names)."""
    from .engine import build_detector  # the engine builds detectors from configs

    payload = read_checkpoint(path)
    cfg = config_from_dict(payload["config"])
    detector = build_detector(cfg, num_classes=len(payload["classes"]), weights="none",
                              kind="rcnn" if payload["detector"] == "RCNNDetector" else "spp")
    try:
        detector.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise SppdetError(f"{path}: network weights do not match its config ({str(e).splitlines()[0]})") from None
    return detector.to(device).eval(), cfg, payload["classes"]
