"""Letterbox: resize keeping the aspect ratio, pad to the target size; and its exact inverse for boxes.

``rect_shape`` gives the smallest stride-multiple target that holds an image at a square size's scale
("rectangular" inference: a 16:9 frame at 640 runs at 384x640 instead of 640x640).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def letterbox_batch(images: Sequence[np.ndarray], shape: tuple[int, int],
                    bgr: bool | Sequence[bool] = False) -> tuple[torch.Tensor, list[LetterboxInfo]]:
    """Letterbox each (H, W, 3) uint8 image to ``shape`` = (height, width): a float32 (B, 3, H, W) RGB batch in
    0-1 (channels_last in memory; ``.contiguous()`` for NCHW) and each image's ``LetterboxInfo``. ``bgr``: the
    images (or, per image, which of them) are in OpenCV's BGR order, turned to RGB on the small letterboxed copy.
    NumPy and OpenCV only: on a worker thread, a torch op would start a second OpenMP team competing with the
    model's."""
    flags = [bgr] * len(images) if isinstance(bgr, bool) else list(bgr)
    boxed, infos = [], []
    for image, is_bgr in zip(images, flags, strict=True):
        b, info = letterbox(image, shape)
        boxed.append(cv2.cvtColor(b, cv2.COLOR_BGR2RGB) if is_bgr else b)
        infos.append(info)
    x = np.divide(boxed[0][None] if len(boxed) == 1 else np.stack(boxed), np.float32(255), dtype=np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2), infos  # (B, H, W, 3) in memory: channels_last


def unletterbox_boxes(boxes: torch.Tensor, info: LetterboxInfo) -> torch.Tensor:
    """Map xyxy boxes from letterboxed pixels back to original pixels, clipped to the image."""
    sx, sy = info.scale
    left, top = info.pad
    h, w = info.orig_shape
    out = boxes.clone()
    out[:, [0, 2]] = ((out[:, [0, 2]] - left) / sx).clamp(0, w)
    out[:, [1, 3]] = ((out[:, [1, 3]] - top) / sy).clamp(0, h)
    return out
