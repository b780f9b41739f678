"""The training pipeline, stage by stage, each resumable:

    data -> proposals -> fine-tune -> SVMs + box regression -> model.pt -> test-split evaluation

A finished stage is stored under `runs/<name>/stages/` with a key over everything it depends
on (config sections and the stages before it); with `resume=True` a stage whose key matches
is loaded instead of redone, and an interrupted fine-tuning continues from its last snapshot.
"""
from __future__ import annotations

import csv
import io
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from . import boxes as box_ops
from .backbones import build_backbone
from .bbox_reg import train_box_regressors
from .checkpoint import save_checkpoint
from .config import Config, dump_config
from .detector import Detector, Detections, SPPDetector
from .evaluation import collect_detections, evaluate_detections, format_ap_table, write_results_files
from .finetune import finetune, label_windows, pooled_window_features
from .proposals import compute_proposals
from .rcnn import RCNNDetector
from .svm import SVMTrainer, feature_scale
from .utils import SppdetError, Timer, atomic_path, get_logger, pick_device, seed_everything, stable_hash, write_json_atomic, write_text_atomic
from .voc import VOCDataset, load_image

REPO = Path(__file__).resolve().parents[1]


def resolve(path: str) -> Path:
    """Relative paths in configs are relative to the repository (where configs/ lives)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO / p


# ----------------------------------------------------------------------------- building

def build_detector(cfg: Config, num_classes: int, weights: str | None = None, kind: str | None = None) -> Detector:
    """The detector a config describes; `weights` overrides model.weights (e.g. 'none' when a
    checkpoint will provide them), `kind` overrides run.detector."""
    m = cfg.model
    weights = m.weights if weights is None else weights
    if weights not in ("none", "imagenet"):
        weights = str(resolve(weights))
    backbone = build_backbone(m.backbone, width=m.width, weights=weights)
    if m.pixel_std is not None:
        if m.pixel_std <= 0:
            raise SppdetError(f"config key model.pixel_std: must be positive, got {m.pixel_std}")
        backbone.std = (float(m.pixel_std),) * 3  # preprocess reads it
    common = dict(levels=m.levels, fc_dim=m.fc_dim, dropout=m.dropout, chunk=m.chunk)
    if (kind or cfg.run.detector) == "rcnn":
        return RCNNDetector(backbone, num_classes, input_size=m.rcnn_input_size, context=m.rcnn_context, **common)
    return SPPDetector(backbone, num_classes, scales=m.scales, max_size=m.max_size,
                       projection=m.projection, scale_rule=m.scale_rule, **common)


def load_datasets(cfg: Config, splits: Sequence[str]) -> list[VOCDataset]:
    d = cfg.data
    root = resolve(d.root)
    if d.synthetic:
        from .synthetic import MARKER_NAME, ensure_dataset
        if root.is_dir() and any(root.iterdir()) and not (root / MARKER_NAME).exists():
            # a devkit of the user's own (demo.yaml with data.root=...): use it, never overwrite it
            get_logger("sppdet").info(f"data: {root} is not a generated synthetic dataset; using it as it is")
        else:
            ensure_dataset(root, seed=d.synthetic_seed, num_trainval=d.synthetic_trainval,
                           num_test=d.synthetic_test, classes=d.classes)
    out = []
    for split in splits:
        ds = VOCDataset(root, year=d.year, split=split, classes=d.classes)
        if d.max_images:
            ds.records = ds.records[: d.max_images]
        out.append(ds)
    return out


def proposals_for(cfg: Config, dataset: VOCDataset) -> dict[str, np.ndarray]:
    p = cfg.proposals
    return compute_proposals([(r.image_id, r.path) for r in dataset], mode=p.mode, max_boxes=p.max_boxes,
                             min_size=p.min_size, resize=p.resize, cache_dir=resolve(p.cache_dir),
                             workers=p.workers)


# ----------------------------------------------------------------------------- detection

def detect_split(detector: Detector, dataset: VOCDataset, proposals: dict[str, np.ndarray], cfg: Config,
                 desc: str = "detect") -> tuple[dict[str, Detections], dict[str, float]]:
    """Detect every image of a split -> ({image id: Detections}, seconds per image by part:
    conv, pool, fc, total (network, proposals excluded))."""
    timers: dict[str, Timer] = {}
    total = Timer(detector.device)
    results = {}
    for rec in tqdm(dataset, desc=desc, leave=False, dynamic_ncols=True):
        image = load_image(rec.path)
        with total:
            results[rec.image_id] = detector.detect(
                image, proposals[rec.image_id], score_thresh=cfg.test.score_thresh, nms=cfg.test.nms,
                max_per_image=cfg.test.max_per_image, timers=timers)
    n = max(len(dataset), 1)
    times = {f"{k}_s": t.total / n for k, t in timers.items()}
    times["total_s"] = total.total / n
    # R-CNN's crop + warp of each window is part of its feature path, as resizing is SPP's
    times["conv_s"] = times.get("conv_s", 0.0) + times.pop("warp_s", 0.0)
    return results, times


def detect_to_results(detector: Detector, dataset: VOCDataset, proposals, cfg: Config, results_dir: Path,
                      desc: str = "detect") -> tuple[dict, dict[str, float]]:
    """Detect the split and write its comp4 results files into `results_dir`
    -> (detections by class as `collect_detections` gives them, seconds per image by part)."""
    results, times = detect_split(detector, dataset, proposals, cfg, desc=desc)
    detections = collect_detections(((i, d.boxes, d.scores, d.labels) for i, d in results.items()),
                                    dataset.classes)
    write_results_files(results_dir, dataset.split, dataset.classes, detections)
    return detections, times


def evaluate_run(detector: Detector, dataset: VOCDataset, proposals, cfg: Config, out_dir: Path,
                 logger: logging.Logger, desc: str = "evaluate") -> tuple[dict, dict]:
    """Detect the split, write comp4 results files, score them -> (metrics, times)."""
    detections, times = detect_to_results(detector, dataset, proposals, cfg, out_dir / "results", desc)
    metrics = evaluate_detections(dataset.records, detections, dataset.classes, metric=cfg.test.metric)
    logger.info(format_ap_table(metrics, context=f"{type(detector).__name__} on {dataset.split}"))
    metrics = {k: metrics[k] for k in ("metric", "ap", "map")}
    return metrics, times


# ----------------------------------------------------------------------------- stages

class Stages:
    """Finished stages of one run under <run>/stages/<name>.pt, each tagged with its key."""

    def __init__(self, folder: Path, resume: bool):
        self.folder = folder
        self.resume = resume
        folder.mkdir(parents=True, exist_ok=True)
        if not resume:  # a fresh run: forget earlier stages (caches outside the run are kept)
            for f in folder.glob("*.pt"):
                f.unlink()

    def load(self, name: str, key: str):
        path = self.folder / f"{name}.pt"
        if not self.resume or not path.is_file():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:
            return None  # unreadable (never half-written: saves are atomic) -> redo the stage
        return payload["value"] if payload.get("key") == key else None

    def save(self, name: str, key: str, value) -> None:
        with atomic_path(self.folder / f"{name}.pt") as tmp:
            torch.save({"key": key, "value": value}, tmp)


def _windows_for(dataset: VOCDataset, proposals) -> dict:
    return {r.image_id: label_windows(proposals[r.image_id], r.boxes, r.labels) for r in dataset}


def train_svms_and_regressors(detector: Detector, dataset: VOCDataset, proposals, cfg: Config,
                              logger: logging.Logger, store: dict[str, torch.Tensor] | None = None) -> dict:
    """Two passes over the training images: ground-truth features (SVM positives, the feature
    scale), then hard-negative mining, collecting box-regression samples on the way.

    store: pooled features of each image's training windows (its proposals, then its ground
    truth; `pooled_window_features`), read instead of running the network again."""
    detector.eval()

    @torch.no_grad()
    def features(rec, boxes: np.ndarray, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled (R, D), fc7 (R, F)) of `boxes`, rows `rows` of the image's training windows."""
        if store is not None:
            pooled = store[rec.image_id][torch.from_numpy(rows)].to(detector.device).float()
        else:
            pooled = detector.pooled_features(load_image(rec.path), torch.from_numpy(boxes.astype(np.float32)))
        return pooled, detector.fc7(pooled)

    K = len(dataset.classes)
    rng = np.random.default_rng(cfg.run.seed)
    gt_feats, gt_labels, sample = [], [], []
    for i, rec in enumerate(tqdm(dataset, desc="SVM positives", leave=False, dynamic_ncols=True)):
        props = proposals[rec.image_id]
        take = rng.choice(len(props), min(len(props), 200), replace=False) if i < 200 and len(props) \
            else np.zeros(0, np.int64)
        boxes = np.concatenate([rec.boxes, props[take].reshape(-1, 4)])
        if len(boxes) == 0:
            continue
        _, fc7 = features(rec, boxes, np.concatenate([len(props) + np.arange(len(rec.boxes)), take]))
        gt_feats.append(fc7[: len(rec.boxes)].cpu().numpy())
        gt_labels.append(rec.labels)
        sample.append(fc7[len(rec.boxes):].cpu().numpy())
    svm_scale = feature_scale(np.concatenate(sample + gt_feats), cfg.svm.target_norm)
    s = cfg.svm
    trainer = SVMTrainer(K, detector.head.fc7.out_features, C=s.C, pos_weight=s.pos_weight,
                         bias_mult=s.bias_mult, neg_iou=s.neg_iou, neg_overlap_prune=s.neg_overlap_prune,
                         hard_thresh=s.hard_thresh, evict_thresh=s.evict_thresh,
                         retrain_every=s.retrain_every, feat_scale=svm_scale, seed=cfg.run.seed,
                         class_names=dataset.classes, logger=logger)
    trainer.add_positives(np.concatenate(gt_feats), np.concatenate(gt_labels))

    b = cfg.bbox_reg
    reg_feats, reg_boxes, reg_gt, reg_labels, reg_overlaps = [], [], [], [], []
    for rec in tqdm(dataset, desc="SVM mining", leave=False, dynamic_ncols=True):
        props = proposals[rec.image_id]
        if len(props) == 0:
            logger.info(f"{rec.image_id}: no proposals; skipped for SVM mining")
            continue
        pooled, fc7 = features(rec, props, np.arange(len(props)))
        trainer.add_image(fc7.cpu().numpy(), props, rec.boxes, rec.labels)
        if b.enabled and len(rec.boxes):
            overlap, index = box_ops.max_iou(props, rec.boxes)
            sel = np.flatnonzero(overlap >= b.min_iou)
            if len(sel) > b.max_per_image:
                sel = rng.choice(sel, b.max_per_image, replace=False)
            reg_feats.append(pooled[torch.from_numpy(sel)].cpu().numpy().astype(np.float16))
            reg_boxes.append(props[sel])
            reg_gt.append(rec.boxes[index[sel]])
            reg_labels.append(rec.labels[index[sel]])
            reg_overlaps.append(overlap[sel])
    W, bias = trainer.finish()
    out = {"svm_weight": torch.from_numpy(W), "svm_bias": torch.from_numpy(bias),
           "svm_scale": torch.tensor(float(svm_scale)), "svm_history": trainer.history}
    if b.enabled and reg_feats:
        feats = np.concatenate(reg_feats).astype(np.float32)
        reg_scale = feature_scale(feats, cfg.svm.target_norm)  # the SPP code norm-scales pool5 to 20
        regressor = train_box_regressors(feats, np.concatenate(reg_boxes), np.concatenate(reg_gt),
                                         np.concatenate(reg_labels), np.concatenate(reg_overlaps), K,
                                         min_iou=b.min_iou, lam=b.lam, feat_scale=reg_scale, logger=logger)
        out.update(bbox_coef=torch.from_numpy(regressor.coef), bbox_intercept=torch.from_numpy(regressor.intercept),
                   bbox_scale=torch.tensor(float(regressor.feat_scale)), bbox_enabled=torch.tensor(True))
    return out


def _set_buffers(detector: Detector, values: dict) -> None:
    for name, value in values.items():
        if isinstance(value, torch.Tensor) and hasattr(detector, name):
            getattr(detector, name).copy_(value.to(getattr(detector, name).dtype))


def train_detector(cfg: Config, kind: str, run_dir: Path, train_set: VOCDataset, test_set: VOCDataset,
                   train_props, test_props, resume: bool, logger: logging.Logger,
                   init_backbone: dict | None = None, train_conv: bool | None = None) -> tuple[Detector, dict, dict]:
    """Fine-tune, SVMs + box regression, save model.pt, evaluate -> (detector, metrics, times)."""
    stages = Stages(run_dir / "stages", resume)
    if not resume:  # nor append to an earlier run's metrics
        (run_dir / "metrics.csv").unlink(missing_ok=True)
    device = pick_device(cfg.run.device)
    seed_everything(cfg.run.seed)
    K = len(train_set.classes)
    detector = build_detector(cfg, K, weights="none" if init_backbone is not None else None, kind=kind)
    if init_backbone is not None:
        detector.backbone.load_state_dict(init_backbone)
    detector.to(device)
    f = cfg.finetune
    train_conv = f.train_conv if train_conv is None else train_conv
    # proposals.workers and cache_dir change where and how fast boxes are computed, not the boxes
    props_cfg = {k: v for k, v in asdict(cfg.proposals).items() if k not in ("workers", "cache_dir")}
    data_key = stable_hash(asdict(cfg.data), props_cfg, train_set.image_ids)
    ft_key = stable_hash(kind, data_key, asdict(cfg.model), asdict(f), train_conv, cfg.run.seed,
                         None if init_backbone is None else stable_hash(
                             [v.cpu().numpy().tobytes() for v in init_backbone.values()]))
    windows = _windows_for(train_set, train_props)
    image_path = lambda i: load_image(train_set.folder / "JPEGImages" / f"{i}.jpg")  # noqa: E731
    store = {}  # pooled features of every training window, when conv is frozen and they are kept

    def window_store() -> dict | None:
        if not f.window_features or train_conv:
            return None
        if not store:
            store.update(pooled_window_features(detector, train_set.image_ids, image_path, windows,
                                                desc=f"{kind} window features"))
        return store

    done = stages.load("finetune", ft_key)
    if done is not None:
        detector.load_state_dict(done)
        logger.info(f"[{kind}] fine-tune: done earlier, loaded")
    else:
        t0 = time.time()
        snapshot = stages.load("finetune_snapshot", ft_key)
        if snapshot is not None:
            logger.info(f"[{kind}] fine-tune: resuming at iteration {snapshot['iteration']}")
        state = finetune(
            detector, train_set.image_ids, image_path, windows, iterations=f.iterations, lr=f.lr, lr_steps=f.lr_steps,
            gamma=f.gamma, momentum=f.momentum, weight_decay=f.weight_decay, batch_size=f.batch_size,
            images_per_batch=f.images_per_batch, fg_fraction=f.fg_fraction, fg_iou=f.fg_iou, bg_iou=f.bg_iou,
            flip=f.flip, random_scale=f.random_scale, train_conv=train_conv, conv_lr_mult=f.conv_lr_mult,
            feature_cache=f.feature_cache, cache_dir=run_dir / "cache" / "conv5", seed=cfg.run.seed,
            state=snapshot, checkpoint=lambda s: stages.save("finetune_snapshot", ft_key, s),
            checkpoint_every=f.checkpoint_every, logger=logger, window_features=window_store())
        stages.save("finetune", ft_key, detector.state_dict())
        _append_metrics(run_dir, [("finetune", h["iteration"], k, h[k]) for h in state["history"]
                                  for k in ("loss", "accuracy", "lr")])
        logger.info(f"[{kind}] fine-tune: {f.iterations} iterations in {time.time() - t0:.0f} s")

    svm_key = stable_hash(ft_key, asdict(cfg.svm), asdict(cfg.bbox_reg))
    done = stages.load("svm", svm_key)
    if done is None:
        t0 = time.time()
        done = train_svms_and_regressors(detector, train_set, train_props, cfg, logger, window_store())
        stages.save("svm", svm_key, done)
        logger.info(f"[{kind}] SVMs and box regression: {time.time() - t0:.0f} s")
    else:
        logger.info(f"[{kind}] SVMs and box regression: done earlier, loaded")
    _set_buffers(detector, done)
    save_checkpoint(run_dir / "model.pt", detector, cfg, train_set.classes)

    metrics, times = evaluate_run(detector, test_set, test_props, cfg, run_dir, logger, desc=f"{kind} test")
    write_json_atomic(run_dir / "metrics.json", metrics)
    _append_metrics(run_dir, [("test", 0, f"ap/{c}", v) for c, v in metrics["ap"].items()] +
                    [("test", 0, "map", metrics["map"])] + [("test", 0, k, v) for k, v in times.items()])
    return detector, metrics, times


def _append_metrics(run_dir: Path, rows: list[tuple]) -> None:
    """metrics.csv: stage, step, name, value; rewritten atomically with the new rows added, a new
    row replacing an old one of the same (stage, step, name), so a resumed run logs each once."""
    path = run_dir / "metrics.csv"
    new = [[str(v) for v in row] for row in rows]
    fresh = {tuple(row[:3]) for row in new}
    old = list(csv.reader(io.StringIO(path.read_text())))[1:] if path.is_file() else []
    kept = [row for row in old if tuple(row[:3]) not in fresh]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([["stage", "step", "name", "value"], *kept, *new])
    write_text_atomic(path, buf.getvalue())


def comparison(spp: tuple[dict, dict], rcnn: tuple[dict, dict]) -> dict:
    def entry(metrics, times):
        return {"map": metrics["map"], "ap": metrics["ap"], "conv_s": times.get("conv_s", 0.0),
                "fc_s": times.get("fc_s", 0.0), "total_s": times["total_s"]}
    out = {"spp": entry(*spp), "rcnn": entry(*rcnn)}
    out["speedup"] = {"conv": out["rcnn"]["conv_s"] / max(out["spp"]["conv_s"], 1e-12),
                      "total": out["rcnn"]["total_s"] / max(out["spp"]["total_s"], 1e-12)}
    return out


def comparison_markdown(comp: dict, metric: str, device: str) -> str:
    s, r, up = comp["spp"], comp["rcnn"], comp["speedup"]
    lines = [f"# SPP-net vs R-CNN (the paper's Table 10 layout), {device}", "",
             f"| | SPP-net (1 network pass per scale) | R-CNN (1 pass per window) |", "|---|---|---|",
             f"| mAP ({metric}) | {100 * s['map']:.1f} | {100 * r['map']:.1f} |",
             f"| conv time per image (s) | {s['conv_s']:.4f} | {r['conv_s']:.4f} |",
             f"| fc time per image (s) | {s['fc_s']:.4f} | {r['fc_s']:.4f} |",
             f"| total time per image (s) | {s['total_s']:.4f} | {r['total_s']:.4f} |",
             f"| speed-up (conv) | {up['conv']:.1f}x | 1x |",
             f"| speed-up (total) | {up['total']:.1f}x | 1x |", "",
             "Times exclude selective search (computed once and cached, shared by both).", "",
             "| class | SPP-net AP | R-CNN AP |", "|---|---|---|"]
    lines += [f"| {c} | {100 * s['ap'][c]:.1f} | {100 * r['ap'][c]:.1f} |" for c in s["ap"]]
    return "\n".join(lines) + "\n"


def run_training(cfg: Config, resume: bool = False) -> dict:
    """The whole `train.py` job for one config; returns the SPP (or only) run's metrics."""
    run_dir = resolve(cfg.run.output_dir) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = get_logger("sppdet", run_dir / "train.log")
    try:
        return _run(cfg, resume, run_dir, logger)
    finally:  # a later run in this process (tests, notebooks) must not write into this run's log
        for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)
                        and Path(h.baseFilename) == (run_dir / "train.log").resolve()]:
            logger.removeHandler(handler)
            handler.close()


def _run(cfg: Config, resume: bool, run_dir: Path, logger: logging.Logger) -> dict:
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    dump_config(cfg, run_dir / "config.yaml")
    logger.info(f"run {run_dir} (resume={resume}), torch {torch.__version__}, device {pick_device(cfg.run.device)}")
    train_set, test_set = load_datasets(cfg, [cfg.data.train_split, cfg.data.test_split])
    train_set.check_trainable()
    test_set.check_not_empty()
    logger.info(f"data: {len(train_set)} {train_set.split} / {len(test_set)} {test_set.split} images, "
                f"classes {', '.join(train_set.classes)}")
    t0 = time.time()
    train_props, test_props = proposals_for(cfg, train_set), proposals_for(cfg, test_set)
    logger.info(f"proposals: {np.mean([len(v) for v in train_props.values()]):.0f} per image ({time.time() - t0:.0f} s)")

    detector, metrics, times = train_detector(cfg, cfg.run.detector, run_dir, train_set, test_set,
                                              train_props, test_props, resume, logger)
    if cfg.run.compare_rcnn and cfg.run.detector == "spp":
        # The baseline: the same (fine-tuned) conv weights, frozen; its own fc, SVMs, regressors.
        rcnn = train_detector(cfg, "rcnn", run_dir / "rcnn", train_set, test_set, train_props, test_props,
                              resume, logger, init_backbone=detector.backbone.state_dict(), train_conv=False)
        comp = comparison((metrics, times), rcnn[1:])
        write_json_atomic(run_dir / "comparison.json", comp)
        table = comparison_markdown(comp, cfg.test.metric, str(pick_device(cfg.run.device)))
        write_text_atomic(run_dir / "comparison.md", table)
        logger.info("\n" + table)
    return metrics
