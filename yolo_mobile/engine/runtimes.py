"""The phone runtimes: LiteRT's interpreter (XNNPACK) for .tflite files and ncnn for pnnx's ncnn folders. Loading,
one forward pass and the metadata an export wrote; export/ checks exports with these, predictor runs them.

Both are optional extras (``pip install -e ".[tflite]"``, ``".[ncnn]"``), imported on first use.
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

TFLITE_METADATA = "yolo_mobile"  # the flatbuffer metadata entry holding the export's metadata as JSON
NCNN_PARAM, NCNN_WEIGHTS, NCNN_METADATA = "model.ncnn.param", "model.ncnn.bin", "metadata.json"


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


def require_ncnn() -> None:
    try:
        import ncnn  # noqa: F401
        import pnnx  # noqa: F401
    except ImportError:
        raise ImportError('--format ncnn needs pnnx and ncnn: pip install -e ".[ncnn]"') from None


# ------------------------------------------------------------------------------------------------------- LiteRT
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


# --------------------------------------------------------------------------------------------------------- ncnn
def is_ncnn_folder(path: str | Path) -> bool:
    return (Path(path) / NCNN_PARAM).is_file()


def ncnn_metadata(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / NCNN_METADATA
    return json.loads(path.read_text()) if path.is_file() else {}


def unsupported_layers(param: Path) -> list[str]:
    """Layer types in an ncnn .param file that this ncnn build has no layer for (pnnx leaves an op it cannot
    lower under its PyTorch name, such as ``Tensor.reshape`` of a tensor with more than 4 dimensions)."""
    import ncnn

    lines = param.read_text().splitlines()[2:]  # magic number, then layer and blob counts
    kinds = [line.split()[0] for line in lines if line.strip()]
    return sorted({k for k in kinds if ncnn.layer_to_index(k) < 0})


def ncnn_net(folder: str | Path, threads: int | None = None, half: bool | None = None):
    """An ncnn Net loaded from ``folder`` running on ``threads`` (default: torch's thread count); float16 storage
    and arithmetic only for a float16 export (``half`` None: as its metadata says), so a float32 export runs as
    it was checked."""
    import ncnn
    import torch

    folder = Path(folder)
    if half is None:
        half = ncnn_metadata(folder).get("precision") == "float16"
    missing = unsupported_layers(folder / NCNN_PARAM)
    if missing:
        raise ValueError(f"{folder / NCNN_PARAM}: ncnn has no layer for {', '.join(missing)}")
    model = ncnn.Net()
    model.opt.use_fp16_storage = model.opt.use_fp16_packed = model.opt.use_fp16_arithmetic = half
    # default: torch's intra-op count, the share of the cores this process was given (a test worker gets 1): ncnn
    # waits at every layer for each of its threads, so more threads than free cores cost it most (README)
    model.opt.num_threads = threads or torch.get_num_threads()
    if model.load_param(str(folder / NCNN_PARAM)) != 0 or model.load_model(str(folder / NCNN_WEIGHTS)) != 0:
        raise ValueError(f"{folder}: ncnn cannot load {NCNN_PARAM} and {NCNN_WEIGHTS}")
    return model


def ncnn_run(model, x: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) float32 in, (B, 4 + nc, N) out: one extractor per image (ncnn has no batch axis)."""
    import ncnn

    outs = []
    for image in np.ascontiguousarray(x, dtype=np.float32):
        extractor = model.create_extractor()
        extractor.input(model.input_names()[0], ncnn.Mat(image).clone())
        status, out = extractor.extract(model.output_names()[0])
        if status != 0:
            raise RuntimeError(f"ncnn failed to run the model (status {status})")
        outs.append(np.array(out))
    return np.stack(outs)
