"""MobileViT's multi-scale variable-batch sampler, adapted to detection.

Each batch draws one input size; smaller sizes get larger batches so every batch holds about the same number
of pixels. Under DDP all ranks draw the same size sequence (shared seed) and take disjoint slices of one
global permutation, so every image is seen exactly once per epoch and every rank runs the same number of steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def _divisible(value: float, stride: int) -> int:
    return max(stride, round(value / stride) * stride)


class MultiScaleBatchSampler(Sampler[list[tuple[int, int, int]]]):
    """Yields lists of ``(index, h, w)``; ``sizes`` lists the ``(h, w, batch_size)`` choices."""

    def __init__(self, n_samples: int, imgsz: int, base_batch: int, min_scale: float = 0.5, max_scale: float = 1.5,
                 n_scales: int = 5, stride: int = 32, shuffle: bool = True, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None) -> None:
        if rank is None or world_size is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = (torch.distributed.get_rank() if dist else 0) if rank is None else rank
            world_size = (torch.distributed.get_world_size() if dist else 1) if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        if n_samples < world_size:
            raise ValueError(f"{n_samples} samples cannot be shared among {world_size} ranks")
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.n_samples, self.imgsz, self.base_batch = n_samples, imgsz, base_batch
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.epoch = 0
        edges = {_divisible(s, stride) for s in np.linspace(min_scale * imgsz, max_scale * imgsz, max(1, n_scales))}
        edges.add(_divisible(imgsz, stride))
        self.sizes = [(s, s, max(1, int(base_batch * imgsz**2 / (s * s)))) for s in sorted(edges)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _schedule(self) -> list[tuple[int, int, list[int]]]:
        """The epoch's global steps: (h, w, indices for all ranks), identical on every rank."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n_samples, generator=g) if self.shuffle else torch.arange(self.n_samples)
        order = order.tolist()
        steps: list[tuple[int, int, list[int]]] = []
        pos = 0
        while pos < self.n_samples:
            h, w, b = self.sizes[int(torch.randint(len(self.sizes), (1,), generator=g))]
            chunk = order[pos: pos + b * self.world_size]
            pos += len(chunk)
            if len(chunk) < self.world_size and steps:  # too few left to give every rank one: join the last step
                steps[-1][2].extend(chunk)
            else:
                steps.append((h, w, chunk))
        return steps

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for h, w, chunk in self._schedule():
            yield [(i, h, w) for i in chunk[self.rank:: self.world_size]]

    def __len__(self) -> int:
        return len(self._schedule())

    def batch_size_of(self, h: int, w: int) -> int:
        """The nominal batch size of a size (the tail batch of an epoch may hold fewer)."""
        return next(b for sh, sw, b in self.sizes if (sh, sw) == (h, w))
