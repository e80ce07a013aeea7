"""LiteRT (TFLite) export through litert-torch, checked in the LiteRT interpreter (XNNPACK) against PyTorch.

litert-torch converts the PyTorch model itself (torch.export, then the LiteRT converter): no ONNX step, and no
TensorFlow install (onnx2tf needs one, whose pins would move numpy, onnx and onnxruntime). The input stays NCHW
float32 RGB in 0-1 and the output ``(1, 4 + nc, N)``, as in the ONNX file. Precisions: float32; float16 weights
(ai-edge-quantizer's float casting, computed in float32); INT8 by PT2E static quantization, calibrated on
letterboxed train images, with the box decode left in float (see ``DecodeFloatQuantizer``).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import check_imgsz
from ..runtimes.litert import TFLITE_METADATA, TfliteRuntime, native_logs_filtered, require_tflite
from .checks import (
    ConversionError,
    ExportError,
    ExportReport,
    check_parity,
    fused_copy,
    metadata,
    metadata_json,
    staged,
    warnings_ignored,
)

# INT8 fails its check below half of PyTorch's mAP50-95: a broken quantization (a quantized decode rounds every
# score to zero), not the point or two that calibration costs
INT8_MIN_MAP_RATIO = 0.5


@contextlib.contextmanager
def _quiet_converter() -> Iterator[None]:
    """litert-torch prints a progress tree on every conversion unless told not to; restored afterwards."""
    import litert_torch

    shown = litert_torch.config.show_progress
    litert_torch.config.show_progress = False
    try:
        yield
    finally:
        litert_torch.config.show_progress = shown


def _converted(module: nn.Module, x: torch.Tensor, quant_config: Any = None) -> bytes:
    import litert_torch

    # the converter's absl, MLIR and JAX lines go to file descriptor 2: kept out of the export's output
    with native_logs_filtered("litert-torch"):
        try:
            with _quiet_converter(), warnings_ignored():
                edge = litert_torch.convert(module, (x,), quant_config=quant_config)
                return bytes(edge.model_content())
        except Exception as e:  # the converter raises bare RuntimeErrors and lowering errors naming the aten op
            raise ConversionError(f"litert-torch cannot convert this model{_named_op(e)}: "
                                  f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
        finally:
            _release_jax()


def _release_jax() -> None:
    """litert-torch lowers some ops through JAX, which starts a CPU client with threads of its own; dropped after
    the conversion, so that a later fork in this process (DataLoader workers) does not copy a process mid-thread."""
    import sys

    if "jax" in sys.modules:
        from jax.extend.backend import clear_backends

        clear_backends()


def _named_op(error: Exception) -> str:
    """' (operator aten.x)' when the converter's message names an aten or TFLite op, else ''."""
    import re

    match = re.search(r"(aten\.\w+(?:\.\w+)?|tfl\.\w+)", str(error))
    return f" (operator {match.group(1)})" if match else ""


def with_metadata(model_bytes: bytes, meta: dict[str, Any]) -> bytes:
    """The flatbuffer with ``meta`` stored as JSON in a metadata entry (the LiteRT schema's place for it)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(metadata_json(meta).encode(), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = TFLITE_METADATA, len(model.buffers) - 1
    model.metadata = [m for m in model.metadata or [] if m.name != TFLITE_METADATA.encode()] + [entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _input_layout(model_bytes: bytes) -> str:
    """How to feed a converted file: an INT8 file whose first layer is quantized takes int8 input."""
    from ai_edge_litert.interpreter import Interpreter

    with native_logs_filtered("the LiteRT interpreter"):
        given = Interpreter(model_content=model_bytes).get_input_details()[0]
    if not np.issubdtype(given["dtype"], np.integer):
        return "NCHW float32 RGB 0-1"
    scale, zero = given["quantization"]
    return f"NCHW int8: RGB 0-1 / {scale:.6g} + {zero} (the input tensor's scale and zero point)"


def _float16_weights(model_bytes: bytes) -> bytes:
    """Every float weight stored as float16 (ai-edge-quantizer's float casting; computed in float32)."""
    from litert_torch.generative.quantize import quant_recipes
    from litert_torch.quantize import translate_recipe

    recipe = translate_recipe.translate_to_ai_edge_recipe(quant_recipes.full_fp16_recipe().generative_recipe)
    # the quantizer prints sizes and progress bars on every call
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            native_logs_filtered("ai-edge-quantizer"):
        return bytes(translate_recipe.quantize_model(model_bytes, recipe))


def _decode_quantizer():
    """litert-torch's PT2E quantizer (int8 per-channel weights, int8 activations through histogram observers),
    with the head's own nodes, the box decode, left unannotated: its one tensor holds boxes in pixels and scores
    in 0-1, and one 8-bit scale for both would round every score to zero (as in the ONNX INT8 export)."""
    from litert_torch.quantize import pt2e_quantizer

    class DecodeFloatQuantizer(pt2e_quantizer.PT2EQuantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            model = super().annotate(model)
            for node in model.graph.nodes:
                if in_decode(node):
                    node.meta.pop("quantization_annotation", None)
            return model

    config = pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True)
    return DecodeFloatQuantizer().set_global(config)


def in_decode(node: torch.fx.Node) -> bool:
    """A node the head computes itself (the decode), not inside one of its convolution branches."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if not stack:
        return False
    path = stack[-1][0].replace("L['self'].", "").replace("L__self__.", "")
    return path == "head"


def _int8(module: nn.Module, x: torch.Tensor, images: list[Path], imgsz: int) -> bytes:
    from litert_torch.quantize import quant_config
    from torchao.quantization.pt2e import quantize_pt2e

    from ..datasets.labels import read_image
    from ..datasets.letterbox import letterbox_batch

    quantizer = _decode_quantizer()
    with warnings_ignored(), native_logs_filtered("torch.export"):
        graph = torch.export.export(module, (x,)).module()
        prepared = quantize_pt2e.prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for path in images:
                prepared(letterbox_batch([read_image(path)], (imgsz, imgsz))[0].contiguous())
        quantized = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
    return _converted(quantized, x, quant_config.QuantConfig(pt2e_quantizer=quantizer))


def tflite_map(path: str | Path, data: str | Path, imgsz: int) -> dict[str, Any]:
    """COCO mAP of a .tflite file on the val split of ``data``, through the same evaluator as every model."""
    from ..engine.validate import validate

    # workers=0: litert-torch has started JAX's threads in this process, and a forked loader worker could deadlock
    return validate(TfliteRuntime(path), data, split="val", imgsz=imgsz, progress=False, workers=0)


def export_tflite(model: nn.Module, output: str | Path, imgsz: int = 640, half: bool = False, int8: bool = False,
                  data: str | Path | None = None, calib_images: int = 256,
                  check_images: list[str | Path] | None = None) -> dict[str, Any]:
    """Convert ``model`` (fused) to a .tflite at batch 1 and ``imgsz``, then check it in the LiteRT interpreter:
    float32 and float16 against PyTorch on random and drawn images (``checks.check_parity``), INT8 by mAP50-95
    on the val split of ``data`` beside PyTorch's (calibrated on ``calib_images`` letterboxed train images;
    without a val split, on further train images held apart). Written only when every step passed."""
    require_tflite()
    output = Path(output)
    check_imgsz(imgsz)
    if half and int8:
        raise ValueError("--half and --int8 are two precisions: choose one")
    if int8 and data is None:
        raise ValueError("--int8 needs --data: its train split calibrates, its val split evaluates")
    if int8 and calib_images < 1:
        raise ValueError(f"--calib-images must be at least 1, got {calib_images}")
    if output.is_dir():
        raise ValueError(f"{output}: is a folder; give the path of the .tflite file to write")
    fused = fused_copy(model)
    x = torch.zeros(1, 3, imgsz, imgsz)
    precision = "int8" if int8 else "float16" if half else "float32"
    report: dict[str, Any] = {"precision": precision}
    with tempfile.TemporaryDirectory(prefix="yolo_mobile_tflite_") as tmp, staged(output) as partial:
        start = time.perf_counter()
        if int8:
            from .int8 import calibration_split

            calib, eval_data = calibration_split(data, calib_images, Path(tmp))
            model_bytes = _int8(fused, x, calib, imgsz)
            report["calibration_images"] = len(calib)
        else:
            model_bytes = _converted(fused, x)
            if half:
                model_bytes = _float16_weights(model_bytes)
        meta = metadata(model, imgsz, precision)
        if int8:
            meta["input"] = _input_layout(model_bytes)
        partial.write_bytes(with_metadata(model_bytes, meta))
        report["export_s"] = time.perf_counter() - start
        runtime = TfliteRuntime(partial)
        if int8:
            from ..engine.validate import validate

            report["map_float"] = validate(fused, eval_data, split="val", imgsz=imgsz, progress=False, workers=0)
            report["map_int8"] = tflite_map(partial, eval_data, imgsz)
            held_apart = Path(eval_data).parent == Path(tmp)
            report["evaluated_on"] = f"{calib_images} train images held apart" if held_apart else "the val split"
            kept, base = report["map_int8"]["map"], report["map_float"]["map"]
            if base > 0 and not kept >= INT8_MIN_MAP_RATIO * base:
                raise ExportError(f"INT8 mAP50-95 {kept:.4f} on {report['evaluated_on']} is under "
                                  f"{INT8_MIN_MAP_RATIO:.0%} of PyTorch's {base:.4f}")
        else:
            report.update(check_parity(fused, runtime.run, imgsz, "LiteRT", half, check_images))
        report["size_mb"] = partial.stat().st_size / 2**20
    return ExportReport("tflite", imgsz, {**report, "path": output})
