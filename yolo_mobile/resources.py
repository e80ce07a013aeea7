"""What the machine gives this process: usable CPUs, resident and available memory.

At the bottom of the package, so the datasets (RAM cache) and the engine (memory probe, workers) both read it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

GiB = 2**30


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as torch's DataLoader counts them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def proc_kb(path: str, key: str) -> int | None:
    """The value in kB of ``key`` in a /proc file such as /proc/meminfo, or None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def resident_bytes() -> int:
    """This process's resident set (0 where /proc cannot be read)."""
    return (proc_kb("/proc/self/status", "VmRSS") or 0) * 1024


def _cgroup_limit_bytes() -> int | None:
    """The memory limit of this process's cgroup (v2 or v1), when one is set."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            usage_file = "memory.current" if path.endswith("memory.max") else "memory.usage_in_bytes"
            try:
                used = int((Path(path).parent / usage_file).read_text().strip())
            except (OSError, ValueError):
                used = 0
            return int(text) - used
    return None


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can still take: free GPU memory, or MemAvailable (and the cgroup's headroom)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # what our own allocator holds but does not use can be reused too
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    kb = proc_kb("/proc/meminfo", "MemAvailable")
    if kb is None:
        return None
    available = kb * 1024
    limit = _cgroup_limit_bytes()
    return min(available, limit) if limit is not None else available
