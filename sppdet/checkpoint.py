"""One file per trained detector: config, class names, feature path, network and heads.

Everything lives in the detector's state dict (fc head, SVM scorer, box regressor and the
backbone's pixel preprocessing are modules and buffers), plus the resolved config to rebuild it.
Written atomically with a content digest (`utils.save_verified`); loads on CPU. A file of another
format version, a truncated one, or one whose bytes changed after it was written is one clear
error, and nothing is evaluated with it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import __version__
from .config import Config, config_from_dict
from .model import build_detector
from .utils import CorruptFileError, SppdetError, load_verified, save_verified

FORMAT_VERSION = 2   # 2: heads as modules (svm.*, regressor.*), features.* / backbone preprocessing
KINDS = ("spp", "rcnn")


def save_checkpoint(path: str | Path, detector, cfg: Config, classes, extra: dict | None = None,
                    compressed: dict | None = None) -> None:
    """Write `detector` (its exact head), its resolved config and its class names (labels 1..K)
    to `path`; `compressed`: the truncated-SVD fc6/fc7 for the test settings
    (`inference.for_test`), stored so loading need not compute them."""
    if detector.kind not in KINDS:
        raise TypeError(f"save_checkpoint: unknown detector kind {detector.kind!r}")
    payload = {
        "format_version": FORMAT_VERSION,
        "sppdet_version": __version__,
        "config": cfg.to_dict(),
        "classes": list(classes),
        "kind": detector.kind,
        "model": {k: v.cpu() for k, v in detector.state_dict().items()},
        "extra": extra or {},
    }
    if compressed is not None:
        payload["compressed"] = {"svd": list(compressed["svd"]),
                                 "state": {k: v.cpu() for k, v in compressed["state"].items()}}
    save_verified(payload, path)


def read_checkpoint(path: str | Path) -> dict:
    """The payload of a checkpoint (tensors on CPU), checked for integrity, format and version."""
    path = Path(path)
    if not path.is_file():
        raise SppdetError(f"{path}: checkpoint not found")
    try:
        payload = load_verified(path, weights_only=True)
    except CorruptFileError as e:
        raw = _raw(path)
        if isinstance(raw, dict) and "format_version" in raw:  # written before files carried digests
            raise SppdetError(f"{path}: checkpoint format version {raw['format_version']}, this sppdet "
                              f"reads version {FORMAT_VERSION}; retrain or use a matching sppdet release") from None
        raise SppdetError(f"{e}: not a usable sppdet checkpoint") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        version = payload.get("format_version") if isinstance(payload, dict) else None
        raise SppdetError(f"{path}: checkpoint format version {version}, this sppdet reads version "
                          f"{FORMAT_VERSION}; retrain or use a matching sppdet release")
    missing = [k for k in ("config", "classes", "kind", "model") if k not in payload]
    if missing:
        raise SppdetError(f"{path}: incomplete sppdet checkpoint (no {', '.join(missing)})")
    if payload["kind"] not in KINDS:
        raise SppdetError(f"{path}: unknown detector kind {payload['kind']!r} (expected {' or '.join(KINDS)})")
    return payload


def _raw(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", for_test: bool = False):
    """Rebuild the detector saved at `path` -> (detector in eval mode on `device`, Config,
    class names). No pretrained weights are read: the file holds every parameter. With
    `for_test`, the head is the one its test settings ask for (`inference.for_test`: the stored
    truncated SVD when its settings match)."""
    payload = read_checkpoint(path)
    try:
        cfg = config_from_dict(payload["config"])
    except SppdetError as e:
        raise SppdetError(f"{path}: its config does not fit this sppdet ({e})") from None
    detector = build_detector(cfg, num_classes=len(payload["classes"]), weights="none", kind=payload["kind"])
    try:
        detector.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise SppdetError(f"{path}: network weights do not match its config ({str(e).splitlines()[0]})") from None
    detector = detector.to(device).eval()
    if for_test:
        from .inference import for_test as test_head
        detector, _ = test_head(detector, cfg, payload.get("compressed"))
    return detector, cfg, list(payload["classes"])
