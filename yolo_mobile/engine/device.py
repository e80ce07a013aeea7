"""Device strings as users type them: 'cpu', '0', '0,1', 'cuda:1', 'mps'."""

from __future__ import annotations

from pathlib import Path

import torch


def select_device(device: str | int | None = None) -> torch.device:
    """'' or None picks the first GPU when there is one, else the CPU; a GPU asked for but absent is an error, and
    so are several GPUs (that takes torchrun: one process per GPU)."""
    spec = "" if device is None else str(device).strip().lower()
    if spec in ("", "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec in ("cpu", "mps"):
        return torch.device(spec)
    indices = [i.strip() for i in spec.removeprefix("cuda:").split(",")]
    if len(indices) > 1:  # one process runs on one device: taking the first in silence would hide the others
        raise ValueError(f"device '{device}' names {len(indices)} GPUs, but one process uses one; train on all of "
                         f"them with torchrun --nproc_per_node {len(indices)} -m yolo_mobile train ... "
                         f"(CUDA_VISIBLE_DEVICES={','.join(indices)}), or pick one, e.g. --device {indices[0]}")
    index = indices[0]
    if not index.isdigit():
        raise ValueError(f"unknown device '{device}'; use cpu, a GPU index such as 0, or cuda:N")
    if not torch.cuda.is_available() or int(index) >= torch.cuda.device_count():
        raise ValueError(f"device '{device}' asked for, but {torch.cuda.device_count()} CUDA GPU(s) are available")
    return torch.device(f"cuda:{index}")


def next_run_dir(project: str | Path, name: str = "exp") -> Path:
    """``project/name``, or ``name2``, ``name3``... when it already exists; created empty."""
    base = Path(project) / name
    path, n = base, 2
    while path.exists():
        path, n = base.with_name(f"{name}{n}"), n + 1
    path.mkdir(parents=True)
    return path
