"""ONNX export that checks itself: the graph passes onnx.checker, and ONNX Runtime must give what PyTorch gives.

Uses the TorchScript-based exporter (``dynamo=False``): it needs no extra package and exports torchvision's NMS.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.ops import box_convert

from ..config import check_imgsz
from ..engine.postprocess import CONF, IOU, MAX_DET, class_aware_nms
from .checks import ExportError, ExportReport, check_parity, metadata, output_difference, staged

MIN_OPSET = 9  # opset 8 cannot export the neck's nearest-neighbour upsampling


def max_opset() -> int:
    """The newest opset torch's exporter writes (its constant is private, hence the fallback)."""
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET
    except ImportError:
        return 20
    return int(ONNX_MAX_OPSET)


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


def _compare_nms(module: DetectorWithNMS, session: Any, raw_session: Any, x: torch.Tensor) -> tuple[float, float]:
    """An embedded-NMS export against PyTorch: the model part on the raw outputs (``raw_session``), the NMS part
    on identical inputs: PyTorch's NMS applied to ONNX Runtime's raw output. (Comparing end to end would let 1e-5
    noise flip greedy NMS decisions among near-equal boxes.)"""
    feed = x.numpy().astype(np.float32)
    out = session.run(feed)
    raw = raw_session.run(feed)[0]
    with torch.no_grad():
        parts = [output_difference(raw, module.model(x).numpy())]
        dets, counts = module.nms(torch.from_numpy(raw))
    if not np.array_equal(out[1], counts.numpy()):
        raise ExportError(f"embedded NMS kept {out[1].tolist()} detections where PyTorch kept {counts.tolist()}")
    parts += [output_difference(canonical_order(a), canonical_order(b))
              for a, b in zip(out[0], dets.numpy(), strict=True)]
    return max(p[0] for p in parts), max(p[1] for p in parts)


def canonical_order(dets: np.ndarray) -> np.ndarray:
    """Detections sorted by score, then coordinates: NMS may list equal scores in either order (keys rounded,
    so float noise between runtimes does not reorder ties)."""
    keys = [*np.round(dets[:, [5, 3, 2, 1, 0]], 1).T.tolist(), np.round(-dets[:, 4], 4)]
    return dets[np.lexsort(keys)]


def export_onnx(model: nn.Module, output: str | Path, imgsz: int = 640, batch: int = 1, dynamic: bool = False,
                opset: int = 17, simplify: bool = False, half: bool = False, nms: bool = False, max_det: int = MAX_DET,
                conf: float = CONF, iou: float = IOU, device: str = "cpu",
                check_images: list[str | Path] | None = None) -> dict[str, Any]:
    """Fuse, export, check with onnx.checker, optionally simplify, then compare ONNX Runtime with PyTorch on a
    drawn image and ``check_images`` (and, with ``dynamic``, at a second batch and size). Returns a report.

    The file is written under a temporary name beside ``output`` and moved into place only when every check
    passed: a failed export leaves nothing behind."""
    output = Path(output)
    check_imgsz(imgsz)
    if batch < 1 or max_det < 1:
        raise ValueError(f"batch and max_det must be >= 1, got {batch} and {max_det}")
    if not MIN_OPSET <= opset <= max_opset():
        raise ValueError(f"opset must be in {MIN_OPSET}..{max_opset()}, got {opset}")
    if output.is_dir():
        raise ValueError(f"{output}: is a folder; give the path of the .onnx file to write")
    with staged(output) as partial:  # after a failed check (or any error): no half-checked file
        report = _export(model, partial, imgsz, batch, dynamic, opset, simplify, half, nms, max_det, conf, iou,
                         device, check_images)
    return ExportReport("onnx", imgsz, {**report, "path": output})


def _export(model: nn.Module, output: Path, imgsz: int, batch: int, dynamic: bool, opset: int, simplify: bool,
            half: bool, nms: bool, max_det: int, conf: float, iou: float, device: str,
            check_images: list[str | Path] | None) -> dict[str, Any]:
    import onnx

    from ..engine.device import select_device
    from ..runtimes import OnnxRuntime

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
    # imgsz as [h, w], task and args (a Python literal) as ultralytics' exports write them, so its predict and val
    # read the file (docs/ultralytics.md)
    meta = {**metadata(model, imgsz, "float16" if half else "float32", batch=batch, dynamic=dynamic, nms=nms,
                       max_det=max_det, conf=conf, iou=iou, box_format="xyxy" if nms else "cxcywh"),
            "imgsz": [imgsz, imgsz], "task": "detect", "args": repr({"dynamic": bool(dynamic), "nms": bool(nms)})}
    del graph.metadata_props[:]
    for k, v in meta.items():  # ONNX metadata holds strings: the rest as JSON
        graph.metadata_props.add(key=k, value=v if isinstance(v, str) else json.dumps(v))
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
    shapes = [(batch, imgsz, imgsz)]
    if dynamic:
        shapes.append((batch if nms else batch + 1, max(32, imgsz - 64), imgsz + 64))  # another size, as it says
    report = {"path": output, "size_mb": output.stat().st_size / 2**20, "export_s": export_s,
              "max_abs_diff": float("nan"), "checked": []}
    if not half:  # fp16 runs on the GPU only; its parity is reported by the GPU benchmark instead
        compare = (lambda x: _compare_nms(module, session, raw_session, x)) if raw_session is not None else None
        report.update(check_parity(module, lambda a: session.run(a)[0], imgsz, "ONNX Runtime",
                                   check_images=check_images, shapes=shapes, compare=compare))
    return report
