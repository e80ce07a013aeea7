"""How much memory a training step needs, and how much the machine has: the probe that runs before epoch 1.

On a GPU the CUDA allocator's peak is read; on a Linux CPU the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs). A step is measured at two small batches, so the fixed part (weights, gradients,
workspaces) and the part per image are known and the batch that fits can be computed without ever running a
step that does not fit.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..resources import proc_kb, usable_cpus

WORKER_BYTES = 600 * 2**20  # one DataLoader worker: its own Python, torch, OpenCV and albumentations


def default_workers(world_size: int = 1) -> int:
    """DataLoader workers per process: one core stays with the process that runs the model, at most 8."""
    return max(0, min(8, usable_cpus() // max(1, world_size) - 1))


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back so the next peak starts from what is held


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Memory one call of ``fn`` needs above what is already held; None where it cannot be read."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return max(torch.cuda.max_memory_allocated(device) - before, 0)
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
    except OSError:
        return None
    before = proc_kb("/proc/self/status", "VmRSS")
    fn()
    peak = proc_kb("/proc/self/status", "VmHWM")
    if before is None or peak is None:
        return None
    return max(peak - before, 0) * 1024


@dataclass
class StepMemory:
    """Peak memory of one training step as ``fixed + per_image x batch``, measured at ``size`` (h, w)."""

    fixed: int
    per_image: int
    size: tuple[int, int]

    def at(self, batch: int, h: int, w: int) -> int:
        """Predicted peak at another batch and size: activations grow with the pixels of the batch."""
        return int(self.fixed + self.per_image * batch * (h * w) / (self.size[0] * self.size[1]))


def measure_step(step: Callable[[int], object], device: torch.device, size: tuple[int, int],
                 batches: tuple[int, int] = (1, 2)) -> StepMemory | None:
    """Run ``step(batch)`` once to warm up, then at two batches; None where memory cannot be read."""
    step(batches[0])  # first call: one-time allocations (thread pools, kernels' workspaces) are not per image
    small = peak_bytes(lambda: step(batches[0]), device)
    large = peak_bytes(lambda: step(batches[1]), device)
    if small is None or large is None:
        return None
    per_image = max((large - small) // (batches[1] - batches[0]), 1)
    fixed = max(small - per_image * batches[0], 0)
    return StepMemory(fixed, per_image, size)


def largest_batch(memory: StepMemory, budget: int, sizes_for: Callable[[int], list[tuple[int, int, int]]],
                  limit: int) -> int:
    """The largest base batch (at most ``limit``) whose every (h, w, batch) from ``sizes_for(base)`` fits."""

    def fits(base: int) -> bool:
        return all(memory.at(b, h, w) <= budget for h, w, b in sizes_for(base))

    if not fits(1):
        return 0
    low, high = 1, limit
    while low < high:  # fits() only gets harder as the batch grows
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def random_targets(batch: int, h: int, w: int, nc: int, per_image: int = 8, seed: int = 0) -> torch.Tensor:
    """(B, M, 5) class + xyxy boxes in pixels, like the training loader's padded targets."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([w, h], dtype=torch.float32)
    centers = torch.rand(batch, per_image, 2, generator=g) * scale
    sizes = (0.05 + 0.4 * torch.rand(batch, per_image, 2, generator=g)) * scale
    boxes = torch.minimum(torch.cat([centers - sizes / 2, centers + sizes / 2], 2).clamp(min=0), scale.repeat(2))
    classes = torch.randint(0, nc, (batch, per_image, 1), generator=g).float()
    return torch.cat([classes, boxes], 2)
