"""What every export shares: the errors, writing under a temporary name so that a failed check leaves nothing,
the parity check against PyTorch in the export's own runtime (with its float32 and float16 bounds), the metadata an
export carries, and the report the CLI prints. ONNX, INT8, LiteRT and ncnn all take this one path.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import files
from ..datasets.inference import sample_batch

PARITY_TOLERANCE = 1e-3  # max abs difference of scores (and of boxes below BOX_TOLERANCE), float32
# box corners, in pixels, within this fraction of the input side (0.032 px at 320): float32 sums in another order
# move a trained mobilenetv3_large's DFL distances, times the stride, by up to ~5e-3 px where its scores agree to 2e-6
BOX_TOLERANCE = 1e-4
# float16 weights: bounds on the max abs difference from float32 PyTorch, boxes as a fraction of the input size
# (cx, cy, w, h are pixels) and scores absolute. A float16 weight keeps 11 significant bits (relative step 2^-11);
# the rounding of ~50 layers adds up to a few of those steps on a coordinate in the hundreds of pixels, so 2^-8
# of the input size (1.25 px at 320) holds with room while still catching a wrong layer (tens of pixels off).
FP16_BOX_TOLERANCE = 2**-8
FP16_SCORE_TOLERANCE = 2**-7  # sigmoid outputs in 0-1: 0.008, well under any confidence threshold step


class ExportError(ValueError):
    """The exported file does not run the same as the PyTorch model (a ValueError: the CLI reports it in one
    line, as it does bad arguments; another opset may export a file that does)."""


class ConversionError(ExportError):
    """The converter (litert-torch, pnnx) cannot take the model; the message names the operator where it can."""


Runner = Callable[[np.ndarray], np.ndarray]  # (B, 3, H, W) float32 RGB in 0-1 -> (B, 4 + nc, N)
Shape = tuple[int, int, int]  # batch, height, width


@contextlib.contextmanager
def staged(output: Path) -> Iterator[Path]:
    """:func:`yolo_mobile.files.staged` for an export: a failed check says that nothing was written."""
    try:
        with files.staged(output) as partial:
            yield partial
    except ExportError as e:
        raise type(e)(f"{output}: {e}; nothing was written") from None


def fused_copy(model: nn.Module) -> nn.Module:
    """A fused float32 eval copy on the CPU (Conv+BN folded, FastViT reparameterized); ``model`` is left as is."""
    import copy

    return copy.deepcopy(model).cpu().float().fuse().eval()


def _drawn_image(imgsz: int) -> np.ndarray:
    """A deterministic drawn image (shapes on a background), for checks when no real image is given."""
    from ..datasets.synthetic import draw_sample

    image, _ = draw_sample(np.random.default_rng(0), imgsz)
    return image


def image_batch(paths: list[Path], batch: int, h: int, w: int) -> torch.Tensor:
    """``batch`` letterboxed images at h x w from ``paths`` (cycled), or the drawn image; float RGB in 0-1."""
    from ..datasets.labels import read_image
    from ..datasets.letterbox import letterbox_chw

    images = [read_image(p) for p in paths] or [_drawn_image(max(h, w))]
    boxed = [letterbox_chw(images[k % len(images)], (h, w))[0] for k in range(batch)]
    return torch.from_numpy(np.stack(boxed)).float() / 255


def check_inputs(imgsz: int, check_images: list[str | Path] | None = None,
                 shapes: list[Shape] | None = None) -> list[tuple[str, torch.Tensor]]:
    """The batches every export is checked on, at each of ``shapes`` (default batch 1 at imgsz): a random one and
    a drawn (or the given real) image, letterboxed."""
    paths = [Path(p) for p in check_images or []]
    image = "real" if paths else "drawn"
    return [batch for b, h, w in shapes or [(1, imgsz, imgsz)]
            for batch in (("random", torch.rand(b, 3, h, w)), (image, sample_batch(paths, b, (h, w))))]


def output_difference(out: np.ndarray, ref: np.ndarray, box_axis: int = 1) -> tuple[float, float]:
    """(max abs difference of the box corners, of everything else); ``box_axis`` holds corners first, then the
    rest (scores, class)."""
    if out.shape != ref.shape:
        raise ExportError(f"output shape {tuple(out.shape)} where PyTorch gives {tuple(ref.shape)}")
    diff = np.abs(out.astype(np.float64) - ref)  # a float16 output compared in full precision
    boxes, rest = np.split(diff, [4], axis=box_axis)
    return float(boxes.max(initial=0.0)), float(rest.max(initial=0.0))


Compare = Callable[[torch.Tensor], tuple[float, float]]  # a batch -> (box difference, score difference)


def max_differences(module: nn.Module, run: Runner, imgsz: int, check_images: list[str | Path] | None = None,
                    shapes: list[Shape] | None = None, compare: Compare | None = None) -> dict[str, float]:
    """Max abs difference of ``run`` from ``module`` over the check inputs, for boxes (rows 0-3) and scores;
    ``compare`` replaces the plain comparison of outputs (the ONNX export's embedded NMS has its own)."""
    def plain(x: torch.Tensor) -> tuple[float, float]:
        with torch.no_grad():
            return output_difference(run(x.numpy()), module(x).numpy())

    boxes, scores = 0.0, 0.0
    for _, x in check_inputs(imgsz, check_images, shapes):
        b, s = (compare or plain)(x)
        boxes, scores = max(boxes, b), max(scores, s)
    return {"boxes": boxes, "scores": scores}


def check_parity(module: nn.Module, run: Runner, imgsz: int, runtime: str, half: bool = False,
                 check_images: list[str | Path] | None = None, shapes: list[Shape] | None = None,
                 compare: Compare | None = None) -> dict[str, Any]:
    """Raise ExportError unless ``run`` gives what ``module`` gives: float32 boxes within ``BOX_TOLERANCE`` x
    imgsz and scores within ``PARITY_TOLERANCE``; float16 boxes within ``FP16_BOX_TOLERANCE`` x imgsz and scores
    within ``FP16_SCORE_TOLERANCE``. ``checked`` says which inputs at which shapes."""
    diff = max_differences(module, run, imgsz, check_images, shapes, compare)
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
    image = "real" if check_images else "drawn"
    checked = [f"random and {image} images at {b}x3x{h}x{w}" for b, h, w in shapes or [(1, imgsz, imgsz)]]
    return {"max_abs_diff": worst, "box_diff": diff["boxes"], "score_diff": diff["scores"], "checked": checked}


def metadata(model: nn.Module, imgsz: int, precision: str, **extra: Any) -> dict[str, Any]:
    """What an export carries beside its weights: class names, input size, stride, layout, precision, the model's
    config; ``extra`` adds a format's own (ONNX: batch, dynamic, embedded NMS settings)."""
    from ..detector import class_names
    from ..version import __version__

    config = model.config.to_dict() if hasattr(model, "config") else None
    return {"names": class_names(model), "imgsz": imgsz, "stride": 32, "batch": 1, "input": "NCHW float32 RGB 0-1",
            "box_format": "cxcywh", "precision": precision, "producer": f"yolo-mobile {__version__}",
            "model": config, **extra}


def metadata_json(meta: dict[str, Any]) -> str:
    return json.dumps(meta, sort_keys=True)


@contextlib.contextmanager
def warnings_ignored() -> Iterator[None]:
    """Converters' and tracers' deprecation notes (torch.export, torch.jit.trace, litert-torch) held back."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield



@dataclass
class ExportReport:
    """What an export wrote and measured, read as the dict the exporters fill (``report["path"]``), and the
    lines the CLI prints (``summary()``)."""

    format: str  # onnx, tflite, ncnn
    imgsz: int
    values: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def summary(self) -> str:
        r, imgsz = self.values, self.imgsz
        int8 = r.get("precision") == "int8" or "map_int8" in r
        if self.format == "onnx" and int8:
            drop = r["map_float"]["map"] - r["map_int8"]["map"]
            return "\n".join([
                f"Exported {r['path']} ({r['size_mb']:.1f} MB, float {r['float']['size_mb']:.1f} MB) in "
                f"{r['quantize_s']:.1f} s: QDQ int8, {r['method']} calibration on {r['calibration_images']} "
                f"letterboxed train images at {imgsz}; {len(r['float_nodes'])} nodes kept float "
                f"({', '.join(r['keep_float']) or 'none'})",
                f"mAP50-95 on {r['evaluated_on']}: float {r['map_float']['map']:.4f}, INT8 {r['map_int8']['map']:.4f} "
                f"(drop {drop:+.4f}); mAP50 {r['map_float']['map50']:.4f} -> {r['map_int8']['map50']:.4f}",
                f"ONNX Runtime latency at {imgsz} (batch 1, medians interleaved): float {r['ms_float']:.1f} ms, "
                f"INT8 {r['ms_int8']:.1f} ms ({r['ms_int8'] / r['ms_float']:.2f}x)"])
        checked = ", ".join(r.get("checked", []))
        if self.format == "onnx":
            return (f"Exported {r['path']} ({r['size_mb']:.1f} MB) in {r['export_s']:.1f} s; ONNX Runtime vs PyTorch "
                    f"max abs difference {r['max_abs_diff']:.2e} ({checked})")
        if self.format == "ncnn":
            return (f"Exported {r['path']}/ ({r['size_mb']:.1f} MB {r['precision']} weights) in {r['export_s']:.1f} "
                    f"s; ncnn vs PyTorch max abs difference {r['max_abs_diff']:.2e} ({checked})")
        head = f"Exported {r['path']} ({r['size_mb']:.1f} MB, {r['precision']}) in {r['export_s']:.1f} s"
        if not int8:
            return f"{head}; LiteRT vs PyTorch max abs difference {r['max_abs_diff']:.2e} on boxes and scores " \
                   f"({checked})"
        return "\n".join([
            f"{head}; PT2E static INT8 calibrated on {r['calibration_images']} letterboxed train images at {imgsz}",
            f"mAP50-95 on {r['evaluated_on']}: PyTorch {r['map_float']['map']:.4f}, LiteRT INT8 "
            f"{r['map_int8']['map']:.4f}; mAP50 {r['map_float']['map50']:.4f} -> {r['map_int8']['map50']:.4f}"])
