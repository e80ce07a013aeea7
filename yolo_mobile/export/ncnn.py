"""ncnn export through pnnx (TorchScript trace -> pnnx -> ncnn), checked in ncnn's own runtime against PyTorch.

The folder ``<name>_ncnn/`` holds ``model.ncnn.param`` and ``model.ncnn.bin`` (the layout ultralytics' ncnn
exports use, so code written for theirs finds the files) and ``metadata.json`` (class names, size, precision).
ncnn runs one image at a time: input blob ``in0`` (3, H, W) float32 RGB in 0-1, output ``out0`` (4 + nc, N).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import check_imgsz
from ..runtimes.ncnn import NCNN_METADATA as METADATA
from ..runtimes.ncnn import NCNN_PARAM as PARAM
from ..runtimes.ncnn import NCNN_WEIGHTS as WEIGHTS
from ..runtimes.ncnn import NcnnRuntime, require_ncnn, unsupported_layers
from .checks import (
    ConversionError,
    ExportReport,
    check_parity,
    fused_copy,
    metadata,
    metadata_json,
    staged,
    warnings_ignored,
)


def _pnnx(traced: Path, imgsz: int, half: bool, workdir: Path) -> None:
    import pnnx

    outputs = {"ncnnparam": PARAM, "ncnnbin": WEIGHTS, "ncnnpy": "model_ncnn.py", "pnnxparam": "model.pnnx.param",
               "pnnxbin": "model.pnnx.bin", "pnnxpy": "model_pnnx.py", "pnnxonnx": "model.pnnx.onnx"}
    command = [pnnx.EXEC_PATH, str(traced), f"inputshape=[1,3,{imgsz},{imgsz}]f32", "device=cpu",
               f"fp16={int(half)}", *(f"{k}={workdir / v}" for k, v in outputs.items())]
    done = subprocess.run(command, capture_output=True, text=True, cwd=workdir)
    if done.returncode != 0 or not (workdir / PARAM).is_file():
        tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-3:])
        raise ConversionError(f"pnnx cannot convert this model (exit {done.returncode}): {tail}")


def export_ncnn(model: nn.Module, output: str | Path, imgsz: int = 640, half: bool = False,
                check_images: list[str | Path] | None = None) -> dict[str, Any]:
    """Trace ``model`` (fused) at batch 1 and ``imgsz``, convert it with pnnx into the folder ``output``, then
    check it in ncnn against PyTorch on random and drawn images (``checks.check_parity``: float32 within the ONNX
    export's bounds; ``half``: float16 weights and storage, within the float16 bounds). The folder is written only
    when the check passed."""
    require_ncnn()
    output = Path(output)
    check_imgsz(imgsz)
    if output.is_file():
        raise ValueError(f"{output}: is a file; ncnn writes a folder (model.ncnn.param and model.ncnn.bin)")
    fused = fused_copy(model)
    x = torch.zeros(1, 3, imgsz, imgsz)
    precision = "float16" if half else "float32"
    report: dict[str, Any] = {"precision": precision}
    with tempfile.TemporaryDirectory(prefix="yolo_mobile_ncnn_") as tmp, staged(output) as partial:
        start = time.perf_counter()
        workdir = Path(tmp)
        with warnings_ignored(), torch.no_grad():  # torch.jit.trace's deprecation note
            torch.jit.trace(fused, x, check_trace=False).save(str(workdir / "model.pt"))
        _pnnx(workdir / "model.pt", imgsz, half, workdir)
        missing = unsupported_layers(workdir / PARAM)
        if missing:
            raise ConversionError(f"pnnx left operator(s) {', '.join(missing)} that ncnn has no layer for")
        partial.mkdir()
        for name in (PARAM, WEIGHTS):
            shutil.move(str(workdir / name), str(partial / name))
        (partial / METADATA).write_text(metadata_json(metadata(model, imgsz, precision)) + "\n")
        report["export_s"] = time.perf_counter() - start
        runtime = NcnnRuntime(partial)  # float16 storage as the metadata just written says
        report.update(check_parity(fused, runtime.run, imgsz, "ncnn", half, check_images))
        report["size_mb"] = (partial / WEIGHTS).stat().st_size / 2**20
    return ExportReport("ncnn", imgsz, {**report, "path": output})
