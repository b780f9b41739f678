"""checkpoint: save/load round trips (SPP-net and R-CNN) and one clear error per bad file."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from sppdet.checkpoint import FORMAT_VERSION, load_checkpoint, read_checkpoint, save_checkpoint
from sppdet.config import load_config
from sppdet.features import SPPFeatures
from sppdet.model import build_detector
from sppdet.rcnn import RCNNFeatures
from sppdet.utils import SppdetError, load_verified, save_verified

CLASSES = ["disk", "ring", "triangle"]
IMAGE = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
PROPOSALS = np.array([[0, 0, 63, 47], [5, 5, 30, 30], [20, 10, 50, 40], [40, 20, 63, 47],
                      [2, 30, 20, 47], [10, 0, 40, 20]], np.float32)


def tiny_config(*extra):
    return load_config("demo", ["model.width=0.125", "model.fc_dim=32", "model.scales=[96]",
                                "model.rcnn_input_size=64", "model.weights=none", *extra])


def trained_like(kind: str, cfg=None):
    """A small detector whose every parameter and buffer is set (random), as after training."""
    cfg = cfg or tiny_config()
    torch.manual_seed(0)
    det = build_detector(cfg, len(CLASSES), kind=kind)
    with torch.no_grad():
        det.svm.weight.normal_()
        det.svm.bias.normal_()
        det.svm.scale.fill_(3.0)
        det.regressor.coef.normal_(std=1e-3)
        det.regressor.intercept.normal_(std=0.1)
        det.regressor.scale.fill_(0.5)
        det.backbone.set_preprocessing(mean=(100.0, 110.0, 120.0), std=50.0)
    return det.eval(), cfg


@pytest.mark.parametrize("kind, cls", [("spp", SPPFeatures), ("rcnn", RCNNFeatures)])
def test_round_trip_gives_identical_detections(tmp_path, kind, cls):
    det, cfg = trained_like(kind)
    path = tmp_path / "run" / "model.pt"
    save_checkpoint(path, det, cfg, CLASSES, extra={"note": "test"})
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"], "no temporary file left"

    loaded, cfg2, classes = load_checkpoint(path)
    assert type(loaded.features) is cls and loaded.kind == kind and classes == CLASSES and cfg2 == cfg
    assert loaded.backbone.preprocessing() == det.backbone.preprocessing()  # part of the state
    assert not loaded.training
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())
    for name, value in det.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    a = det.detect(IMAGE, PROPOSALS, score_thresh=-10)
    b = loaded.detect(IMAGE, PROPOSALS, score_thresh=-10)
    assert len(a) > 0
    for x, y in ((a.boxes, b.boxes), (a.scores, b.scores), (a.labels, b.labels)):
        np.testing.assert_array_equal(x, y)
    assert read_checkpoint(path)["extra"] == {"note": "test"}


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    det, cfg = trained_like("spp")
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, det, cfg, CLASSES)
    return path


def expect_error(path, *fragments):
    with pytest.raises(SppdetError) as e:
        load_checkpoint(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.pt", "checkpoint not found")
    expect_error(tmp_path, "checkpoint not found")  # a folder is not a checkpoint either


def test_truncated_file(tmp_path, good_file):
    data = good_file.read_bytes()
    for cut in (len(data) // 2, 100, 0):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data[:cut])
        expect_error(bad, "unreadable", "not a usable sppdet checkpoint")


def garble_largest_member(src, dst, nbytes: int = 400) -> None:
    """Overwrite `nbytes` in the middle of the zip's largest member, its structure intact (the
    archive still opens and torch.load still succeeds)."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size // 2
    data[start:start + nbytes] = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))


def test_changed_bytes_are_caught(tmp_path, good_file):
    bad = tmp_path / "garbled.pt"
    garble_largest_member(good_file, bad)
    torch.load(bad, weights_only=True)  # torch itself does not notice
    expect_error(bad, "does not match its digest", "not a usable sppdet checkpoint")


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello, I am not a network\n")
    expect_error(text, "unreadable")
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    expect_error(tensor, "not a verified sppdet file")
    plain = tmp_path / "dict.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, plain)
    expect_error(plain, "not a verified sppdet file")


def rewrite(good_file, tmp_path, name, **changes):
    """The checkpoint's payload with `changes`, saved as a valid (verified) file."""
    payload = load_verified(good_file, weights_only=True)
    payload.update(changes)
    path = tmp_path / name
    save_verified(payload, path)
    return path, payload


def test_other_format_version(tmp_path, good_file):
    path, _ = rewrite(good_file, tmp_path, "v3.pt", format_version=FORMAT_VERSION + 1)
    expect_error(path, f"format version {FORMAT_VERSION + 1}", f"reads version {FORMAT_VERSION}")
    old = tmp_path / "v1.pt"  # version 1 files had no digest
    torch.save({"format_version": 1, "config": {}, "classes": [], "detector": "SPPDetector", "model": {}}, old)
    expect_error(old, "format version 1", "retrain")


def test_damaged_contents(tmp_path, good_file):
    payload = load_verified(good_file, weights_only=True)
    # weights that do not fit the saved config (another fc width)
    cfg = dict(payload["config"], model=dict(payload["config"]["model"], fc_dim=16))
    expect_error(rewrite(good_file, tmp_path, "fc.pt", config=cfg)[0], "network weights do not match")
    # a config key this version does not know
    cfg = dict(payload["config"], model=dict(payload["config"]["model"], colour="red"))
    expect_error(rewrite(good_file, tmp_path, "key.pt", config=cfg)[0], "model.colour")
    path, payload = rewrite(good_file, tmp_path, "kind.pt", kind="yolo")
    expect_error(path, "unknown detector kind 'yolo'")
    del payload["model"]
    save_verified(payload, tmp_path / "nomodel.pt")
    expect_error(tmp_path / "nomodel.pt", "incomplete", "model")


def test_loads_on_the_requested_device(good_file):
    det, _, _ = load_checkpoint(good_file, device="cpu")
    assert det.device.type == "cpu" and next(det.parameters()).device.type == "cpu"
    payload = read_checkpoint(good_file)
    assert all(t.device.type == "cpu" for t in payload["model"].values())
