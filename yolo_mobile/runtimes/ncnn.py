"""ncnn: an export folder written by pnnx (model.ncnn.param, model.ncnn.bin, metadata.json) in ncnn's own
runtime, one image at a time; loading, one forward pass and the metadata. An optional extra
(``pip install -e ".[ncnn]"``), imported on first use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import RUNTIMES

NCNN_PARAM, NCNN_WEIGHTS, NCNN_METADATA = "model.ncnn.param", "model.ncnn.bin", "metadata.json"


def require_ncnn() -> None:
    try:
        import ncnn  # noqa: F401
        import pnnx  # noqa: F401
    except ImportError:
        raise ImportError('--format ncnn needs pnnx and ncnn: pip install -e ".[ncnn]"') from None


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


@RUNTIMES.register("ncnn")
class NcnnRuntime:
    """An ncnn export folder (model.ncnn.param, model.ncnn.bin, metadata.json) run by ncnn, one image at a time
    at the size it was exported at; float16 storage only for a float16 export. ``threads``: see ``ncnn_net``."""

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        require_ncnn()
        meta = ncnn_metadata(folder)
        if "imgsz" not in meta:
            raise ValueError(f"{folder}: no {NCNN_METADATA} (written by yolo-mobile export --format ncnn); "
                             "the input size is not known")
        self.net = ncnn_net(folder, threads)
        self.names = meta["names"]
        self.batch, self.imgsz, self.stride, self.nms_inside = 1, int(meta["imgsz"]), int(meta["stride"]), False

    def run(self, x: np.ndarray) -> np.ndarray:
        """``ncnn_run`` on this folder's net: (B, 3, H, W) float32 in, (B, 4 + nc, N) out."""
        return ncnn_run(self.net, x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(x.numpy()))
