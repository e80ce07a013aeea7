"""yolo-mobile: YOLO detection with pluggable mobile backbones.

The public API is loaded on first use, so ``import yolo_mobile`` does not import torch, timm or ultralytics.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .version import __version__

_API = {
    "build_model": "yolo_mobile.api",
    "load_model": "yolo_mobile.api",
    "Model": "yolo_mobile.api",
    "Detector": "yolo_mobile.detector",
    "list_backbones": "yolo_mobile.backbones",
    "build_backbone": "yolo_mobile.backbones",
    "register_backbone": "yolo_mobile.backbones",
    "Backbone": "yolo_mobile.backbones",
    "list_builtin_models": "yolo_mobile.config",
    "COCOEvaluator": "yolo_mobile.engine.evaluator",
    "train": "yolo_mobile.engine.trainer",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'yolo_mobile' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)
