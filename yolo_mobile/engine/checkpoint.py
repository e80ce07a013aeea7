"""The one checkpoint format: tensors and plain data only, so ``torch.load(path, weights_only=True)`` reads it.

Keys: ``model`` (state_dict), ``ema`` (state_dict or None), ``optimizer`` (state_dict or None), ``config``
(the resolved model YAML as a dict), ``names``, ``epoch``, ``metrics``, ``version``; a training checkpoint
adds ``imgsz`` and ``data`` (the training size and the absolute data YAML path, which val, detect and export
default to) and the trainer's state for --resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT_KEYS = ("model", "ema", "optimizer", "config", "names", "epoch", "metrics", "version")


def save_checkpoint(path: str | Path, model: nn.Module, *, ema: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, epoch: int | None = None,
                    metrics: dict[str, float] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """``extra`` adds plain-data entries (the trainer's scheduler, scaler and arguments, for --resume)."""
    from .. import __version__

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
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint under the real name
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled code, a truncated file, or not a torch file at all
        raise ValueError(f"{path}: not a yolo-mobile checkpoint that loads safely (weights_only): {e}") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        keys = list(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path}: not a yolo-mobile checkpoint (expected keys {', '.join(FORMAT_KEYS)}; got {keys})")
    return checkpoint


def load_model(path: str | Path, use_ema: bool = True) -> nn.Module:
    """Rebuild the detector from a checkpoint's own config and load its weights (the EMA ones when present)."""
    from ..detector import build_model

    checkpoint = load_checkpoint(path)
    model = build_model(checkpoint["config"], pretrained=False)  # the checkpoint holds every weight
    weights = checkpoint["ema"] if use_ema and checkpoint.get("ema") else checkpoint["model"]
    model.load_state_dict(weights)
    if checkpoint.get("names"):
        model.names = list(checkpoint["names"])
    model.train_imgsz = checkpoint.get("imgsz")
    model.train_data = checkpoint.get("data")
    return model.eval()
