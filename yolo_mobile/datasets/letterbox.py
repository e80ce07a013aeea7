"""Letterbox: resize keeping the aspect ratio, pad to the target size; and its exact inverse for boxes.

``rect_shape`` gives the smallest stride-multiple target that holds an image at a square size's scale
("rectangular" inference: a 16:9 frame at 640 runs at 384x640 instead of 640x640).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

PAD_VALUE = 114  # YOLO's grey


@dataclass(frozen=True)
class LetterboxInfo:
    """How an original (height, width) image was placed in the letterboxed one."""

    orig_shape: tuple[int, int]
    scale: tuple[float, float]  # (x, y): resized size / original size, per axis after rounding
    pad: tuple[int, int]  # (left, top) in pixels


def fit_shape(shape: tuple[int, int], bounds: tuple[int, int], enlarge: bool = True) -> tuple[int, int]:
    """(height, width) of an image of ``shape`` = (height, width) resized, keeping its ratio, to fit ``bounds``
    = (height, width); never larger than it is unless ``enlarge``. Each side rounded, at least 1."""
    h, w = shape
    r = min(bounds[0] / h, bounds[1] / w, math.inf if enlarge else 1.0)
    return max(1, round(h * r)), max(1, round(w * r))


def rect_shape(shape: tuple[int, int], imgsz: int, stride: int = 32) -> tuple[int, int]:
    """(height, width): the smallest multiples of ``stride`` that hold an image of ``shape`` = (height, width)
    scaled to fit an ``imgsz`` square. ``imgsz`` a multiple of ``stride`` gives the long side ``imgsz``, e.g.
    (720, 1280) at 640 -> (384, 640): scale 0.5, 360 rows rounded up to 384. Letterboxing into it uses the same
    scale as the ``imgsz`` square (give or take rounding), with less padding."""
    nh, nw = fit_shape(shape, (imgsz, imgsz))
    return math.ceil(nh / stride) * stride, math.ceil(nw / stride) * stride


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, LetterboxInfo]:
    """Fit ``image`` (H, W, C) into ``size`` = (height, width), centred, padded with grey."""
    h, w = image.shape[:2]
    th, tw = size
    nh, nw = fit_shape((h, w), size)
    if (nw, nh) != (w, h):
        interp = cv2.INTER_AREA if nh < h or nw < w else cv2.INTER_LINEAR
        image = cv2.resize(image, (nw, nh), interpolation=interp)
    left, top = (tw - nw) // 2, (th - nh) // 2
    out = cv2.copyMakeBorder(image, top, th - nh - top, left, tw - nw - left, cv2.BORDER_CONSTANT,
                             value=(PAD_VALUE,) * 3)
    return out, LetterboxInfo((h, w), (nw / w, nh / h), (left, top))


def letterbox_chw(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, LetterboxInfo]:
    """``letterbox``, then (H, W, C) -> contiguous (C, H, W), the layout a model batch stacks; channels as given."""
    boxed, info = letterbox(image, size)
    return np.ascontiguousarray(boxed.transpose(2, 0, 1)), info


def unletterbox_boxes(boxes: torch.Tensor, info: LetterboxInfo) -> torch.Tensor:
    """Map xyxy boxes from letterboxed pixels back to original pixels, clipped to the image."""
    sx, sy = info.scale
    left, top = info.pad
    h, w = info.orig_shape
    out = boxes.clone()
    out[:, [0, 2]] = ((out[:, [0, 2]] - left) / sx).clamp(0, w)
    out[:, [1, 3]] = ((out[:, [1, 3]] - top) / sy).clamp(0, h)
    return out
