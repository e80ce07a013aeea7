"""Timing helpers shared by the benchmark command and scripts: median and p90 latency after warm-up."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def time_fn(fn: Callable[[], object], runs: int = 30, warmup: int = 5) -> dict[str, float]:
    """Median and 90th-percentile wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)), "runs": runs}


def onnx_latency(path: str | Path, imgsz: int, batch: int = 1, runs: int = 30, warmup: int = 5,
                 threads: int | None = None) -> dict[str, float]:
    """ONNX Runtime (CPU) latency of one forward pass at ``batch`` x 3 x imgsz x imgsz."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((batch, 3, imgsz, imgsz), dtype=np.float32)
    name = session.get_inputs()[0].name
    return time_fn(lambda: session.run(None, {name: x}), runs, warmup)
