"""The one checkpoint format: tensors and plain data only, so ``torch.load(path, weights_only=True)`` reads it.

Keys: ``model`` (state_dict), ``ema`` (state_dict or None), ``optimizer`` (state_dict or None), ``config``
(the resolved model YAML as a dict), ``names``, ``epoch``, ``metrics``, ``version``; a training checkpoint
adds ``imgsz`` and ``data`` (the training size and the absolute data YAML path, which val, detect and export
default to) and the trainer's state for --resume.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..detector import Detector, build_model
from ..files import write_with
from ..version import __version__

FORMAT_KEYS = ("model", "ema", "optimizer", "config", "names", "epoch", "metrics", "version")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and says why in one line."""


def save_checkpoint(path: str | Path, model: nn.Module, *, ema: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, epoch: int | None = None,
                    metrics: dict[str, float] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """``extra`` adds plain-data entries (the trainer's scheduler, scaler and arguments, for --resume)."""
    if getattr(model, "fused", False):
        raise ValueError("a fused model cannot be saved as a checkpoint (its layers changed); save before fuse()")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "ema": {k: v.detach().cpu() for k, v in ema.state_dict().items()} if ema is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "config": model.config.to_dict(),
        "names": list(model.names),
        "epoch": epoch,
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "version": __version__,
        **(extra or {}),
    }
    # never a half-written checkpoint under the real name, nor a temporary left to fill the disk
    return write_with(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled code, a truncated file, or not a torch file at all
        raise CheckpointError(f"{path}: not a yolo-mobile checkpoint that loads safely: {_load_problem(path, e)}") \
            from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        keys = list(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{path}: not a yolo-mobile checkpoint (expected keys {', '.join(FORMAT_KEYS)}; "
                              f"got {keys})")
    return checkpoint


def _load_problem(path: Path, error: Exception) -> str:
    """What torch.load's error means, in our words: its own text advises turning weights_only off, which would
    run whatever code the file holds."""
    pickled = re.search(r"GLOBAL ([\w.]+)", str(error))
    if pickled:
        return (f"it holds pickled Python objects ({pickled.group(1)}), which are never loaded; a yolo-mobile "
                "checkpoint holds only tensors and plain data")
    size = path.stat().st_size
    if not size:
        return "the file is empty"
    return f"not a PyTorch file, or truncated or corrupt ({size:,} bytes)"


def built_from(checkpoint: dict[str, Any]) -> str:
    """What a checkpoint's model was built from, for messages: its model YAML (when trained) and backbone."""
    config = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else {}
    backbone = config.get("backbone") if isinstance(config.get("backbone"), dict) else {}
    details = ", ".join(f"{k} {backbone[k]}" for k in ("variant", "model") if k in backbone)
    cfg = (checkpoint.get("train_args") or {}).get("cfg")
    name = f"backbone {backbone.get('name', '?')}" + (f" ({details})" if details else "")
    return (f"{cfg}: " if cfg else "") + f"{name}, nc={config.get('nc', '?')}"


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], path: str | Path,
                 checkpoint: dict[str, Any], target: str = "its own config") -> None:
    """``model.load_state_dict(weights)``, or one line naming the file, the first tensors that do not fit and
    what the checkpoint was built from (instead of torch's list of every tensor)."""
    own = model.state_dict()
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in weights.items()
              if k in own and tuple(own[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    problems = [f"{len(found)} {what} (first: {', '.join(found[:2])})" for found, what in
                ((shapes, "tensor(s) of another shape, checkpoint vs model"), (missing, "missing tensor(s)"),
                 (unexpected, "unexpected tensor(s)")) if found]
    if problems:
        raise CheckpointError(f"{path}: weights do not fit the model built from {target}: {'; '.join(problems)}; "
                              f"the checkpoint was built from {built_from(checkpoint)}")
    model.load_state_dict(weights)


def load_model(path: str | Path, use_ema: bool = True, model_class: type[Detector] = Detector) -> Detector:
    """Rebuild the detector from a checkpoint's own config and load its weights (the EMA ones when present)."""
    checkpoint = load_checkpoint(path)
    try:  # the checkpoint holds every weight
        model = build_model(checkpoint["config"], pretrained=False, model_class=model_class)
    except ConfigError as e:
        raise CheckpointError(f"{path}: its stored model config does not build: {e}") from None
    weights = checkpoint["ema"] if use_ema and checkpoint.get("ema") else checkpoint["model"]
    load_weights(model, weights, path, checkpoint)
    if checkpoint.get("names"):
        model.names = list(checkpoint["names"])
    model.train_imgsz = checkpoint.get("imgsz")
    model.train_data = checkpoint.get("data")
    return model.eval()
