"""Device strings as users type them: 'cpu', '0', '0,1', 'cuda', 'cuda:1', 'mps'."""

from __future__ import annotations

import torch


def select_device(device: str | int | None = None, command: str = "train") -> torch.device:
    """'' or None picks the first GPU when there is one, else the CPU; 'cuda' is 'cuda:0', as in PyTorch. A
    device asked for but absent is an error, and so are several GPUs (``train`` takes torchrun for that: one
    process per GPU; the other commands run on one). ``command`` names the command in messages."""
    spec = "" if device is None else str(device).strip().lower()
    if spec in ("", "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec in ("mps", "mps:0"):
        if not torch.backends.mps.is_available():
            why = "none found" if torch.backends.mps.is_built() else "this PyTorch was built without MPS"
            raise ValueError(f"device '{device}' asked for, but this machine has no Apple MPS device ({why}); "
                             "use --device cpu")
        return torch.device("mps")
    indices = [i.strip() for i in ("0" if spec == "cuda" else spec.removeprefix("cuda:")).split(",")]
    if len(indices) > 1:  # one process runs on one device: taking the first in silence would hide the others
        how = (f"train on all of them with torchrun --nproc_per_node {len(indices)} -m yolo_mobile train ... "
               f"(CUDA_VISIBLE_DEVICES={','.join(indices)}), or pick one" if command == "train"
               else f"{command} runs on one GPU: pick one")
        raise ValueError(f"device '{device}' names {len(indices)} GPUs, but one process uses one; {how}, "
                         f"e.g. --device {indices[0]}")
    index = indices[0]
    if not index.isdigit():
        raise ValueError(f"unknown device '{device}'; use cpu, a GPU index such as 0, cuda, cuda:N or mps")
    if not torch.cuda.is_available() or int(index) >= torch.cuda.device_count():
        raise ValueError(f"device '{device}' asked for, but {torch.cuda.device_count()} CUDA GPU(s) are available")
    return torch.device(f"cuda:{index}")
