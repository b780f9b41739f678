"""Pretraining the SPP classification network on an ImageFolder dataset (the paper's first half,
PAPER.md 1.1 and 1.7): what ImageNet is to the paper, the embedded classification set is to the
demo. One process, or several under torchrun (DistributedDataParallel: gloo on CPU, nccl and
automatic mixed precision on CUDA).

    data.root/train/<class>/*.jpg ─► short side `resize`, random `crop`, flip, colour jitter
        (multi-size: that crop resized to the epoch's size) ─► SPPClassifier ─► cross-entropy
    data.root/val/<class>/*.jpg ─► top-1 / top-5 error of three views: the centre crop, the
        paper's 10 views (centre + 4 corners, each flipped too, softmax averaged) and the full
        image (short side `resize`; an SPP network only)

Writes runs/<name>/: config.yaml, train.log, metrics.json ({"top1_error": {view: fraction},
"top5_error": {view: fraction}, "epochs": n}), history.csv and weights.pth: conv1..conv5 (batch
norm folded in) and fc6/fc7 with their meta, the file `model.weights` takes for detection.
Resumable per epoch (`--resume`): a resumed run ends with the weights of an uninterrupted one.
Classes are the folder names, sorted, as torchvision's ImageFolder has them.
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from . import __version__
from .classifier import SPPClassifier, add_batch_norm, initialize
from .config import Config, dump_config, resolve
from .model import build_backbone
from .utils import CorruptFileError, FolderLock, SppdetError, check_writable_dir, content_digest, \
    load_verified, pick_device, run_log, save_verified, set_torch_rng_state, stable_hash, torch_rng_state, \
    write_json_atomic, write_text_atomic

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIEWS = ("center", "ten", "full")
WEIGHTS_FILE = "weights.pth"


# ----------------------------------------------------------------------------- data

def list_image_folder(root: Path, split: str) -> tuple[list[str], list[tuple[Path, int]]]:
    """(classes, [(image path, class index)]) of root/split/<class>/*: classes are the sorted
    folder names (torchvision's ImageFolder rule), images sorted by path."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise SppdetError(f"{folder}: not found (an ImageFolder dataset has {root}/train/<class>/*.jpg and "
                          f"{root}/val/<class>/*.jpg)")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise SppdetError(f"{folder}: no class folders")
    items = [(p, k) for k, c in enumerate(classes) for p in sorted((folder / c).iterdir())
             if p.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise SppdetError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return classes, items


def resize_short(image: np.ndarray, short: int) -> np.ndarray:
    h, w = image.shape[:2]
    f = short / min(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)


def color_jitter(image: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation each scaled by a factor in [1 - amount, 1 + amount]."""
    x = image.astype(np.float32)
    b, c, s = rng.uniform(1 - amount, 1 + amount, 3)
    x *= b
    x = (x - x.mean()) * c + x.mean()
    gray = x.mean(axis=2, keepdims=True)
    x = (x - gray) * s + gray
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


class TrainImages(Dataset):
    """Training crops: item i of epoch e draws its augmentation from PCG64([seed, e, i]), so the
    crops do not depend on which process or worker reads them (DDP equals one process)."""

    def __init__(self, items, resize: int, crop: int, flip: bool, jitter: float, seed: int):
        self.items, self.resize, self.crop, self.flip, self.jitter, self.seed = items, resize, crop, flip, jitter, seed
        self.epoch, self.size = 0, crop

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch, i]))
        image = resize_short(read_image(path), self.resize)
        h, w = image.shape[:2]
        y, x = int(rng.integers(0, h - self.crop + 1)), int(rng.integers(0, w - self.crop + 1))
        image = image[y:y + self.crop, x:x + self.crop]
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        if self.jitter:
            image = color_jitter(image, self.jitter, rng)
        if self.size != self.crop:  # multi-size: the same crop at another resolution [P 1.7]
            image = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(image), label


def read_image(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise SppdetError(f"{path}: not a readable image")
    return image


def collate(batch):
    images, labels = zip(*batch)
    return np.stack(images), torch.tensor(labels, dtype=torch.int64)


def view_crops(image: np.ndarray, resize: int, crop: int) -> dict[str, list[np.ndarray]]:
    """The three test views of one image: centre crop; 10 views (centre + corners, and flips);
    the full image with its short side `resize`."""
    full = resize_short(image, resize)
    h, w = full.shape[:2]
    c = crop
    corners = [((h - c) // 2, (w - c) // 2), (0, 0), (0, w - c), (h - c, 0), (h - c, w - c)]
    crops = [full[y:y + c, x:x + c] for y, x in corners]
    return {"center": [crops[0]], "ten": crops + [v[:, ::-1] for v in crops], "full": [full]}


# ----------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """One process, or torchrun's: RANK / WORLD_SIZE / LOCAL_RANK from the environment; gloo on
    CPU, nccl on CUDA (each process on its LOCAL_RANK's GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), pick_device(device_name)
    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d, device


# ----------------------------------------------------------------------------- training

def build_classifier(cfg: Config, num_classes: int) -> SPPClassifier:
    backbone, _ = build_backbone(cfg.model)
    if cfg.pretrain.batch_norm:
        add_batch_norm(backbone)
    model = SPPClassifier(backbone, num_classes, cfg.model.levels, cfg.model.fc_dim, cfg.model.dropout,
                          pyramid=cfg.pretrain.pyramid, fixed_input=cfg.pretrain.crop, fc8_std=cfg.finetune.fc8_std)
    initialize(model, cfg.pretrain.init)
    return model


def epoch_size(cfg: Config, epoch: int) -> int:
    """The input size of an epoch: the crop, or with multi-size training the crop and
    small_size in turn (alternate) or a seeded random size between them (random)."""
    p = cfg.pretrain
    if p.multi_size == "alternate":
        return p.crop if epoch % 2 == 0 else p.small_size
    if p.multi_size == "random":
        lo, hi = sorted((p.small_size, p.crop))
        return int(np.random.Generator(np.random.PCG64([cfg.run.seed, epoch, 7])).integers(lo, hi + 1))
    return p.crop


def learning_rate(cfg: Config, epoch: float) -> float:
    """lr at a (fractional) epoch: linear warm-up, then step or cosine decay."""
    p = cfg.pretrain
    if epoch < p.warmup_epochs:
        return p.lr * epoch / p.warmup_epochs
    if p.lr_schedule == "cosine":
        t = (epoch - p.warmup_epochs) / max(p.epochs - p.warmup_epochs, 1e-9)
        return p.lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return p.lr * p.gamma ** sum(epoch >= s for s in p.lr_steps)


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    p = cfg.pretrain
    decay = [t for n, t in model.named_parameters() if t.ndim > 1]
    no_decay = [t for n, t in model.named_parameters() if t.ndim <= 1]  # biases, batch norm
    groups = [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if p.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=p.lr)
    return torch.optim.SGD(groups, lr=p.lr, momentum=p.momentum)


def pretrain_key(cfg: Config) -> str:
    """Everything the weights depend on: the data, model and pretrain sections and the seed."""
    d = cfg.to_dict()
    return stable_hash(__version__, d["data"], d["model"], d["pretrain"], cfg.run.seed, cfg.finetune.fc8_std)


def run_pretraining(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict:
    """The whole scripts/pretrain.py job -> metrics (see the module docstring)."""
    ddp, device = init_distributed(cfg.run.device)
    try:
        return _run(cfg, resume, overwrite, ddp, device)
    finally:
        # gloo's threads must be joined before the interpreter exits, or a rank may abort at
        # exit ("terminate called without an active exception") after the run itself succeeded
        if ddp.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: Config, resume: bool, overwrite: bool, ddp: Dist, device: torch.device) -> dict:
    run_dir = resolve(cfg.run.output_dir) / cfg.run.name
    if ddp.main:
        check_writable_dir(run_dir, "run folder (run.output_dir / run.name)")
        run_dir.mkdir(parents=True, exist_ok=True)
    ddp.barrier()
    with contextlib.ExitStack() as stack:
        if ddp.main:  # the main process writes every file: it holds the folder
            stack.enter_context(FolderLock(run_dir, what="run.name"))
        logger = stack.enter_context(run_log(run_dir / "train.log" if ddp.main else None))
        if not ddp.main:
            logger.setLevel(logging.WARNING)
        return _pretrain(cfg, resume, overwrite, ddp, device, run_dir, logger)


def _claim(run_dir: Path, cfg: Config, resume: bool, overwrite: bool) -> None:
    """The pretraining counterpart of engine.claim_run_folder: another config's outputs are an
    error naming the choices; --overwrite removes them; --resume keeps them (its snapshot is
    used only when its key matches)."""
    saved = run_dir / "config.yaml"
    if not saved.is_file() or yaml.safe_load(saved.read_text()) == cfg.to_dict():
        return
    if not (resume or overwrite):
        raise SppdetError(f"{run_dir} holds the outputs of another pretraining config; rerun with --resume to "
                          f"continue what still fits, or choose another run.name, or pass --overwrite to "
                          f"replace them")
    if overwrite:
        shutil.rmtree(run_dir / "stages", ignore_errors=True)
        for name in (WEIGHTS_FILE, "metrics.json", "history.csv"):
            (run_dir / name).unlink(missing_ok=True)


def _pretrain(cfg: Config, resume: bool, overwrite: bool, ddp: Dist, device: torch.device, run_dir: Path,
              logger: logging.Logger) -> dict:
    p = cfg.pretrain
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if ddp.main:
        _claim(run_dir, cfg, resume, overwrite)
        dump_config(cfg, run_dir / "config.yaml")
        logger.info(f"pretrain {run_dir} (resume={resume}), {ddp.world} process(es), device {device}, "
                    f"sppdet {__version__}, torch {torch.__version__}")
    root, d = resolve(cfg.data.root), cfg.data
    if d.synthetic and ddp.main:
        from .synthetic import CLASSIFICATION_CLASSES, CLASSIFICATION_MARKER, ensure_classification_set
        if root.is_dir() and any(root.iterdir()) and not (root / CLASSIFICATION_MARKER).exists():
            logger.info(f"data: {root} is not a generated classification set; using it as it is")
        else:
            ensure_classification_set(root, seed=d.synthetic_seed, train_per_class=d.synthetic_train_per_class,
                                      val_per_class=d.synthetic_val_per_class, image_size=d.synthetic_image_size,
                                      classes=CLASSIFICATION_CLASSES + (("background",) if d.synthetic_background_class
                                                                        else ()))
    ddp.barrier()
    classes, train_items = list_image_folder(root, "train")
    val_classes, val_items = list_image_folder(root, "val")
    if val_classes != classes:
        raise SppdetError(f"{root}/val: class folders {val_classes} differ from train's {classes}")
    if p.batch_size % ddp.world:
        raise SppdetError(f"pretrain.batch_size={p.batch_size} must divide among the {ddp.world} processes")
    logger.info(f"data: {root}: {len(classes)} classes, {len(train_items)} train / {len(val_items)} val images")

    torch.manual_seed(cfg.run.seed)  # the same initial weights in every process
    model = build_classifier(cfg, len(classes)).to(device)
    optimizer = make_optimizer(cfg, model)
    snapshot_path = run_dir / "stages" / "pretrain_snapshot.pt"
    start, history = 0, []
    key = pretrain_key(cfg)
    if resume and snapshot_path.is_file():
        try:
            snap = load_verified(snapshot_path)
        except CorruptFileError as e:
            snap = None
            logger.warning(f"pretrain: {e}; starting from the beginning")
        if snap is not None and snap["key"] == key:
            model.load_state_dict(snap["model"])
            optimizer.load_state_dict(snap["optimizer"])
            set_torch_rng_state(snap["torch_rng"][ddp.rank] if ddp.rank < len(snap["torch_rng"]) else snap["torch_rng"][0])
            start, history = snap["epoch"], snap["history"]
            logger.info(f"pretrain: resuming after epoch {start}")
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp.world > 1 else model
    amp_dtype = {"auto": torch.float16 if device.type == "cuda" else None, "bf16": torch.bfloat16,
                 "fp32": None}[p.precision]
    # fp16 gradients underflow without scaling; bf16 has fp32's exponent range and needs none
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    data = TrainImages(train_items, p.resize, p.crop, p.flip, p.color_jitter, cfg.run.seed)
    sampler = DistributedSampler(data, num_replicas=ddp.world, rank=ddp.rank, shuffle=True, seed=cfg.run.seed,
                                 drop_last=True)
    loader = DataLoader(data, batch_size=p.batch_size // ddp.world, sampler=sampler, drop_last=True,
                        num_workers=p.workers, collate_fn=collate, persistent_workers=False)
    steps = len(loader)
    if steps == 0:
        raise SppdetError(f"pretrain.batch_size={p.batch_size} exceeds the {len(data)} training images")
    backbone = model.backbone
    for epoch in range(start, p.epochs):
        t0 = time.time()
        data.epoch, data.size = epoch, epoch_size(cfg, epoch)
        sampler.set_epoch(epoch)
        net.train()
        total, correct, seen = 0.0, 0, 0
        bar = tqdm(loader, desc=f"pretrain {epoch + 1}/{p.epochs} ({data.size}px)", leave=False,
                   dynamic_ncols=True, disable=not ddp.main)
        for step, (images, labels) in enumerate(bar):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, epoch + step / steps)
            x = backbone.preprocess(images).to(device)
            labels = labels.to(device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = net(x)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=p.label_smoothing)
            if not torch.isfinite(loss):
                raise SppdetError(f"pretraining diverged: the loss is {loss.item()} in epoch {epoch + 1}; "
                                  f"lower pretrain.lr (now {p.lr:g}) and rerun")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += loss.item() * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
            bar.set_postfix(loss=f"{total / seen:.3f}", acc=f"{correct / seen:.2f}")
        entry = {"epoch": epoch + 1, "size": data.size, "loss": total / seen, "train_acc": correct / seen,
                 "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - t0}
        if ddp.main and ((epoch + 1) % p.val_every == 0 or epoch + 1 == p.epochs):
            err = evaluate_views(model, val_items, cfg, device, views=("center",))
            entry["val_top1_error_center"] = err["top1_error"]["center"]
        history.append(entry)
        rng_states = [torch_rng_state()]  # dropout: each process's own generator
        if ddp.world > 1:
            rng_states = [None] * ddp.world
            dist.all_gather_object(rng_states, torch_rng_state())
        if ddp.main:
            logger.info("pretrain epoch {epoch}/{epochs} ({size} px): loss {loss:.4f}, train acc {train_acc:.3f}"
                        .format(epochs=p.epochs, **entry)
                        + (f", val top-1 error (centre) {entry['val_top1_error_center']:.3f}"
                           if "val_top1_error_center" in entry else "") + f", {entry['seconds']:.0f} s")
            save_verified({"key": key, "epoch": epoch + 1, "history": history, "model": model.state_dict(),
                           "optimizer": optimizer.state_dict(), "torch_rng": rng_states}, snapshot_path)
        ddp.barrier()
    if p.batch_norm:
        recalibrate_batch_norm(model, data, loader, cfg, device, ddp)
    if ddp.world > 1:  # every process must end with the same weights
        for buffer in model.buffers():  # batch-norm statistics are per process: take rank 0's
            dist.broadcast(buffer, src=0)
        digests = [None] * ddp.world
        dist.all_gather_object(digests, content_digest(model.state_dict()))
        if len(set(digests)) != 1:
            raise SppdetError(f"pretraining: the {ddp.world} processes ended with different weights")
        logger.info(f"pretrain: all {ddp.world} processes hold the same weights ({digests[0][:12]})")
    metrics = {}
    if ddp.main:
        views = VIEWS if p.pyramid == "spp" else ("center", "ten")  # no-SPP takes its crop size only
        metrics = {**evaluate_views(model, val_items, cfg, device, views), "epochs": p.epochs}
        write_json_atomic(run_dir / "metrics.json", metrics)
        _write_history(run_dir / "history.csv", history)
        meta = {"source": "sppdet pretrain", "key": key, "classes": classes, "backbone": cfg.model.backbone,
                "width": cfg.model.width, "levels": list(cfg.model.levels) if p.pyramid == "spp" else None,
                "input": backbone.preprocessing(), "lrn": cfg.model.lrn, "metrics": metrics}
        save_verified({"state_dict": model.detection_weights(), "meta": meta}, run_dir / WEIGHTS_FILE)
        logger.info(format_errors(metrics, f"pretrain {cfg.run.name}"))
    ddp.barrier()
    return metrics


@torch.no_grad()
def recalibrate_batch_norm(model: SPPClassifier, data: TrainImages, loader, cfg: Config, device: torch.device,
                           ddp: Dist, batches: int = 50) -> None:
    """Re-estimate the batch-norm statistics at the crop size (the size the folded weights will
    see most): multi-size training leaves those of its last epoch's size. A cumulative average
    over `batches` training batches (augmented as in training, drawn for epoch index `epochs`)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    data.epoch, data.size = cfg.pretrain.epochs, cfg.pretrain.crop
    loader.sampler.set_epoch(cfg.pretrain.epochs)
    model.train()
    for step, (images, _) in enumerate(loader):
        if step == batches:
            break
        model(model.backbone.preprocess(images).to(device))
    model.eval()
    for m, momentum in zip(norms, saved):
        m.momentum = momentum


def _write_history(path: Path, history: list[dict]) -> None:
    keys = sorted({k for h in history for k in h}, key=lambda k: list(history[0]).index(k) if k in history[0] else 99)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(path, buf.getvalue())


@torch.no_grad()
def evaluate_views(model: SPPClassifier, items, cfg: Config, device: torch.device,
                   views=VIEWS, batch: int = 128) -> dict:
    """Top-1 / top-5 error of each test view over `items` [(path, label)]:
    {"top1_error": {view: fraction}, "top5_error": {view: fraction}}. A view of several crops
    averages their softmax; crops of one size go through the network in batches."""
    p = cfg.pretrain
    model.eval()
    backbone = model.backbone
    labels = torch.tensor([label for _, label in items])
    probs = {v: [None] * len(items) for v in views}
    pending: dict[tuple, list] = {}  # (view, crop shape) -> [(image index, crop)]

    def flush(key) -> None:
        view, _ = key
        group = pending.pop(key)
        x = backbone.preprocess(np.stack([np.ascontiguousarray(c) for _, c in group])).to(device)
        out = torch.softmax(model(x).float(), dim=1).cpu()
        for (i, _), p_i in zip(group, out):
            probs[view][i] = p_i if probs[view][i] is None else probs[view][i] + p_i

    for i, (path, _) in enumerate(tqdm(items, desc="validate", leave=False, dynamic_ncols=True)):
        all_views = view_crops(read_image(path), p.resize, p.crop)
        for v in views:
            for crop in all_views[v]:
                key = (v, crop.shape)
                pending.setdefault(key, []).append((i, crop))
                if len(pending[key]) >= batch:
                    flush(key)
    for key in list(pending):
        flush(key)
    out = {"top1_error": {}, "top5_error": {}}
    for v in views:
        top5 = torch.stack(probs[v]).topk(min(5, len(probs[v][0])), dim=1).indices
        out["top1_error"][v] = 1 - float((top5[:, 0] == labels).float().mean())
        out["top5_error"][v] = 1 - float((top5 == labels[:, None]).any(1).float().mean())
    return out


def format_errors(metrics: dict, context: str) -> str:
    lines = [f"{context}: validation error after {metrics.get('epochs', '?')} epochs",
             f"{'view':<8s} {'top-1 %':>8s} {'top-5 %':>8s}"]
    for v in metrics["top1_error"]:
        lines.append(f"{v:<8s} {100 * metrics['top1_error'][v]:8.2f} {100 * metrics['top5_error'][v]:8.2f}")
    return "\n".join(lines)
