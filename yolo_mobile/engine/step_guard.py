"""The non-finite guard: an optimizer step is taken only when the loss, the gradients and the buffers are all
finite; otherwise every tensor is left as it was before the step's batches, and too many such steps in a row stop
the run. The trainer calls it once per optimizer step, at the cost of one host sync."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from ..config import ConfigError

log = logging.getLogger(__name__)


class TrainingDiverged(ConfigError):
    """Training stopped because its numbers stopped being numbers (too many skipped steps, non-finite weights):
    a setting to change, not a bug, so the CLI prints one line."""


class LossWatch:
    """Warns when the loss leaves its running range by orders of magnitude (a learning rate far too high shows
    as a loss that explodes long before it turns into NaN)."""

    def __init__(self, factor: float = 100.0, settle: int = 10) -> None:
        self.level: float | None = None  # running mean of log10(loss)
        self.factor, self.settle, self.seen = math.log10(factor), settle, 0

    def update(self, loss: float) -> float | None:
        """Feed one finite loss; returns the running level it jumped above (as a loss), else None."""
        x = math.log10(max(loss, 1e-12))
        jumped = self.level if self.level is not None and self.seen >= self.settle \
            and x > self.level + self.factor else None
        self.level = x if self.level is None else 0.9 * self.level + 0.1 * x
        self.seen += 1
        return 10 ** jumped if jumped is not None else None


def nonfinite_tensors(state: dict[str, Any], prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a (nested) state dict that hold a NaN or an infinity."""
    bad = []
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                bad.append(f"{prefix}{k}")
        elif isinstance(v, dict):
            bad += nonfinite_tensors(v, f"{prefix}{k}.")
    return bad


class StepGuard:
    """Per optimizer step: ``begin`` on its first batch, ``add`` each batch's loss, then ``check`` before the
    optimizer steps. Counts per epoch (``new_epoch`` resets them) the skipped steps and the AMP overflows, which
    results.csv reports; the steps skipped in a row are counted over the whole run."""

    def __init__(self, model: nn.Module, device: torch.device, max_skipped: int, lr0: float,
                 main: bool = True) -> None:
        # every buffer (BatchNorm statistics) as it was at the start of an optimizer step's batches: a skipped
        # step puts them back, as the train-mode forward changed them before the loss was known
        self.buffers = list(model.buffers())
        self.buffers_before = [b.detach().clone() for b in self.buffers]
        self.float_buffers = [b for b in self.buffers if b.is_floating_point()]
        self.device, self.max_skipped, self.lr0, self.main = device, max_skipped, lr0, main
        self.consecutive_skips, self.loss_watch = 0, LossWatch()
        self.new_epoch()

    def new_epoch(self) -> None:
        self.window_loss = torch.zeros((), device=self.device)  # loss summed over an optimizer step's batches
        self.skipped_steps, self.amp_overflows = 0, 0  # per epoch, in results.csv
        self.loss_warned = False  # the loss-jump warning comes once per epoch

    def begin(self) -> None:
        """The first batch of an optimizer step: keep the buffers as they are."""
        torch._foreach_copy_(self.buffers_before, self.buffers)  # one fused copy, no host sync

    def add(self, loss: torch.Tensor) -> None:
        self.window_loss += loss.detach()

    def check(self, grad_norm: torch.Tensor, scaler: torch.amp.GradScaler, epoch: int, i: int) -> bool:
        """True when the step may be taken. Otherwise puts the buffers back and returns False: an AMP overflow
        (the scaler lowers its scale and the next step goes on) or a skipped step, which warns, and raises
        TrainingDiverged after ``max_skipped`` in a row. Call before ``scaler.update()``."""
        peak = torch.stack(torch._foreach_norm(self.float_buffers, ord=math.inf)).max() if self.float_buffers \
            else torch.zeros((), device=self.device)
        # one host sync per optimizer step for all four
        grads_ok, buffers_ok, loss_ok, loss = torch.stack(
            [torch.isfinite(grad_norm).float(), torch.isfinite(peak).float(),
             torch.isfinite(self.window_loss).float(), self.window_loss.float()]).tolist()
        self.window_loss.zero_()
        if grads_ok and buffers_ok and loss_ok:
            self.consecutive_skips = 0
            self._watch(loss, epoch, i)
            return True
        torch._foreach_copy_(self.buffers, self.buffers_before)
        scale = scaler.get_scale() if scaler.is_enabled() else 0.0
        if loss_ok and buffers_ok and scale > 1.0:
            self.amp_overflows += 1  # routine under AMP: the scaler lowers its scale and the next step goes on
        else:
            self._skip("loss" if not loss_ok else "BatchNorm statistics" if not buffers_ok else "gradient", epoch, i)
        return False

    def _watch(self, loss: float, epoch: int, i: int) -> None:
        level = self.loss_watch.update(loss)
        if level is not None and not self.loss_warned and self.main:
            self.loss_warned = True  # once per epoch
            log.warning("epoch %d batch %d: loss %.3g is over 100x its running level %.3g; the learning rate "
                        "(lr0 %g) may be too high", epoch + 1, i + 1, loss, level, self.lr0)

    def _skip(self, what: str, epoch: int, i: int) -> None:
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.main:
            log.warning("epoch %d batch %d: non-finite %s; step skipped, weights and buffers unchanged",
                        epoch + 1, i + 1, what)
        if self.consecutive_skips >= self.max_skipped:
            raise TrainingDiverged(
                f"stopped at epoch {epoch + 1} batch {i + 1}: {self.consecutive_skips} optimizer steps in a "
                f"row had a non-finite {what}; lower --lr0 (now {self.lr0:g}) or check the data "
                f"(max_skipped_steps {self.max_skipped})")
