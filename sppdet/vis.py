"""Pictures: detections drawn on an image, and precision/recall curves (OpenCV only)."""
from __future__ import annotations

import colorsys
from typing import Sequence

import cv2
import numpy as np


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
    """A white BGR image (size x size) with the precision/recall curve, axes 0..1 and a grid."""
    img = np.full((size, size, 3), 255, np.uint8)
    margin = 40
    span = size - 2 * margin

    def point(r, p):
        return int(margin + r * span), int(size - margin - p * span)

    for t in np.linspace(0, 1, 6):
        cv2.line(img, point(t, 0), point(t, 1), (225, 225, 225), 1)
        cv2.line(img, point(0, t), point(1, t), (225, 225, 225), 1)
        cv2.putText(img, f"{t:.1f}", (point(t, 0)[0] - 10, size - margin + 15), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1)
        cv2.putText(img, f"{t:.1f}", (5, point(0, t)[1] + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1)
    cv2.rectangle(img, point(0, 0), point(1, 1), (0, 0, 0), 1)
    if len(recall):
        pts = np.array([point(r, p) for r, p in zip(recall, precision)], np.int32)
        cv2.polylines(img, [pts], False, (200, 60, 0), 2, cv2.LINE_AA)
    cv2.putText(img, title, (margin, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "recall", (size // 2 - 20, size - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    return img
