"""Pictures: detections drawn on an image, and precision/recall curves (OpenCV only)."""
from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .utils import SppdetError, atomic_path


def class_colour(label: int) -> tuple[int, int, int]:
    """A distinct, stable BGR colour per class index."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(255 * b), int(255 * g), int(255 * r)


def draw_detections(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                    classes: Sequence[str], score_thresh: float = -np.inf) -> np.ndarray:
    """A copy of the BGR image with each detection above `score_thresh` drawn as its box
    (0-based inclusive) and a 'class score' tag, lowest score first so the best sit on top."""
    out = image.copy()
    thickness = max(1, round(max(image.shape[:2]) / 400))
    scale = max(0.4, max(image.shape[:2]) / 1000)
    for i in np.argsort(scores, kind="stable"):
        if scores[i] < score_thresh:
            continue
        x1, y1, x2, y2 = (int(round(v)) for v in boxes[i])
        colour = class_colour(int(labels[i]))
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thickness)
        text = f"{classes[labels[i] - 1]} {scores[i]:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = y1 - th - base if y1 - th - base >= 0 else y1
        cv2.rectangle(out, (x1, ty), (x1 + tw, ty + th + base), colour, -1)
        cv2.putText(out, text, (x1, ty + th), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def draw_pr_curve(recall: np.ndarray, precision: np.ndarray, title: str, size: int = 400) -> np.ndarray:
    """A white BGR image (size x size) with the precision/recall curve (D,) points in score
    order, axes 0..1 and a grid. Non-finite points (recall is NaN for a class without
    positives) are left out; with none left the plot says so."""
    img = np.full((size, size, 3), 255, np.uint8)
    margin = 40
    span = size - 2 * margin
    font = cv2.FONT_HERSHEY_SIMPLEX

    def point(r, p):
        return int(round(margin + r * span)), int(round(size - margin - p * span))

    for t in np.linspace(0, 1, 6):
        cv2.line(img, point(t, 0), point(t, 1), (225, 225, 225), 1)
        cv2.line(img, point(0, t), point(1, t), (225, 225, 225), 1)
        cv2.putText(img, f"{t:.1f}", (point(t, 0)[0] - 10, size - margin + 15), font, 0.35, (0, 0, 0), 1)
        cv2.putText(img, f"{t:.1f}", (8, point(0, t)[1] + 4), font, 0.35, (0, 0, 0), 1)
    cv2.rectangle(img, point(0, 0), point(1, 1), (0, 0, 0), 1)
    recall = np.asarray(recall, np.float64).reshape(-1)
    precision = np.asarray(precision, np.float64).reshape(-1)
    ok = np.isfinite(recall) & np.isfinite(precision)
    if ok.any():
        pts = np.array([point(r, p) for r, p in zip(recall[ok].clip(0, 1), precision[ok].clip(0, 1))], np.int32)
        cv2.polylines(img, [pts], False, (200, 60, 0), 2, cv2.LINE_AA)
        if len(pts) == 1:  # one detection: a polyline of one point draws nothing
            cv2.circle(img, tuple(int(v) for v in pts[0]), 3, (200, 60, 0), -1, cv2.LINE_AA)
    else:
        cv2.putText(img, "no curve (no detections or no positives)", (margin + 10, size // 2), font, 0.4,
                    (0, 0, 200), 1, cv2.LINE_AA)
    cv2.putText(img, title, (margin, 16), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "recall", (size // 2 - 20, size - 8), font, 0.4, (0, 0, 0), 1)
    cv2.putText(img, "precision", (4, margin - 10), font, 0.4, (0, 0, 0), 1)
    return img


def write_image(path, image: np.ndarray) -> None:
    """Write a BGR image atomically, in the format its suffix names (.png, .jpg, ...)."""
    path = Path(path)
    ok, data = cv2.imencode(path.suffix or ".png", image)
    if not ok:
        raise SppdetError(f"{path}: cannot encode a {path.suffix or '.png'} image")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())
