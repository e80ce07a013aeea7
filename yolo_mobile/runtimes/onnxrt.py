"""ONNX Runtime: a .onnx file (float or INT8, raw output or NMS in the graph) on the CPU or, when installed and
asked for, CUDA. Named ``onnxrt`` so that it never stands in for the ``onnxruntime`` package itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import default_names
from .base import RUNTIMES
from .timing import interleaved_latency


def onnx_session(path: str | Path, cuda: bool = False, threads: int | None = None):
    """An ONNX Runtime session on the CUDA provider when asked and installed, else the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), options, providers=providers)


@RUNTIMES.register("onnxruntime")
class OnnxRuntime:
    """An exported model run by ONNX Runtime; names, size, batch and embedded NMS come from its metadata.
    ``imgsz`` is set when the file has a fixed height and width (then inputs are letterboxed square). ``threads``:
    ONNX Runtime's intra-op threads (default: its own choice). Thread-safe: sessions may be run concurrently."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", threads: int | None = None) -> None:
        import onnxruntime  # noqa: F401  (not installed: an ImportError as it is, not a file problem)

        try:
            self.session = onnx_session(path, torch.device(device).type == "cuda", threads)
        except Exception as e:  # onnxruntime's InvalidProtobuf, Fail...: a file problem, not a bug to trace
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path}: not an ONNX model that ONNX Runtime can load ({reason})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.names = json.loads(meta["names"]) if "names" in meta else None
        shape = self.session.get_inputs()[0].shape
        self.batch = shape[0] if isinstance(shape[0], int) else None
        self.imgsz = onnx_imgsz(meta["imgsz"]) if "imgsz" in meta and meta.get("dynamic") != "true" else None
        if self.imgsz is None and isinstance(shape[2], int) and shape[2] == shape[3]:  # a file without metadata
            self.imgsz = shape[2]
        self.stride = int(meta.get("stride", 32))
        self.nms_inside = meta.get("nms") == "true"
        self.input_name = self.session.get_inputs()[0].name
        self.dtype = np.float16 if "float16" in self.session.get_inputs()[0].type else np.float32
        if self.names is None:
            n = self.session.get_outputs()[0].shape[1]
            self.names = default_names(n - 4) if isinstance(n, int) else []

    @property
    def provider(self) -> str:
        """The execution provider the session runs on first (CUDAExecutionProvider or CPUExecutionProvider)."""
        return self.session.get_providers()[0]

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """One forward pass on an array already in the input's dtype: every output, as ONNX Runtime gives them."""
        return self.session.run(None, {self.input_name: x})

    def __call__(self, x: torch.Tensor) -> Any:
        outputs = self.run(np.ascontiguousarray(x.numpy(), dtype=self.dtype))
        if self.nms_inside:
            return torch.from_numpy(outputs[0]).float(), torch.from_numpy(outputs[1])
        return torch.from_numpy(outputs[0]).float()


def onnx_imgsz(value: str) -> int:
    """The square input size in an export's metadata: "[640, 640]" (ultralytics' layout, ours since it was read by
    their tools), or "640" as earlier exports wrote it."""
    size = json.loads(value)
    return int(size[0] if isinstance(size, list) else size)


def onnx_latency(paths: dict[str, str | Path], imgsz: int, batch: int = 1, runs: int = 30, warmup: int = 5,
                 threads: int | None = None, cuda: bool = False, half: bool = False,
                 rounds: int = 5) -> dict[str, dict[str, Any]]:
    """ONNX Runtime latency of one forward pass at ``batch`` x 3 x imgsz x imgsz for each file, interleaved
    (``interleaved_latency``)."""
    runtimes = {k: OnnxRuntime(p, "cuda" if cuda else "cpu", threads) for k, p in paths.items()}
    x = np.random.default_rng(0).random((batch, 3, imgsz, imgsz), dtype=np.float32)
    feeds = {k: x.astype(np.float16) if half and r.dtype == np.float16 else x for k, r in runtimes.items()}
    calls = {k: (lambda r=r, feed=feeds[k]: r.run(feed)) for k, r in runtimes.items()}
    times = interleaved_latency(calls, runs, warmup, rounds)
    return {k: {**v, "provider": runtimes[k].provider} for k, v in times.items()}
