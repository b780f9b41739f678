"""Using trained detectors: detection over a split (results files, evaluation), the `Predictor`
(the Python API), and the work behind scripts/detect.py and scripts/evaluate.py.

    from sppdet import Predictor
    predictor = Predictor.from_checkpoint("runs/demo/model.pt")      # device="auto"
    result = predictor("photo.jpg")                                  # a path or a BGR uint8 array
    result.boxes, result.scores, result.labels, result.class_names

Scores are the checkpoint's scorer (test.scorer): SVM margins by default, where > 0 means the
class's SVM calls the window an object; the Predictor and detect.py report detections scoring
at least test.draw_thresh (null: that boundary, 0 for SVMs, 0.5 for softmax probabilities).
Nothing here imports the training stages (scikit-learn), so detection starts quickly.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from . import boxes as box_ops
from .checkpoint import load_checkpoint
from .config import Config, resolve
from .detector import DECISION_BOUNDARY, Detections, Detector
from .evaluation import (coco_evaluate, collect_detections, evaluate_class, evaluate_detections,
                         format_ap_table, write_results_files)
from .proposals import compute_proposals, selective_search
from .utils import SppdetError, Timer, get_logger, pick_device, write_json_atomic
from .voc import VOC_CLASSES, VOCDataset, find_damaged, load_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------- data of a config

def load_datasets(cfg: Config, splits: Sequence[str], logger: logging.Logger | None = None) -> list[VOCDataset]:
    """The splits of the config's dataset (the embedded synthetic set is generated on first use).
    data.classes other than VOC's 20 may be a subset of the dataset's classes: objects of other
    classes are then ignored, as the log says once per split."""
    d = cfg.data
    logger = logger or get_logger()
    root = resolve(d.root)
    if d.synthetic:
        from .synthetic import MARKER_NAME, ensure_dataset
        if root.is_dir() and any(root.iterdir()) and not (root / MARKER_NAME).exists():
            # a devkit of the user's own (demo.yaml with data.root=...): use it, never overwrite it
            logger.info(f"data: {root} is not a generated synthetic dataset; using it as it is")
        else:
            ensure_dataset(root, seed=d.synthetic_seed, num_trainval=d.synthetic_trainval,
                           num_test=d.synthetic_test, classes=d.classes)
    other = "error" if tuple(d.classes) == VOC_CLASSES else "ignore"
    out = []
    for split in splits:
        ds = VOCDataset(root, year=d.year, split=split, classes=d.classes, other_classes=other)
        if ds.ignored_classes:
            counts = ", ".join(f"{n} {c}" for c, n in sorted(ds.ignored_classes.items()))
            logger.info(f"data: {split}: ignoring objects of classes not in data.classes ({counts})")
        if d.max_images:
            ds.records = ds.records[: d.max_images]
        damaged = find_damaged(r.path for r in ds)
        if damaged:
            names = ", ".join(f"{p} ({why})" for p, why in list(damaged.items())[:5])
            action = "skipped (data.damaged_images=skip)" if d.damaged_images == "skip" else \
                "used as they decode (data.damaged_images=use)"
            logger.warning(f"data: {split}: {len(damaged)} damaged image(s) {action}: {names}")
            if d.damaged_images == "skip":
                ds.records = [r for r in ds.records if Path(r.path) not in damaged]
        out.append(ds)
    return out


def proposals_for(cfg: Config, dataset: VOCDataset) -> dict[str, np.ndarray]:
    """Selective search boxes of every image of `dataset` with the config's settings (cached)."""
    p = cfg.proposals
    return compute_proposals([(r.image_id, r.path) for r in dataset], mode=p.mode, max_boxes=p.max_boxes,
                             min_size=p.min_size, resize=p.resize, cache_dir=resolve(p.cache_dir),
                             workers=p.workers, max_side=p.max_side)


# ----------------------------------------------------------------------------- detection of a split

def resolve_precision(precision: str, device: torch.device) -> str:
    """test.precision -> "bf16" or "fp32": auto is bf16 where the device computes it natively
    (a CPU with AVX-512 BF16 / AMX as oneDNN reports it, or a CUDA GPU with bf16), else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def for_test(detector: Detector, cfg: Config, stored: dict | None = None) -> tuple[Detector, dict | None]:
    """The detector as the test settings run it: fc6/fc7 replaced by truncated SVDs as
    test.svd_fc6 / svd_fc7 ask (unless test.exact), in place. `stored` is a checkpoint's
    precomputed compression ({"svd": [fc6, fc7], "state": ...}), used when it was made with the
    same settings (an SVD of a 4096 x 12800 fc6 takes a minute on two cores). Returns (the
    detector, the compression to store: None when nothing was compressed)."""
    from .heads import compress_head, match_compression

    t = cfg.test
    if t.exact:
        return detector, None
    spec = [t.svd_fc6, t.svd_fc7]
    if stored is not None and stored.get("svd") == spec:
        state = {f"head.{k}": v for k, v in stored["state"].items()}
        match_compression(detector.head, state)
        detector.head.load_state_dict(stored["state"], strict=False)
        detector.to(detector.device)
        return detector, stored
    if not compress_head(detector.head, *spec):
        return detector, None
    state = {k: v for k, v in detector.head.state_dict().items() if ".reduce." in k or ".expand." in k}
    return detector, {"svd": spec, "state": state}


def compress_checkpoint(path: str | os.PathLike, svd_fc6: float | None = None, svd_fc7: float | None = None,
                        out: str | os.PathLike | None = None) -> dict[str, int]:
    """scripts/compress.py: store the truncated-SVD fc6/fc7 in a checkpoint beside its exact head
    (see `for_test`), its test.svd_* set to the values used; returns {layer: rank}."""
    import copy
    from dataclasses import replace as dc_replace

    from .checkpoint import read_checkpoint, save_checkpoint
    from .heads import svd_ranks
    from .utils import check_writable_file

    out = Path(out) if out is not None else Path(path)
    check_writable_file(out, "--out")
    for name, value in (("--svd-fc6", svd_fc6), ("--svd-fc7", svd_fc7)):
        if value is not None and value < 0:
            raise SppdetError(f"{name} must be >= 0 (a rank, a fraction of the layer, or 0 for off), got {value}")
    detector, cfg, classes = load_checkpoint(path)
    t = cfg.test
    cfg = dc_replace(cfg, test=dc_replace(t, svd_fc6=t.svd_fc6 if svd_fc6 is None else svd_fc6,
                                          svd_fc7=t.svd_fc7 if svd_fc7 is None else svd_fc7, exact=False))
    tested, compressed = for_test(copy.deepcopy(detector), cfg)
    ranks = svd_ranks(tested.head)
    save_checkpoint(out, detector, cfg, classes, extra=read_checkpoint(path).get("extra"), compressed=compressed)
    print(f"{out}: " + (", ".join(f"{n} rank {r}" for n, r in ranks.items()) if ranks else
                        "nothing compressed (at these ranks the layers would not get cheaper)"))
    return ranks


def describe_head(detector: Detector, precision: str) -> str:
    from .heads import svd_ranks

    ranks = ", ".join(f"{n} rank {r}" for n, r in svd_ranks(detector.head).items())
    return f"fc layers in {precision}, " + (f"truncated SVD ({ranks})" if ranks else "no SVD")


def draw_threshold(cfg: Config) -> float:
    """The score from which detections are reported (Predictor, detect.py): test.draw_thresh,
    or the scorer's decision boundary when it is null."""
    t = cfg.test
    return DECISION_BOUNDARY[t.scorer] if t.draw_thresh is None else t.draw_thresh


def detect_options(cfg: Config, score_thresh: float | None = None, device: torch.device | None = None) -> dict:
    """`Detector.detect` keyword arguments of a config's test section (`score_thresh` overrides
    the candidate threshold)."""
    t = cfg.test
    precision = "fp32" if t.exact else resolve_precision(t.precision, device or torch.device("cpu"))
    return dict(scorer=t.scorer, score_thresh=t.score_thresh if score_thresh is None else score_thresh,
                nms=t.nms, max_per_class=t.max_per_class, max_per_image=t.max_per_image,
                regress=cfg.bbox_reg.enabled, precision=precision,
                conv_precision="fp32" if t.exact else t.conv_precision)


def combine_detections(parts: Sequence[Detections], nms: float, max_per_image: int) -> Detections:
    """Model combination [P 4.4]: the union of several detectors' detections of one image,
    per-class NMS on it, the best `max_per_image` kept."""
    if len(parts) == 1:
        return parts[0]
    boxes = np.concatenate([d.boxes for d in parts])
    scores = np.concatenate([d.scores for d in parts])
    labels = np.concatenate([d.labels for d in parts])
    keep = box_ops.nms_per_class(boxes, scores, labels, nms)[:max_per_image]
    return Detections(boxes[keep], scores[keep], labels[keep], parts[0].class_names)


def detect_split(detector: Detector | Sequence[Detector], dataset: VOCDataset, proposals: dict[str, np.ndarray],
                 cfg: Config, desc: str = "detect") -> tuple[dict[str, Detections], dict[str, float]]:
    """Detect every image of a split -> ({image id: Detections}, seconds per image by part:
    conv (R-CNN: crop + warp included, as resizing is SPP's), pool, fc, nms and total =
    the network and NMS, proposals excluded). Several detectors: their combination on the
    same proposals (`combine_detections`)."""
    detectors = [detector] if isinstance(detector, Detector) else list(detector)
    timers: dict[str, Timer] = {}
    total = Timer(detectors[0].device)
    results = {}
    options = detect_options(cfg, device=detectors[0].device)
    for rec in tqdm(dataset, desc=desc, leave=False, dynamic_ncols=True):
        image = load_image(rec.path)
        with total:
            parts = [d.detect(image, proposals[rec.image_id], timers=timers, **options) for d in detectors]
            results[rec.image_id] = combine_detections(parts, cfg.test.nms, cfg.test.max_per_image)
    n = max(len(dataset), 1)
    times = {f"{k}_s": t.total / n for k, t in timers.items()}
    times["total_s"] = total.total / n
    times["conv_s"] = times.get("conv_s", 0.0) + times.pop("warp_s", 0.0)
    return results, times


def detect_to_results(detector: Detector | Sequence[Detector], dataset: VOCDataset, proposals, cfg: Config, results_dir: Path,
                      desc: str = "detect") -> tuple[dict, dict[str, float]]:
    """Detect the split and write its comp4 results files into `results_dir`
    -> (detections by class as `collect_detections` gives them, seconds per image by part)."""
    results, times = detect_split(detector, dataset, proposals, cfg, desc=desc)
    detections = collect_detections(((i, d.boxes, d.scores, d.labels) for i, d in results.items()),
                                    dataset.classes)
    write_results_files(results_dir, dataset.split, dataset.classes, detections)
    return detections, times


def score_detections(dataset: VOCDataset, detections: dict, metric: str) -> dict:
    """evaluate_detections (VOC metrics) or coco_evaluate on a split's ground truth."""
    if metric == "coco":
        return coco_evaluate(dataset.records, detections, dataset.classes)
    return evaluate_detections(dataset.records, detections, dataset.classes, metric)


def evaluate_run(detector: Detector, dataset: VOCDataset, proposals, cfg: Config, out_dir: Path,
                 logger: logging.Logger, desc: str = "evaluate") -> tuple[dict, dict]:
    """Detect the split with the test settings (`detector` as `for_test` made it), write comp4
    results files under out_dir/results, score them -> ({metric, ap, map}, seconds per image)."""
    precision = detect_options(cfg, device=detector.device)["precision"]
    logger.info(f"test head: {describe_head(detector, precision)}")
    detections, times = detect_to_results(detector, dataset, proposals, cfg, out_dir / "results", desc)
    metrics = score_detections(dataset, detections, cfg.test.metric)
    name = {"spp": "SPP-net", "rcnn": "R-CNN"}[detector.kind]
    logger.info(format_ap_table(metrics, context=f"{name} on {dataset.split}"))
    return {k: metrics[k] for k in ("metric", "ap", "map")}, times


# ----------------------------------------------------------------------------- the Python API

class Predictor:
    """Detect objects in images with a trained checkpoint (or several: model combination).

    predictor(image) takes a path or a BGR uint8 array (H, W, 3) and returns `Detections`:
    boxes (N, 4) float32 [x1, y1, x2, y2] in the image's pixels (0-based, inclusive), scores (N,),
    labels (N,) in 1..K and class_names, sorted by score, at most test.max_per_image. Proposals
    are computed with the (first) checkpoint's own selective search settings unless given; with
    several checkpoints every detector scores the same proposals and NMS runs on the union of
    their detections, as the paper combines two networks [P 4.4].
    """

    def __init__(self, detectors: Detector | Sequence[Detector], cfg: Config, classes: Sequence[str]):
        self.detectors = [detectors] if isinstance(detectors, Detector) else list(detectors)
        self.cfg, self.classes = cfg, tuple(classes)

    @property
    def detector(self) -> Detector:
        return self.detectors[0]

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike | Sequence[str | os.PathLike], device: str = "auto") -> "Predictor":
        """One checkpoint, or a list of checkpoints of the same classes to combine."""
        detectors, cfg, classes = load_checkpoints([path] if isinstance(path, (str, os.PathLike)) else path,
                                                   pick_device(device, key="device"))
        return cls(detectors, cfg, classes)

    @property
    def score_thresh(self) -> float:
        """The default threshold: test.draw_thresh, or the scorer's decision boundary."""
        return draw_threshold(self.cfg)

    def proposals(self, image: np.ndarray) -> np.ndarray:
        """Selective search boxes (N, 4) of a BGR image with the checkpoint's settings."""
        p = self.cfg.proposals
        return selective_search(image, mode=p.mode, max_boxes=p.max_boxes, min_size=p.min_size, resize=p.resize,
                                max_side=p.max_side)

    def __call__(self, image: str | os.PathLike | np.ndarray, proposals: np.ndarray | None = None,
                 score_thresh: float | None = None) -> Detections:
        if not isinstance(image, np.ndarray):
            image = load_image(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise SppdetError(f"expected a BGR uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
        if proposals is None:
            proposals = self.proposals(image)
        # Dropping windows below the threshold before NMS keeps exactly the detections NMS would
        # keep above it: a window is only ever suppressed by better-scoring ones.
        thresh = self.score_thresh if score_thresh is None else score_thresh
        options = detect_options(self.cfg, thresh, self.detector.device)
        parts = [d.detect(image, proposals, **options) for d in self.detectors]
        det = combine_detections(parts, self.cfg.test.nms, self.cfg.test.max_per_image)
        return replace(det, class_names=self.classes)


def load_checkpoints(paths: Sequence[str | os.PathLike], device) -> tuple[list[Detector], Config, list[str]]:
    """Several checkpoints to combine -> (detectors, the first one's config, classes); they must
    name the same classes in the same order."""
    if not paths:
        raise SppdetError("no checkpoint given")
    detectors, cfg, classes = [], None, None
    for path in paths:
        detector, c, k = load_checkpoint(path, device, for_test=True)
        if classes is not None and k != classes:
            raise SppdetError(f"{path}: its classes {k} differ from {paths[0]}'s {classes}; only detectors of "
                              f"the same classes combine")
        detectors.append(detector)
        cfg, classes = cfg or c, classes or k
    return detectors, cfg, classes


# ----------------------------------------------------------------------------- scripts/detect.py

def newest_checkpoint(runs: Path) -> Path:
    found = sorted(runs.glob("*/model.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SppdetError(f"no checkpoint under {runs}/*/model.pt; train one (scripts/train.py) or pass --checkpoint")
    return found[-1]


def find_checkpoint(path: str | os.PathLike | None) -> Path:
    """A model.pt as given; a run folder -> its model.pt; a folder of runs -> the newest one;
    None -> the newest runs/*/model.pt."""
    if path is None:
        return newest_checkpoint(resolve("runs"))
    path = Path(path)
    if path.is_dir():
        return path / "model.pt" if (path / "model.pt").is_file() else newest_checkpoint(path)
    if not path.is_file():
        raise SppdetError(f"{path}: checkpoint not found")
    return path


def gather_images(inputs: Sequence[str]) -> tuple[list[Path], list[str], list[str], Path]:
    """Image files of `inputs` (files and folders, folders followed recursively, in sorted order)
    -> (images, errors (missing inputs, one line each), skipped (what was passed over and why),
    the common folder of the inputs (outputs mirror the tree below it))."""
    images, errors, skipped, bases = [], [], [], []
    for item in inputs:
        p = Path(item)
        bases.append((p if p.is_dir() else p.parent).resolve())
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_symlink() and not f.exists():
                    skipped.append(f"{f} (dangling link)")
                elif not f.is_file():
                    continue  # a folder: its files are listed by rglob
                elif f.suffix.lower() in IMAGE_SUFFIXES:
                    images.append(f)
                else:
                    skipped.append(f"{f} (not an image)")
        elif p.is_file():
            images.append(p)
        else:
            errors.append(f"{p}: no such file or folder")
    common = Path(os.path.commonpath([str(b) for b in bases])) if bases else Path(".").resolve()
    return images, errors, skipped, common


def output_names(images: Sequence[Path], common: Path) -> list[str]:
    """One output stem per image, never two alike: the path relative to the inputs' common
    folder without its suffix (a/x.jpg, b/x.jpg -> a/x, b/x); images whose stems would still
    collide (x.jpg, x.png) keep their suffix as _jpg / _png."""
    rel = [p.resolve().relative_to(common) for p in images]
    stems = [str(r.with_suffix("")) for r in rel]
    counts = {s: stems.count(s) for s in stems}
    return [f"{s}_{r.suffix[1:].lower()}" if counts[s] > 1 else s for s, r in zip(stems, rel)]


def detect_images(inputs: Sequence[str], checkpoints: Sequence[str] = (), out: str = "detections",
                  score_thresh: float | None = None, device: str = "auto") -> int:
    """scripts/detect.py: detect in every image of `inputs` with a checkpoint (none given: the
    newest; several: their combination); print the detections; write <out>/<name>.jpg (boxes
    drawn), <out>/<name>.json and one <out>/results.json for the run (COCO results style plus
    image sizes). Returns the exit status: 1 if an input was missing or unreadable (the other
    images are still processed), else 0."""
    from .vis import draw_detections, write_image

    ckpts = [find_checkpoint(c) for c in checkpoints] or [find_checkpoint(None)]
    ckpt = ", ".join(str(c) for c in ckpts)
    images, errors, skipped, common = gather_images(inputs)
    out_dir = Path(out)
    names = output_names(images, common)
    inputs_resolved = {p.resolve() for p in images}
    for name in names:
        for suffix in (".jpg", ".json"):
            if (out_dir / f"{name}{suffix}").resolve() in inputs_resolved:
                raise SppdetError(f"--out {out_dir}: would overwrite the input {out_dir / (name + suffix)}; "
                                  f"choose another output folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise SppdetError(f"--out {out_dir}: exists and is not a folder")
    predictor = Predictor.from_checkpoint(ckpts, device)
    thresh = predictor.score_thresh if score_thresh is None else score_thresh
    print(f"checkpoint{'s' if len(ckpts) > 1 else ''} {ckpt} ({'+'.join(d.kind for d in predictor.detectors)}, "
          f"{len(predictor.classes)} classes, {predictor.cfg.test.scorer} scores >= {thresh:g})")
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    failures = len(errors)
    combined = {"checkpoint": str(ckpt), "score_thresh": thresh,
                "box_format": "bbox [x, y, width, height] in pixels (COCO results)",
                "categories": [{"id": k + 1, "name": c} for k, c in enumerate(predictor.classes)],
                "images": [], "annotations": []}
    for path, name in zip(images, names):
        try:
            image = load_image(path)
        except SppdetError as e:
            print(f"error: {e}", file=sys.stderr)
            failures += 1
            continue
        t0 = time.perf_counter()
        proposals = predictor.proposals(image)
        t1 = time.perf_counter()
        det = predictor(image, proposals, score_thresh=thresh)
        t2 = time.perf_counter()
        print(f"{path}: {len(det)} detections (proposals {t1 - t0:.2f} s, {len(proposals)} boxes; "
              f"network {t2 - t1:.2f} s)")
        records = []
        for box, score, label in zip(det.boxes, det.scores, det.labels):
            cls = predictor.classes[label - 1]
            print(f"  {cls:<14s} {score:7.3f}  {box[0]:7.1f} {box[1]:7.1f} {box[2]:7.1f} {box[3]:7.1f}")
            records.append({"class": cls, "score": float(score), "box": [float(v) for v in box]})
        image_id = len(combined["images"]) + 1
        combined["images"].append({"id": image_id, "file_name": str(path), "output": name,
                                   "width": image.shape[1], "height": image.shape[0]})
        combined["annotations"] += [{"image_id": image_id, "category_id": int(label), "score": float(score),
                                     "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0] + 1), float(b[3] - b[1] + 1)]}
                                    for b, score, label in zip(det.boxes, det.scores, det.labels)]
        write_image(out_dir / f"{name}.jpg", draw_detections(image, det.boxes, det.scores, det.labels,
                                                             predictor.classes))
        write_json_atomic(out_dir / f"{name}.json", {
            "image": str(path), "width": image.shape[1], "height": image.shape[0],
            "box_format": "x1 y1 x2 y2, 0-based pixel indices, inclusive", "checkpoint": str(ckpt),
            "score": f"{predictor.cfg.test.scorer} ({'SVM margin' if predictor.cfg.test.scorer == 'svm' else 'probability'})",
            "proposal_seconds": t1 - t0, "network_seconds": t2 - t1, "detections": records})
    if combined["images"]:
        write_json_atomic(out_dir / "results.json", combined, indent=None)
        print(f"wrote {out_dir}/<name>.jpg, <name>.json and results.json for {len(combined['images'])} image(s)")
    if skipped:
        print(f"note: skipped {len(skipped)} non-image path(s): {', '.join(skipped[:5])}"
              f"{', ...' if len(skipped) > 5 else ''}")
    return 1 if failures else 0


# ----------------------------------------------------------------------------- scripts/evaluate.py

def evaluate_checkpoint(checkpoints: str | os.PathLike | Sequence[str | os.PathLike], split: str = "test",
                        out_dir: Path | None = None, voc_root: str | None = None, year: str | None = None,
                        device: str = "auto", overrides: Sequence[str] = ()
                        ) -> tuple[VOCDataset, dict, list[str], Config]:
    """Detect a split with a checkpoint (several: their combination, on one set of proposals)
    and write its results files -> (dataset, detections by class, notes, the config used). The
    dataset, proposals and test settings are the (first) checkpoint's config's, with `overrides`
    (key=value) on top; voc_root / year replace data.root / data.year."""
    from .config import config_from_dict, parse_override, _merge

    checkpoints = [checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else list(checkpoints)
    detectors, cfg, classes = load_checkpoints(checkpoints, pick_device(device, key="--device"))
    values = cfg.to_dict()
    for item in overrides:
        values = _merge(values, parse_override(item))
    if voc_root is not None:  # another devkit: never generate the synthetic set into it
        values["data"].update(root=str(Path(voc_root).expanduser().resolve()), synthetic=False)
    if year is not None:
        values["data"]["year"] = str(year)
    cfg = config_from_dict(values)
    if tuple(cfg.data.classes) != tuple(classes):
        raise SppdetError(f"data.classes {list(cfg.data.classes)} differ from the checkpoint's classes "
                          f"{list(classes)}: a detector scores only the classes it was trained on")
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    out_dir = Path(out_dir) if out_dir is not None else Path(checkpoints[0]).parent / f"eval_{split}"
    [dataset] = load_datasets(cfg, [split])
    dataset.check_not_empty()
    if dataset.ignored_classes:
        raise SppdetError(f"{dataset.folder} ({split}) has objects of classes the checkpoint does not know "
                          f"({', '.join(sorted(dataset.ignored_classes))}); its classes are {', '.join(classes)}")
    proposals = proposals_for(cfg, dataset)
    detections, times = detect_to_results(detectors, dataset, proposals, cfg, out_dir, desc=f"detect {split}")
    parts = ", ".join(f"{k[:-2]} {v:.3f}" for k, v in times.items() if k != "total_s")
    what = " + ".join(f"{d.kind} detector from {c}" for d, c in zip(detectors, checkpoints))
    notes = [f"{what}{' (combined: NMS on the union)' if len(detectors) > 1 else ''} on {detectors[0].device}: "
             f"{np.mean([len(p) for p in proposals.values()]):.0f} proposals per image; network "
             f"{times['total_s']:.3f} s per image ({parts})",
             f"results files: {out_dir}/comp4_det_{split}_<class>.txt"]
    return dataset, detections, notes, cfg


def write_evaluation_reports(out_dir: Path, dataset: VOCDataset, detections: dict, result: dict) -> None:
    """COCO results + ground truth json, and one precision/recall curve PNG per class."""
    from .evaluation import to_coco_ground_truth, to_coco_results
    from .vis import draw_pr_curve, write_image

    split, classes, records = dataset.split, dataset.classes, dataset.records
    write_json_atomic(out_dir / f"coco_results_{split}.json",
                      to_coco_results(detections, classes, dataset.image_ids), indent=None)
    write_json_atomic(out_dir / f"coco_gt_{split}.json", to_coco_ground_truth(records, classes), indent=None)
    for k, cls in enumerate(classes, 1):
        # the curve of the VOC matching (IoU >= 0.5) whatever the metric: only AP differs
        gt = {r.image_id: (r.boxes[r.labels == k], r.difficult[r.labels == k]) for r in records}
        curve = evaluate_class(gt, detections.get(cls))
        title = f"{cls}: AP {100 * result['ap'][cls]:.1f} ({result['metric']}), {curve.num_detections} dets"
        write_image(out_dir / f"pr_{cls}.png", draw_pr_curve(curve.recall, curve.precision, title))


def results_dir_detections(results_dir: str | os.PathLike, voc_root: str | os.PathLike, year: str = "2007",
                           split: str = "test", classes: Sequence[str] = VOC_CLASSES
                           ) -> tuple[VOCDataset, dict, list[str]]:
    """Ground truth and detections of existing comp4 results files -> (dataset, detections by
    class, notes). The ground truth is read as the devkit scores it: coordinates as written,
    objects of other classes skipped; the images themselves are not needed."""
    from .evaluation import missing_results_files, read_results_files

    dataset = VOCDataset(voc_root, year, split, classes, strict=False, check_images=False)
    detections = read_results_files(results_dir, split, classes, dataset.image_ids)
    missing = missing_results_files(results_dir, split, classes)
    notes = [f"note: no results file (no detections) for {', '.join(missing)} in {results_dir}"] if missing else []
    return dataset, detections, notes


def evaluate_command(checkpoint: Sequence[str] | None = None, results_dir: str | None = None, voc_root: str | None = None,
                     year: str | None = None, split: str = "test", metric: str | None = None,
                     classes: Sequence[str] | None = None, out: str | None = None, device: str = "auto",
                     json_path: str | None = None, overrides: Sequence[str] = ()) -> int:
    """scripts/evaluate.py: score a checkpoint on a split (detecting it) or existing results
    files; print the AP table; write reports into `out` and {metric, ap, map} into `json_path`.
    Every output path is checked before any detection runs."""
    from .utils import check_writable_dir, check_writable_file

    out_dir = Path(out) if out is not None else (Path(checkpoint[0]).parent / f"eval_{split}" if checkpoint else None)
    if out_dir is not None:
        check_writable_dir(out_dir, "--out")
    if json_path is not None:
        check_writable_file(Path(json_path), "--json")
    if checkpoint:
        if classes is not None:
            raise SppdetError("--classes applies to --results-dir only: a checkpoint names its own classes")
        dataset, detections, notes, cfg = evaluate_checkpoint(checkpoint, split, out_dir, voc_root, year, device,
                                                              overrides)
        metric = metric or cfg.test.metric
    else:
        if voc_root is None:
            raise SppdetError("--results-dir needs --voc-root (the devkit with the ground truth)")
        if overrides:
            raise SppdetError("--set applies to --checkpoint only")
        dataset, detections, notes = results_dir_detections(results_dir, voc_root, year or "2007", split,
                                                            tuple(classes or VOC_CLASSES))
        metric = metric or "voc07"
    result = score_detections(dataset, detections, metric)
    print("\n".join([format_ap_table(result, context=f"VOC{dataset.year} {split}, {len(dataset)} images")] + notes))
    if out_dir is not None:
        write_evaluation_reports(out_dir, dataset, detections, result)
        print(f"wrote {out_dir}/coco_results_{split}.json, coco_gt_{split}.json and pr_<class>.png")
    if json_path is not None:
        write_json_atomic(json_path, {"metric": result["metric"], "ap": result["ap"], "map": result["map"]})
        print(f"wrote {json_path}")
    return 0
