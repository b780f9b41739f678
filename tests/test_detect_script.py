"""scripts/detect.py as a user runs it (a subprocess) and the Predictor behind it, with a tiny
random-weight checkpoint: output files, names that never collide, one `error:` line per bad input,
exit status, and the same detections from the CLI as from the Python API."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO
from sppdet.checkpoint import save_checkpoint
from sppdet.config import load_config
from sppdet.inference import Predictor
from sppdet.model import build_detector

CLASSES = ["apple", "kite"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny SPP detector with random weights whose SVMs score every window above 0, so each
    image gets detections (NMS then thins them)."""
    cfg = load_config("demo", ["model.width=0.125", "model.fc_dim=64", "model.scales=[200]",
                               "proposals.max_boxes=60", "data.classes=[apple, kite]", "model.weights=none"])
    torch.manual_seed(0)
    detector = build_detector(cfg, len(CLASSES), weights="none")
    detector.svm.weight.normal_(0, 0.01)
    detector.svm.bias.fill_(5.0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, detector, cfg, CLASSES)
    return path


def scene(h: int, w: int, seed: int) -> np.ndarray:
    """A noisy background with a few filled shapes, so selective search finds regions."""
    rng = np.random.default_rng(seed)
    image = rng.integers(90, 130, (h, w, 3), dtype=np.uint8)
    for _ in range(3):
        x, y = int(rng.integers(10, w - 50)), int(rng.integers(10, h - 50))
        cv2.rectangle(image, (x, y), (x + 40, y + 30), [int(c) for c in rng.integers(0, 255, 3)], -1)
    cv2.circle(image, (w // 2, h // 2), 20, (20, 200, 240), -1)
    return image


def detect(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny net: threads only thrash the shared cores
    return subprocess.run([sys.executable, str(REPO / "scripts" / "detect.py"), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=env)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_folder_with_images_and_bad_files(tmp_path, checkpoint):
    images = tmp_path / "images"
    images.mkdir()
    shapes = {"a.jpg": (150, 200), "b.png": (180, 160)}
    for seed, (name, (h, w)) in enumerate(shapes.items()):
        cv2.imwrite(str(images / name), scene(h, w, seed))
    (images / "notes.txt").write_text("not an image\n")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated JPEG")
    out = tmp_path / "out"

    proc = detect(tmp_path, str(images), "--checkpoint", str(checkpoint), "--out", str(out))
    assert proc.returncode == 1  # something failed
    errors = error_lines(proc)
    assert len(errors) == 1 and "broken.jpg" in errors[0] and "not a readable image" in errors[0]
    assert "note: skipped 1 non-image path(s):" in proc.stdout and "notes.txt (not an image)" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg", "a.json", "b.jpg", "b.json", "results.json"]
    combined = json.loads((out / "results.json").read_text())
    assert [(im["output"], im["width"], im["height"]) for im in combined["images"]] == [("a", 200, 150), ("b", 160, 180)]
    assert [c["name"] for c in combined["categories"]] == CLASSES

    for name, (h, w) in shapes.items():
        stem = Path(name).stem
        drawn = cv2.imread(str(out / f"{stem}.jpg"))
        assert drawn is not None and drawn.shape == (h, w, 3)
        result = json.loads((out / f"{stem}.json").read_text())
        assert (result["width"], result["height"]) == (w, h)
        dets = result["detections"]
        assert dets, f"{stem}: the SVM bias makes every window score above 0"
        assert f"{images / name}: {len(dets)} detections" in proc.stdout
        for d in dets:
            assert set(d) == {"class", "score", "box"} and d["class"] in CLASSES and d["score"] >= 0.0
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= w - 1 and 0 <= y1 <= y2 <= h - 1  # clipped, 0-based inclusive
        scores = [d["score"] for d in dets]
        assert scores == sorted(scores, reverse=True)


def test_good_images_only_exit_zero_and_a_run_folder_is_a_checkpoint(tmp_path, checkpoint):
    cv2.imwrite(str(tmp_path / "a.jpg"), scene(120, 160, seed=3))
    # --checkpoint may name the run folder (runs/<name>/) that holds model.pt
    proc = detect(tmp_path, "a.jpg", "--checkpoint", str(checkpoint.parent), "--out", "out")
    assert proc.returncode == 0, proc.stderr
    assert error_lines(proc) == [] and (tmp_path / "out" / "a.json").is_file()


def test_missing_path_and_an_image_without_proposals(tmp_path, checkpoint):
    # 6x6 pixels: every selective-search box is under proposals.min_size (8) -> no windows at all
    cv2.imwrite(str(tmp_path / "speck.png"), np.full((6, 6, 3), 128, np.uint8))
    proc = detect(tmp_path, "speck.png", "nowhere.jpg", "--checkpoint", str(checkpoint), "--out", "out")
    assert proc.returncode == 1
    assert error_lines(proc) == ["error: nowhere.jpg: no such file or folder"]
    assert "speck.png: 0 detections" in proc.stdout and "0 boxes" in proc.stdout
    assert json.loads((tmp_path / "out" / "speck.json").read_text())["detections"] == []


@pytest.mark.parametrize("where", ["empty runs folder", "missing file"])
def test_no_checkpoint_is_one_line(tmp_path, where):
    cv2.imwrite(str(tmp_path / "a.jpg"), scene(120, 160, seed=4))
    (tmp_path / "runs" / "demo").mkdir(parents=True)  # a run that never finished
    ckpt = tmp_path / "runs" if where == "empty runs folder" else tmp_path / "runs" / "demo" / "model.pt"
    proc = detect(tmp_path, "a.jpg", "--checkpoint", str(ckpt))
    assert proc.returncode == 1
    expected = (f"error: no checkpoint under {tmp_path / 'runs'}/*/model.pt" if where == "empty runs folder"
                else f"error: {ckpt}: checkpoint not found")
    assert len(error_lines(proc)) == 1 and error_lines(proc)[0].startswith(expected)
    assert proc.stdout == "" and not (tmp_path / "detections").exists()


def test_outputs_never_collide_and_never_overwrite_inputs(tmp_path, checkpoint):
    tree = tmp_path / "in"
    for rel, seed in (("x.jpg", 1), ("x.png", 2), ("sub1/y.jpg", 3), ("sub2/y.jpg", 4)):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tree / rel), scene(100, 120, seed))
    proc = detect(tmp_path, str(tree), "--checkpoint", str(checkpoint), "--out", "out")
    assert proc.returncode == 0, proc.stderr
    got = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.json"))
    assert got == ["results.json", "sub1/y.json", "sub2/y.json", "x_jpg.json", "x_png.json"]
    # the output folder is the input folder: the drawn x_jpg.jpg is fine, but a.jpg -> a.jpg is not
    cv2.imwrite(str(tmp_path / "a.jpg"), scene(100, 120, 5))
    before = (tmp_path / "a.jpg").read_bytes()
    proc = detect(tmp_path, "a.jpg", "--checkpoint", str(checkpoint), "--out", ".")
    assert proc.returncode == 1 and "would overwrite the input" in error_lines(proc)[0]
    assert (tmp_path / "a.jpg").read_bytes() == before


def test_cli_and_python_api_give_identical_detections(tmp_path, checkpoint):
    for seed in range(2):
        cv2.imwrite(str(tmp_path / f"p{seed}.png"), scene(140, 180, seed + 10))
    proc = detect(tmp_path, "p0.png", "p1.png", "--checkpoint", str(checkpoint), "--out", "out")
    assert proc.returncode == 0, proc.stderr
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    assert predictor.score_thresh == 0.0  # the SVM margin's boundary, as the CLI's default
    for seed in range(2):
        result = predictor(str(tmp_path / f"p{seed}.png"))
        assert result.class_names == tuple(CLASSES) and len(result) > 0
        cli = json.loads((tmp_path / "out" / f"p{seed}.json").read_text())["detections"]
        assert [d["class"] for d in cli] == [CLASSES[k - 1] for k in result.labels]
        np.testing.assert_array_equal(np.array([d["score"] for d in cli], np.float32), result.scores)
        np.testing.assert_array_equal(np.array([d["box"] for d in cli], np.float32), result.boxes)
        # an array input and precomputed proposals give the same
        image = cv2.imread(str(tmp_path / f"p{seed}.png"))
        again = predictor(image, proposals=predictor.proposals(image))
        np.testing.assert_array_equal(again.boxes, result.boxes)


def as_rows(det) -> list:
    return sorted((float(s), int(k), *map(float, b)) for b, s, k in zip(det.boxes, det.scores, det.labels))


def test_model_combination_is_nms_on_the_union(tmp_path, checkpoint):
    from sppdet.detector import Detections
    from sppdet.inference import combine_detections

    a = Detections(np.array([[0, 0, 19, 19], [50, 50, 69, 69]], np.float32), np.array([0.9, 0.4], np.float32),
                   np.array([1, 1]))
    b = Detections(np.array([[1, 1, 20, 20], [50, 50, 69, 69], [0, 0, 19, 19]], np.float32),
                   np.array([0.95, 0.8, 0.3], np.float32), np.array([1, 1, 2]))
    both = combine_detections([a, b], nms=0.3, max_per_image=100)
    # class 1: b's 0.95 box suppresses a's 0.9 (IoU 0.82); b's 0.8 suppresses a's 0.4 (IoU 1);
    # class 2 keeps its only box
    assert both.scores.tolist() == pytest.approx([0.95, 0.8, 0.3]) and both.labels.tolist() == [1, 1, 2]
    assert len(combine_detections([a, b], nms=0.3, max_per_image=2)) == 2
    # two copies of one checkpoint combine to that checkpoint's detections
    cv2.imwrite(str(tmp_path / "p.png"), scene(140, 180, 21))
    one = Predictor.from_checkpoint(checkpoint, device="cpu")(str(tmp_path / "p.png"))
    two = Predictor.from_checkpoint([checkpoint, checkpoint], device="cpu")(str(tmp_path / "p.png"))
    assert len(one) == len(two) > 0  # the same detections (equal scores may come in another order)
    assert as_rows(one) == as_rows(two)
    proc = detect(tmp_path, "p.png", "--checkpoint", str(checkpoint), "--checkpoint", str(checkpoint), "--out", "o")
    assert proc.returncode == 0 and "checkpoints" in proc.stdout and "spp+spp" in proc.stdout


def test_the_readme_python_example_runs_as_written(tmp_path, checkpoint, monkeypatch):
    """README's "Python API" block, verbatim, where the first command would have left a model."""
    import re
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Python API\n\n```python\n(.*?)```", text, re.S)
    assert block, "README lost its Python API example"
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "model.pt").write_bytes(checkpoint.read_bytes())
    cv2.imwrite(str(tmp_path / "photo.jpg"), scene(140, 180, 3))
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.boxes.shape == (len(result), 4) and result.scores.shape == result.labels.shape == (len(result),)
    assert list(result.scores) == sorted(result.scores, reverse=True)
    assert result.class_names == namespace["predictor"].classes
