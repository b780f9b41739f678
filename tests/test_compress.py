"""Compressed fc layers (truncated SVD, Fast R-CNN 3.1) and reduced precision: exact at full
rank, close on real pooled features for a head with a trained-like spectrum, stored in and read
from checkpoints (scripts/compress.py), and test.exact one switch away."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from conftest import REPO
from sppdet.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from sppdet.config import load_config
from sppdet.heads import LowRankLinear, compress_head, svd_rank
from sppdet.inference import for_test
from sppdet.model import build_detector
from sppdet.voc import VOCDataset, load_image


def test_full_rank_equals_the_layer_and_the_truncation_is_the_best_one():
    torch.manual_seed(0)
    layer = nn.Linear(40, 24)
    x = torch.randn(7, 40)
    full = LowRankLinear.from_linear(layer, 24)
    torch.testing.assert_close(full(x), layer(x), rtol=1e-5, atol=1e-5)
    # rank r: the weight is the SVD truncation, whose error is the dropped singular values
    r = LowRankLinear.from_linear(layer, 5)
    w = r.expand.weight @ r.reduce.weight
    s = torch.linalg.svdvals(layer.weight.double())
    assert torch.linalg.matrix_norm(layer.weight - w).item() == pytest.approx(s[5:].norm().item(), rel=1e-4)
    torch.testing.assert_close(r.expand.bias, layer.bias)


def test_rank_specs():
    fc6, fc7 = nn.Linear(12800, 4096), nn.Linear(4096, 4096)
    assert (svd_rank(0.25, fc6), svd_rank(0.0625, fc7)) == (1024, 256)  # Fast R-CNN's ranks
    assert svd_rank(300, fc6) == 300 and svd_rank(0, fc6) is None
    assert svd_rank(0.75, fc7) is None  # 3072 * 8192 > 4096 * 4096: not cheaper, left alone
    assert svd_rank(0.25, LowRankLinear(10, 10, 2)) is None


def trained_like(layer: nn.Linear, decay: float, generator) -> None:
    """Give `layer` a trained-like spectrum: random singular vectors, singular values k^-decay."""
    out_f, in_f = layer.weight.shape
    u, _ = torch.linalg.qr(torch.randn(out_f, min(out_f, in_f), generator=generator))
    v, _ = torch.linalg.qr(torch.randn(in_f, min(out_f, in_f), generator=generator))
    s = torch.arange(1, min(out_f, in_f) + 1, dtype=torch.float32) ** -decay
    with torch.no_grad():
        layer.weight.copy_(u @ torch.diag(s) @ v.T * (in_f ** 0.5 / s.norm()))


def test_compressed_bf16_scores_stay_close_on_real_pooled_features(voc07_mini):
    """Pooled conv5 features of genuine VOC photographs (ZF-5, width 1/2), a head with a
    power-law spectrum: SVD at Fast R-CNN's fractions plus bf16 moves the SVM scores by a small
    fraction of their spread."""
    cfg = load_config(None, ["model.width=0.5", "model.fc_dim=512", "model.weights=none", "model.scales=[400]"])
    torch.manual_seed(0)
    det = build_detector(cfg, 20).eval()
    gen = torch.Generator().manual_seed(1)
    trained_like(det.head.fc6, 1.0, gen)
    trained_like(det.head.fc7, 1.0, gen)
    with torch.no_grad():
        det.svm.weight.normal_(generator=gen)
        det.svm.weight.mul_(0.05)
    ds = VOCDataset(voc07_mini, split="test")
    rng = np.random.default_rng(0)
    pooled = []
    for rec in ds.records[:2]:
        image = load_image(rec.path)
        h, w = image.shape[:2]
        xy = rng.uniform(0, [w - 40, h - 40], (150, 2))
        wh = rng.uniform(30, 250, (150, 2))
        boxes = np.concatenate([xy, np.minimum(xy + wh, [w - 1, h - 1])], 1).astype(np.float32)
        with torch.no_grad():
            pooled.append(det.features(image, torch.from_numpy(boxes)))
    pooled = torch.cat(pooled)
    with torch.no_grad():
        exact = det.svm(det.fc7(pooled))
        bf16 = det.svm(det.fc7(pooled, "bf16"))
        compress_head(det.head, 0.25, 0.0625)
        svd = det.svm(det.fc7(pooled))
        both = det.svm(det.fc7(pooled, "bf16"))
    spread = exact.std().item()

    def corr(a):
        return np.corrcoef(a.flatten().numpy(), exact.flatten().numpy())[0, 1]

    # bf16 alone: rounding only (8 mantissa bits)
    assert (bf16 - exact).abs().max().item() < 0.05 * spread and corr(bf16) > 0.999
    # SVD: the energy of the dropped singular values; a wrong factor order, a missing S or bias
    # would leave no correlation at all
    print(corr(svd), corr(both), (both - exact).abs().mean().item() / spread)
    assert corr(svd) > 0.9 and corr(both) > 0.9
    assert (both - exact).abs().mean().item() < 0.3 * spread


def test_checkpoints_store_the_compression_and_exact_is_one_switch_away(tmp_path):
    cfg = load_config("demo", ["model.width=0.125", "model.fc_dim=64", "model.weights=none", "test.svd_fc6=8",
                               "test.svd_fc7=0.25"])
    torch.manual_seed(0)
    det = build_detector(cfg, 3)
    path = tmp_path / "model.pt"
    save_checkpoint(path, det, cfg, ["a", "b", "c"])
    assert "compressed" not in read_checkpoint(path)
    plain, _, _ = load_checkpoint(path, for_test=True)   # computed at load
    assert (plain.head.fc6.rank, plain.head.fc7.rank) == (8, 16)
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "compress.py"), str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "fc6 rank 8, fc7 rank 16" in proc.stdout
    payload = read_checkpoint(path)
    assert payload["compressed"]["svd"] == [8, 0.25] and "fc6.reduce.weight" in payload["compressed"]["state"]
    stored, cfg2, _ = load_checkpoint(path, for_test=True)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, stored.state_dict()[k]), k
    exact, _, _ = load_checkpoint(path)  # the exact head is still there
    assert isinstance(exact.head.fc6, nn.Linear) and torch.equal(exact.head.fc6.weight, det.head.fc6.weight)
    from dataclasses import replace
    cfg_exact = replace(cfg2, test=replace(cfg2.test, exact=True))
    kept, stored_again = for_test(exact, cfg_exact, payload["compressed"])
    assert isinstance(kept.head.fc6, nn.Linear) and stored_again is None
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "compress.py"), str(path), "--svd-fc6", "-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: --svd-fc6 must be >= 0")


def test_head_variants_of_a_trained_detector(tmp_path):
    """scripts/benchmark.py --heads: every variant's mAP, time and largest score difference."""
    from conftest import tiny
    from sppdet.engine import run_training
    from sppdet.report import compare_heads, format_heads

    cfg = tiny(tmp_path, "run.compare_rcnn=false", "model.fc_dim=128", "test.svd_fc6=16", "test.svd_fc7=16",
               shared=tmp_path)
    metrics = run_training(cfg)
    result = compare_heads(tmp_path / "demo" / "model.pt", device="cpu")
    assert set(result) == {"exact", "bf16", "svd", "svd_bf16"}
    assert result["exact"]["max_score_diff"] == 0.0 and result["exact"]["ranks"] == {}
    assert result["svd"]["ranks"] == {"fc6": 16, "fc7": 16} and result["svd"]["max_score_diff"] > 0
    # the training run evaluated the default head (SVD + bf16 where native, else SVD in fp32)
    default = "svd_bf16" if result["svd_bf16"]["precision"] == "bf16" else "svd"
    assert result[default]["map"] == pytest.approx(metrics["map"])
    assert "max |score diff|" in format_heads(result)
