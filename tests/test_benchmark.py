"""The benchmark (sppdet.report, scripts/benchmark.py): the timing bookkeeping, and an
end-to-end run on a tiny devkit."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, write_devkit
from sppdet.spp import spp_pool, spp_pool_reference
from sppdet.utils import SppdetError

SCRIPT = REPO / "scripts" / "benchmark.py"


@pytest.fixture(scope="module")
def bench():
    from sppdet import report
    return report


def test_per_image_means_and_linear_extrapolation(bench):
    # Image 1 timed on all 10 windows; image 2 on 5 of its 20 -> counted as 4x its times.
    samples = [({"conv": 1.0, "total": 2.0}, 10, 10), ({"conv": 1.0, "total": 3.0}, 5, 20)]
    assert bench.per_image(samples) == {"conv_s": 2.5, "total_s": 7.0}


def test_time_detect_folds_warp_into_conv_and_counts_nms_in_the_total(bench):
    class Stub:
        features = torch.nn.Identity()

        def detect(self, image, boxes, timers):
            self.features(torch.ones(3))
            for name, seconds in (("warp", 0.02), ("conv", 0.01), ("nms", 0.3)):
                with timers.setdefault(name, None):
                    time.sleep(seconds)

    t, pooled = bench.time_detect(Stub(), None, None, torch.device("cpu"))
    assert t["warp"] >= 0.02 and t["conv"] - t["warp"] >= 0.01 and t["nms"] >= 0.3
    assert t["total"] >= t["conv"] + t["nms"]  # the user waits for NMS too
    assert t["pool"] == t["fc"] == 0.0 and torch.equal(pooled, torch.ones(3))


def test_side_by_side_timing_alternates_the_order_image_by_image(bench, tmp_path):
    """Train.py's Table 10 times both detectors on the same images, alternating which goes first
    (so load drifting on a shared machine touches both alike), after one untimed call each."""
    import numpy as np
    from types import SimpleNamespace
    import cv2

    calls = []

    class Stub:
        features = torch.nn.Identity()
        device = torch.device("cpu")

        def __init__(self, name, seconds):
            self.name, self.seconds = name, seconds

        def detect(self, image, boxes, timers=None, **options):
            calls.append((self.name, len(boxes), options["flag"]))
            self.features(torch.ones(1))
            if timers is not None:
                with timers.setdefault("conv", None):
                    time.sleep(self.seconds)

    records = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        cv2.imwrite(str(path), np.zeros((4, 4, 3), np.uint8))
        records.append(SimpleNamespace(path=path, image_id=str(i)))
    proposals = {str(i): np.zeros((i + 1, 4), np.float32) for i in range(3)}
    t = bench.time_side_by_side({"spp": Stub("spp", 0.001), "rcnn": Stub("rcnn", 0.02)}, records + records,
                                proposals, {"flag": 7}, images=3)
    assert [c[0] for c in calls] == ["spp", "rcnn", "spp", "rcnn", "rcnn", "spp", "spp", "rcnn"]
    assert [c[1] for c in calls] == [1, 1, 1, 1, 2, 2, 3, 3] and {c[2] for c in calls} == {7}
    assert set(t) == {"spp", "rcnn"} and t["rcnn"]["conv_s"] >= 0.02 and t["spp"]["conv_s"] < t["rcnn"]["conv_s"]
    assert t["rcnn"]["total_s"] >= t["rcnn"]["conv_s"] and t["spp"]["fc_s"] == 0.0


def test_spp_pool_restores_the_thread_count():
    # The no-grad path pools on one thread; the caller's setting must come back.
    gen = torch.Generator().manual_seed(0)
    feature = torch.randn(8, 7, 9, generator=gen)
    windows = torch.tensor([[0, 0, 8, 6], [2, 1, 5, 3], [4, 4, 4, 4]])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            out = spp_pool(feature, windows)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out, spp_pool_reference(feature, windows))


@pytest.mark.parametrize("kwargs", [dict(images=0), dict(rcnn_windows=0), dict(max_proposals=-1)])
def test_bad_counts_are_one_line_errors(bench, kwargs, tmp_path):
    with pytest.raises(SppdetError, match="must be >= 1"):
        bench.run_benchmark(tmp_path, **kwargs)


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_benchmark_end_to_end(tmp_path):
    root = write_devkit(tmp_path / "devkit", {"a": [("dog", 2, 2, 40, 30, 0)], "b": [("cat", 5, 5, 60, 40, 0)]},
                        split="test", size=(96, 72))
    out = tmp_path / "bench.json"
    proc = _run("--voc-root", str(root), "--images", "2", "--max-proposals", "30", "--rcnn-windows", "10",
                "--threads", "2", "--device", "cpu", "--proposal-cache", str(tmp_path / "cache"),
                "--json", str(out), "--set", "model.width=0.25", "model.fc_dim=64",
                "model.max_size=800",  # caps the 5 scales' long side at 800: a cheaper conv
                "proposals.min_size=4", "proposals.resize=null", "proposals.workers=1")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["threads"] == 2 and result["device"].startswith("cpu")
    assert result["images"] == 2
    assert 10 < result["proposals_per_image"] <= 30  # so R-CNN's 10 windows are a strict subset
    assert result["proposal_s"] > 0
    assert result["rcnn"] == {"images": 1, "input_size": 224, "context": 16, "windows_timed": 10,
                              "extrapolated": True}
    methods = result["methods"]
    assert set(methods) == {"spp_1scale", "spp_5scale", "rcnn"}
    assert [methods[n]["images"] for n in methods] == [2, 2, 1]
    assert methods["spp_1scale"]["windows_per_image"] == result["proposals_per_image"]
    for name, m in methods.items():
        assert min(m["conv_s"], m["pool_s"], m["fc_s"], m["total_s"], m["nms_s"]) > 0, name
        assert m["total_s"] >= m["conv_s"] + m["pool_s"] + m["fc_s"] + m["nms_s"], name
    heads = result["heads"]
    assert set(heads) == {"spp_1scale", "rcnn", "speedup"} and set(heads["speedup"]) == {"exact", "bf16", "svd", "svd_bf16"}
    for h, s in heads["speedup"].items():
        assert s == pytest.approx(heads["rcnn"][h]["total_s"] / heads["spp_1scale"][h]["total_s"])
    e = result["end_to_end"]
    assert e["total_s"] == pytest.approx(e["proposals_s"] + e["network_s"]) and e["proposals_s"] > 0
    assert result["peak_memory_mb"] > 100
    ss = result["selective_search"]
    assert ss["images"] == 2 and ss["ratio"] == pytest.approx(ss["ours_per_image"] / ss["stock_per_image"])
    assert methods["spp_1scale"]["warp_s"] == 0 and 0 < methods["rcnn"]["warp_s"] <= methods["rcnn"]["conv_s"]
    for name in ("spp_1scale", "spp_5scale"):
        for part in ("conv", "total"):
            expected = methods["rcnn"][f"{part}_s"] / methods[name][f"{part}_s"]
            assert result["speedup"][name][part] == pytest.approx(expected, rel=1e-12)
    table = proc.stdout
    for line in ("conv time", "pooling time", "fc time", "total time", "speed-up vs R-CNN (conv)",
                 "speed-up vs R-CNN (total)", "NMS + box regression", "SVD + bf16", "one detect.py call per image",
                 "peak resident memory"):
        assert line in table
    assert "EXTRAPOLATED" in table and "R-CNN timed on 1 of them" in table
    # The cached proposals are reused: a second run would not recompute them.
    assert len(list((tmp_path / "cache").glob("*/*.npz"))) == 2


def test_bad_voc_root_is_one_error_line(tmp_path):
    proc = _run("--voc-root", str(tmp_path / "missing"), "--proposal-cache", str(tmp_path / "cache"))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing" in lines[0]
