"""checkpoint: save/load round trips (SPP-net and R-CNN) and one clear error per bad file."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sppdet.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from sppdet.config import load_config
from sppdet.detector import SPPDetector
from sppdet.engine import build_detector
from sppdet.rcnn import RCNNDetector
from sppdet.utils import SppdetError

CLASSES = ["disk", "ring", "triangle"]
IMAGE = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
PROPOSALS = np.array([[0, 0, 63, 47], [5, 5, 30, 30], [20, 10, 50, 40], [40, 20, 63, 47],
                      [2, 30, 20, 47], [10, 0, 40, 20]], np.float32)


def tiny_config(*extra):
    return load_config("demo", ["model.width=0.125", "model.fc_dim=32", "model.scales=[96]",
                                "model.rcnn_input_size=64", *extra])


def trained_like(kind: str, cfg=None):
    """A small detector whose every parameter and buffer is set (random), as after training."""
    cfg = cfg or tiny_config()
    torch.manual_seed(0)
    det = build_detector(cfg, len(CLASSES), kind=kind)
    with torch.no_grad():
        det.svm_weight.normal_()
        det.svm_bias.normal_()
        det.svm_scale.fill_(3.0)
        det.bbox_coef.normal_(std=1e-3)
        det.bbox_intercept.normal_(std=0.1)
        det.bbox_scale.fill_(0.5)
        det.bbox_enabled.fill_(True)
    return det.eval(), cfg


@pytest.mark.parametrize("kind, cls", [("spp", SPPDetector), ("rcnn", RCNNDetector)])
def test_round_trip_gives_identical_detections(tmp_path, kind, cls):
    det, cfg = trained_like(kind)
    path = tmp_path / "run" / "model.pt"
    save_checkpoint(path, det, cfg, CLASSES, extra={"note": "test"})
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"], "no temporary file left"

    loaded, cfg2, classes = load_checkpoint(path)
    assert type(loaded) is cls and classes == CLASSES and cfg2 == cfg
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
        expect_error(bad, "not a readable sppdet checkpoint")


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello, I am not a network\n")
    expect_error(text, "not a readable sppdet checkpoint")
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    expect_error(tensor, "not an sppdet checkpoint")
    plain = tmp_path / "dict.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, plain)
    expect_error(plain, "not an sppdet checkpoint (no format_version)")


def rewrite(good_file, tmp_path, name, **changes):
    payload = torch.load(good_file, weights_only=True)
    payload.update(changes)
    path = tmp_path / name
    torch.save(payload, path)
    return path, payload


def test_other_format_version(tmp_path, good_file):
    path, _ = rewrite(good_file, tmp_path, "v2.pt", format_version=2)
    expect_error(path, "format version 2", "reads version 1")


def test_damaged_contents(tmp_path, good_file):
    payload = torch.load(good_file, weights_only=True)
    # weights that do not fit the saved config (another fc width)
    cfg = dict(payload["config"], model=dict(payload["config"]["model"], fc_dim=16))
    expect_error(rewrite(good_file, tmp_path, "fc.pt", config=cfg)[0], "network weights do not match")
    # a config key this version does not know
    cfg = dict(payload["config"], model=dict(payload["config"]["model"], colour="red"))
    expect_error(rewrite(good_file, tmp_path, "key.pt", config=cfg)[0], "model.colour")
    path, payload = rewrite(good_file, tmp_path, "kind.pt", detector="YOLO")
    expect_error(path, "unknown detector type 'YOLO'")
    del payload["model"]
    torch.save(payload, tmp_path / "nomodel.pt")
    expect_error(tmp_path / "nomodel.pt", "incomplete", "model")


def test_loads_on_the_requested_device(good_file):
    det, _, _ = load_checkpoint(good_file, device="cpu")
    assert det.device.type == "cpu" and next(det.parameters()).device.type == "cpu"
    payload = read_checkpoint(good_file)
    assert all(t.device.type == "cpu" for t in payload["model"].values())
