"""Latency of runtime calls, timed so that models and runtimes compared with one another share the machine's load."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np


def interleaved_latency(calls: dict[Any, Callable[[], Any]], runs: int = 30, warmup: int = 5,
                        rounds: int = 5) -> dict[Any, dict[str, Any]]:
    """Median and p90 milliseconds of each call, interleaved: the ``runs`` are split into ``rounds`` blocks that
    alternate between the calls, so a load that comes and goes on a shared machine falls on all of them alike."""
    times: dict[Any, list[float]] = {k: [] for k in calls}
    for call in calls.values():
        for _ in range(warmup):
            call()
    rounds = max(1, min(rounds, runs))
    for r in range(rounds):
        n = runs // rounds + (r < runs % rounds)
        for k, call in calls.items():
            for _ in range(n):
                t = time.perf_counter()
                call()
                times[k].append((time.perf_counter() - t) * 1000)
    return {k: {"median_ms": float(np.median(v)), "p90_ms": float(np.percentile(v, 90)), "runs": len(v)}
            for k, v in times.items()}
