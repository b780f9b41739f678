"""The training pipeline, stage by stage, each resumable:

    data -> proposals -> fine-tune -> SVMs -> box regression -> model.pt -> test-split evaluation
    (and, with run.compare_rcnn, the same for the R-CNN baseline, then the Table 10 comparison)

A finished stage is stored under `runs/<name>/stages/` with a key over everything it depends on
(its config section, the data's content, the network it starts from, the stages before it and
the code version); with `resume=True` a stage whose key matches is loaded instead of redone, and
an interrupted fine-tuning continues from its last snapshot. The work of each stage lives in its
own module (finetune.py, svm.py, bbox_reg.py, inference.py, report.py); this file only chains them.
"""
from __future__ import annotations

import copy
import csv
import io
import logging
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import yaml

from . import __version__
from .bbox_reg import train_box_regressor
from .checkpoint import save_checkpoint
from .config import Config, dump_config, resolve
from .detector import Detector
from .features import TrainingFeatures
from .finetune import finetune, label_windows
from .inference import detect_options, evaluate_run, for_test, load_datasets, proposals_for
from .model import build_detector, pretrain_config, pretrained_weights_path
from .report import SIDE_BY_SIDE_IMAGES, comparison, comparison_markdown, time_side_by_side
from .svm import train_svms
from .utils import CorruptFileError, FolderLock, SppdetError, check_writable_dir, file_digest, \
    file_signature, load_verified, pick_device, run_log, save_verified, seed_everything, \
    stable_hash, write_json_atomic, write_text_atomic
from .voc import VOCDataset

# Bump when a change in the training code changes what a stage produces: finished stages of
# earlier versions are then redone, never loaded.
STAGE_VERSION = 3  # 3: the official code's box scaling under projection: code


class Stages:
    """Finished stages of one run under <run>/stages/<name>.pt, each tagged with its key and
    stored with a content digest: a damaged file is redone (with a warning), never trusted."""

    def __init__(self, folder: Path, resume: bool, logger: logging.Logger):
        self.folder, self.resume, self.logger = folder, resume, logger
        folder.mkdir(parents=True, exist_ok=True)
        if not resume:  # a fresh run: forget earlier stages (caches outside the run are kept)
            for f in folder.glob("*.pt"):
                f.unlink()

    def load(self, name: str, key: str):
        path = self.folder / f"{name}.pt"
        if not self.resume or not path.is_file():
            return None
        try:
            payload = load_verified(path)
        except CorruptFileError as e:
            self.logger.warning(f"stage {name}: {e}; redoing it")
            return None
        return payload["value"] if payload.get("key") == key else None

    def save(self, name: str, key: str, value) -> None:
        save_verified({"key": key, "value": value}, self.folder / f"{name}.pt")

    def save_snapshot(self, name: str, key: str, value) -> None:
        """Save a snapshot, keeping the one before it (name.prev.pt) in case this one is damaged."""
        path = self.folder / f"{name}.pt"
        if path.is_file():
            os.replace(path, self.folder / f"{name}.prev.pt")
        self.save(name, key, value)

    def load_snapshot(self, name: str, key: str):
        """The newest intact snapshot with this key: the last one, else the one before it."""
        for candidate in (name, f"{name}.prev"):
            value = self.load(candidate, key)
            if value is not None:
                if candidate != name and (self.folder / f"{name}.pt").is_file():
                    self.logger.warning(f"stage {name}: using the snapshot before the damaged last one")
                return value
        if (self.folder / f"{name}.pt").is_file():
            self.logger.warning(f"stage {name}: no intact snapshot; starting the stage from the beginning")
        return None

    def forget(self, name: str) -> None:
        for path in (self.folder / f"{name}.pt", self.folder / f"{name}.prev.pt"):
            path.unlink(missing_ok=True)


def dataset_key(dataset: VOCDataset) -> str:
    """Changes whenever the split's annotations or image files change (content, not names)."""
    return stable_hash([(r.image_id, r.boxes.tobytes(), r.labels.tobytes(), r.difficult.tobytes(),
                         file_signature(r.path)) for r in dataset], dataset.classes)


def weights_key(cfg: Config) -> str:
    """The pretrained weights a detector starts from: a file's content, or the named source."""
    w = cfg.model.weights
    return file_digest(resolve(w)) if w not in ("none", "imagenet") else w


def ensure_pretrained(cfg: Config, logger: logging.Logger) -> Config:
    """The paper's first half, when `model.weights` is "pretrain:NAME": reuse the finished
    pretraining run of config NAME whose key matches, else run (or resume) it here; returns the
    config with model.weights set to its weights file. Other configs come back unchanged."""
    pcfg = pretrain_config(cfg)
    if pcfg is None:
        return cfg
    from .pretrain import pretrain_key, run_pretraining

    path = pretrained_weights_path(pcfg)
    meta = {}
    if path.is_file():
        try:
            meta = load_verified(path, weights_only=True).get("meta", {})
        except CorruptFileError as e:
            logger.warning(f"pretrain: {e}; pretraining again")
    if meta.get("key") == pretrain_key(pcfg):
        logger.info(f"pretrain: {pcfg.run.name} finished earlier ({path}), reused")
    else:
        logger.info(f"pretrain: running {pcfg.run.name} ({cfg.model.weights}) into {path.parent}")
        t0 = time.time()
        run_pretraining(pcfg, resume=True)
        logger.info(f"pretrain: {time.time() - t0:.0f} s")
    return replace(cfg, model=replace(cfg.model, weights=str(path)))


def train_detector(cfg: Config, kind: str, run_dir: Path, train_set: VOCDataset, test_set: VOCDataset,
                   train_props, test_props, resume: bool, logger: logging.Logger,
                   init_backbone: dict | None = None) -> tuple[Detector, dict, dict]:
    """Fine-tune, SVMs, box regression, save model.pt, evaluate -> (the detector as tested,
    metrics, times).
    `init_backbone`: conv weights replacing the config's (the R-CNN baseline on SPP-net's
    fine-tuned conv layers when those were trained)."""
    stages = Stages(run_dir / "stages", resume, logger)
    if not resume:  # nor append to an earlier run's metrics
        (run_dir / "metrics.csv").unlink(missing_ok=True)
    seed_everything(cfg.run.seed)
    detector = build_detector(cfg, len(train_set.classes), kind=kind, logger=logger)
    if init_backbone is not None:
        detector.backbone.load_state_dict(init_backbone)
    detector.to(pick_device(cfg.run.device))
    f = cfg.finetune
    train_conv = f.train_conv and init_backbone is None
    f = replace(f, train_conv=train_conv)
    # proposals.workers and cache_dir change where and how fast boxes are computed, not the boxes
    props_cfg = {k: v for k, v in asdict(cfg.proposals).items() if k not in ("workers", "cache_dir")}
    # the weights by content, not by the path they were read from
    net_key = stable_hash(STAGE_VERSION, __version__, kind, dataset_key(train_set), props_cfg,
                          {**asdict(cfg.model), "weights": weights_key(cfg)}, cfg.run.seed,
                          None if init_backbone is None else stable_hash(
                              [v.cpu().numpy().tobytes() for v in init_backbone.values()]))
    windows = {r.image_id: label_windows(train_props[r.image_id], r.boxes, r.labels) for r in train_set}
    source = TrainingFeatures(detector.features, {r.image_id: r.path for r in train_set},
                              {i: w.boxes for i, w in windows.items()}, cache=f.feature_cache,
                              folder=run_dir / "cache", train_conv=train_conv)

    ft_key = stable_hash(net_key, asdict(f))
    done = stages.load("finetune", ft_key)
    if done is not None:
        detector.load_state_dict(done)
        logger.info(f"[{kind}] fine-tune: done earlier, loaded")
    else:
        t0 = time.time()
        snapshot = stages.load_snapshot("finetune_snapshot", ft_key)
        if snapshot is not None:
            logger.info(f"[{kind}] fine-tune: resuming at iteration {snapshot['iteration']}")
        state = finetune(detector, source, windows, f, seed=cfg.run.seed, state=snapshot,
                         checkpoint=lambda s: stages.save_snapshot("finetune_snapshot", ft_key, s), logger=logger)
        stages.save("finetune", ft_key, detector.state_dict())
        stages.forget("finetune_snapshot")
        _append_metrics(run_dir, [("finetune", h["iteration"], k, h[k]) for h in state["history"]
                                  for k in ("loss", "accuracy", "lr")])
        logger.info(f"[{kind}] fine-tune: {f.iterations} iterations in {time.time() - t0:.0f} s")

    svm_key = stable_hash(ft_key, asdict(cfg.svm))
    done = stages.load("svm", svm_key)
    if done is None:
        t0 = time.time()
        scorer, history = train_svms(detector, source, train_set.records, train_props, cfg.svm,
                                     class_names=train_set.classes, seed=cfg.run.seed, logger=logger)
        done = {"state": scorer.state_dict(), "history": history}
        stages.save("svm", svm_key, done)
        logger.info(f"[{kind}] SVMs: {time.time() - t0:.0f} s")
    else:
        logger.info(f"[{kind}] SVMs: done earlier, loaded")
    detector.svm.load_state_dict(done["state"])

    if cfg.bbox_reg.enabled:
        # pooled conv5 features: they depend on the conv layers only, not on the fc fine-tuning
        bbox_key = stable_hash(ft_key if train_conv else net_key, asdict(cfg.bbox_reg), cfg.svm.target_norm)
        done = stages.load("bbox_reg", bbox_key)
        if done is None:
            t0 = time.time()
            regressor = train_box_regressor(source, train_set.records, train_props, cfg.bbox_reg,
                                            len(train_set.classes), cfg.svm.target_norm,
                                            class_names=train_set.classes, seed=cfg.run.seed, logger=logger)
            done = regressor.state_dict()
            stages.save("bbox_reg", bbox_key, done)
            logger.info(f"[{kind}] box regression: {time.time() - t0:.0f} s")
        else:
            logger.info(f"[{kind}] box regression: done earlier, loaded")
        detector.regressor.load_state_dict(done)
    tested, compressed = for_test(copy.deepcopy(detector), cfg)  # the head the test settings ask for
    save_checkpoint(run_dir / "model.pt", detector, cfg, train_set.classes, compressed=compressed)

    metrics, times = evaluate_run(tested, test_set, test_props, cfg, run_dir, logger, desc=f"{kind} test")
    write_json_atomic(run_dir / "metrics.json", metrics)
    _append_metrics(run_dir, [("test", 0, f"ap/{c}", v) for c, v in metrics["ap"].items()] +
                    [("test", 0, "map", metrics["map"])] + [("test", 0, k, v) for k, v in times.items()])
    return tested, metrics, times


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


# Where and how fast a run works, not what it computes: a change of these is the same run.
PLACE_KEYS = {"run.output_dir", "run.threads", "proposals.workers", "proposals.cache_dir"}
# What a finished run leaves besides its stages: replaced when another config takes the folder.
RUN_OUTPUTS = ("model.pt", "metrics.json", "metrics.csv", "results", "rcnn", "comparison.md",
               "comparison.json", "cache", "stages")


def claim_run_folder(run_dir: Path, cfg: Config, resume: bool, overwrite: bool, logger: logging.Logger) -> None:
    """A run folder belongs to one config. Another config's outputs there are an error naming
    the choices, unless `overwrite` (they are removed) or `resume` (finished stages whose keys
    still match are reused; the old final outputs are removed first, so none is left beside the
    new config.yaml looking current)."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    try:
        old = yaml.safe_load(saved.read_text())
    except (OSError, yaml.YAMLError):
        old = None
    new = cfg.to_dict()
    changed = sorted(f"{section}.{key}" for section in new for key in new[section]
                     if f"{section}.{key}" not in PLACE_KEYS
                     and (not isinstance(old, dict) or (old.get(section) or {}).get(key) != new[section][key]))
    if not changed:
        return
    what = ", ".join(changed[:6]) + (", ..." if len(changed) > 6 else "")
    if not (resume or overwrite):
        raise SppdetError(f"{run_dir} holds the outputs of another config (differs in {what}); rerun with "
                          f"--resume to reuse what still fits, or choose another run.name, or pass "
                          f"--overwrite to replace them")
    keep = {"stages", "rcnn", "cache"} if resume and not overwrite else set()
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if name in keep:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    if keep:
        for name in ("model.pt", "metrics.json", "results", "comparison.md", "comparison.json"):
            target = run_dir / "rcnn" / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    logger.info(f"run folder {run_dir}: the config changed ({what}); "
                + ("finished stages whose inputs did not change are reused" if keep else "earlier outputs removed"))


def run_training(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict:
    """The whole `train.py` job for one config; returns the SPP (or only) run's metrics. The run
    folder is locked while the run writes to it (`utils.FolderLock`)."""
    pick_device(cfg.run.device)  # an unusable device fails before anything is written
    run_dir = resolve(cfg.run.output_dir) / cfg.run.name
    check_writable_dir(run_dir, "run folder (run.output_dir / run.name)")
    check_writable_dir(resolve(cfg.proposals.cache_dir), "proposals.cache_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    with FolderLock(run_dir, what="run.name"), run_log(run_dir / "train.log") as logger:
        claim_run_folder(run_dir, cfg, resume, overwrite, logger)
        return _run(cfg, resume, run_dir, logger)


def _run(cfg: Config, resume: bool, run_dir: Path, logger: logging.Logger) -> dict:
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    dump_config(cfg, run_dir / "config.yaml")
    logger.info(f"run {run_dir} (resume={resume}), sppdet {__version__}, torch {torch.__version__}, "
                f"device {pick_device(cfg.run.device)}")
    train_set, test_set = load_datasets(cfg, [cfg.data.train_split, cfg.data.test_split], logger)
    train_set.check_trainable()
    test_set.check_not_empty()
    logger.info(f"data: {len(train_set)} {train_set.split} / {len(test_set)} {test_set.split} images, "
                f"classes {', '.join(train_set.classes)}")
    t0 = time.time()
    train_props, test_props = proposals_for(cfg, train_set), proposals_for(cfg, test_set)
    logger.info(f"proposals: {np.mean([len(v) for v in train_props.values()]):.0f} per image ({time.time() - t0:.0f} s)")

    net_cfg = ensure_pretrained(cfg, logger)  # the config the networks are built from
    detector, metrics, times = train_detector(net_cfg, cfg.run.detector, run_dir, train_set, test_set,
                                              train_props, test_props, resume, logger)
    if cfg.run.compare_rcnn and cfg.run.detector == "spp":
        # The baseline: the same conv weights (SPP-net's fine-tuned ones when its conv layers
        # trained), frozen; its own fc fine-tuning, SVMs and box regression.
        init = detector.backbone.state_dict() if cfg.finetune.train_conv else None
        rcnn = train_detector(net_cfg, "rcnn", run_dir / "rcnn", train_set, test_set, train_props, test_props,
                              resume, logger, init_backbone=init)
        timing = time_side_by_side({"spp": detector, "rcnn": rcnn[0]}, test_set, test_props,
                                   detect_options(cfg, device=detector.device))
        comp = comparison((metrics, timing["spp"]), (rcnn[1], timing["rcnn"]),
                          timed_images=min(len(test_set), SIDE_BY_SIDE_IMAGES))
        write_json_atomic(run_dir / "comparison.json", comp)
        table = comparison_markdown(comp, cfg.test.metric, str(pick_device(cfg.run.device)))
        write_text_atomic(run_dir / "comparison.md", table)
        logger.info("\n" + table)
    return metrics
