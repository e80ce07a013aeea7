"""How much memory a training step needs, and how much the machine has: the probe that runs before epoch 1.

On a GPU the CUDA allocator's peak is read; on a Linux CPU the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs). A step is measured at two small batches, so the fixed part (weights, gradients,
workspaces) and the part per image are known and the batch that fits can be computed without ever running a
step that does not fit.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError
from ..resources import GiB, available_bytes, proc_kb, usable_cpus

log = logging.getLogger(__name__)
WORKER_BYTES = 600 * 2**20  # one DataLoader worker: its own Python, torch, OpenCV and albumentations
MEMORY_MARGIN = 0.8  # a training step may use this share of the memory available when it starts
# --batch -1 keeps at least this many steps an epoch: on a small set (coco128) the batch that fits in memory is the
# whole set, one step an epoch
MIN_STEPS_PER_EPOCH = 8


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


@dataclass
class ProbeStep:
    """Forward, loss and backward on random images with random boxes, as a training step does them (channels-last
    on a GPU, float16 autocast when ``amp``); weights, BatchNorm statistics and gradients are left exactly as they
    were."""

    model: nn.Module
    criterion: Callable  # DetectionLoss: (maps, targets) -> (loss, items), with its number of classes as .nc
    device: torch.device
    amp: bool = False

    def __call__(self, batch: int, h: int, w: int) -> None:
        model, device = self.model, self.device
        buffers = [b.detach().clone() for b in model.buffers()]
        model.train()
        x = torch.rand(batch, 3, h, w, device=device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        targets = random_targets(batch, h, w, self.criterion.nc).to(device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=self.amp):
            maps = model(x)
        loss, _ = self.criterion([m.float() for m in maps], targets)
        loss.backward()
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers, strict=True):
                b.copy_(saved)


def optimizer_state_bytes(model: nn.Module, optimizer: str) -> int:
    """Momentum (SGD) or two moments (AdamW) per parameter, which the probe step does not allocate."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    return n * (1 if optimizer == "SGD" else 2)


@dataclass
class BatchFit:
    """What the probe needs to know of the run besides the step itself. ``batch``: the total asked over all
    processes, -1 for the largest that fits; ``images``: the training set's size; ``workers``: loader processes
    per rank; ``reserved``: bytes the step does not allocate but training will (the optimizer's state)."""

    batch: int
    images: int
    workers: int
    reserved: int = 0
    world_size: int = 1
    multi_scale: bool = False
    main: bool = True

    @property
    def asked(self) -> int | None:
        return max(1, self.batch // self.world_size) if self.batch > 0 else None


def fit_batch(step: Callable[[int, int, int], object], device: torch.device, run: BatchFit,
              sizes_for: Callable[[int], list[tuple[int, int, int]]]) -> int:
    """Probe one training step's memory before epoch 1 and return the per-rank batch that fits: the asked
    one, a smaller one with a warning, or (``batch -1``) the largest with a margin. A batch that cannot
    fit at all raises ConfigError, before the run has made anything. ``step(batch, h, w)`` runs one step;
    ``sizes_for(base)`` lists the (h, w, batch) a sampler of base batch ``base`` makes."""
    asked = run.asked
    h, w, _ = max(sizes_for(1), key=lambda s: s[0] * s[1])
    memory = measure_step(lambda b: step(b, h, w), device, (h, w))
    available = available_bytes(device)
    if memory is None or available is None:
        if asked is None:
            raise ConfigError("batch -1 needs the memory to be measured, which this system does not allow; "
                              "give --batch N")
        log.warning("cannot measure memory on this system; keeping batch %d unchecked", run.batch)
        return asked
    cuda = device.type == "cuda"
    workers = 0 if cuda else 2 * run.workers  # CPU: training and validation workers share the RAM
    budget = int(MEMORY_MARGIN * available) - workers * WORKER_BYTES - run.reserved
    limit = asked if asked is not None else max(1, run.images // (run.world_size * MIN_STEPS_PER_EPOCH))
    fitting = largest_batch(memory, budget, sizes_for, limit)
    if run.world_size > 1:  # every rank runs the same batch: the smallest that fits everywhere
        t = torch.tensor([fitting], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        fitting = int(t.item())
    where = "GPU" if cuda else "RAM"
    if run.main:
        log.info("memory probe at %dx%d: %.2f GiB + %.3f GiB per image for a training step; %.1f GiB %s "
                 "available", h, w, memory.fixed / GiB, memory.per_image / GiB, available / GiB, where)
    if fitting == 0:
        raise ConfigError(f"one image at {h}x{w} needs about {memory.at(1, h, w) / GiB:.1f} GiB for a training "
                          f"step but {max(budget, 0) / GiB:.1f} GiB of {where} is usable; lower --imgsz"
                          + (" or --max-scale" if run.multi_scale else "") + " or --workers")
    if run.main:
        _report(run, memory, fitting, budget, limit, (h, w), where)
    return fitting if asked is None else min(asked, fitting)


def _report(run: BatchFit, memory: StepMemory, fitting: int, budget: int, limit: int, size: tuple[int, int],
            where: str) -> None:
    """The batch -1 choice, or the warning for an asked batch that does not fit."""
    h, w = size
    if run.asked is None:
        log.info("batch -1: %d per process fits (%.1f GiB of %.1f GiB usable; at most %d, so that an "
                 "epoch of %d images has %d steps)", fitting, memory.at(fitting, h, w) / GiB, budget / GiB,
                 limit, run.images, MIN_STEPS_PER_EPOCH)
    elif fitting < run.asked:
        log.warning("batch %d needs about %.1f GiB for a training step at %dx%d, more than the %.1f GiB of %s "
                    "usable: training with batch %d instead (--batch %d to choose; --batch -1 picks the "
                    "largest)", run.asked * run.world_size, memory.at(run.asked, h, w) / GiB, h, w, budget / GiB,
                    where, fitting * run.world_size, fitting * run.world_size)
