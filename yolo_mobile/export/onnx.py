"""ONNX export that checks itself: the graph passes onnx.checker, and ONNX Runtime must give what PyTorch gives.

Uses the TorchScript-based exporter (``dynamo=False``): it needs no extra package and exports torchvision's NMS.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.ops import box_convert

from .. import files
from ..detector import class_names
from ..engine.postprocess import class_aware_nms

PARITY_TOLERANCE = 1e-3  # max abs difference of scores (and of boxes below BOX_TOLERANCE), float32
# box corners, in pixels, within this fraction of the input side (0.032 px at 320): float32 sums in another order
# move a trained mobilenetv3_large's DFL distances, times the stride, by up to ~5e-3 px where its scores agree to 2e-6
BOX_TOLERANCE = 1e-4
MIN_OPSET = 9  # opset 8 cannot export the neck's nearest-neighbour upsampling


def max_opset() -> int:
    """The newest opset torch's exporter writes (its constant is private, hence the fallback)."""
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET
    except ImportError:
        return 20
    return int(ONNX_MAX_OPSET)


class ExportError(ValueError):
    """The exported file does not run the same as the PyTorch model (a ValueError: the CLI reports it in one
    line, as it does bad arguments; another opset may export a file that does)."""


class DetectorWithNMS(nn.Module):
    """Model + class-aware NMS in the graph: ``(B, max_det, 6)`` rows of x1, y1, x2, y2, score, class (zero
    padded) and ``(B,)`` counts. The batch is unrolled when traced, so it is fixed at export."""

    def __init__(self, model: nn.Module, conf: float, iou: float, max_det: int) -> None:
        super().__init__()
        self.model, self.conf, self.iou, self.max_det = model, conf, iou, max_det

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.nms(self.model(x))

    def nms(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The NMS stage alone, on the model's (B, 4 + nc, N) output."""
        dets, counts = [], []
        for pred in out:  # (4 + nc, N) per image
            boxes = box_convert(pred[:4].T, "cxcywh", "xyxy")
            scores, classes = pred[4:].max(0)
            idx = (scores > self.conf).nonzero().flatten()
            boxes, scores, classes = boxes[idx], scores[idx], classes[idx]
            keep = class_aware_nms(boxes, scores, classes, self.iou)[: self.max_det]
            det = torch.cat([boxes[keep], scores[keep, None], classes[keep, None].float()], 1)
            dets.append(torch.cat([det, det.new_zeros(self.max_det, 6)])[: self.max_det])
            counts.append((keep >= 0).sum())
        return torch.stack(dets), torch.stack(counts)


def _difference(out: np.ndarray, ref: np.ndarray, box_axis: int) -> tuple[float, float]:
    """(max abs difference of the box corners, of everything else); ``box_axis`` holds corners first, then the
    rest (scores, class)."""
    diff = np.abs(out - ref)
    boxes, rest = np.split(diff, [4], axis=box_axis)
    return float(boxes.max(initial=0.0)), float(rest.max(initial=0.0))


def _compare(module: nn.Module, session: Any, x: torch.Tensor, raw_session: Any = None) -> tuple[float, float]:
    """ONNX Runtime against PyTorch: ``_difference`` of the outputs. With embedded NMS, the model part is compared
    on the raw outputs (``raw_session``) and the NMS part on identical inputs: PyTorch's NMS applied to ONNX
    Runtime's raw output. (Comparing end to end would let 1e-5 noise flip greedy NMS decisions among near-equal
    boxes.)"""
    feed = x.numpy().astype(np.float32)
    out = session.run(feed)
    if raw_session is None:
        with torch.no_grad():
            return _difference(out[0], module(x).numpy(), box_axis=1)
    raw = raw_session.run(feed)[0]
    with torch.no_grad():
        parts = [_difference(raw, module.model(x).numpy(), box_axis=1)]
        dets, counts = module.nms(torch.from_numpy(raw))
    if not np.array_equal(out[1], counts.numpy()):
        raise ExportError(f"embedded NMS kept {out[1].tolist()} detections where PyTorch kept {counts.tolist()}")
    parts += [_difference(canonical_order(a), canonical_order(b), box_axis=1)
              for a, b in zip(out[0], dets.numpy(), strict=True)]
    return max(p[0] for p in parts), max(p[1] for p in parts)


def canonical_order(dets: np.ndarray) -> np.ndarray:
    """Detections sorted by score, then coordinates: NMS may list equal scores in either order (keys rounded,
    so float noise between runtimes does not reorder ties)."""
    keys = [*np.round(dets[:, [5, 3, 2, 1, 0]], 1).T.tolist(), np.round(-dets[:, 4], 4)]
    return dets[np.lexsort(keys)]


def export_onnx(model: nn.Module, output: str | Path, imgsz: int = 640, batch: int = 1, dynamic: bool = False,
                opset: int = 17, simplify: bool = False, half: bool = False, nms: bool = False, max_det: int = 300,
                conf: float = 0.25, iou: float = 0.7, device: str = "cpu",
                check_images: list[str | Path] | None = None) -> dict[str, Any]:
    """Fuse, export, check with onnx.checker, optionally simplify, then compare ONNX Runtime with PyTorch on a
    drawn image and ``check_images`` (and, with ``dynamic``, at a second batch and size). Returns a report.

    The file is written under a temporary name beside ``output`` and moved into place only when every check
    passed: a failed export leaves nothing behind."""
    output = Path(output)
    if imgsz < 32 or imgsz % 32:
        raise ValueError(f"imgsz must be a positive multiple of 32, got {imgsz}")
    if batch < 1 or max_det < 1:
        raise ValueError(f"batch and max_det must be >= 1, got {batch} and {max_det}")
    if not MIN_OPSET <= opset <= max_opset():
        raise ValueError(f"opset must be in {MIN_OPSET}..{max_opset()}, got {opset}")
    if output.is_dir():
        raise ValueError(f"{output}: is a folder; give the path of the .onnx file to write")
    with staged(output) as partial:  # after a failed check (or any error): no half-checked file
        report = _export(model, partial, imgsz, batch, dynamic, opset, simplify, half, nms, max_det, conf, iou,
                         device, check_images)
    return {**report, "path": output}


@contextlib.contextmanager
def staged(output: Path) -> Iterator[Path]:
    """:func:`yolo_mobile.files.staged` for an export: a failed check says that nothing was written."""
    try:
        with files.staged(output) as partial:
            yield partial
    except ExportError as e:
        raise type(e)(f"{output}: {e}; nothing was written") from None


def _export(model: nn.Module, output: Path, imgsz: int, batch: int, dynamic: bool, opset: int, simplify: bool,
            half: bool, nms: bool, max_det: int, conf: float, iou: float, device: str,
            check_images: list[str | Path] | None) -> dict[str, Any]:
    import onnx

    from ..datasets.inference import sample_batch
    from ..engine.device import select_device
    from ..runtimes import OnnxRuntime
    from ..version import __version__

    dev = select_device(device, "export")
    if half and dev.type != "cuda":
        raise ValueError("--half export needs a CUDA device (fp16 convolutions do not run on the CPU)")
    output.parent.mkdir(parents=True, exist_ok=True)
    fused = copy.deepcopy(model).cpu().float().fuse()  # the caller's model stays as it was
    module: nn.Module = DetectorWithNMS(fused, conf, iou, max_det) if nms else fused
    module.eval()
    export_module = copy.deepcopy(module).to(dev)
    if half:
        export_module = export_module.half()
    x = torch.zeros(batch, 3, imgsz, imgsz, device=dev, dtype=torch.float16 if half else torch.float32)
    outputs = ["detections", "count"] if nms else ["output0"]
    axes: dict[str, dict[int, str]] = {}
    if dynamic:
        axes["images"] = {2: "height", 3: "width"} if nms else {0: "batch", 2: "height", 3: "width"}
        if not nms:
            axes["output0"] = {0: "batch", 2: "anchors"}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(export_module, (x,), str(output), dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=outputs, dynamic_axes=axes or None,
                          do_constant_folding=True)
    graph = onnx.load(str(output))
    onnx.checker.check_model(graph)
    if simplify:
        try:
            import onnxslim
        except ImportError:
            raise ImportError("--simplify needs onnxslim: pip install onnxslim") from None
        graph = onnxslim.slim(graph)
    names = class_names(model)
    meta = {"names": json.dumps(names), "stride": "32", "imgsz": str(imgsz), "batch": str(batch),
            "dynamic": str(dynamic).lower(), "nms": str(nms).lower(), "max_det": str(max_det), "conf": str(conf),
            "iou": str(iou), "box_format": "xyxy" if nms else "cxcywh", "producer": f"yolo-mobile {__version__}",
            "model": json.dumps(model.config.to_dict()) if hasattr(model, "config") else ""}
    del graph.metadata_props[:]
    for k, v in meta.items():
        graph.metadata_props.add(key=k, value=v)
    onnx.save(graph, str(output))
    export_s = time.perf_counter() - start

    session = OnnxRuntime(output)
    raw_session = None
    if nms and not half:  # the model without NMS, for the parity check of each part
        raw_path = output.with_name(output.stem + ".raw-check.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(fused, (x.cpu().float(),), str(raw_path), dynamo=False, opset_version=opset,
                              input_names=["images"], output_names=["output0"], dynamic_axes=axes or None)
        raw_session = OnnxRuntime(raw_path)
        raw_path.unlink()
    paths = [Path(p) for p in (check_images or [])]
    shapes = [(batch, imgsz, imgsz)]
    if dynamic:
        shapes.append((batch if nms else batch + 1, imgsz - 64, imgsz + 64))
    diffs, checked = [], []
    if not half:  # fp16 runs on the GPU only; its parity is reported by the GPU benchmark instead
        for b, h, w in shapes:
            diffs.append(_compare(module, session, torch.rand(b, 3, h, w), raw_session))
            diffs.append(_compare(module, session, sample_batch(paths, b, (h, w)), raw_session))
            checked.append(f"random and {'real' if paths else 'drawn'} images at {b}x3x{h}x{w}")
    box_tolerance = BOX_TOLERANCE * imgsz
    worst = max((max(d) for d in diffs), default=float("nan"))
    if diffs and not (max(d[0] for d in diffs) < box_tolerance and max(d[1] for d in diffs) < PARITY_TOLERANCE):
        raise ExportError(f"ONNX Runtime differs from PyTorch by {max(d[0] for d in diffs):.2e} px on boxes "
                          f"(tolerance {box_tolerance:.2g}) and {max(d[1] for d in diffs):.2e} on scores "
                          f"(tolerance {PARITY_TOLERANCE:.0e})")
    return {"path": output, "size_mb": output.stat().st_size / 2**20, "export_s": export_s, "max_abs_diff": worst,
            "checked": checked}
