"""The public API's model: a ``Detector`` that can also save itself and predict on images, videos and streams.

It lives on top of the package: the model layer (``detector.py``) never imports the engine that saves and
predicts, so ``Detector`` itself is only the network. ``build_model`` and ``load_model`` here return ``Model``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import detector
from .config import ModelConfig
from .engine import checkpoint
from .engine.postprocess import CONF, IOU, MAX_DET
from .engine.predictor import Result, predict
from .runtimes import TorchRuntime


class Model(detector.Detector):
    """A ``Detector`` with ``save`` (a checkpoint ``load_model`` reads) and ``predict``."""

    def save(self, path: str | Path, **extra: Any) -> Path:
        """Write a checkpoint that ``load_model(path)`` reads (see engine/checkpoint.py for the format)."""
        return checkpoint.save_checkpoint(path, self, **extra)

    def predict(self, source: Any, imgsz: int = 640, conf: float = CONF, iou: float = IOU, max_det: int = MAX_DET,
                classes: list[int] | None = None, batch: int = 1) -> Iterator[Result]:
        """Yield one result per image or frame of ``source`` (image, folder, glob, video, webcam index, URL):
        ``boxes`` (xyxy, original pixels), ``scores``, ``classes`` and ``names``."""
        device = next(self.parameters()).device
        yield from predict(TorchRuntime(self, device), source, imgsz, conf, iou, max_det, classes, batch)


def build_model(cfg: str | Path | dict[str, Any] | ModelConfig, nc: int | None = None,
                pretrained: bool | str | Path = True) -> Model:
    """Build a detector from a model YAML path, a built-in name (``"mobilevit_s.yaml"``) or a dict.

    ``nc`` overrides the YAML's number of classes. ``pretrained``: True loads the file the YAML names under
    ``backbone.pretrained`` (if any), a path loads that file instead, False loads none. What was loaded is in
    ``model.pretrained_report``.
    """
    return detector.build_model(cfg, nc=nc, pretrained=pretrained, model_class=Model)


def load_model(path: str | Path, use_ema: bool = True) -> Model:
    """Rebuild the detector of a checkpoint and load its weights (the EMA ones when present), in eval mode."""
    return checkpoint.load_model(path, use_ema=use_ema, model_class=Model)
