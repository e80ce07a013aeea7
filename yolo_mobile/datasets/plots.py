"""A look at what the model is fed: a JPEG grid of augmented training images with their boxes and class names."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from .labels import write_image

MAX_SIDE = 1920  # the grid is shrunk to this long side


def _colour(c: int) -> tuple[int, int, int]:
    hue = (c * 47) % 180  # well spread hues, the same for a class in every grid
    bgr = cv2.cvtColor(np.array([[[hue, 220, 255]]], np.uint8), cv2.COLOR_HSV2BGR)[0, 0]
    return int(bgr[0]), int(bgr[1]), int(bgr[2])


def plot_batch(images: torch.Tensor, targets: torch.Tensor, names: Sequence[str], path: str | Path,
               max_images: int = 16) -> Path:
    """Write ``images`` (B, 3, H, W) uint8 RGB with ``targets`` (B, M, 5) [class, x1, y1, x2, y2] pixels (class
    -1: padding), as :func:`~yolo_mobile.datasets.detection.collate_detection` makes them, to ``path``."""
    n = min(len(images), max_images)
    h, w = images.shape[-2:]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for k in range(n):
        y0, x0 = (k // cols) * h, (k % cols) * w
        grid[y0: y0 + h, x0: x0 + w] = images[k].permute(1, 2, 0).numpy()[..., ::-1]  # RGB -> BGR for OpenCV
        cv2.rectangle(grid, (x0, y0), (x0 + w - 1, y0 + h - 1), (255, 255, 255), 2)
    r = min(1.0, MAX_SIDE / max(grid.shape[:2]))
    if r < 1:
        grid = cv2.resize(grid, None, fx=r, fy=r, interpolation=cv2.INTER_AREA)
    font, thick = cv2.FONT_HERSHEY_SIMPLEX, 1
    size = 0.4
    for k in range(n):
        y0, x0 = (k // cols) * h, (k % cols) * w
        for c, x1, y1, x2, y2 in targets[k].tolist():
            if c < 0:
                continue
            colour = _colour(int(c))
            p1 = (round((x0 + x1) * r), round((y0 + y1) * r))
            p2 = (round((x0 + x2) * r), round((y0 + y2) * r))
            cv2.rectangle(grid, p1, p2, colour, 1, cv2.LINE_AA)
            label = names[int(c)] if 0 <= int(c) < len(names) else str(int(c))
            (tw, th), base = cv2.getTextSize(label, font, size, thick)
            ty = max(p1[1], th + base)
            cv2.rectangle(grid, (p1[0], ty - th - base), (p1[0] + tw, ty), colour, -1)
            cv2.putText(grid, label, (p1[0], ty - base), font, size, (0, 0, 0), thick, cv2.LINE_AA)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, grid, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return path
