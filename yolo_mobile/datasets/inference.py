"""Images for evaluation and prediction: read, letterboxed to a fixed size, with what is needed to map back."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .labels import read_image
from .letterbox import LetterboxInfo, letterbox_batch, letterbox_chw

log = logging.getLogger(__name__)


class SourceError(FileNotFoundError):
    """A source that cannot be read; raised before any work starts."""


def sample_batch(paths: list[Path], batch: int, shape: tuple[int, int]) -> torch.Tensor:
    """A contiguous float (batch, 3, H, W) RGB batch in 0-1 of the images at ``paths`` (cycled to fill the
    batch) letterboxed to ``shape``, or of one deterministic drawn image (shapes on a background) when there are
    none: what exports are checked on."""
    from .synthetic import draw_sample

    images = [read_image(p) for p in paths] or [draw_sample(np.random.default_rng(0), max(shape))[0]]
    return letterbox_batch([images[k % len(images)] for k in range(batch)], shape)[0].contiguous()


class LetterboxImages(Dataset):
    """``(image_id, path)`` pairs -> ``(uint8 CHW tensor, image_id, LetterboxInfo)``; unreadable images -> None."""

    def __init__(self, items: list[tuple[Any, Path]], imgsz: int) -> None:
        self.items, self.imgsz = items, imgsz

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any, LetterboxInfo] | None:
        image_id, path = self.items[i]
        try:
            image = read_image(path)
        except OSError as e:
            log.warning("skipped: %s", e)
            return None
        chw, info = letterbox_chw(image, (self.imgsz, self.imgsz))
        return torch.from_numpy(chw), image_id, info


def collate_letterboxed(batch: list) -> tuple[torch.Tensor, list, list[LetterboxInfo], int]:
    """Stack the readable images; the last element counts the unreadable ones that were dropped."""
    ok = [b for b in batch if b is not None]
    if not ok:
        return torch.zeros(0, 3, 0, 0, dtype=torch.uint8), [], [], len(batch)
    images, ids, infos = zip(*ok, strict=True)
    return torch.stack(images), list(ids), list(infos), len(batch) - len(ok)
