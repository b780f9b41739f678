"""Fine-tuning the fc layers (and optionally the conv layers) on pooled windows.

Paper (section 4.1, PAPER.md 2.1): conv frozen; fc6, fc7 and a new (K+1)-way fc8 trained on
windows pooled from conv5; positives IoU >= 0.5 with a ground-truth box (the ground-truth
boxes themselves included), background IoU in [0.1, 0.5), 25% positives per minibatch of 128,
SGD momentum 0.9, weight decay 5e-4, dropout 0.5. Beyond the paper, `train_conv` back-propagates
through the pyramid pooling into conv1..conv5.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import boxes as box_ops
from .detector import Detector, SPPDetector
from .utils import atomic_path


@dataclass
class TrainWindows:
    """The windows of one training image: proposals followed by its ground-truth boxes.

    boxes (R, 4) 0-based inclusive; overlap (R,) best IoU with a ground-truth box;
    label (R,) that box's class 1..K, or 0 when the image has no objects.
    """

    boxes: np.ndarray
    overlap: np.ndarray
    label: np.ndarray


def label_windows(proposals: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray) -> TrainWindows:
    boxes = np.concatenate([proposals.reshape(-1, 4), gt_boxes.reshape(-1, 4)]).astype(np.float32)
    overlap, index = box_ops.max_iou(boxes, gt_boxes.astype(np.float32))
    label = np.where(index >= 0, gt_labels[np.maximum(index, 0)] if len(gt_labels) else 0, 0)
    return TrainWindows(boxes, overlap.astype(np.float32), label.astype(np.int64))


def sample_windows(windows: TrainWindows, num: int, fg_fraction: float, fg_iou: float,
                   bg_iou: tuple[float, float], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw `num` windows: up to round(num * fg_fraction) positives (IoU >= fg_iou), the rest
    background (IoU in [lo, hi)), without replacement where possible.

    Returns (indices (n,), targets (n,)) with target = class 1..K for positives, 0 for background.
    """
    fg = np.flatnonzero(windows.overlap >= fg_iou)
    bg = np.flatnonzero((windows.overlap >= bg_iou[0]) & (windows.overlap < bg_iou[1]))
    num_fg = min(int(round(num * fg_fraction)), len(fg))
    fg = rng.choice(fg, num_fg, replace=False) if num_fg else fg[:0]
    num_bg = num - num_fg
    if len(bg):
        bg = rng.choice(bg, num_bg, replace=len(bg) < num_bg)
    index = np.concatenate([fg, bg]).astype(np.int64)
    target = np.concatenate([windows.label[fg], np.zeros(len(bg), np.int64)])
    return index, target


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Mirror boxes (R, 4) in an image of `width` pixels: x -> width - 1 - x."""
    out = boxes.copy()
    out[:, 0], out[:, 2] = width - 1 - boxes[:, 2], width - 1 - boxes[:, 0]
    return out


class Conv5Cache:
    """Frozen conv5 maps of the training images, computed once: in memory or as fp16 .npy
    files on disk (atomic writes, so an interrupted run never leaves a half file).

    Every lookup of a cached map returns the fp16-rounded values, the first (which computes
    it) included, so a map reads the same whether it was just computed, kept in memory or read
    from disk: a resumed run (empty memory cache) trains exactly as an uninterrupted one."""

    def __init__(self, detector: SPPDetector, mode: str, folder: Path | None = None):
        self.detector, self.mode, self.folder = detector, mode, folder
        self.memory: dict[tuple, torch.Tensor] = {}

    def get(self, key: str, image: np.ndarray, scale: int) -> torch.Tensor:
        if self.mode == "none":
            with torch.no_grad():
                return self.detector.conv5_pyramid(image, [scale])[scale]
        if (key, scale) in self.memory:
            return self.memory[(key, scale)].to(self.detector.device).float()
        path = self.folder / f"{key}_s{scale}.npy" if self.mode == "disk" else None
        if path is not None and path.is_file():
            conv5 = torch.from_numpy(np.load(path))
        else:
            with torch.no_grad():
                conv5 = self.detector.conv5_pyramid(image, [scale])[scale].cpu().half()
            if path is not None:
                with atomic_path(path) as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, conv5.numpy())
        if self.mode == "memory":
            self.memory[(key, scale)] = conv5
        return conv5.to(self.detector.device).float()


def learning_rate(iteration: int, base_lr: float, steps: Sequence[int], gamma: float) -> float:
    return base_lr * gamma ** sum(iteration >= s for s in steps)


def finetune(detector: Detector, images: Sequence[str], load_image: Callable[[str], np.ndarray],
             windows: dict[str, TrainWindows], *, iterations: int, lr: float, lr_steps: Sequence[int],
             gamma: float, momentum: float, weight_decay: float, batch_size: int, images_per_batch: int,
             fg_fraction: float, fg_iou: float, bg_iou: tuple[float, float], flip: bool = False,
             random_scale: bool = False, train_conv: bool = False, conv_lr_mult: float = 1.0,
             feature_cache: str = "memory", cache_dir: Path | None = None, seed: int = 0,
             state: dict | None = None, checkpoint: Callable[[dict], None] | None = None,
             checkpoint_every: int = 500, logger: logging.Logger | None = None,
             window_features: dict[str, torch.Tensor] | None = None) -> dict:
    """Train the fc head (and conv layers if `train_conv`) with softmax over K+1 classes.

    Each iteration draws `batch_size` windows from `images_per_batch` random training images.
    `window_features` {image id: (R, D) pooled features of `windows[id].boxes`}, computed
    once with the conv layers frozen (`pooled_window_features`), replaces the per-iteration
    feature path for unflipped windows (R-CNN's warp + conv per window is the costly one).
    `state` resumes an interrupted run (from `checkpoint(state)` calls every
    `checkpoint_every` iterations) exactly: the same seed and arguments give the same weights
    as an uninterrupted run. The state holds the live model and optimizer tensors, so the
    callback must save (serialise) it before returning. Returns the final state: iteration,
    model, optimizer, RNG states (numpy sampling, torch dropout), loss history.
    """
    rng = np.random.default_rng(seed)
    params = [{"params": detector.head.parameters(), "lr": lr}]
    if train_conv:
        params.append({"params": detector.backbone.parameters(), "lr": lr * conv_lr_mult, "mult": conv_lr_mult})
    else:
        detector.backbone.requires_grad_(False)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    start, history, running = 0, [], []
    if state:
        detector.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]
        if "torch_rng" in state:  # snapshots of older versions lack it: resumed, not exactly
            _set_torch_rng(state["torch_rng"])
        start, history, running = state["iteration"], list(state["history"]), list(state.get("running", []))
    spp = isinstance(detector, SPPDetector)
    cache = Conv5Cache(detector, feature_cache, cache_dir) if spp and not train_conv else None
    per_image = max(1, batch_size // images_per_batch)
    loss_fn = nn.CrossEntropyLoss()
    detector.train()
    if not train_conv:
        detector.backbone.eval()
    bar = tqdm(range(start, iterations), desc="fine-tune", initial=start, total=iterations,
               leave=False, dynamic_ncols=True)
    for it in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(it, lr, lr_steps, gamma) * group.get("mult", 1.0)
        pooled, targets = [], []
        for image_id in rng.choice(images, images_per_batch, replace=len(images) < images_per_batch):
            win = windows[image_id]
            index, target = sample_windows(win, per_image, fg_fraction, fg_iou, bg_iou, rng)
            if len(index) == 0:
                continue
            image = load_image(image_id)
            boxes = win.boxes[index]
            mirrored = flip and rng.random() < 0.5
            if mirrored:
                image = np.ascontiguousarray(image[:, ::-1])
                boxes = flip_boxes(boxes, image.shape[1])
            boxes_t = torch.from_numpy(boxes)
            if window_features is not None and not mirrored and not train_conv:
                # Frozen conv, unflipped: the window's pooled features never change.
                pooled.append(window_features[image_id][torch.from_numpy(index)].to(detector.device).float())
            elif spp:
                scale_idx = (torch.from_numpy(rng.integers(0, len(detector.scales), len(boxes)))
                             if random_scale else detector.window_scales(image.shape, boxes_t))
                ids = scale_idx.unique().tolist()
                if cache is not None:
                    key = f"{image_id}{'_flip' if mirrored else ''}"
                    maps = {k: cache.get(key, image, k) for k in ids}
                else:
                    maps = detector.conv5_pyramid(image, ids)
                pooled.append(detector.pool(maps, image.shape, boxes_t, scale_idx))
            else:
                with torch.set_grad_enabled(train_conv):
                    pooled.append(detector.pooled_features(image, boxes_t))
            targets.append(torch.from_numpy(target))
        if not pooled:
            continue
        logits = detector.head.cls_score(detector.head(torch.cat(pooled)))
        target = torch.cat(targets).to(logits.device)
        loss = loss_fn(logits, target)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"fine-tuning loss is {loss.item()} at iteration {it}; lower finetune.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        accuracy = (logits.argmax(1) == target).float().mean().item()
        running.append((loss.item(), accuracy))
        if (it + 1) % 20 == 0 or it + 1 == iterations:
            mean_loss, mean_acc = np.mean(running, axis=0)
            history.append({"iteration": it + 1, "loss": float(mean_loss), "accuracy": float(mean_acc),
                            "lr": optimizer.param_groups[0]["lr"]})
            bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{mean_acc:.2f}")
            if logger and ((it + 1) % 200 == 0 or it + 1 == iterations):
                logger.info(f"fine-tune {it + 1}/{iterations}: loss {mean_loss:.4f} accuracy {mean_acc:.3f}")
            running = []
        if checkpoint is not None and (it + 1) % checkpoint_every == 0 and it + 1 < iterations:
            checkpoint(_state(detector, optimizer, rng, it + 1, history, running))
    detector.eval()
    detector.backbone.requires_grad_(True)
    return _state(detector, optimizer, rng, max(start, iterations), history, running)


def _state(detector, optimizer, rng, iteration, history, running) -> dict:
    """Everything an exact resume needs; `running` holds the (loss, accuracy) of iterations
    since the last history entry."""
    return {"model": detector.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": rng.bit_generator.state, "torch_rng": _torch_rng(), "iteration": iteration,
            "history": list(history), "running": list(running)}


def _torch_rng() -> dict:
    """torch's global generators (dropout draws from them): CPU, and each CUDA device in use."""
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_torch_rng(states: dict) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@torch.no_grad()
def pooled_window_features(detector: Detector, images: Sequence[str], load_image: Callable[[str], np.ndarray],
                           windows: dict[str, TrainWindows], desc: str = "window features") -> dict[str, torch.Tensor]:
    """{image id: pooled conv5 features (R, D) float16 on the CPU of `windows[id].boxes`}, with
    the detector in eval mode: what fine-tuning, SVMs and box regression read when conv is frozen.
    Memory: (windows per image) x D x 2 bytes per image, so for small datasets only."""
    detector.eval()
    out = {}
    for image_id in tqdm(images, desc=desc, leave=False, dynamic_ncols=True):
        boxes = torch.from_numpy(windows[image_id].boxes)
        out[image_id] = detector.pooled_features(load_image(image_id), boxes).half().cpu()
    return out
