"""Runtimes: one backend per runtime (PyTorch, ONNX Runtime, LiteRT, ncnn) behind one interface (``base.Runtime``),
registered by name in ``RUNTIMES``. predict, val, benchmark and the export checks all run models through them;
``load_runtime`` picks the backend for a file.

The phone runtimes are optional extras, and onnxruntime, LiteRT and ncnn are imported on first use only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..datasets.inference import SourceError
from .base import RUNTIMES, Runtime
from .litert import TfliteRuntime
from .ncnn import NcnnRuntime, is_ncnn_folder
from .onnxrt import OnnxRuntime
from .pytorch import TorchRuntime

__all__ = ["RUNTIMES", "NcnnRuntime", "OnnxRuntime", "Runtime", "TfliteRuntime", "TorchRuntime", "exported_format",
           "load_runtime"]

FORMAT_RUNTIMES = {"onnx": "onnxruntime", "tflite": "tflite", "ncnn": "ncnn"}  # exported_format -> RUNTIMES name


def exported_format(weights: str | Path | None) -> str | None:
    """'onnx', 'tflite' or 'ncnn' for an exported model (a .onnx or .tflite file, an ncnn export folder), else
    None (a checkpoint, or nothing)."""
    if weights is None:
        return None
    text = str(weights).rstrip("/")
    if text.endswith(".onnx"):
        return "onnx"
    if text.endswith(".tflite"):
        return "tflite"
    if text.endswith("_ncnn") or is_ncnn_folder(text):
        return "ncnn"
    return None


def load_runtime(weights: str | Path | None = None, cfg: str | None = None, device: torch.device | str = "cpu",
                 half: bool = False) -> Runtime:
    """A ``.pt`` checkpoint or a model YAML (PyTorch), an ``.onnx`` file (ONNX Runtime), a ``.tflite`` file
    (LiteRT) or an ncnn export folder (ncnn)."""
    kind = exported_format(weights)
    if kind == "ncnn" and not is_ncnn_folder(weights):
        raise SourceError(f"{weights}: no ncnn export folder (with model.ncnn.param) there")
    if kind in ("onnx", "tflite") and not Path(weights).is_file():
        raise SourceError(f"{weights}: no such {'ONNX' if kind == 'onnx' else 'TFLite'} file")
    if kind is not None:
        backend = RUNTIMES.get(FORMAT_RUNTIMES[kind])
        return backend(weights, device) if kind == "onnx" else backend(weights)
    if weights is not None:
        from ..engine.checkpoint import load_model

        return RUNTIMES.get("torch")(load_model(weights), device, half)
    from ..detector import build_model

    return RUNTIMES.get("torch")(build_model(cfg), device, half)
