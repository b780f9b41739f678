"""Fine-tuning the fc layers (and optionally the conv layers) on pooled windows.

Paper (section 4.1, PAPER.md 2.1): conv frozen; fc6, fc7 and a new (K+1)-way fc8 trained on
windows pooled from conv5; positives IoU >= 0.5 with a ground-truth box (the ground-truth
boxes themselves included), background IoU in [0.1, 0.5), 25% positives per minibatch of 128,
SGD momentum 0.9, weight decay 5e-4, dropout 0.5. Beyond the paper, `train_conv` back-propagates
through the pyramid pooling into conv1..conv5. The official code's choices are switches
(FinetuneConfig; the paper's values stay the defaults): flips, a random scale per window, the
vstep schedule (lr / lr_steps / gamma), fc8's bias initialised to `fc8_bias` (the train
prototxt's bias_filler constant 1), biases at `bias_lr_mult` x the learning rate (blobs_lr 2)
and no weight decay on fc8's bias (`fc8_bias_decay` false: weight_decay 0 on fc8_pascal's bias),
as `param_groups` builds them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import boxes as box_ops
from .config import FinetuneConfig
from .detector import Detector
from .features import TrainingFeatures
from .utils import SppdetError, set_torch_rng_state, torch_rng_state


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


def learning_rate(iteration: int, base_lr: float, steps: Sequence[int], gamma: float) -> float:
    return base_lr * gamma ** sum(iteration >= s for s in steps)


def _is_bias(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "bias"


def param_groups(detector: Detector, cfg: FinetuneConfig, train_conv: bool | None = None) -> list[dict]:
    """The optimizer's parameter groups, in a fixed order (an exact resume loads the optimizer
    state group by group): head weights, head biases but fc8's, fc8's bias, and with
    `train_conv` the backbone's weights and biases. Each group's "mult" scales the scheduled
    learning rate (`learning_rate(...) * mult`): biases `cfg.bias_lr_mult` (Caffe's blobs_lr 2 on
    the second blob), the backbone `cfg.conv_lr_mult` (its biases both). Weight decay is
    `cfg.weight_decay` everywhere but on fc8's bias when `cfg.fc8_bias_decay` is false (the
    official prototxt's weight_decay 0 on fc8_pascal's bias). Groups stay even when empty."""
    train_conv = cfg.train_conv if train_conv is None else train_conv
    head = list(detector.head.named_parameters())
    fc8_bias = detector.head.cls_score.bias
    groups = [
        ("head.weight", [p for n, p in head if not _is_bias(n)], 1.0, cfg.weight_decay),
        ("head.bias", [p for n, p in head if _is_bias(n) and p is not fc8_bias], cfg.bias_lr_mult,
         cfg.weight_decay),
        ("fc8.bias", [fc8_bias], cfg.bias_lr_mult, cfg.weight_decay if cfg.fc8_bias_decay else 0.0),
    ]
    if train_conv:
        conv = list(detector.backbone.named_parameters())
        groups += [
            ("backbone.weight", [p for n, p in conv if not _is_bias(n)], cfg.conv_lr_mult, cfg.weight_decay),
            ("backbone.bias", [p for n, p in conv if _is_bias(n)], cfg.conv_lr_mult * cfg.bias_lr_mult,
             cfg.weight_decay),
        ]
    return [{"name": name, "params": params, "mult": mult, "lr": cfg.lr * mult, "weight_decay": decay}
            for name, params, mult, decay in groups]


def finetune(detector: Detector, source: TrainingFeatures, windows: dict[str, TrainWindows],
             cfg: FinetuneConfig, seed: int = 0, state: dict | None = None,
             checkpoint: Callable[[dict], None] | None = None,
             logger: logging.Logger | None = None) -> dict:
    """Train the fc head (and the conv layers if `cfg.train_conv`) with softmax over K+1 classes.

    Each iteration draws `cfg.batch_size` windows from `cfg.images_per_batch` random training
    images (`windows`: their proposals + ground truth, labelled), their pooled features read
    through `source` (which keeps what frozen conv layers produce). `state` resumes an
    interrupted run (from `checkpoint(state)` calls every `cfg.checkpoint_every` iterations)
    exactly: the same seed and config give the same weights as an uninterrupted run. The state
    holds the live model and optimizer tensors, so the callback must save (serialise) it before
    returning. A new run (no `state`) first sets fc8's bias to `cfg.fc8_bias` (a resumed one
    keeps the snapshot's); the optimizer's groups and their learning-rate multipliers are
    `param_groups`'s. Returns the final state: iteration, model, optimizer, RNG states (numpy
    sampling, torch dropout), loss history.
    """
    images = list(windows)
    rng = np.random.default_rng(seed)
    if not cfg.train_conv:
        detector.backbone.requires_grad_(False)
    optimizer = torch.optim.SGD(param_groups(detector, cfg), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    start, history, running = 0, [], []
    if not state:
        # A new fc8's bias starts at cfg.fc8_bias (official: 1); its N(0, fc8_std) weights stay.
        with torch.no_grad():
            detector.head.cls_score.bias.fill_(cfg.fc8_bias)
    else:
        detector.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]
        set_torch_rng_state(state["torch_rng"])
        start, history, running = state["iteration"], list(state["history"]), list(state["running"])
    spp = detector.kind == "spp"
    per_image = max(1, cfg.batch_size // cfg.images_per_batch)
    loss_fn = nn.CrossEntropyLoss()
    detector.train()
    if not cfg.train_conv:
        detector.backbone.eval()
    bar = tqdm(range(start, cfg.iterations), desc="fine-tune", initial=start, total=cfg.iterations,
               leave=False, dynamic_ncols=True)
    for it in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(it, cfg.lr, cfg.lr_steps, cfg.gamma) * group.get("mult", 1.0)
        pooled, targets = [], []
        for image_id in rng.choice(images, cfg.images_per_batch, replace=len(images) < cfg.images_per_batch):
            index, target = sample_windows(windows[image_id], per_image, cfg.fg_fraction, cfg.fg_iou,
                                           cfg.bg_iou, rng)
            if len(index) == 0:
                continue
            mirrored = cfg.flip and rng.random() < 0.5
            scale_idx = None
            if cfg.random_scale and spp:
                scale_idx = torch.from_numpy(rng.integers(0, len(detector.features.scales), len(index)))
            pooled.append(source(image_id, index, flip=mirrored, scale_idx=scale_idx))
            targets.append(torch.from_numpy(target))
        if not pooled:
            continue
        logits = detector.head.cls_score(detector.head(torch.cat(pooled)))
        target = torch.cat(targets).to(logits.device)
        loss = loss_fn(logits, target)
        if not torch.isfinite(loss):
            raise SppdetError(f"fine-tuning diverged: the loss is {loss.item()} at iteration {it + 1}; "
                              f"lower finetune.lr (now {cfg.lr:g}) and rerun")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        accuracy = (logits.argmax(1) == target).float().mean().item()
        running.append((loss.item(), accuracy))
        if (it + 1) % 20 == 0 or it + 1 == cfg.iterations:
            mean_loss, mean_acc = np.mean(running, axis=0)
            history.append({"iteration": it + 1, "loss": float(mean_loss), "accuracy": float(mean_acc),
                            "lr": optimizer.param_groups[0]["lr"]})
            bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{mean_acc:.2f}")
            if logger and ((it + 1) % 200 == 0 or it + 1 == cfg.iterations):
                logger.info(f"fine-tune {it + 1}/{cfg.iterations}: loss {mean_loss:.4f} accuracy {mean_acc:.3f}")
            running = []
        if checkpoint is not None and (it + 1) % cfg.checkpoint_every == 0 and it + 1 < cfg.iterations:
            checkpoint(_state(detector, optimizer, rng, it + 1, history, running))
    detector.eval()
    detector.backbone.requires_grad_(True)
    return _state(detector, optimizer, rng, max(start, cfg.iterations), history, running)


def _state(detector, optimizer, rng, iteration, history, running) -> dict:
    """Everything an exact resume needs; `running` holds the (loss, accuracy) of iterations
    since the last history entry."""
    return {"model": detector.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": rng.bit_generator.state, "torch_rng": torch_rng_state(), "iteration": iteration,
            "history": list(history), "running": list(running)}
