"""The paper's Table 10 for this machine: SPP-net against R-CNN on the same network, as the
training run reports it (mAP and time per image on the test split: `comparison`) and as the
benchmark measures it (conv, pooling, fc and total time per image for SPP 1-scale, SPP 5-scale
and R-CNN on the same images, proposals and weights: `run_benchmark`).

Times are seconds per image. conv includes resizing + preprocessing (R-CNN: crop + warp of every
window); total is the detector's whole time per image without NMS and proposals.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .utils import SppdetError, Timer

# ----------------------------------------------------------------------------- train.py's table


def comparison(spp: tuple[dict, dict], rcnn: tuple[dict, dict], timed_images: int | None = None) -> dict:
    """(metrics, seconds per image) of SPP-net and of R-CNN -> the comparison.json dict."""
    def entry(metrics, times):
        return {"map": metrics["map"], "ap": metrics["ap"], "conv_s": times.get("conv_s", 0.0),
                "fc_s": times.get("fc_s", 0.0), "total_s": times["total_s"]}
    out = {"spp": entry(*spp), "rcnn": entry(*rcnn)}
    out["speedup"] = {"conv": out["rcnn"]["conv_s"] / max(out["spp"]["conv_s"], 1e-12),
                      "total": out["rcnn"]["total_s"] / max(out["spp"]["total_s"], 1e-12)}
    if timed_images is not None:
        out["timed_images"] = timed_images
    return out


SIDE_BY_SIDE_IMAGES = 30  # R-CNN takes ~0.4 s per demo image: ~15 s for the timing pass


def time_side_by_side(detectors: dict, dataset, proposals: dict[str, np.ndarray], options: dict,
                      images: int = SIDE_BY_SIDE_IMAGES) -> dict[str, dict[str, float]]:
    """Seconds per image by part ({name: {conv_s, fc_s, total_s, ...}}) of each detector, timed
    image by image on the first `images` of `dataset`, the order alternating from one image to
    the next: load on a shared machine then touches every detector alike, which separate passes
    over the split minutes apart do not promise (the speed-up moved from 24x to 38x that way).
    One untimed call each first (allocator and thread-pool warm-up)."""
    from .voc import load_image

    records = list(dataset)[:images]
    names = list(detectors)
    samples = {n: [] for n in names}
    for i, rec in enumerate(records):
        image, boxes = load_image(rec.path), proposals[rec.image_id]
        if i == 0:
            for d in detectors.values():
                d.detect(image, boxes, **options)
        for n in (names if i % 2 == 0 else names[::-1]):
            samples[n].append(time_detect(detectors[n], image, boxes, detectors[n].device, **options)[0])
    return {n: {f"{k}_s": float(np.mean([t[k] for t in s])) for k in PARTS + ("total",)}
            for n, s in samples.items()}


def comparison_markdown(comp: dict, metric: str, device: str) -> str:
    s, r, up = comp["spp"], comp["rcnn"], comp["speedup"]
    lines = [f"# SPP-net vs R-CNN (the paper's Table 10 layout), {device}", "",
             "| | SPP-net (1 network pass per scale) | R-CNN (1 pass per window) |", "|---|---|---|",
             f"| mAP ({metric}) | {100 * s['map']:.1f} | {100 * r['map']:.1f} |",
             f"| conv time per image (s) | {s['conv_s']:.4f} | {r['conv_s']:.4f} |",
             f"| fc time per image (s) | {s['fc_s']:.4f} | {r['fc_s']:.4f} |",
             f"| total time per image (s) | {s['total_s']:.4f} | {r['total_s']:.4f} |",
             f"| speed-up (conv) | {up['conv']:.1f}x | 1x |",
             f"| speed-up (total) | {up['total']:.1f}x | 1x |", "",
             "Times exclude selective search (computed once and cached, shared by both); total "
             "includes NMS." + (f" Timed side by side, alternating image by image, on {comp['timed_images']} "
                                "test images." if "timed_images" in comp else ""), "",
             "| class | SPP-net AP | R-CNN AP |", "|---|---|---|"]
    lines += [f"| {c} | {100 * s['ap'][c]:.1f} | {100 * r['ap'][c]:.1f} |" for c in s["ap"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- benchmark.py

METHODS = {  # name -> (column title, detector kind, scales)
    "spp_1scale": ("SPP 1-scale", "spp", (688,)),
    "spp_5scale": ("SPP 5-scale", "spp", (480, 576, 688, 864, 1200)),
    "rcnn": ("R-CNN", "rcnn", None),
}
# fc head variants timed on the same pooled features: name -> (title, SVD on, precision)
HEADS = {
    "exact": ("fp32 (exact)", False, "fp32"),
    "bf16": ("bf16", False, "bf16"),
    "svd": ("SVD fp32", True, "fp32"),
    "svd_bf16": ("SVD + bf16", True, "bf16"),
}
PARTS = ("warp", "conv", "pool", "fc", "nms")  # the timers the detectors fill
WARMUP_WINDOWS = 64  # R-CNN warms up on one conv batch, not on ~2000 windows


def time_detect(detector, image: np.ndarray, boxes: np.ndarray, device: torch.device,
                **options) -> tuple[dict[str, float], torch.Tensor]:
    """One `detect` call -> (seconds by part: conv (R-CNN: warp included), warp, pool, fc, nms,
    total = the call's wall time, NMS included; the pooled features it computed)."""
    timers = {k: Timer(device) for k in PARTS}  # every part present, even those a method skips
    wall = Timer(device)
    pooled = []
    hook = detector.features.register_forward_hook(lambda m, args, out: pooled.append(out))
    try:
        with wall:
            detector.detect(image, boxes, timers=timers, **options)
    finally:
        hook.remove()
    t = {k: timers[k].total for k in PARTS}
    t["conv"] += t["warp"]  # crop + warp is R-CNN's counterpart of SPP's resize + preprocess
    t["total"] = wall.total
    return t, pooled[0]


def time_heads(detector, heads: dict, pooled: torch.Tensor, device: torch.device) -> dict[str, float]:
    """Seconds of fc6 + fc7 + SVM scores on `pooled` for each head variant {name: (head, precision)}."""
    from .features import pooling_dtype

    out = {}
    original = detector.head
    try:
        for name, (head, precision) in heads.items():
            detector.head = head
            timer = Timer(device)
            x = pooled.to(pooling_dtype(precision))  # as that head's detect call pools (untimed)
            with torch.no_grad(), timer:
                detector.svm(detector.fc7(x, precision))
            out[name] = timer.total
    finally:
        detector.head = original
    return out


def per_image(samples: list[tuple[dict[str, float], int, int]]) -> dict[str, float]:
    """Mean seconds per image over (times, windows timed, windows of the image) samples; an
    image timed on part of its windows counts as times * windows / timed (linear in windows)."""
    keys = samples[0][0].keys()
    return {f"{k}_s": float(np.mean([t[k] * total / timed for t, timed, total in samples])) for k in keys}


# Of all (window, class) pairs, the shares a trained detector scores above the candidate threshold
# test.score_thresh (-1.5: they go to NMS, so NMS's cost depends on it) and above 0 (what the
# Predictor reports): measured on the demo's SPP-net, 30 test images. The benchmark's random SVMs
# are scaled and shifted per class to match both.
SCORE_SHARES = {"candidates": 0.516, "above_zero": 0.0056}


def build_benchmark_detectors(cfg, num_classes: int, device: torch.device,
                              calibration: tuple[np.ndarray, np.ndarray]) -> tuple[dict, dict]:
    """The three detectors on one random network (conv and fc) with random SVMs that score the
    windows of the `calibration` (image, boxes) as a trained detector does (SCORE_SHARES), and
    the head variants {name: (FCHead, precision)}: SVD heads are random at their ranks (timings
    depend on shapes, not on values)."""
    import copy

    from .heads import LowRankLinear, svd_rank
    from .inference import resolve_precision
    from .model import build_detector

    torch.manual_seed(cfg.run.seed)
    detectors = {}
    for name, (_, kind, scales) in METHODS.items():
        model = cfg.model if scales is None else dataclasses.replace(cfg.model, scales=scales)
        detectors[name] = build_detector(dataclasses.replace(cfg, model=model), num_classes, kind=kind)
    first = detectors["spp_1scale"]
    gen = torch.Generator().manual_seed(cfg.run.seed)
    first.svm.weight.copy_(torch.randn(first.svm.weight.shape, generator=gen) / first.svm.weight.shape[1] ** 0.5)
    with torch.no_grad():
        image, boxes = calibration
        scores = first.svm(first.fc7(first.features(image, torch.as_tensor(boxes))))
        lo = scores.quantile(1 - SCORE_SHARES["candidates"], dim=0)   # -> score_thresh
        hi = scores.quantile(1 - SCORE_SHARES["above_zero"], dim=0)   # -> 0
        a = -cfg.test.score_thresh / (hi - lo).clamp(min=1e-12)
        first.svm.weight.mul_(a[:, None])
        first.svm.bias.copy_(-a * hi)
    for det in detectors.values():
        det.load_state_dict(first.state_dict())
        det.to(device).eval()
    bf16 = resolve_precision("bf16" if cfg.test.precision == "auto" else cfg.test.precision, device)
    heads = {}
    for name, (_, svd, precision) in HEADS.items():
        head = copy.deepcopy(first.head)
        if svd:
            for layer, spec in (("fc6", cfg.test.svd_fc6), ("fc7", cfg.test.svd_fc7)):
                rank = svd_rank(spec, getattr(head, layer))
                if rank is not None:
                    full = getattr(head, layer)
                    setattr(head, layer, LowRankLinear(full.in_features, full.out_features, rank))
        heads[name] = (head.to(device).eval(), "fp32" if precision == "fp32" else bf16)
    return detectors, heads


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


def benchmark_proposals(records, cfg, max_boxes: int, cache_dir: str | Path):
    from .proposals import compute_proposals_with_stats

    p = cfg.proposals
    run = compute_proposals_with_stats(records, mode=p.mode, max_boxes=max_boxes, min_size=p.min_size,
                                       resize=p.resize, cache_dir=cache_dir, workers=p.workers, max_side=p.max_side)
    for rec in records:
        if rec.image_id in run.failures:
            raise SppdetError(f"{rec.path}: selective search failed ({run.failures[rec.image_id]})")
        if len(run.boxes[rec.image_id]) == 0:
            raise SppdetError(f"{rec.path}: no proposals of at least {p.min_size} px; "
                              f"lower proposals.min_size (--set proposals.min_size=N)")
    return run


def peak_memory_mb() -> float:
    """Peak resident memory of this process (Linux: ru_maxrss in KiB), in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def format_benchmark(result: dict) -> str:
    m, up = result["methods"], result["speedup"]
    names = list(METHODS)
    cols = "".join(f"{METHODS[n][0]:>14s}" for n in names)

    def row(label, values, width=28):
        return f"{label:<{width}s}" + "".join(f"{v:>14s}" for v in values)

    r = result["rcnn"]
    windows = "all windows" if not r["extrapolated"] else \
        f"first {r['windows_timed']} windows per image, times scaled linearly to all windows (EXTRAPOLATED)"
    lines = [
        f"SPP-net vs R-CNN (the paper's Table 10 layout): {result['network']}",
        f"device {result['device']}, {result['threads']} torch threads (pooling splits the windows between Python threads, see sppdet.spp)",
        f"{result['images']} images of {result['dataset']}, {result['proposals_per_image']:.0f} proposals per image; "
        f"R-CNN timed on {r['images']} of them ({m['rcnn']['windows_per_image']:.0f} proposals per image), {windows}",
        f"default head: {result['default_head']}; random SVMs scoring {100 * SCORE_SHARES['candidates']:.0f}% "
        f"of the windows above {result['score_thresh']} and {100 * SCORE_SHARES['above_zero']:.1f}% above 0, as "
        f"the demo's trained SVMs do",
        "",
        f"{'seconds per image':<28s}{cols}",
        row("conv time", [f"{m[n]['conv_s']:.4f}" for n in names]),
        row("pooling time", [f"{m[n]['pool_s']:.4f}" for n in names]),
        row("fc time (fc6, fc7, SVM)", [f"{m[n]['fc_s']:.4f}" for n in names]),
        row("NMS + box regression", [f"{m[n]['nms_s']:.4f}" for n in names]),
        row("total time", [f"{m[n]['total_s']:.4f}" for n in names]),
        row("speed-up vs R-CNN (conv)", [f"{up[n]['conv']:.1f}x" for n in names[:-1]] + ["1x"]),
        row("speed-up vs R-CNN (total)", [f"{up[n]['total']:.1f}x" for n in names[:-1]] + ["1x"]),
        "",
        "fc heads on the same pooled features (both detectors with the same head):",
        row("seconds per image", [HEADS[h][0] for h in HEADS], 36),
    ]
    for n in ("spp_1scale", "rcnn"):
        lines.append(row(f"{METHODS[n][0]} fc time", [f"{result['heads'][n][h]['fc_s']:.4f}" for h in HEADS], 36))
        lines.append(row(f"{METHODS[n][0]} total time", [f"{result['heads'][n][h]['total_s']:.4f}" for h in HEADS], 36))
    lines.append(row("SPP 1-scale total speed-up vs R-CNN", [f"{result['heads']['speedup'][h]:.1f}x" for h in HEADS], 36))
    e = result["end_to_end"]
    lines += [
        "",
        f"one detect.py call per image (SPP 1-scale, default head, scores above 0 reported): proposals "
        f"{e['proposals_s']:.3f} + network "
        f"and NMS {e['network_s']:.3f} = {e['total_s']:.3f} s (wall clock, imports excluded)",
        f"selective search, side by side on the same resized images: ours {result['selective_search']['ours_per_image']:.2f} s, "
        f"OpenCV's stock fast mode {result['selective_search']['stock_per_image']:.2f} s per image "
        f"(ratio {result['selective_search']['ratio']:.3f})",
        f"peak resident memory: {result['peak_memory_mb']:.0f} MiB",
        "conv includes resize + preprocessing (R-CNN: crop + warp of each window); total = the detector's "
        "whole time per image, NMS and box regression included, proposals not.",
        f"pooling / conv, SPP 1-scale: {100 * m['spp_1scale']['pool_s'] / m['spp_1scale']['conv_s']:.0f}%",
    ]
    return "\n".join(lines)


def run_benchmark(voc_root: str | Path | None = None, year: str = "2007", split: str = "test", images: int = 3,
                  max_proposals: int = 2000, config: str | None = None, overrides=(),
                  rcnn_images: int = 1, rcnn_windows: int | None = None, device: str | None = None,
                  threads: int | None = None, proposal_cache: str | Path | None = None) -> dict:
    """Time the three methods on the first `images` images of a split (R-CNN on the first
    `rcnn_images`, optionally on its first `rcnn_windows` windows, scaled linearly) after one
    untimed warm-up, image-major so load changes hit all methods alike, each with the default
    head and every head variant on the same pooled features; then one detect.py-style call per
    image (fresh selective search + network + NMS) -> the figures."""
    from .config import load_config, resolve
    from .inference import describe_head, detect_options, draw_threshold
    from .proposals import selective_search, time_against_stock
    from .utils import pick_device
    from .voc import VOCDataset, load_image

    for name, value in (("images", images), ("max-proposals", max_proposals), ("rcnn-images", rcnn_images),
                        ("rcnn-windows", rcnn_windows), ("threads", threads)):
        if value is not None and value < 1:
            raise SppdetError(f"--{name} must be >= 1, got {value}")
    cfg = load_config(config, ["model.weights=none"] + list(overrides))
    threads = threads or cfg.run.threads
    if threads:
        torch.set_num_threads(threads)
    device = pick_device(device or cfg.run.device, key="--device")
    if voc_root is None:  # the embedded set, as the demo generates it
        from .inference import load_datasets
        [dataset] = load_datasets(load_config("demo"), [split])
    else:  # labels do not matter for timing: every class is read, none is an error
        dataset = VOCDataset(voc_root, year, split, classes=cfg.data.classes, other_classes="ignore")
    dataset.check_not_empty()
    records = dataset.records[:images]
    n_rcnn = min(rcnn_images, len(records))
    proposals = benchmark_proposals(records, cfg, max_proposals, proposal_cache or resolve(cfg.proposals.cache_dir))
    detectors, heads = build_benchmark_detectors(
        cfg, len(dataset.classes), device, (load_image(records[0].path), proposals.boxes[records[0].image_id]))
    default = "exact" if cfg.test.exact else ("svd_bf16" if heads["svd_bf16"][1] == "bf16" else "svd")
    for det in detectors.values():
        det.head = heads[default][0]
    options = {**detect_options(cfg, device=device), "precision": heads[default][1]}

    with torch.no_grad():
        image, boxes = load_image(records[0].path), proposals.boxes[records[0].image_id]
        for name, det in detectors.items():  # warm-up: thread pools, allocator, oneDNN kernels
            det.detect(image, boxes[:WARMUP_WINDOWS] if name == "rcnn" else boxes, **options)
        samples = {name: [] for name in METHODS}
        head_samples = {name: [] for name in ("spp_1scale", "rcnn")}
        for i, rec in enumerate(records):
            image, boxes = load_image(rec.path), proposals.boxes[rec.image_id]
            for name, det in detectors.items():
                if name == "rcnn" and i >= n_rcnn:
                    continue
                timed = boxes[:rcnn_windows] if name == "rcnn" and rcnn_windows else boxes
                t, pooled = time_detect(det, image, timed, device, **options)
                samples[name].append((t, len(timed), len(boxes)))
                if name in head_samples:
                    fc = time_heads(det, heads, pooled, device)
                    # a variant's total: the measured call with its fc time in place of the default's
                    variant = {f"{h}_{k}": v for h, s in fc.items()
                               for k, v in (("fc", s), ("total", t["total"] - t["fc"] + s))}
                    head_samples[name].append((variant, len(timed), len(boxes)))
                print(f"[{i + 1}/{len(records)}] {rec.image_id} {name}: {t['total']:.2f} s "
                      f"({len(timed)} windows)", file=sys.stderr, flush=True)
        # the time a user waits: a detect.py call, selective search included (not cached)
        p = cfg.proposals
        draw = draw_threshold(cfg)
        e2e = []
        for rec in records:
            image = load_image(rec.path)
            t_ss, t_net = Timer(device), Timer(device)
            with t_ss:
                found = selective_search(image, mode=p.mode, max_boxes=max_proposals, min_size=p.min_size,
                                         resize=p.resize, max_side=p.max_side)
            with t_net:  # as the Predictor runs: detections scoring above the drawing threshold
                detectors["spp_1scale"].detect(image, found, **{**options, "score_thresh": draw})
            e2e.append((t_ss.total, t_net.total))
        ss = time_against_stock([load_image(r.path) for r in records], mode=p.mode, resize=p.resize,
                                max_boxes=max_proposals, min_size=p.min_size)

    methods = {name: {**per_image(s), "images": len(s),
                      "windows_per_image": float(np.mean([total for _, _, total in s]))}
               for name, s in samples.items()}
    rcnn = methods["rcnn"]
    speedup = {name: {"conv": rcnn["conv_s"] / methods[name]["conv_s"],
                      "total": rcnn["total_s"] / methods[name]["total_s"]} for name in METHODS if name != "rcnn"}
    head_means = {name: per_image(s) for name, s in head_samples.items()}
    head_table = {name: {h: {"fc_s": head_means[name][f"{h}_fc_s"], "total_s": head_means[name][f"{h}_total_s"]}
                         for h in HEADS} for name in head_samples}
    head_table["speedup"] = {h: head_table["rcnn"][h]["total_s"] / head_table["spp_1scale"][h]["total_s"]
                             for h in HEADS}
    m = cfg.model
    extrapolated = bool(rcnn_windows) and any(timed < total for _, timed, total in samples["rcnn"])
    return {
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "images": len(records),
        "proposals_per_image": float(np.mean([len(proposals.boxes[r.image_id]) for r in records])),
        "proposal_s": float(np.mean([proposals.seconds[r.image_id] for r in records])),
        "proposal_mode": cfg.proposals.mode,
        "dataset": f"{dataset.folder} {split}",
        "network": f"{m.backbone} (width {m.width}, fc {m.fc_dim}, weights {m.weights}), "
                   f"levels {list(m.levels)}",
        "default_head": f"{default}: {describe_head(detectors['spp_1scale'], heads[default][1])}",
        "methods": methods,
        "speedup": speedup,
        "heads": head_table,
        "end_to_end": {"proposals_s": float(np.mean([a for a, _ in e2e])),
                       "network_s": float(np.mean([b for _, b in e2e])),
                       "total_s": float(np.mean([a + b for a, b in e2e]))},
        "selective_search": {k: v for k, v in ss.items() if not isinstance(v, list)},
        "score_thresh": cfg.test.score_thresh,
        "peak_memory_mb": peak_memory_mb(),
        "rcnn": {"images": n_rcnn, "input_size": m.rcnn_input_size, "context": m.rcnn_context,
                 "windows_timed": rcnn_windows if extrapolated else "all", "extrapolated": extrapolated},
        "notes": "seconds per image; conv includes resize + preprocessing (R-CNN: crop + warp); total = "
                 "detector time with NMS and box regression (nms_s), without proposals (proposal_s); "
                 "heads: fc time of each head variant on the same pooled features, and the total with it",
    }


def compare_heads(checkpoint: str | Path, split: str = "test", device: str = "auto") -> dict:
    """Every fc head variant of a trained detector on a split of its dataset, against the exact
    one: {variant: {"map", "fc_s" (fc6 + fc7 + SVM seconds per image), "total_s" (the detector's
    seconds per image), "max_score_diff" (the largest |score - exact score| over every window
    and class), "ranks"}}; what README's head table holds (`scripts/benchmark.py --heads`)."""
    import copy

    from tqdm import tqdm

    from .checkpoint import load_checkpoint, read_checkpoint
    from .heads import svd_ranks
    from .inference import detect_split, for_test, load_datasets, proposals_for, resolve_precision, score_detections
    from .evaluation import collect_detections
    from .utils import pick_device
    from .voc import load_image

    device = pick_device(device, key="--device")
    exact, cfg, classes = load_checkpoint(checkpoint, device)
    stored = read_checkpoint(checkpoint).get("compressed")
    [dataset] = load_datasets(cfg, [split])
    proposals = proposals_for(cfg, dataset)
    test = dataclasses.replace(cfg.test, exact=False)
    svd_model, _ = for_test(copy.deepcopy(exact), dataclasses.replace(cfg, test=test), stored)
    bf16 = resolve_precision("bf16", device)
    variants = {"exact": (exact, "fp32"), "bf16": (exact, bf16), "svd": (svd_model, "fp32"),
                "svd_bf16": (svd_model, bf16)}
    # the largest score difference of each variant over every window, one image at a time (a
    # split's pooled features would not fit in memory: VOC07 test holds ~10^7 windows)
    diff = dict.fromkeys(variants, 0.0)
    with torch.no_grad():
        for rec in tqdm(dataset, desc="scores (every head)", leave=False, dynamic_ncols=True):
            pooled = exact.features(load_image(rec.path), proposals[rec.image_id])
            if len(pooled) == 0:
                continue
            scores = exact.svm(exact.fc7(pooled))
            for name, (det, precision) in variants.items():
                diff[name] = max(diff[name], float((det.svm(det.fc7(pooled, precision)) - scores).abs().max()))
    out = {}
    for name, (det, precision) in variants.items():
        vcfg = dataclasses.replace(cfg, test=dataclasses.replace(test, precision=precision, exact=False))
        results, times = detect_split(det, dataset, proposals, vcfg, desc=f"detect ({name})")
        detections = collect_detections(((i, d.boxes, d.scores, d.labels) for i, d in results.items()), classes)
        ranks = svd_ranks(det.head)
        out[name] = {"map": score_detections(dataset, detections, cfg.test.metric)["map"], "fc_s": times["fc_s"],
                     "total_s": times["total_s"], "max_score_diff": diff[name], "ranks": ranks, "precision": precision}
    return out


def format_heads(result: dict) -> str:
    lines = [f"{'head':<10s} {'precision':>9s} {'SVD ranks':>14s} {'mAP':>6s} {'fc s/img':>9s} {'total s/img':>12s} "
             f"{'max |score diff|':>17s}"]
    for name, r in result.items():
        ranks = ", ".join(f"{k} {v}" for k, v in r["ranks"].items()) or "-"
        lines.append(f"{name:<10s} {r['precision']:>9s} {ranks:>14s} {100 * r['map']:6.1f} {r['fc_s']:9.4f} "
                     f"{r['total_s']:12.4f} {r['max_score_diff']:17.4f}")
    return "\n".join(lines)
