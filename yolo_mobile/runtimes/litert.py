"""LiteRT (TFLite): a .tflite file in LiteRT's interpreter with XNNPACK, its default CPU delegate; loading, one
forward pass, the metadata an export wrote, and the filter that keeps LiteRT's (and its converter's) native log
lines out of the output. An optional extra (``pip install -e ".[tflite]"``), imported on first use.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import default_names
from .base import RUNTIMES

TFLITE_METADATA = "yolo_mobile"  # the flatbuffer metadata entry holding the export's metadata as JSON


# a native (absl, TFLite) or torch log line of level E or F: "E0000 00:00:...", "F1126 ...", "ERROR: ..."
_SEVERE_LINE = re.compile(r"^(?:[EF]\d{4} |ERROR:|FATAL)")


@contextlib.contextmanager
def native_logs_filtered(source: str) -> Iterator[None]:
    """Hold what the block writes to file descriptor 2 (absl's and TFLite's C++ logging, JAX's, torch's log
    lines) and drop it, except error and fatal lines, which come back as one warning naming ``source``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            severe = [line for line in sink.read().decode(errors="replace").splitlines() if _SEVERE_LINE.match(line)]
            if severe:
                warnings.warn(f"{source} logged: {' | '.join(severe)}", RuntimeWarning, stacklevel=3)


def require_tflite() -> None:
    try:
        with native_logs_filtered("litert-torch"):  # torchao's import logs a deprecation line
            import ai_edge_litert  # noqa: F401
            import litert_torch  # noqa: F401
    except ImportError:
        raise ImportError('--format tflite needs litert-torch and ai-edge-litert: pip install -e ".[tflite]"') \
            from None



def tflite_interpreter(path: str | Path, threads: int | None = None):
    """A LiteRT interpreter for ``path`` with its tensors allocated (XNNPACK, LiteRT's default CPU delegate)."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        with native_logs_filtered("the LiteRT interpreter"):  # "INFO: Created TensorFlow Lite XNNPACK delegate"
            runner = Interpreter(model_path=str(path), num_threads=threads)
            runner.allocate_tensors()
    except ValueError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "unreadable"
        raise ValueError(f"{path}: not a model the LiteRT interpreter can load ({reason})") from None
    return runner


def tflite_run(runner, x: np.ndarray) -> np.ndarray:
    """One forward pass: (1, 3, H, W) float32 in, the first output as float32. An integer input (a full-integer
    INT8 export) is quantized with the file's scale and zero point, an integer output dequantized."""
    given, wanted = runner.get_input_details()[0], runner.get_output_details()[0]
    if np.issubdtype(given["dtype"], np.integer):
        scale, zero = given["quantization"]
        info = np.iinfo(given["dtype"])
        x = np.clip(np.round(x / scale) + zero, info.min, info.max)
    runner.set_tensor(given["index"], np.ascontiguousarray(x, dtype=given["dtype"]))
    runner.invoke()
    out = runner.get_tensor(wanted["index"])
    if np.issubdtype(wanted["dtype"], np.integer):
        scale, zero = wanted["quantization"]
        return (out.astype(np.float32) - zero) * scale
    return out.astype(np.float32)  # a copy: the interpreter reuses its output buffer


def tflite_metadata(path: str | Path) -> dict[str, Any]:
    """The export's metadata (class names, size, precision...), or {} for a .tflite written elsewhere."""
    from ai_edge_litert import schema_py_generated as schema

    data = Path(path).read_bytes()
    model = schema.Model.GetRootAs(data, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() == TFLITE_METADATA.encode():
            return json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    return {}


@RUNTIMES.register("tflite")
class TfliteRuntime:
    """A .tflite file run by the LiteRT interpreter (XNNPACK): batch 1, the size it was exported at; names and
    size from its metadata. One interpreter is not thread-safe: predict runs it one batch at a time."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        require_tflite()
        self.runner = tflite_interpreter(path, threads)
        meta = tflite_metadata(path)
        _, _, h, w = self.runner.get_input_details()[0]["shape"]
        outputs = int(self.runner.get_output_details()[0]["shape"][1])
        self.names = meta.get("names") or default_names(outputs - 4)
        self.batch, self.imgsz, self.stride, self.nms_inside = 1, int(h), int(meta.get("stride", 32)), False
        if h != w:
            raise ValueError(f"{path}: input {h}x{w} is not square; yolo-mobile exports square inputs")

    def run(self, x: np.ndarray) -> np.ndarray:
        """``tflite_run`` on this file's interpreter: (1, 3, H, W) float32 in, (1, 4 + nc, N) float32 out."""
        return tflite_run(self.runner, x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(x.numpy()))
