"""finetune: window labelling and sampling, flips, the lr schedule, a tiny training run, resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sppdet.backbones import build_backbone
from sppdet.features import flip_boxes
from sppdet.finetune import TrainWindows, label_windows, learning_rate, sample_windows


# ----------------------------------------------------------------------------- windows

def test_label_windows_overlaps_and_labels():
    proposals = np.array([[0, 0, 9, 9], [5, 5, 14, 14], [20, 20, 38, 39], [60, 60, 69, 69]], np.float32)
    gt = np.array([[0, 0, 9, 9], [20, 20, 39, 39]], np.float32)
    win = label_windows(proposals, gt, np.array([3, 1]))
    assert win.boxes.shape == (6, 4) and np.array_equal(win.boxes[4:], gt), "ground truth appended"
    # +1 widths: 5x5 of 100 + 100 -> 25 / 175; 19x20 inside 20x20 -> 380 / 400
    np.testing.assert_allclose(win.overlap, [1.0, 25 / 175, 380 / 400, 0.0, 1.0, 1.0], atol=1e-6)
    assert win.label[[0, 1, 2, 4, 5]].tolist() == [3, 3, 1, 3, 1]
    none = label_windows(proposals, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    assert len(none.boxes) == 4 and not none.overlap.any() and not none.label.any()


def make_windows(num_fg: int, num_bg: int, num_low: int) -> TrainWindows:
    """Positives (IoU 0.5..1, label 1 or 2), background [0.1, 0.5), and too-low (< 0.1) windows,
    with the boundary values 0.5, 0.1 and just below each among them."""
    rng = np.random.default_rng(0)
    fg = np.concatenate([[0.5], rng.uniform(0.5, 1.0, num_fg - 1)])[:num_fg]
    bg = np.concatenate([[0.1, 0.4999], rng.uniform(0.1, 0.5, num_bg - 2)])[:num_bg]
    low = np.concatenate([[0.0999], rng.uniform(0.0, 0.1, num_low - 1)])[:num_low]
    overlap = np.concatenate([fg, bg, low]).astype(np.float32)
    label = np.concatenate([rng.integers(1, 3, num_fg), rng.integers(1, 3, num_bg + num_low)])
    return TrainWindows(np.zeros((len(overlap), 4), np.float32), overlap, label.astype(np.int64))


def check_sample(win, index, target):
    fg = target > 0
    assert np.all(win.overlap[index[fg]] >= 0.5), "no positive below 0.5"
    assert np.array_equal(target[fg], win.label[index[fg]]), "positives keep their class"
    bg_overlap = win.overlap[index[~fg]]
    assert np.all((bg_overlap >= 0.1) & (bg_overlap < 0.5)), "background only in [0.1, 0.5)"


def test_sample_windows_quarter_positives_when_enough():
    win = make_windows(100, 300, 50)
    index, target = sample_windows(win, 128, 0.25, 0.5, (0.1, 0.5), np.random.default_rng(1))
    assert len(index) == 128 and (target > 0).sum() == 32
    assert len(np.unique(index)) == 128, "without replacement when there are enough"
    check_sample(win, index, target)


def test_sample_windows_all_positives_when_fewer():
    win = make_windows(5, 300, 50)
    index, target = sample_windows(win, 128, 0.25, 0.5, (0.1, 0.5), np.random.default_rng(1))
    assert len(index) == 128 and sorted(index[target > 0]) == list(range(5))
    check_sample(win, index, target)
    # few background windows: drawn with replacement to fill the batch
    win = make_windows(5, 10, 50)
    index, target = sample_windows(win, 128, 0.25, 0.5, (0.1, 0.5), np.random.default_rng(1))
    assert len(index) == 128 and (target > 0).sum() == 5
    check_sample(win, index, target)


def test_sample_windows_edge_cases():
    # the boundaries: 0.5 is positive, 0.1 background, 0.0999 neither
    win = TrainWindows(np.zeros((3, 4), np.float32), np.array([0.5, 0.1, 0.0999], np.float32),
                       np.array([2, 1, 1]))
    index, target = sample_windows(win, 8, 0.25, 0.5, (0.1, 0.5), np.random.default_rng(0))
    assert set(zip(index.tolist(), target.tolist())) == {(0, 2), (1, 0)}
    # nothing usable: an empty draw, not an error
    win = TrainWindows(np.zeros((2, 4), np.float32), np.array([0.0, 0.05], np.float32), np.zeros(2, np.int64))
    index, target = sample_windows(win, 8, 0.25, 0.5, (0.1, 0.5), np.random.default_rng(0))
    assert len(index) == 0 and len(target) == 0


def test_flip_boxes():
    boxes = np.array([[10, 5, 29, 50], [0, 0, 99, 9]], np.float32)
    np.testing.assert_array_equal(flip_boxes(boxes, 100), [[70, 5, 89, 50], [0, 0, 99, 9]])
    np.testing.assert_array_equal(flip_boxes(flip_boxes(boxes, 100), 100), boxes)
    # the flipped box covers the same pixels of the flipped image
    image = np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    x1, y1, x2, y2 = boxes[0].astype(int)
    fx1, _, fx2, _ = flip_boxes(boxes, 100)[0].astype(int)
    np.testing.assert_array_equal(image[y1:y2 + 1, x1:x2 + 1][:, ::-1], image[:, ::-1][y1:y2 + 1, fx1:fx2 + 1])


def test_learning_rate_schedule():
    lrs = [learning_rate(i, 0.01, (10, 20), 0.1) for i in (0, 9, 10, 19, 20, 1000)]
    assert lrs == pytest.approx([0.01, 0.01, 0.001, 0.001, 1e-4, 1e-4])
    assert learning_rate(5, 0.5, (), 0.1) == 0.5


# ----------------------------------------------------------------------------- training

import dataclasses  # noqa: E402

import cv2  # noqa: E402

from sppdet.config import FinetuneConfig  # noqa: E402
from sppdet.detector import Detector  # noqa: E402
from sppdet.features import SPPFeatures, TrainingFeatures  # noqa: E402
from sppdet.finetune import finetune  # noqa: E402


def synthetic_images(folder, n: int = 4):
    """Grey 64x64 PNGs in `folder`, each with a bright square (class 1) and a dark square
    (class 2), and a grid of proposals around them -> ({id: path}, {id: TrainWindows})."""
    rng = np.random.default_rng(0)
    paths, windows = {}, {}
    grid = np.array([[x, y, x + s - 1, y + s - 1] for s in (12, 20, 28) for x in range(0, 64 - s + 1, 6)
                     for y in range(0, 64 - s + 1, 6)], np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = np.full((64, 64, 3), 128, np.uint8)
        (x1, y1), (x2, y2) = rng.integers(2, 14, 2), rng.integers(34, 44, 2)
        image[y1:y1 + 18, x1:x1 + 18] = 250
        image[y2:y2 + 18, x2:x2 + 18] = 5
        gt = np.array([[x1, y1, x1 + 17, y1 + 17], [x2, y2, x2 + 17, y2 + 17]], np.float32)
        paths[f"im{i}"] = folder / f"im{i}.png"
        cv2.imwrite(str(paths[f"im{i}"]), image)
        windows[f"im{i}"] = label_windows(grid, gt, np.array([1, 2]))
    return paths, windows


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_detector(seed: int = 0, dropout: float = 0.5, scales=(128,)) -> Detector:
    torch.manual_seed(seed)
    features = SPPFeatures(build_backbone("zf5", width=0.125), levels=(4, 2, 1), scales=scales)
    return Detector(features, num_classes=2, fc_dim=64, dropout=dropout)


def finetune_run(detector, paths, windows, iterations, cache="memory", folder=None, state=None,
                 checkpoint=None, **kw):
    settings = dict(iterations=iterations, lr=0.01, lr_steps=(25,), gamma=0.1, batch_size=32,
                    images_per_batch=2, flip=True)
    cfg = dataclasses.replace(FinetuneConfig(), **{**settings, **kw})
    source = TrainingFeatures(detector.features, paths, {i: w.boxes for i, w in windows.items()},
                              cache=cache, folder=folder, train_conv=cfg.train_conv)
    return finetune(detector, source, windows, cfg, seed=3, state=state, checkpoint=checkpoint)


def test_finetune_learns_an_easy_case(tmp_path):
    paths, windows = synthetic_images(tmp_path)
    det = tiny_detector(dropout=0.0)
    state = finetune_run(det, paths, windows, 100, lr=0.03, lr_steps=())
    losses = [h["loss"] for h in state["history"]]
    assert [h["iteration"] for h in state["history"]] == [20, 40, 60, 80, 100] and state["iteration"] == 100
    # predicting only the class frequencies (3/4 background, 1/8 each class) costs 0.736
    assert losses[-1] < 0.6 * losses[0] and losses[-1] < 0.6, losses
    assert not det.training and all(p.requires_grad for p in det.backbone.parameters())
    # fc8 tells the bright squares (class 1) from the dark ones (class 2) on every positive window
    for image_id, win in windows.items():
        fg = win.overlap >= 0.5
        with torch.no_grad():
            pooled = det.features(cv2.imread(str(paths[image_id])), torch.from_numpy(win.boxes[fg]))
            logits = det.head.cls_score(det.head(pooled))
        assert (logits[:, 1:].argmax(1).numpy() + 1 == win.label[fg]).mean() > 0.9


@pytest.mark.parametrize("options", [dict(cache="memory"), dict(cache="disk"),
                                     dict(train_conv=True, conv_lr_mult=0.5),
                                     dict(random_scale=True, cache="memory", scales=(96, 128)),
                                     # the official code's settings: five parameter groups
                                     dict(train_conv=True, bias_lr_mult=2.0, fc8_bias=1.0,
                                          fc8_bias_decay=False)])
def test_resume_equals_an_uninterrupted_run(tmp_path, options):
    """Stop after 13 of 30 iterations (mid lr step, mid history window), resume from the saved
    snapshot on a differently initialised detector: the result is bit-identical."""
    paths, windows = synthetic_images(tmp_path / "images", 3)
    if options.get("cache") == "disk":
        options = dict(options, folder=tmp_path / "cache")
    scales = options.pop("scales", (128,))
    saved = []

    def checkpoint(state):  # as the engine does: persist it at once (its tensors are live)
        path = tmp_path / f"snap{len(saved)}.pt"
        torch.save(state, path)
        saved.append(path)

    full = tiny_detector(0, scales=scales)
    final = finetune_run(full, paths, windows, 30, checkpoint=checkpoint, checkpoint_every=13, **options)
    assert len(saved) == 2  # at 13 and 26; none at the end
    snapshot = torch.load(saved[0], weights_only=False)
    assert snapshot["iteration"] == 13

    torch.manual_seed(123)  # the global torch RNG (dropout) must come from the snapshot
    resumed = tiny_detector(1, scales=scales)
    again = finetune_run(resumed, paths, windows, 30, state=snapshot, **options)
    assert again["iteration"] == final["iteration"] == 30
    assert again["history"] == final["history"]
    for name, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    for a, b in zip(final["optimizer"]["state"].values(), again["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_divergence_is_one_line_naming_the_learning_rate(tmp_path):
    from sppdet.utils import SppdetError

    paths, windows = synthetic_images(tmp_path, 2)
    det = tiny_detector(0)
    with torch.no_grad():
        det.head.fc6.weight.fill_(float("inf"))
    with pytest.raises(SppdetError, match=r"fine-tuning diverged.*lower finetune.lr \(now 0.01\)"):
        finetune_run(det, paths, windows, 5)
