"""Images for evaluation and prediction: read, letterboxed to a fixed size, with what is needed to map back."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from .labels import read_image
from .letterbox import LetterboxInfo, letterbox_chw

log = logging.getLogger(__name__)


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
