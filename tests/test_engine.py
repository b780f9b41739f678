"""End to end: `engine.run_training` on a tiny synthetic dataset (12 trainval + 6 test images, a
width-1/8 ZF-5, 20 fine-tuning iterations): the files a run writes, resuming an interrupted run,
reusing finished stages, a dataset with other class names, and bad input."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, tiny, write_devkit
from sppdet import engine
from sppdet.checkpoint import load_checkpoint, read_checkpoint
from sppdet.config import SVMConfig, config_from_dict, load_config, resolve
from sppdet.model import build_detector
from sppdet.synthetic import ensure_dataset
from sppdet.utils import SppdetError

CLASSES = ["disk", "ring", "triangle", "cross", "star"]  # demo.yaml's


pytestmark = pytest.mark.usefixtures("keep_torch_threads")


@pytest.fixture(scope="module")
def reference(shared, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted tiny run with the R-CNN comparison -> (run folder, returned metrics)."""
    out = tmp_path_factory.mktemp("reference")
    metrics = engine.run_training(tiny(out, shared=shared))
    return out / "demo", metrics


def read_csv(path: Path) -> list[list[str]]:
    return list(csv.reader(path.open()))


def state_dict(path: Path) -> dict:
    return read_checkpoint(path)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = state_dict(a), state_dict(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def new_log(run_dir: Path, offset: int) -> str:
    return (run_dir / "train.log").read_text()[offset:]


# ----------------------------------------------------------------------------- outputs

def test_tiny_run_writes_every_output(reference, shared):
    run_dir, returned = reference
    cfg = tiny(run_dir.parent, shared=shared)
    assert config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text())) == cfg

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics == returned
    assert set(metrics) == {"metric", "ap", "map"} and metrics["metric"] == "voc07"
    assert list(metrics["ap"]) == CLASSES
    assert all(0.0 <= v <= 1.0 for v in metrics["ap"].values())
    assert metrics["map"] == pytest.approx(np.mean(list(metrics["ap"].values())))

    rows = read_csv(run_dir / "metrics.csv")
    assert rows[0] == ["stage", "step", "name", "value"]
    assert ["finetune", "20", "lr", "0.01"] in rows  # one history entry per 20 iterations
    test_rows = {r[2]: float(r[3]) for r in rows if r[0] == "test"}
    assert test_rows["map"] == pytest.approx(metrics["map"])
    assert test_rows["ap/star"] == pytest.approx(metrics["ap"]["star"])
    assert test_rows["total_s"] > 0

    log = (run_dir / "train.log").read_text()
    assert "data: 12 trainval / 6 test images" in log and "[spp] fine-tune: 20 iterations" in log

    detector, saved_cfg, classes = load_checkpoint(run_dir / "model.pt")
    assert classes == CLASSES and saved_cfg == cfg and detector.kind == "spp"
    assert detector.svm.weight.abs().sum() > 0  # the SVMs made it into the checkpoint
    assert detector.regressor.coef.abs().sum() > 0 and detector.regressor.num_samples.sum() > 0

    comp = json.loads((run_dir / "comparison.json").read_text())
    entry = {"map", "ap", "conv_s", "fc_s", "total_s"}
    assert set(comp) == {"spp", "rcnn", "speedup", "timed_images"} and comp["timed_images"] == 6
    assert set(comp["spp"]) == entry and set(comp["rcnn"]) == entry
    assert set(comp["speedup"]) == {"conv", "total"}
    assert comp["spp"]["map"] == metrics["map"] and comp["spp"]["ap"] == metrics["ap"]
    assert comp["speedup"]["total"] == pytest.approx(comp["rcnn"]["total_s"] / comp["spp"]["total_s"])
    assert json.loads((run_dir / "rcnn" / "metrics.json").read_text())["map"] == comp["rcnn"]["map"]
    _, _, rcnn_classes = load_checkpoint(run_dir / "rcnn" / "model.pt")
    assert rcnn_classes == CLASSES
    md = (run_dir / "comparison.md").read_text()
    assert "| mAP (voc07) |" in md and all(f"| {c} |" in md for c in CLASSES)
    assert "side by side, alternating image by image, on 6 test images" in md


# ----------------------------------------------------------------------------- resume

def interrupt_then_resume(cfg, monkeypatch) -> tuple[Path, dict, str]:
    """Run `cfg`, Ctrl-C right after the fine-tuning snapshot at iteration 10, then rerun with
    resume=True -> (run folder, metrics, what the resumed run logged)."""
    save = engine.Stages.save

    def save_then_interrupt(self, name, key, value):
        save(self, name, key, value)
        if name == "finetune_snapshot":
            raise KeyboardInterrupt

    monkeypatch.setattr(engine.Stages, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        engine.run_training(cfg)
    run_dir = resolve(cfg.run.output_dir) / cfg.run.name
    assert (run_dir / "stages" / "finetune_snapshot.pt").is_file() and not (run_dir / "model.pt").exists()
    monkeypatch.undo()
    offset = len((run_dir / "train.log").read_text())
    metrics = engine.run_training(cfg, resume=True)
    return run_dir, metrics, new_log(run_dir, offset)


def test_interrupted_run_resumes_to_the_uninterrupted_result(reference, shared, tmp_path, monkeypatch):
    ref_dir, ref_metrics = reference
    run_dir, metrics, log = interrupt_then_resume(tiny(tmp_path, shared=shared), monkeypatch)
    assert "[spp] fine-tune: resuming at iteration 10" in log
    assert metrics == ref_metrics  # needs the dropout RNG in the snapshot
    assert json.loads((run_dir / "metrics.json").read_text()) == ref_metrics
    assert_same_weights(run_dir / "model.pt", ref_dir / "model.pt")
    assert_same_weights(run_dir / "rcnn" / "model.pt", ref_dir / "rcnn" / "model.pt")
    comp, ref_comp = (json.loads((d / "comparison.json").read_text()) for d in (run_dir, ref_dir))
    assert comp["rcnn"]["ap"] == ref_comp["rcnn"]["ap"]
    # the fine-tuning history is complete and logged once
    finetune_rows = [r for r in read_csv(run_dir / "metrics.csv") if r[0] == "finetune"]
    assert finetune_rows == [r for r in read_csv(ref_dir / "metrics.csv") if r[0] == "finetune"]


def test_interrupted_run_with_cached_conv5_resumes_exactly(shared, tmp_path, monkeypatch):
    """Frozen conv layers: fine-tuning reads conv5 from the in-memory cache, which the resumed
    run has to rebuild; fresh and cached maps must read the same (fp16-rounded) values."""
    extra = ("finetune.train_conv=false", "finetune.feature_cache=memory", "run.compare_rcnn=false")
    ref_metrics = engine.run_training(tiny(tmp_path / "ref", *extra, shared=shared))
    run_dir, metrics, log = interrupt_then_resume(tiny(tmp_path / "cut", *extra, shared=shared), monkeypatch)
    assert "[spp] fine-tune: resuming at iteration 10" in log and metrics == ref_metrics
    assert_same_weights(run_dir / "model.pt", tmp_path / "ref" / "demo" / "model.pt")


def copy_run(reference, tmp_path) -> Path:
    shutil.copytree(reference[0], tmp_path / "demo")
    return tmp_path / "demo"


def stage_times(run_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("stages/*.pt")}


def test_finished_run_resumed_redoes_nothing(reference, shared, tmp_path):
    run_dir = copy_run(reference, tmp_path)
    before, offset = stage_times(run_dir), len((run_dir / "train.log").read_text())
    assert engine.run_training(tiny(tmp_path, shared=shared), resume=True) == reference[1]
    log = new_log(run_dir, offset)
    for kind in ("spp", "rcnn"):
        for stage in ("fine-tune", "SVMs", "box regression"):
            assert f"[{kind}] {stage}: done earlier, loaded" in log
    assert "iterations in" not in log and "resuming" not in log
    assert stage_times(run_dir) == before
    keys = [tuple(r[:3]) for r in read_csv(run_dir / "metrics.csv")]
    assert len(keys) == len(set(keys))  # the re-evaluation replaced the test rows


def test_changed_svm_C_redoes_the_svms_only(reference, shared, tmp_path):
    run_dir = copy_run(reference, tmp_path)
    before, offset = stage_times(run_dir), len((run_dir / "train.log").read_text())
    engine.run_training(tiny(tmp_path, "svm.C=0.01", shared=shared), resume=True)
    log = new_log(run_dir, offset)
    after = stage_times(run_dir)
    for kind, prefix in (("spp", ""), ("rcnn", "rcnn/")):
        assert f"[{kind}] fine-tune: done earlier, loaded" in log
        assert f"[{kind}] box regression: done earlier, loaded" in log  # it does not read the SVMs
        assert f"[{kind}] SVMs: done earlier" not in log
        for stage in ("finetune", "bbox_reg"):
            assert after[f"{prefix}stages/{stage}.pt"] == before[f"{prefix}stages/{stage}.pt"]
        assert after[f"{prefix}stages/svm.pt"] != before[f"{prefix}stages/svm.pt"]
    new, old = state_dict(run_dir / "model.pt"), state_dict(reference[0] / "model.pt")
    assert torch.equal(new["head.fc7.weight"], old["head.fc7.weight"])
    assert torch.equal(new["regressor.coef"], old["regressor.coef"])
    assert not torch.equal(new["svm.weight"], old["svm.weight"])
    assert load_checkpoint(run_dir / "model.pt")[1].svm.C == 0.01


# ----------------------------------------------------------------------------- other data

def test_dataset_with_other_class_names_needs_only_root_and_classes(tmp_path):
    folder = ensure_dataset(tmp_path / "fruit", seed=1, num_trainval=8, num_test=4,
                            classes=("apple", "kite"), progress=False)  # -> .../VOC2007
    files = sorted(p.name for p in folder.rglob("*"))
    cfg = tiny(tmp_path / "runs", f"data.root={folder}", "data.classes=[apple, kite]",
               f"proposals.cache_dir={tmp_path / 'proposals'}", "finetune.iterations=10",
               "run.compare_rcnn=false")
    metrics = engine.run_training(cfg)
    assert list(metrics["ap"]) == ["apple", "kite"]
    assert all(0.0 <= v <= 1.0 for v in metrics["ap"].values())
    assert load_checkpoint(tmp_path / "runs" / "demo" / "model.pt")[2] == ["apple", "kite"]
    assert sorted(p.name for p in folder.rglob("*")) == files  # used as it is, never regenerated


def test_images_without_proposals_train_and_detect(shared, tmp_path, monkeypatch):
    compute = engine.proposals_for

    def some_empty(cfg, dataset):
        props = compute(cfg, dataset)
        props[dataset.image_ids[0]] = np.zeros((0, 4), np.float32)
        return props

    monkeypatch.setattr(engine, "proposals_for", some_empty)
    metrics = engine.run_training(tiny(tmp_path, "finetune.iterations=10", shared=shared))
    assert all(0.0 <= v <= 1.0 for v in metrics["ap"].values())
    log = (tmp_path / "demo" / "train.log").read_text()
    assert "000001: no proposals; skipped for SVM mining" in log
    assert (tmp_path / "demo" / "comparison.json").is_file()  # the R-CNN path coped as well


# ----------------------------------------------------------------------------- bad input

def one_line_error(cfg) -> str:
    with pytest.raises(SppdetError) as info:
        engine.run_training(cfg)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_class_without_positives_is_named(tmp_path):
    write_devkit(tmp_path / "kit", {"a": [("cat", 3, 3, 30, 30, 0)], "b": [("cat", 10, 5, 60, 40, 1)]})
    (tmp_path / "kit/VOC2007/ImageSets/Main/test.txt").write_text("a\n")
    message = one_line_error(tiny(tmp_path, f"data.root={tmp_path / 'kit'}", "data.classes=[cat, dog]",
                                  f"proposals.cache_dir={tmp_path / 'proposals'}"))
    assert "class(es) dog have no training positives" in message


@pytest.mark.parametrize("empty", ["trainval", "test"])
def test_empty_split_is_one_line(tmp_path, empty):
    write_devkit(tmp_path / "kit", {"a": [("cat", 3, 3, 30, 30, 0)]})
    main = tmp_path / "kit/VOC2007/ImageSets/Main"
    (main / "test.txt").write_text("a\n")
    (main / f"{empty}.txt").write_text("\n")
    message = one_line_error(tiny(tmp_path, f"data.root={tmp_path / 'kit'}", "data.classes=[cat]",
                                  f"proposals.cache_dir={tmp_path / 'proposals'}"))
    assert message.endswith(f"ImageSets/Main/{empty}.txt: the split is empty")


def run_train_script(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_train_script_unknown_key_lists_the_valid_ones(tmp_path):
    proc = run_train_script(tmp_path, "--config", "demo", "svm.Cx=1", f"run.output_dir={tmp_path}")
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown config key svm.Cx; valid keys under svm: ")
    assert lines[0].split(": ", 2)[2].split(", ") == list(SVMConfig.__dataclass_fields__)
    assert not any(tmp_path.iterdir())  # nothing was started


def test_pixel_std_scales_the_network_input():
    """model.pixel_std divides the mean-subtracted pixels (ZF-5: (v - 128) / std), for both
    feature paths; None keeps the paper's raw Caffe input."""
    image = np.array([[[0, 128, 255]]], np.uint8)
    paper = build_detector(load_config("demo", ["model.width=0.125", "model.fc_dim=8", "model.pixel_std=null", "model.weights=none"]), 5)
    np.testing.assert_array_equal(paper.backbone.preprocess(image)[:, 0, 0].numpy(), [-128, 0, 127])
    for kind in ("spp", "rcnn"):
        cfg = load_config("demo", ["model.width=0.125", "model.fc_dim=8", "model.pixel_std=64", "model.weights=none"])
        det = build_detector(cfg, 5, kind=kind)
        np.testing.assert_allclose(det.backbone.preprocess(image)[:, 0, 0].numpy(), [-2, 0, 127 / 64])
    with pytest.raises(SppdetError, match="model.pixel_std"):
        load_config("demo", ["model.pixel_std=0"])


def test_a_dataset_of_shapes_the_pretraining_never_saw(tmp_path):
    """The held-out check of the demo: a VOC-format set of shape families that are in neither the
    classification set nor the detection set, trained with only data.root / data.classes."""
    from sppdet.synthetic import CLASSIFICATION_CLASSES, HELDOUT_FAMILIES

    families = HELDOUT_FAMILIES[:2]
    assert not set(families) & set(CLASSIFICATION_CLASSES)
    folder = ensure_dataset(tmp_path / "heldout", seed=7, num_trainval=8, num_test=4, classes=families,
                            progress=False)
    cfg = tiny(tmp_path / "runs", f"data.root={folder}", f"data.classes=[{','.join(families)}]",
               f"proposals.cache_dir={tmp_path / 'proposals'}", "finetune.iterations=10", "run.compare_rcnn=false")
    metrics = engine.run_training(cfg)
    assert list(metrics["ap"]) == list(families)
