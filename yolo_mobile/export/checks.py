"""What the phone formats (LiteRT, ncnn) share: the parity check against PyTorch in their own runtime, the
float16 bound, the metadata they carry, and writing under a temporary name so that a failed check leaves nothing.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..datasets.inference import sample_batch
from .onnx import BOX_TOLERANCE, PARITY_TOLERANCE, ExportError

# float16 weights: bounds on the max abs difference from float32 PyTorch, boxes as a fraction of the input size
# (cx, cy, w, h are pixels) and scores absolute. A float16 weight keeps 11 significant bits (relative step 2^-11);
# the rounding of ~50 layers adds up to a few of those steps on a coordinate in the hundreds of pixels, so 2^-8
# of the input size (1.25 px at 320) holds with room while still catching a wrong layer (tens of pixels off).
FP16_BOX_TOLERANCE = 2**-8
FP16_SCORE_TOLERANCE = 2**-7  # sigmoid outputs in 0-1: 0.008, well under any confidence threshold step

class ConversionError(ExportError):
    """The converter (litert-torch, pnnx) cannot take the model; the message names the operator where it can."""


Runner = Callable[[np.ndarray], np.ndarray]  # (1, 3, H, W) float32 RGB in 0-1 -> (1, 4 + nc, N)


def fused_copy(model: nn.Module) -> nn.Module:
    """A fused float32 eval copy on the CPU (Conv+BN folded, FastViT reparameterized); ``model`` is left as is."""
    import copy

    return copy.deepcopy(model).cpu().float().fuse().eval()


def check_inputs(imgsz: int, check_images: list[str | Path] | None = None) -> list[tuple[str, torch.Tensor]]:
    """The batches every export is checked on: a random one and a drawn (or the given real) image, letterboxed."""
    paths = [Path(p) for p in check_images or []]
    return [("random", torch.rand(1, 3, imgsz, imgsz)),
            ("real" if paths else "drawn", sample_batch(paths, 1, (imgsz, imgsz)))]


def max_differences(module: nn.Module, run: Runner, imgsz: int,
                    check_images: list[str | Path] | None = None) -> dict[str, float]:
    """Max abs difference of ``run`` from ``module`` over the check inputs, for boxes (rows 0-3) and scores."""
    boxes, scores = 0.0, 0.0
    for _, x in check_inputs(imgsz, check_images):
        with torch.no_grad():
            ref = module(x).numpy()
        out = run(x.numpy())
        if out.shape != ref.shape:
            raise ExportError(f"output shape {tuple(out.shape)} where PyTorch gives {tuple(ref.shape)}")
        diff = np.abs(out.astype(np.float32) - ref)
        boxes, scores = max(boxes, float(diff[:, :4].max())), max(scores, float(diff[:, 4:].max()))
    return {"boxes": boxes, "scores": scores}


def check_parity(module: nn.Module, run: Runner, imgsz: int, runtime: str, half: bool = False,
                 check_images: list[str | Path] | None = None) -> dict[str, Any]:
    """Raise ExportError unless ``run`` gives what ``module`` gives: float32 as the ONNX export's check (boxes
    within ``BOX_TOLERANCE`` x imgsz, scores within ``PARITY_TOLERANCE``); float16 boxes within
    ``FP16_BOX_TOLERANCE`` x imgsz and scores within ``FP16_SCORE_TOLERANCE``."""
    diff = max_differences(module, run, imgsz, check_images)
    worst = max(diff.values())
    if half:
        box_bound, score_bound = FP16_BOX_TOLERANCE * imgsz, FP16_SCORE_TOLERANCE
        if not (diff["boxes"] <= box_bound and diff["scores"] <= score_bound):
            raise ExportError(f"{runtime} (float16) differs from PyTorch by {diff['boxes']:.3g} px on boxes and "
                              f"{diff['scores']:.3g} on scores (bounds {box_bound:.3g} px, {score_bound:.3g})")
    elif not (diff["boxes"] < BOX_TOLERANCE * imgsz and diff["scores"] < PARITY_TOLERANCE):
        raise ExportError(f"{runtime} differs from PyTorch by {diff['boxes']:.2e} px on boxes (tolerance "
                          f"{BOX_TOLERANCE * imgsz:.2g}) and {diff['scores']:.2e} on scores (tolerance "
                          f"{PARITY_TOLERANCE:.0e})")
    names = [name for name, _ in check_inputs(imgsz, check_images)]
    return {"max_abs_diff": worst, "box_diff": diff["boxes"], "score_diff": diff["scores"],
            "checked": f"{' and '.join(names)} images at 1x3x{imgsz}x{imgsz}"}


def metadata(model: nn.Module, imgsz: int, precision: str) -> dict[str, Any]:
    """What a phone export carries beside its weights: class names, input size, stride, layout, precision."""
    from ..detector import class_names
    from ..version import __version__

    config = model.config.to_dict() if hasattr(model, "config") else None
    return {"names": class_names(model), "imgsz": imgsz, "stride": 32, "batch": 1, "input": "NCHW float32 RGB 0-1",
            "box_format": "cxcywh", "precision": precision, "producer": f"yolo-mobile {__version__}",
            "model": config}


def metadata_json(meta: dict[str, Any]) -> str:
    return json.dumps(meta, sort_keys=True)


@contextlib.contextmanager
def warnings_ignored() -> Iterator[None]:
    """Converters' and tracers' deprecation notes (torch.export, torch.jit.trace, litert-torch) held back."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield

