"""scripts/evaluate.py --checkpoint: detect a split with a saved model, write the results
files, COCO json and curves, score; and its argument errors."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO, write_devkit
from sppdet.checkpoint import save_checkpoint
from sppdet.config import load_config
from sppdet.model import build_detector

CLASSES = ["car", "dog", "person"]  # no person in the test split: a curve without positives
OBJECTS = {"000001": [("car", 5, 5, 30, 30, 0), ("dog", 35, 10, 60, 40, 0)],
           "000002": [("dog", 10, 8, 50, 45, 0)],
           "000003": [("car", 20, 15, 44, 40, 1), ("car", 2, 2, 20, 20, 0)]}


def script(*args, timeout=240):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random-weight checkpoint whose config points at a 3-image test devkit."""
    tmp = tmp_path_factory.mktemp("evalckpt")
    devkit = write_devkit(tmp / "devkit", OBJECTS, split="test")
    cfg = load_config(None, [f"data.root={devkit}", f"data.classes=[{','.join(CLASSES)}]",
                             f"proposals.cache_dir={tmp / 'proposals'}", "proposals.max_boxes=50",
                             "proposals.min_size=4", "proposals.resize=null", "proposals.workers=1",
                             "model.weights=none",
                             "model.width=0.125", "model.fc_dim=32", "model.scales=[96]",
                             "run.device=cpu", "run.threads=1"])
    torch.manual_seed(0)
    det = build_detector(cfg, len(CLASSES))
    with torch.no_grad():
        det.svm.weight.normal_()
        det.svm.bias.fill_(2.0)  # plenty of windows above the -1.5 threshold
    ckpt = tmp / "run" / "model.pt"
    save_checkpoint(ckpt, det, cfg, CLASSES)
    return tmp, devkit, ckpt


def test_evaluate_checkpoint_end_to_end(setup):
    tmp, devkit, ckpt = setup
    out_json = tmp / "ap.json"
    p = script("--checkpoint", ckpt, "--json", out_json)
    assert p.returncode == 0, p.stderr
    assert "VOC07 11-point" in p.stdout and "mAP" in p.stdout and "spp detector" in p.stdout
    assert "no positives (no non-difficult objects) for person" in p.stdout
    got = json.loads(out_json.read_text())
    assert set(got) == {"metric", "ap", "map"} and got["metric"] == "voc07"
    assert set(got["ap"]) == set(CLASSES) and all(0 <= v <= 1 for v in got["ap"].values())
    assert got["ap"]["person"] == 0.0
    assert got["map"] == pytest.approx(np.mean(list(got["ap"].values())))

    out = ckpt.parent / "eval_test"  # the default --out
    rows = []
    for k, cls in enumerate(CLASSES, 1):
        lines = (out / f"comp4_det_test_{cls}.txt").read_text().split()
        assert len(lines) % 6 == 0
        for image_id, s, x1, y1, x2, y2 in np.array(lines).reshape(-1, 6):
            rows.append((int(image_id), k, float(s), float(x1), float(y1), float(x2), float(y2)))
        png = cv2.imread(str(out / f"pr_{cls}.png"))
        assert png is not None and png.shape == (400, 400, 3)
    assert rows, "the random model should detect something"
    assert all(r[3] >= 1 and r[4] >= 1 and r[5] <= 64 and r[6] <= 48 for r in rows), "1-based, in the image"

    # COCO results: image ids are 1-based split positions, bbox [x, y, w, h] of the 0-based box
    # with +1 widths, i.e. exactly the results files' rows
    coco = json.loads((out / "coco_results_test.json").read_text())
    gt = json.loads((out / "coco_gt_test.json").read_text())
    assert {im["id"]: im["voc_id"] for im in gt["images"]} == {1: "000001", 2: "000002", 3: "000003"}
    assert len(coco) == len(rows)
    want = sorted((i, k, s, x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1) for i, k, s, x1, y1, x2, y2 in rows)
    have = sorted((d["image_id"], d["category_id"], d["score"], *d["bbox"]) for d in coco)
    np.testing.assert_allclose(np.array(have), np.array(want, dtype=np.float64), rtol=0, atol=1e-9)

    # the results files score the same through --results-dir (one shared scoring path), which
    # writes the same COCO json and curves with --out
    again, rescored = tmp / "again.json", tmp / "rescored"
    p = script("--results-dir", out, "--voc-root", devkit, "--classes", ",".join(CLASSES), "--json", again,
               "--out", rescored)
    assert p.returncode == 0, p.stderr
    assert json.loads(again.read_text()) == got
    assert json.loads((rescored / "coco_results_test.json").read_text()) == coco
    assert sorted(f.name for f in rescored.glob("pr_*.png")) == [f"pr_{c}.png" for c in sorted(CLASSES)]


def test_missing_checkpoint_is_one_error_line(tmp_path):
    out_json = tmp_path / "ap.json"
    p = script("--checkpoint", tmp_path / "missing.pt", "--json", out_json)
    assert p.returncode == 1 and not out_json.exists()
    assert p.stderr.startswith("error:") and p.stderr.strip().count("\n") == 0
    assert "missing.pt" in p.stderr and "not found" in p.stderr


def load_script():
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args, message", [
    (["--results-dir", "x"], "--results-dir needs --voc-root"),
    (["--checkpoint", "{ckpt}", "--classes", "car"], "--classes applies to --results-dir only"),
])
def test_argument_errors(setup, capsys, args, message):
    evaluate = load_script()
    with pytest.raises(SystemExit) as e:
        evaluate.run_cli(evaluate.main, [a.format(ckpt=setup[2]) for a in args])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and err.strip().count("\n") == 0
