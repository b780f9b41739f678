"""The fault suite: every way a stored file, a cache key, an output path or an input can be wrong,
each ending in the correct result or one clear line, with nothing lost (issue "reliability").

Runs use the tiny demo config of conftest.tiny (about 10 s each); the reference run is shared.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO, tiny
from sppdet import engine
from sppdet.checkpoint import read_checkpoint
from sppdet.utils import SppdetError
from test_checkpoint import garble_largest_member


pytestmark = pytest.mark.usefixtures("keep_torch_threads")


NO_RCNN = ("run.compare_rcnn=false",)


@pytest.fixture(scope="module")
def reference(shared, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("reference")
    return out / "demo", engine.run_training(tiny(out, *NO_RCNN, shared=shared))


def weights(path: Path) -> dict:
    return read_checkpoint(path)["model"]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def copy_run(reference, tmp_path) -> Path:
    shutil.copytree(reference[0], tmp_path / "demo")
    return tmp_path / "demo"


def one_line(fn) -> str:
    with pytest.raises(SppdetError) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


# ----------------------------------------------------------------------------- integrity

def test_a_damaged_snapshot_falls_back_and_resumes_to_the_same_weights(reference, shared, tmp_path,
                                                                       monkeypatch, sppdet_log):
    cfg = tiny(tmp_path, *NO_RCNN, shared=shared)
    save = engine.Stages.save_snapshot

    def save_then_interrupt(self, name, key, value):  # the snapshot at iteration 10, then Ctrl-C
        save(self, name, key, value)
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.Stages, "save_snapshot", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        engine.run_training(cfg)
    monkeypatch.undo()
    snap = tmp_path / "demo" / "stages" / "finetune_snapshot.pt"
    garble_largest_member(snap, snap)
    metrics = engine.run_training(cfg, resume=True)
    assert metrics == reference[1] and same_weights(tmp_path / "demo" / "model.pt", reference[0] / "model.pt")
    log = "\n".join(sppdet_log)
    assert "does not match its digest" in log and "starting the stage from the beginning" in log


@pytest.mark.parametrize("stage", ["finetune", "svm", "bbox_reg"])
def test_a_damaged_stage_file_is_redone_not_loaded(reference, shared, tmp_path, stage, sppdet_log):
    run_dir = copy_run(reference, tmp_path)
    garble_largest_member(run_dir / "stages" / f"{stage}.pt", run_dir / "stages" / f"{stage}.pt")
    metrics = engine.run_training(tiny(tmp_path, *NO_RCNN, shared=shared), resume=True)
    assert metrics == reference[1] and same_weights(run_dir / "model.pt", reference[0] / "model.pt")
    assert any(f"stage {stage}:" in m and "redoing it" in m for m in sppdet_log)


def test_a_damaged_checkpoint_is_one_error_and_evaluates_nothing(reference, tmp_path):
    bad = tmp_path / "model.pt"
    garble_largest_member(reference[0] / "model.pt", bad)
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), "--checkpoint", str(bad),
                           "--json", str(tmp_path / "ap.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == "" and not (tmp_path / "ap.json").exists()
    assert proc.stderr.startswith("error:") and "does not match its digest" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_damaged_conv5_cache_files_are_recomputed(shared, tmp_path, sppdet_log):
    cfg = tiny(tmp_path / "a", *NO_RCNN, "finetune.feature_cache=disk", "finetune.train_conv=false", shared=shared)
    first = engine.run_training(cfg)
    files = sorted((tmp_path / "a" / "demo" / "cache").rglob("*.pt"))
    assert files
    garble_largest_member(files[0], files[0], nbytes=40)
    files[1].write_bytes(files[1].read_bytes()[:100])   # truncated
    again = engine.run_training(cfg, resume=False)
    assert again == first
    assert sum("feature cache" in m and "recomputing it" in m for m in sppdet_log) == 2


# ----------------------------------------------------------------------------- complete keys

def test_changed_annotations_redo_the_stages(reference, shared, tmp_path, sppdet_log):
    """Swap two classes' labels in the XML of the training images: fine-tuning, SVMs and box
    regression are all redone on --resume (their keys cover the annotation content)."""
    data = tmp_path / "data"
    shutil.copytree(shared / "data", data)
    for xml in (data / "VOC2007" / "Annotations").glob("*.xml"):
        xml.write_text(xml.read_text().replace("<name>disk</name>", "<name>@</name>")
                       .replace("<name>ring</name>", "<name>disk</name>").replace("<name>@</name>", "<name>ring</name>"))
    copy_run(reference, tmp_path)
    engine.run_training(tiny(tmp_path, *NO_RCNN, f"data.root={data}",
                             f"proposals.cache_dir={shared / 'proposals'}", shared=shared), resume=True)
    log = "\n".join(sppdet_log)
    assert "done earlier" not in log and "[spp] fine-tune: 20 iterations" in log


def test_changed_image_content_redoes_the_stages(reference, shared, tmp_path, sppdet_log):
    data = tmp_path / "data"
    shutil.copytree(shared / "data", data)
    image = data / "VOC2007" / "JPEGImages" / "000001.jpg"
    cv2.imwrite(str(image), 255 - cv2.imread(str(image)))
    copy_run(reference, tmp_path)
    engine.run_training(tiny(tmp_path, *NO_RCNN, f"data.root={data}",
                             f"proposals.cache_dir={shared / 'proposals'}", shared=shared), resume=True)
    assert "done earlier" not in "\n".join(sppdet_log)


def test_changed_code_version_redoes_the_stages(reference, shared, tmp_path, sppdet_log, monkeypatch):
    copy_run(reference, tmp_path)
    monkeypatch.setattr(engine, "STAGE_VERSION", engine.STAGE_VERSION + 1)
    engine.run_training(tiny(tmp_path, *NO_RCNN, shared=shared), resume=True)
    assert "done earlier" not in "\n".join(sppdet_log)


@pytest.mark.parametrize("change", ["model.pixel_std=32", "model.scales=[240]"])
def test_changed_model_settings_never_reuse_conv5_maps(shared, tmp_path, change):
    """A disk feature cache under the same run name is keyed on the settings that shape conv5:
    the changed run gives the same result as a clean run with that setting."""
    extra = (*NO_RCNN, "finetune.feature_cache=disk", "finetune.train_conv=false")
    engine.run_training(tiny(tmp_path / "a", *extra, shared=shared))
    changed = engine.run_training(tiny(tmp_path / "a", *extra, change, shared=shared), resume=True)
    clean = engine.run_training(tiny(tmp_path / "b", *extra, change, shared=shared))
    assert changed == clean
    assert len(list((tmp_path / "a" / "demo" / "cache").iterdir())) == 2  # one folder per key


# ----------------------------------------------------------------------------- run folders

def test_another_config_in_a_run_folder_is_an_error_naming_the_choices(reference, shared, tmp_path):
    run_dir = copy_run(reference, tmp_path)
    before = sorted(p.name for p in run_dir.iterdir())
    message = one_line(lambda: engine.run_training(tiny(tmp_path, *NO_RCNN, "svm.C=0.5", shared=shared)))
    assert "holds the outputs of another config (differs in svm.C)" in message
    assert "--resume" in message and "run.name" in message and "--overwrite" in message
    assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing touched
    metrics = engine.run_training(tiny(tmp_path, *NO_RCNN, "svm.C=0.5", shared=shared), overwrite=True)
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics


def test_a_locked_run_folder_names_its_holder_and_a_stale_lock_is_taken_over(reference, shared, tmp_path,
                                                                            sppdet_log):
    run_dir = copy_run(reference, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / ".lock").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename,
                                                   "since": "earlier"}))
        message = one_line(lambda: engine.run_training(tiny(tmp_path, *NO_RCNN, shared=shared), resume=True))
        assert f"in use by process {holder.pid}" in message
    finally:
        holder.kill()
        holder.wait()
    metrics = engine.run_training(tiny(tmp_path, *NO_RCNN, shared=shared), resume=True)  # the holder is gone
    assert metrics == reference[1] and not (run_dir / ".lock").exists()
    assert any(f"taking over the lock of process {holder.pid}" in m for m in sppdet_log)


def test_kill_9_during_fine_tuning_resumes_to_the_uninterrupted_result(reference, shared, tmp_path):
    args = [f"{a}" for a in ("model.width=0.125", "model.fc_dim=64", "model.scales=[200]", "model.weights=none",
                             "finetune.iterations=20", "finetune.checkpoint_every=10", "finetune.batch_size=32",
                             "proposals.max_boxes=60", "proposals.workers=0", f"run.output_dir={tmp_path}",
                             "run.threads=1", "run.compare_rcnn=false", f"data.root={shared / 'data'}",
                             "data.synthetic_trainval=12", "data.synthetic_test=6",
                             f"proposals.cache_dir={shared / 'proposals'}")]
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "--config", "demo", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    snapshot = tmp_path / "demo" / "stages" / "finetune_snapshot.pt"
    deadline = time.time() + 120
    # Poll fast: the tiny run's iterations 10..20 and the stage save that removes the snapshot
    # can take well under 50 ms, and a snapshot seen late (or not at all) is no test of resume.
    while not snapshot.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert snapshot.is_file() and not (tmp_path / "demo" / "model.pt").exists()
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "taking over the lock" in done.stderr and "resuming at iteration 10" in done.stderr
    assert json.loads((tmp_path / "demo" / "metrics.json").read_text()) == reference[1]
    assert same_weights(tmp_path / "demo" / "model.pt", reference[0] / "model.pt")


# ----------------------------------------------------------------------------- output paths

def test_output_paths_that_are_files_are_one_line_before_any_work(reference, shared, tmp_path):
    (tmp_path / "runs").write_text("a file")
    message = one_line(lambda: engine.run_training(tiny(tmp_path / "runs", shared=shared)))
    assert "runs" in message and "is a file" in message
    (tmp_path / "cache").write_text("a file")
    message = one_line(lambda: engine.run_training(tiny(tmp_path / "ok", f"proposals.cache_dir={tmp_path / 'cache'}",
                                                        *NO_RCNN, shared=shared)))
    assert "proposals.cache_dir" in message and "exists and is not a folder" in message
    assert not (tmp_path / "ok").exists()
    script = REPO / "scripts" / "evaluate.py"
    for extra, needle in ((["--out", str(tmp_path / "runs")], "exists and is not a folder"),
                          (["--json", str(tmp_path)], "is a folder")):
        proc = subprocess.run([sys.executable, str(script), "--checkpoint", str(reference[0] / "model.pt"), *extra],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and needle in proc.stderr and proc.stderr.count("\n") == 1
        assert "average precision" not in proc.stdout  # failed before detecting the split


def test_permission_errors_are_one_line(monkeypatch, capsys, tmp_path):
    from sppdet.utils import run_cli

    def denied(argv):
        raise PermissionError(13, "Permission denied", str(tmp_path / "runs" / "demo"))

    with pytest.raises(SystemExit) as e:
        run_cli(denied, [])
    assert e.value.code == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'runs' / 'demo'}: Permission denied\n"


# ----------------------------------------------------------------------------- inputs

def test_a_truncated_jpeg_is_named_once_and_used_or_skipped(shared, tmp_path, sppdet_log):
    data = tmp_path / "data"
    shutil.copytree(shared / "data", data)
    jpeg = data / "VOC2007" / "JPEGImages" / "000002.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) * 2 // 3])
    common = (*NO_RCNN, f"data.root={data}", f"proposals.cache_dir={tmp_path / 'proposals'}")
    engine.run_training(tiny(tmp_path / "use", *common, shared=shared))
    named = [m for m in sppdet_log if "000002.jpg" in m]
    assert len(named) == 1 and "truncated JPEG" in named[0] and "used as they decode" in named[0]
    sppdet_log.clear()
    engine.run_training(tiny(tmp_path / "skip", *common, "data.damaged_images=skip", shared=shared))
    assert any("skipped (data.damaged_images=skip)" in m for m in sppdet_log)
    assert "data: 11 trainval" in (tmp_path / "skip" / "demo" / "train.log").read_text()


def test_generated_data_folders_have_the_usual_permissions(reference, shared):
    mode = (shared / "data").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask


def test_dangling_links_and_subfolders_in_a_detect_folder(reference, tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    cv2.imwrite(str(images / "sub" / "a.png"), np.random.default_rng(0).integers(0, 255, (80, 90, 3), np.uint8))
    (images / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (images / "readme.txt").write_text("x")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "detect.py"), str(images), "--checkpoint",
                           str(reference[0] / "model.pt"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "note: skipped 2 non-image path(s)" in proc.stdout and "gone.jpg (dangling link)" in proc.stdout
    assert (tmp_path / "out" / "sub" / "a.json").is_file()  # subfolders are followed


def test_a_huge_image_is_searched_at_a_capped_size_with_a_note(sppdet_log):
    from sppdet.proposals import selective_search

    rng = np.random.default_rng(0)
    image = cv2.resize(rng.integers(0, 255, (30, 45, 3), dtype=np.uint8), (1800, 1200),
                       interpolation=cv2.INTER_NEAREST)  # big flat blocks: a quick search
    boxes = selective_search(image, max_boxes=200, min_size=20, resize=None, max_side=300, threads=1)
    assert any("a 1800x1200 image is searched at 300x200 (proposals.max_side 300)" in m for m in sppdet_log)
    assert len(boxes) and boxes[:, 2].max() > 1500 and boxes[:, 3].max() > 1000  # in the image's pixels


def test_a_garbled_proposal_cache_file_is_recomputed(tmp_path, sppdet_log):
    from sppdet.proposals import compute_proposals

    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8))
    first = compute_proposals([("a", image)], max_boxes=50, min_size=4, cache_dir=tmp_path / "cache")["a"]
    [npz] = list((tmp_path / "cache").rglob("a-*.npz"))
    with np.load(npz) as z:
        parts = {k: z[k] for k in z.files}
    parts["boxes"] = parts["boxes"] + 1  # valid file, changed content, the old digest
    with open(npz, "wb") as f:
        np.savez(f, **parts)
    again = compute_proposals([("a", image)], max_boxes=50, min_size=4, cache_dir=tmp_path / "cache")["a"]
    assert np.array_equal(again, first)
    assert any("ignoring bad cache file" in m and "digest" in m for m in sppdet_log)


def test_proposals_script_reads_any_voc_dataset(shared, reference, tmp_path):
    data = shared / "data"
    script = [sys.executable, str(REPO / "scripts" / "proposals.py"), "--voc-root", str(data), "--split", "test",
              "--resize", "0", "--min-size", "8", "--max-boxes", "60", "--workers", "0",
              "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run(script, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "of 5 classes" in proc.stdout and "recall@0.5" in proc.stdout
    assert "wall clock of each image's search" in proc.stdout
    proc = subprocess.run(script + ["--classes", "disk,ring"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "of 2 classes" in proc.stdout
    proc = subprocess.run(script + ["--config", "demo"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "of 5 classes" in proc.stdout
