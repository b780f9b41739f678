"""Time SPP-net (1 scale and 5 scales) against R-CNN on the same images, proposals and network
weights, and print the paper's Table 10 layout (He et al., TPAMI 2015) for this machine.

    python scripts/benchmark.py [--voc-root ROOT] [--year 2007] [--split test] [--images 3]
        [--max-proposals 2000] [--config NAME] [--set KEY=VALUE ...] [--rcnn-images 1]
        [--rcnn-windows N] [--device cpu|cuda|auto] [--threads N] [--proposal-cache DIR]
        [--json OUT]

What is timed, in seconds per image, for each method on each image (after one untimed warm-up):
- conv: SPP: resize + preprocess + conv1..conv5, once per scale used; R-CNN: preprocess +
  crop/warp of every window to 224 x 224 (16 px context) + conv1..conv5 on each;
- pooling: window projection + pyramid pooling (R-CNN: pooling of each window's own conv5);
- fc: fc6, fc7 and the linear SVMs;
- total: the detector's whole time per image (the above plus window bookkeeping), without NMS,
  which is reported on its own line; selective search is not in any time and is reported
  separately (seconds per image measured when the cached proposals were computed).
R-CNN is slow (one ZF-5 pass per window), so it is timed on the first --rcnn-images images
(all their windows by default); --rcnn-windows N times only the first N windows of each and
scales its times linearly to all windows, which the output then says.

Weights do not change the timings: by default the network is random (model.weights=none; pass
`--set model.weights=PATH` for real ones), the three methods share it, and the SVMs are random.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sppdet.utils import SppdetError, Timer, run_cli, write_json_atomic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VOC_ROOT = REPO.parent / "shared" / "data" / "voc07-mini"
METHODS = {  # name -> (column title, detector kind, scales)
    "spp_1scale": ("SPP 1-scale", "spp", (688,)),
    "spp_5scale": ("SPP 5-scale", "spp", (480, 576, 688, 864, 1200)),
    "rcnn": ("R-CNN", "rcnn", None),
}
PARTS = ("warp", "conv", "pool", "fc", "nms")  # the timers the detectors fill
WARMUP_WINDOWS = 64  # R-CNN warms up on one conv batch, not on ~2000 windows


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--voc-root", default=str(DEFAULT_VOC_ROOT),
                   help="VOCdevkit folder or its VOC<year> folder (default: %(default)s)")
    p.add_argument("--year", default="2007")
    p.add_argument("--split", default="test")
    p.add_argument("--images", type=int, default=3, help="first N images of the split (default 3)")
    p.add_argument("--max-proposals", type=int, default=2000, help="selective search boxes per image")
    p.add_argument("--config", default=None, help="configs/NAME[.yaml] or a path (default: built-in defaults)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. model.width=0.25 model.fc_dim=256")
    p.add_argument("--rcnn-images", type=int, default=1, help="time R-CNN on the first N images (default 1)")
    p.add_argument("--rcnn-windows", type=int, default=None,
                   help="time R-CNN on the first N windows of each image and extrapolate linearly")
    p.add_argument("--device", default=None, help="cpu | cuda | auto (default: the config's run.device)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the config's run.threads, else torch's default)")
    p.add_argument("--proposal-cache", default=str(REPO / "cache" / "proposals"),
                   help="selective search cache folder (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    for name in ("images", "max_proposals", "rcnn_images", "rcnn_windows", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SppdetError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


# ----------------------------------------------------------------------------- timing

def time_detect(detector, image: np.ndarray, boxes: np.ndarray, device: torch.device) -> dict[str, float]:
    """One `detect` call -> seconds by part: conv (R-CNN: warp included), warp, pool, fc, nms,
    and total = the call's wall time minus NMS."""
    timers = {k: Timer(device) for k in PARTS}  # every part present, even those a method skips
    wall = Timer(device)
    with wall:
        detector.detect(image, boxes, timers=timers)
    t = {k: timers[k].total for k in PARTS}
    t["conv"] += t["warp"]  # crop + warp is R-CNN's counterpart of SPP's resize + preprocess
    t["total"] = wall.total - t["nms"]
    return t


def per_image(samples: list[tuple[dict[str, float], int, int]]) -> dict[str, float]:
    """Mean seconds per image over (times, windows timed, windows of the image) samples; an
    image timed on part of its windows counts as times * windows / timed (linear in windows)."""
    keys = samples[0][0].keys()
    return {f"{k}_s": float(np.mean([t[k] * total / timed for t, timed, total in samples])) for k in keys}


# ----------------------------------------------------------------------------- setup

def build_detectors(cfg, num_classes: int, device: torch.device) -> dict:
    """The three detectors on one random network (conv and fc), with random SVMs."""
    from sppdet.engine import build_detector

    torch.manual_seed(cfg.run.seed)
    detectors = {}
    for name, (_, kind, scales) in METHODS.items():
        model = cfg.model if scales is None else dataclasses.replace(cfg.model, scales=scales)
        detectors[name] = build_detector(dataclasses.replace(cfg, model=model), num_classes, kind=kind)
    first = detectors["spp_1scale"]
    gen = torch.Generator().manual_seed(cfg.run.seed)
    # Random SVMs: only NMS (reported apart) depends on the scores.
    first.svm_weight.copy_(torch.randn(first.svm_weight.shape, generator=gen) / first.svm_weight.shape[1] ** 0.5)
    first.svm_bias.fill_(-1.0)
    for det in detectors.values():
        det.load_state_dict(first.state_dict())
        det.to(device).eval()
    return detectors


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu ({model + ', ' if model else ''}{os.cpu_count()} cores)"


def load_proposals(records, cfg, max_boxes: int, cache_dir: str):
    from sppdet.proposals import compute_proposals_with_stats

    p = cfg.proposals
    run = compute_proposals_with_stats(records, mode=p.mode, max_boxes=max_boxes, min_size=p.min_size,
                                       resize=p.resize, cache_dir=cache_dir, workers=p.workers)
    for rec in records:
        if rec.image_id in run.failures:
            raise SppdetError(f"{rec.path}: selective search failed ({run.failures[rec.image_id]})")
        if len(run.boxes[rec.image_id]) == 0:
            raise SppdetError(f"{rec.path}: no proposals of at least {p.min_size} px; "
                              f"lower proposals.min_size (--set proposals.min_size=N)")
    return run


# ----------------------------------------------------------------------------- report

def format_table(result: dict) -> str:
    m, up = result["methods"], result["speedup"]
    names = list(METHODS)
    cols = "".join(f"{METHODS[n][0]:>14s}" for n in names)

    def row(label, values):
        return f"{label:<28s}" + "".join(f"{v:>14s}" for v in values)

    r = result["rcnn"]
    windows = "all windows" if not r["extrapolated"] else \
        f"first {r['windows_timed']} windows per image, times scaled linearly to all windows (EXTRAPOLATED)"
    lines = [
        f"SPP-net vs R-CNN (the paper's Table 10 layout): {result['network']}",
        f"device {result['device']}, {result['threads']} torch threads (pooling runs on one, see sppdet.spp)",
        f"{result['images']} images of {result['dataset']}, {result['proposals_per_image']:.0f} proposals per image; "
        f"R-CNN timed on {r['images']} of them ({m['rcnn']['windows_per_image']:.0f} proposals per image), {windows}",
        "",
        f"{'seconds per image':<28s}{cols}",
        row("conv time", [f"{m[n]['conv_s']:.4f}" for n in names]),
        row("pooling time", [f"{m[n]['pool_s']:.4f}" for n in names]),
        row("fc time (fc6, fc7, SVM)", [f"{m[n]['fc_s']:.4f}" for n in names]),
        row("total time", [f"{m[n]['total_s']:.4f}" for n in names]),
        row("speed-up vs R-CNN (conv)", [f"{up[n]['conv']:.1f}x" for n in names[:-1]] + ["1x"]),
        row("speed-up vs R-CNN (total)", [f"{up[n]['total']:.1f}x" for n in names[:-1]] + ["1x"]),
        "",
        row("NMS (not in total)", [f"{m[n]['nms_s']:.4f}" for n in names]),
        f"proposals: selective search ({result['proposal_mode']}) {result['proposal_s']:.2f} s per image "
        f"(measured when computed; not in any time above)",
        "conv includes resize + preprocessing (R-CNN: crop + warp of each window); total = the "
        "detector's time per image without NMS and proposals.",
        f"pooling / conv, SPP 1-scale: {100 * m['spp_1scale']['pool_s'] / m['spp_1scale']['conv_s']:.0f}%",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from sppdet.config import load_config
    from sppdet.utils import pick_device
    from sppdet.voc import VOCDataset, load_image

    cfg = load_config(args.config, ["model.weights=none"] + list(args.set))
    threads = args.threads or cfg.run.threads
    if threads:
        torch.set_num_threads(threads)
    device = pick_device(args.device or cfg.run.device)
    dataset = VOCDataset(args.voc_root, args.year, args.split, classes=cfg.data.classes)
    dataset.check_not_empty()
    records = dataset.records[: args.images]
    n_rcnn = min(args.rcnn_images, len(records))
    proposals = load_proposals(records, cfg, args.max_proposals, args.proposal_cache)
    detectors = build_detectors(cfg, len(dataset.classes), device)

    with torch.no_grad():
        image, boxes = load_image(records[0].path), proposals.boxes[records[0].image_id]
        for name, det in detectors.items():  # warm-up: thread pools, allocator, oneDNN kernels
            det.detect(image, boxes[:WARMUP_WINDOWS] if name == "rcnn" else boxes)
        samples = {name: [] for name in METHODS}
        for i, rec in enumerate(records):
            image, boxes = load_image(rec.path), proposals.boxes[rec.image_id]
            for name, det in detectors.items():  # image-major: load changes hit all methods alike
                if name == "rcnn" and i >= n_rcnn:
                    continue
                timed = boxes[: args.rcnn_windows] if name == "rcnn" and args.rcnn_windows else boxes
                t = time_detect(det, image, timed, device)
                samples[name].append((t, len(timed), len(boxes)))
                print(f"[{i + 1}/{len(records)}] {rec.image_id} {name}: {t['total']:.2f} s "
                      f"({len(timed)} windows)", file=sys.stderr, flush=True)

    methods = {name: {**per_image(s), "images": len(s),
                      "windows_per_image": float(np.mean([total for _, _, total in s]))}
               for name, s in samples.items()}
    rcnn = methods["rcnn"]
    speedup = {name: {"conv": rcnn["conv_s"] / methods[name]["conv_s"],
                      "total": rcnn["total_s"] / methods[name]["total_s"]} for name in METHODS if name != "rcnn"}
    m = cfg.model
    extrapolated = bool(args.rcnn_windows) and any(timed < total for _, timed, total in samples["rcnn"])
    result = {
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "images": len(records),
        "proposals_per_image": float(np.mean([len(proposals.boxes[r.image_id]) for r in records])),
        "proposal_s": float(np.mean([proposals.seconds[r.image_id] for r in records])),
        "proposal_mode": cfg.proposals.mode,
        "dataset": f"{dataset.folder} {args.split}",
        "network": f"{m.backbone} (width {m.width}, fc {m.fc_dim}, weights {m.weights}), "
                   f"levels {list(m.levels)}",
        "methods": methods,
        "speedup": speedup,
        "rcnn": {"images": n_rcnn, "input_size": m.rcnn_input_size, "context": m.rcnn_context,
                 "windows_timed": args.rcnn_windows if extrapolated else "all", "extrapolated": extrapolated},
        "notes": "seconds per image; conv includes resize + preprocessing (R-CNN: crop + warp); "
                 "total = detector time without NMS (nms_s) and without proposals (proposal_s)",
    }
    print(format_table(result))
    if args.json:
        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    run_cli(main)
