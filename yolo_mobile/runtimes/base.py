"""What every runtime backend is: a callable from a float batch to the model's output, with what predict, val,
benchmark and the export checks need to feed it; and the registry that names them."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..registry import Registry

RUNTIMES = Registry("runtime")  # torch, onnxruntime, tflite, ncnn: name -> backend class


class Runtime(Protocol):
    """One loaded model in one runtime.

    ``names``: class names. ``batch``: the fixed batch the file takes, or None (any). ``imgsz``: the fixed square
    size it takes, or None (any multiple of ``stride``). ``nms_inside``: the graph ends in NMS, and a call returns
    (detections, counts) instead of the raw ``(B, 4 + nc, N)`` output. A call takes a (B, 3, H, W) float RGB batch
    in 0-1 on the CPU and returns float CPU tensors."""

    names: list[str]
    batch: int | None
    imgsz: int | None
    stride: int
    nms_inside: bool

    def __call__(self, x: torch.Tensor) -> Any: ...
