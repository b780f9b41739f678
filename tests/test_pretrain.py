"""Pretraining (the paper's first half): batch-norm folding, the classifier at any input size and
its no-SPP baseline, the test views, the schedules, a tiny end-to-end run whose weights start a
detector's conv and fc layers, exact resume, and DistributedDataParallel under torchrun (2 CPU
processes) against one process with the same global batch."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from sppdet.backbones import build_backbone
from sppdet.classifier import SPPClassifier, add_batch_norm, fold_batch_norm
from sppdet.config import load_config
from sppdet.model import build_detector
from sppdet.pretrain import epoch_size, learning_rate, run_pretraining, view_crops
from sppdet.synthetic import ensure_classification_set
from sppdet.utils import load_verified


pytestmark = pytest.mark.usefixtures("one_thread")


def test_folded_batch_norm_computes_what_the_trained_net_does():
    torch.manual_seed(0)
    backbone = add_batch_norm(build_backbone("zf5", width=0.125))
    x = torch.randn(4, 3, 64, 72)
    backbone.train()
    for _ in range(3):  # non-trivial running statistics
        backbone(x * 3 + 1)
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
    backbone.eval()
    with torch.no_grad():
        want = backbone(x)
        folded = fold_batch_norm(backbone)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        assert set(build_backbone("zf5", width=0.125).state_dict()) == set(folded.state_dict())
        torch.testing.assert_close(folded(x), want, rtol=1e-4, atol=1e-4)


def test_spp_classifier_takes_any_size_and_the_no_spp_baseline_only_its_own():
    torch.manual_seed(0)
    spp = SPPClassifier(build_backbone("zf5", width=0.125), 7, levels=(3, 1), fc_dim=16).eval()
    for size in ((96, 96), (77, 77), (110, 140)):
        assert spp(torch.randn(2, 3, *size)).shape == (2, 7)
    # the paper's rule for 6x6 bins on an a x a map, window ceil(a/6), stride floor(a/6): conv5 of
    # a 224 input is 13x13 -> 3x3 stride 2 -> 6x6 (the original pool5); of a 96 input 5x5 ->
    # 1x1 stride 1 -> 5x5, so fc6 sees 32 channels x 25
    fixed = SPPClassifier(build_backbone("zf5", width=0.125), 7, fc_dim=16, pyramid="none", fixed_input=224)
    assert fixed.pool == (3, 2) and fixed.head.fc6.in_features == 32 * 36
    fixed = SPPClassifier(build_backbone("zf5", width=0.125), 7, fc_dim=16, pyramid="none", fixed_input=96).eval()
    assert fixed.head.fc6.in_features == 32 * 25 and fixed(torch.randn(2, 3, 96, 96)).shape == (2, 7)
    with pytest.raises(RuntimeError):
        fixed(torch.randn(1, 3, 150, 150))


def test_test_views_centre_corners_flips_and_full_image():
    image = np.arange(120 * 160 * 3, dtype=np.uint32).reshape(120, 160, 3).astype(np.uint8)
    v = view_crops(image, resize=120, crop=100)   # short side already 120: no resampling
    assert [len(v[k]) for k in ("center", "ten", "full")] == [1, 10, 1]
    np.testing.assert_array_equal(v["center"][0], image[10:110, 30:130])
    np.testing.assert_array_equal(v["ten"][1], image[:100, :100])           # top-left corner
    np.testing.assert_array_equal(v["ten"][4], image[20:, 60:])             # bottom-right corner
    np.testing.assert_array_equal(v["ten"][5], image[10:110, 30:130][:, ::-1])  # centre, flipped
    assert v["full"][0].shape == (120, 160, 3)


def test_multi_size_epochs_and_learning_rate_schedules():
    cfg = load_config("demo_pretrain", ["pretrain.crop=96", "pretrain.small_size=72", "pretrain.multi_size=alternate"])
    assert [epoch_size(cfg, e) for e in range(4)] == [96, 72, 96, 72]
    cfg = load_config("demo_pretrain", ["pretrain.crop=96", "pretrain.small_size=72", "pretrain.multi_size=random"])
    sizes = [epoch_size(cfg, e) for e in range(40)]
    assert min(sizes) >= 72 and max(sizes) <= 96 and len(set(sizes)) > 5
    assert sizes == [epoch_size(cfg, e) for e in range(40)]  # seeded
    cfg = load_config(None, ["pretrain.lr=0.1", "pretrain.lr_steps=[2,4]", "pretrain.epochs=6"])
    assert [learning_rate(cfg, e) for e in (0, 1.9, 2, 3.5, 4, 5.9)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3])
    cfg = load_config(None, ["pretrain.lr=0.1", "pretrain.lr_schedule=cosine", "pretrain.warmup_epochs=2",
                             "pretrain.epochs=10"])
    assert [learning_rate(cfg, e) for e in (0, 1, 2, 6, 10)] == pytest.approx([0.0, 0.05, 0.1, 0.05, 0.0])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cls") / "set"
    ensure_classification_set(root, workers=1, progress=False, train_per_class=8, val_per_class=2,
                              image_size=48, classes=("disk", "ring", "triangle", "cross"))
    return root


def tiny_pretrain(images, out, *extra):
    return load_config("demo_pretrain", [f"data.root={images}", "data.synthetic=false", "model.width=0.125",
                                         "model.fc_dim=32", "pretrain.epochs=3", "pretrain.batch_size=8",
                                         "pretrain.resize=48", "pretrain.crop=40", "pretrain.small_size=32",
                                         "pretrain.val_every=2", f"run.output_dir={out}", "run.name=pre",
                                         "run.threads=1", "pretrain.workers=0", *extra])


def test_tiny_pretraining_writes_its_outputs_and_starts_a_detector(images, tmp_path, caplog):
    cfg = tiny_pretrain(images, tmp_path)
    metrics = run_pretraining(cfg)
    run_dir = tmp_path / "pre"
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert set(metrics) == {"top1_error", "top5_error", "epochs"} and metrics["epochs"] == 3
    for key in ("top1_error", "top5_error"):
        assert set(metrics[key]) == {"center", "ten", "full"}
        assert all(0.0 <= v <= 1.0 for v in metrics[key].values())
    assert metrics["top5_error"]["center"] == 0.0  # 4 classes: the top 5 hold every label
    history = (run_dir / "history.csv").read_text().splitlines()
    assert len(history) == 4 and "val_top1_error_center" in history[0]
    weights = load_verified(run_dir / "weights.pth", weights_only=True)
    assert weights["meta"]["classes"] == ["cross", "disk", "ring", "triangle"]  # folder names, sorted
    assert weights["meta"]["levels"] == [6, 3, 2, 1]
    # the detector's conv and fc6/fc7 start from it
    det_cfg = load_config("demo", ["model.width=0.125", "model.fc_dim=32", f"model.weights={run_dir / 'weights.pth'}"])
    with caplog.at_level(logging.INFO, logger="t"):
        det = build_detector(det_cfg, 5, logger=logging.getLogger("t"))
    assert "fc6/fc7 start from" in caplog.text
    state = weights["state_dict"]
    assert torch.equal(det.backbone.conv3.weight, state["conv3.weight"])
    assert torch.equal(det.head.fc7.weight, state["fc7.weight"])
    assert det.backbone.preprocessing() == weights["meta"]["input"]


def test_a_loading_process_gives_the_same_weights_and_bf16_changes_them(images, tmp_path):
    """demo_pretrain decodes in a worker process (pretrain.workers=1): its batches, augmentation
    included, must be the in-process ones. pretrain.precision=bf16 must reach the arithmetic."""
    def weights(name, *extra):
        run_pretraining(tiny_pretrain(images, tmp_path / name, "pretrain.epochs=2", *extra))
        return load_verified(tmp_path / name / "pre" / "weights.pth", weights_only=True)["state_dict"]

    base = weights("base")
    loaded = weights("worker", "pretrain.workers=1")
    assert all(torch.equal(base[k], loaded[k]) for k in base)
    bf16 = weights("bf16", "pretrain.precision=bf16")
    assert all(torch.isfinite(v).all() for v in bf16.values())
    assert not torch.equal(base["fc6.weight"], bf16["fc6.weight"])


def test_resume_after_an_interruption_gives_the_same_weights(images, tmp_path, monkeypatch):
    from sppdet import pretrain

    full = run_pretraining(tiny_pretrain(images, tmp_path / "a"))
    cfg = tiny_pretrain(images, tmp_path / "b")
    real = pretrain.save_verified

    def stop_after_first_epoch(obj, path):
        real(obj, path)
        if "snapshot" in str(path) and obj["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "save_verified", stop_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_pretraining(cfg)
    monkeypatch.undo()
    again = run_pretraining(cfg, resume=True)
    assert again == full
    a = load_verified(tmp_path / "a" / "pre" / "weights.pth", weights_only=True)["state_dict"]
    b = load_verified(tmp_path / "b" / "pre" / "weights.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_cpu_processes_match_one_process_with_the_same_global_batch(images, tmp_path):
    """No dropout and no batch norm (per-process statistics): the two ranks average their
    gradients, so they end identical, and equal to one process on the whole global batch."""
    common = ["--config", "demo_pretrain", f"data.root={images}", "data.synthetic=false", "model.width=0.125",
              "model.fc_dim=32", "model.dropout=0", "pretrain.batch_norm=false", "pretrain.epochs=2",
              "pretrain.batch_size=8", "pretrain.resize=48", "pretrain.crop=40", "pretrain.small_size=32",
              "pretrain.val_every=5", "run.threads=1", "run.device=cpu", "pretrain.workers=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = str(REPO / "scripts" / "pretrain.py")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          script, *common, f"run.output_dir={tmp_path}", "run.name=ddp"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "all 2 processes hold the same weights" in (tmp_path / "ddp" / "train.log").read_text()
    single = subprocess.run([sys.executable, script, *common, f"run.output_dir={tmp_path}", "run.name=one"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    a = load_verified(tmp_path / "ddp" / "weights.pth", weights_only=True)["state_dict"]
    b = load_verified(tmp_path / "one" / "weights.pth", weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert any(not torch.equal(a[k], build_backbone("zf5", width=0.125).state_dict().get(k, a[k]))
               for k in a if k.startswith("conv"))  # it did train


def test_initialisation_schemes():
    from sppdet.classifier import gabor_bank, initialize

    w = gabor_bank((24, 3, 7, 7))
    assert w.shape == (24, 3, 7, 7) and torch.isfinite(w).all()
    # Gabors are zero-mean; all filters have He-normal's expected norm sqrt(2 / fan_out * fan_in)
    assert w[:16].mean(dim=(1, 2, 3)).abs().max() < 1e-6
    torch.testing.assert_close(w.flatten(1).norm(dim=1), torch.full((24,), (2 / (24 * 49) * 147) ** 0.5))
    torch.manual_seed(0)
    model = SPPClassifier(build_backbone("zf5", width=0.25), 5, fc_dim=32)
    initialize(model, "gabor")
    assert torch.equal(model.backbone.conv1.weight, gabor_bank(tuple(model.backbone.conv1.weight.shape)))
    assert not model.backbone.conv2.bias.any() and not model.head.fc6.bias.any()
    fan_out = model.backbone.conv3.weight[0].numel() // model.backbone.conv3.in_channels * model.backbone.conv3.out_channels
    assert model.backbone.conv3.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)
