"""Letterbox: resize keeping the aspect ratio, pad to the target size; and its exact inverse for boxes."""

from __future__ import annotations

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


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, LetterboxInfo]:
    """Fit ``image`` (H, W, C) into ``size`` = (height, width), centred, padded with grey."""
    h, w = image.shape[:2]
    th, tw = size
    r = min(th / h, tw / w)
    nw, nh = max(1, round(w * r)), max(1, round(h * r))
    if (nw, nh) != (w, h):
        interp = cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR
        image = cv2.resize(image, (nw, nh), interpolation=interp)
    left, top = (tw - nw) // 2, (th - nh) // 2
    out = cv2.copyMakeBorder(image, top, th - nh - top, left, tw - nw - left, cv2.BORDER_CONSTANT,
                             value=(PAD_VALUE,) * 3)
    return out, LetterboxInfo((h, w), (nw / w, nh / h), (left, top))


def unletterbox_boxes(boxes: torch.Tensor, info: LetterboxInfo) -> torch.Tensor:
    """Map xyxy boxes from letterboxed pixels back to original pixels, clipped to the image."""
    sx, sy = info.scale
    left, top = info.pad
    h, w = info.orig_shape
    out = boxes.clone()
    out[:, [0, 2]] = ((out[:, [0, 2]] - left) / sx).clamp(0, w)
    out[:, [1, 3]] = ((out[:, [1, 3]] - top) / sy).clamp(0, h)
    return out
