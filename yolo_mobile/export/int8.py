"""INT8 ONNX: static post-training quantization with ONNX Runtime's tools, calibrated on letterboxed images.

QDQ format, per-channel int8 weights, uint8 activations (ONNX Runtime's advice for x86 and ARM CPUs). The box
decode (from the concatenation of the per-level maps to the output: DFL softmax, distances to boxes, class
sigmoid) stays float: boxes in pixels and scores in 0-1 share its tensors, and one 8-bit scale for both would
round every score to zero. Softmaxes (attention) stay float too by default: on this CPU that was faster than
their quantized form at the same accuracy (README, "INT8").

Three graph fixes make ONNX Runtime run in int8 what is quantized and in float what is not (profiles:
docs/measurements/2026-12-04-lite-models.md): weights and biases torch's exporter shares through Identity nodes
are inlined first (else their Convs stayed float); grouped convs other than plain depthwise ones (no fast int8
kernel) stay float; and the Q/DQ pair after every node kept float is dropped, so ONNX Runtime does not fuse it back
into a QLinear kernel.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .. import files
from .checks import ExportError, ExportReport

CALIB_METHODS = ("minmax", "entropy", "percentile")
# histograms cut off the rare extreme activations min-max keeps: 0.75 points of mAP50-95 lost instead of 1.18 on
# mobilenetv3_large at 320 with 256 images (README, "INT8")
CALIB_METHOD = "entropy"
KEEP_FLOAT = ("decode", "softmax")  # the box decode; every Softmax (DFL and attention)
# images whose every intermediate tensor ONNX Runtime holds at once while calibrating: it keeps them all until
# it builds its ranges, ~80 MB per image for mobilenetv3_large at 320 (256 at once ran a 24 GiB machine out)
CALIB_CHUNK = 16


class QuantizationError(ExportError):
    """ONNX Runtime cannot quantize or run the quantized graph; the message names the operator."""


def calibration_reader(images: Iterable[np.ndarray | str | Path], input_name: str, imgsz: int):
    """An ONNX Runtime CalibrationDataReader over images (RGB arrays or files), letterboxed one at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    from ..datasets.labels import read_image
    from ..datasets.letterbox import letterbox_batch

    class LetterboxCalibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = list(images)
            self.rewind()

        def _feeds(self, items: list) -> Iterator[dict[str, np.ndarray]]:
            for item in items:
                image = item if isinstance(item, np.ndarray) else read_image(item)
                # (1, 3, imgsz, imgsz) float32 RGB in 0-1, as validate and detect feed the model
                yield {input_name: letterbox_batch([image], (imgsz, imgsz))[0].contiguous().numpy()}

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

        def rewind(self) -> None:
            self.feeds = self._feeds(self.items)

        def set_range(self, start_index: int, end_index: int) -> None:
            """Serve only items[start_index:end_index]: ONNX Runtime's chunked calibration calls this."""
            self.feeds = self._feeds(self.items[start_index:end_index])

        def __len__(self) -> int:
            return len(self.items)

    return LetterboxCalibration()


def decode_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of the box decode's nodes: everything after the Concats that join three or more per-level maps
    reshaped to (B, C, H*W) along the anchors (ours join boxes and classes, ultralytics' each apart) when no
    learned layer follows them (the DFL's fixed 1x1 Conv over a Softmax aside), and every node whose values do not
    depend on the image (anchor grids and strides computed from shapes)."""
    static = {i.name for i in graph.initializer}  # values from weights, constants or a Shape alone
    fixed: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type in ("Shape", "Constant") or all(not i or i in static for i in node.input):
            static.update(node.output)
            fixed += [node] if node.op_type != "Constant" else []
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)

    def after(node: onnx.NodeProto) -> dict[str, onnx.NodeProto]:
        seen, stack = {}, [node]
        while stack:
            n = stack.pop()
            if n.name not in seen:
                seen[n.name] = n
                stack += [c for out in n.output for c in consumers.get(out, [])]
        return seen

    def joins_levels(node: onnx.NodeProto) -> bool:
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        parents = [producer.get(i) for i in node.input]
        return node.op_type == "Concat" and axis in (2, -1) and len(parents) >= 3 and all(
            i not in static and p is not None and p.op_type in ("Reshape", "Flatten")
            for i, p in zip(node.input, parents, strict=True))

    def learned(node: onnx.NodeProto) -> bool:
        softmax_in = getattr(producer.get(node.input[0]), "op_type", "") == "Softmax"
        return node.op_type in ("Conv", "MatMul", "Gemm") and not softmax_in

    decode: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        if joins_levels(node):
            tail = after(node)
            if not any(learned(n) for n in tail.values()):
                decode.update(tail)
    fixed_names = {n.name for n in fixed}
    stack = [producer[i] for n in decode.values() for i in n.input if i in producer]
    while stack:  # the image-independent nodes that feed the decode (anchor grids, strides)
        n = stack.pop()
        if n.name in fixed_names and n.name not in decode:
            decode[n.name] = n
            stack += [producer[i] for i in n.input if i in producer]
    return list(decode)


def inline_initializer_aliases(model: onnx.ModelProto) -> int:
    """Replace every Identity node that reads an initializer by a copy of that initializer under the node's
    output name; returns how many. torch's exporter shares equal tensors that way (the zero biases that an untrained
    model's folded BatchNorms leave, equal weights), and ONNX Runtime's quantizer quantizes only the weights and
    biases it finds as initializers: a Conv whose bias sits behind an Identity kept a float bias, which ONNX
    Runtime cannot fuse into QLinearConv, so it ran the whole Conv in float between a DequantizeLinear and a
    QuantizeLinear (14 of 111 Convs in mobilenetv3_large_lite with a depthwise neck and head)."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    aliases = [n for n in graph.node if n.op_type == "Identity" and n.input[0] in initializers]
    for node in aliases:
        copy = onnx.TensorProto()
        copy.CopyFrom(initializers[node.input[0]])
        copy.name = node.output[0]
        graph.initializer.append(copy)
        graph.node.remove(node)
    return len(aliases)


def slow_int8_convs(graph: onnx.GraphProto) -> list[str]:
    """Grouped Convs other than plain depthwise ones (depthwise with a channel multiplier, grouped 1x1): ONNX
    Runtime's QLinearConv has no fast kernel for them and ran Mobile-Former's depthwise convs with 2-6x
    multipliers ~10x slower than float (25 ms against 2.4 ms of a 1-thread run at 320), so they stay float."""
    dims = {t.name: list(t.dims) for t in graph.initializer}
    slow = []
    for node in graph.node:
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        weight = dims.get(node.input[1], []) if node.op_type == "Conv" and len(node.input) > 1 else []
        if groups > 1 and len(weight) == 4 and not (weight[1] == 1 and weight[0] == groups):
            slow.append(node.name)
    return slow


def drop_output_qdq(model: onnx.ModelProto, names: Iterable[str]) -> int:
    """Remove the QuantizeLinear -> DequantizeLinear pairs on the outputs of the nodes ``names``, or of a Relu or
    Clip that alone follows one (their readers take the float tensor instead); returns how many pairs. A node the
    quantizer kept float still ran quantized when its neighbours put a pair on each side of it: ONNX Runtime fuses
    DequantizeLinear -> Softmax -> QuantizeLinear into QLinearSoftmax (MobileViT's attention: 31 ms against 2.1 in
    float, 1 thread at 320), and quantizes the float weights of such a Conv itself (its WeightBiasQuantization
    pass). Without the pair after them they stay float."""
    graph = model.graph
    names = set(names)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    outputs = set()
    for node in graph.node:
        if node.name in names:
            out = node.output[0]
            outputs.add(out)
            # a Relu or Clip alone after it: ONNX Runtime fuses it into the Conv and looks for the pair after it
            while len(consumers.get(out, [])) == 1 and consumers[out][0].op_type in ("Relu", "Clip"):
                out = consumers[out][0].output[0]
                outputs.add(out)
    graph_outputs = {o.name for o in graph.output}
    dropped = 0
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in outputs]:
        dqs = [d for d in consumers.get(q.output[0], []) if d.op_type == "DequantizeLinear"]
        if len(dqs) != len(consumers.get(q.output[0], [])) or q.output[0] in graph_outputs:
            continue  # something reads the quantized tensor itself: leave the pair
        for dq in dqs:
            for reader in consumers.get(dq.output[0], []):
                reader.input[:] = [q.input[0] if i == dq.output[0] else i for i in reader.input]
            for o in graph.output:
                if o.name == dq.output[0]:
                    o.name = q.input[0]
            graph.node.remove(dq)
        graph.node.remove(q)
        dropped += 1
    return dropped


def calibration_chunk(n: int, most: int = CALIB_CHUNK) -> int:
    """The largest divisor of ``n`` not above ``most``: ONNX Runtime's chunked calibration wants equal chunks."""
    return max(d for d in range(1, min(n, most) + 1) if n % d == 0)


def float_nodes(graph: onnx.GraphProto, keep_float: Sequence[str] = KEEP_FLOAT) -> list[str]:
    """The nodes to leave in float: ``decode`` (the box decode), ``softmax`` (every Softmax)."""
    unknown = set(keep_float) - set(KEEP_FLOAT)
    if unknown:
        raise ValueError(f"keep_float: unknown part(s) {sorted(unknown)}; valid: {list(KEEP_FLOAT)}")
    names = decode_nodes(graph) if "decode" in keep_float else []
    if "softmax" in keep_float:
        names += [n.name for n in graph.node if n.op_type == "Softmax" and n.name not in names]
    return names


def _named_op(error: Exception, graph: onnx.GraphProto) -> str:
    """The operator an ONNX Runtime error is about (its message names a node or an op type), else ''."""
    text = str(error)
    match = re.search(r"implementation for (\w+)", text) or re.search(r"[Oo]p(?:erator)? ?type[: ]+'?(\w+)", text)
    if match:
        return match.group(1)
    by_name = {n.name: n.op_type for n in graph.node if n.name}
    for name, op in by_name.items():
        if name in text:
            return op
    return ""


def quantize_onnx(float_path: str | Path, output: str | Path, images: Sequence[np.ndarray | str | Path],
                  imgsz: int, method: str = CALIB_METHOD, keep_float: Sequence[str] = KEEP_FLOAT,
                  per_channel: bool = True, reduce_range: bool = False,
                  chunk: int = CALIB_CHUNK) -> dict[str, Any]:
    """Quantize ``float_path`` to ``output`` (QDQ), calibrated on ``images`` letterboxed to ``imgsz``, at most
    ``chunk`` images' activations in memory at a time; the output is loaded once in ONNX Runtime. Returns what
    was done (nodes kept float, QDQ counts, seconds)."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIB_METHODS:
        raise ValueError(f"calibration method '{method}': choose one of {', '.join(CALIB_METHODS)}")
    if not images:
        raise ValueError("INT8 calibration needs at least one image")
    graph = onnx.load(str(float_path))
    if any(o.name == "count" for o in graph.graph.output):
        raise ValueError("--int8 quantizes the model's raw (B, 4 + nc, N) output: export it without --nms")
    inline_initializer_aliases(graph)
    excluded = float_nodes(graph.graph, keep_float)
    excluded += [n for n in slow_int8_convs(graph.graph) if n not in excluded]
    reader = calibration_reader(images, graph.graph.input[0].name, imgsz)
    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    output = Path(output)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="yolo_mobile_int8_") as tmp:
        staged = Path(tmp) / output.name
        inlined = Path(tmp) / "float_inlined.onnx"
        onnx.save(graph, str(inlined))
        logging.disable(logging.WARNING)  # the quantizer logs advice to the root logger on every call
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its histogram calibraters print per chunk
                quantize_static(str(inlined), str(staged), reader, quant_format=QuantFormat.QDQ,
                                per_channel=per_channel, reduce_range=reduce_range,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=calibrate, nodes_to_exclude=excluded,
                                calibration_providers=["CPUExecutionProvider"],
                                # despite its name the option chunks every method: ranges (min-max) and
                                # histograms (entropy, percentile) are merged chunk by chunk
                                extra_options={"CalibStridedMinMax": calibration_chunk(len(images), chunk)})
        except Exception as e:  # the quantizer raises bare Exceptions and assertion errors on ops it cannot handle
            op = _named_op(e, graph.graph)
            raise QuantizationError(f"{float_path}: ONNX Runtime cannot quantize this graph"
                                    + (f" (operator {op})" if op else "") + f": {e}") from e
        finally:
            logging.disable(logging.NOTSET)
        quantized = onnx.load(str(staged))
        drop_output_qdq(quantized, excluded)
        meta = {p.key: p.value for p in graph.metadata_props}
        meta["quantization"] = json.dumps({"format": "QDQ", "weights": "int8 per-channel" if per_channel else "int8",
                                           "activations": "uint8", "calibration": method, "images": len(images),
                                           "reduce_range": reduce_range, "float_nodes": len(excluded)})
        del quantized.metadata_props[:]
        for k, v in meta.items():
            quantized.metadata_props.add(key=k, value=v)
        onnx.save(quantized, str(staged))
        try:
            ort.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
        except Exception as e:  # a kernel ONNX Runtime lacks for a quantized op
            op = _named_op(e, quantized.graph)
            raise QuantizationError(f"{float_path}: ONNX Runtime cannot run the quantized graph"
                                    + (f" (operator {op})" if op else "") + f": {e}") from e
        with files.staged(output) as partial:
            shutil.copyfile(staged, partial)
    ops = [n.op_type for n in quantized.graph.node]
    return {"path": output, "size_mb": output.stat().st_size / 2**20, "quantize_s": time.perf_counter() - start,
            "float_nodes": excluded, "quantize_linear": ops.count("QuantizeLinear"),
            "calibration_images": len(images), "method": method}


def calibration_split(data: str | Path, calib_images: int, workdir: Path, seed: int = 0) -> tuple[list[Path], Path]:
    """(calibration images drawn from the train split, the data YAML to evaluate on): ``data`` itself when it
    has a val split apart from train, else a YAML in ``workdir`` whose val split is ``calib_images`` further
    train images, held apart from calibration."""
    import yaml

    from ..config import load_data_config

    config = load_data_config(data)
    train = list(config.split("train").images)
    if not train:
        raise ValueError(f"{config.source}: INT8 calibration needs a YOLO-format train split (a folder or .txt)")
    order = np.random.default_rng(seed).permutation(len(train))
    calib = [train[i] for i in order[:calib_images]]
    if config.splits.get("val") not in (None, "", config.splits.get("train")):
        return calib, Path(config.source)
    held = [train[i] for i in order[calib_images:2 * calib_images]]
    if not held:
        raise ValueError(f"{config.source}: no val split, and the train split has no images left after "
                         f"{calib_images} for calibration: lower --calib-images")
    (workdir / "calibration.txt").write_text("".join(f"{p.resolve()}\n" for p in calib))
    (workdir / "held_apart.txt").write_text("".join(f"{p.resolve()}\n" for p in held))
    held_yaml = workdir / "held_apart.yaml"
    held_yaml.write_text(yaml.safe_dump({"path": str(workdir), "train": "calibration.txt", "val": "held_apart.txt",
                                         "names": config.names}))
    return calib, held_yaml


def onnx_map(path: str | Path, data: str | Path, imgsz: int) -> dict[str, Any]:
    """COCO mAP of an ONNX file on the val split of ``data``."""
    from ..engine.validate import validate
    from ..runtimes import OnnxRuntime

    return validate(OnnxRuntime(path), data, split="val", imgsz=imgsz, progress=False)


def export_int8(model, output: str | Path, data: str | Path, imgsz: int = 640, calib_images: int = 256,
                method: str = CALIB_METHOD, keep_float: Sequence[str] = KEEP_FLOAT, opset: int = 17,
                evaluate: bool = True, runs: int = 20) -> dict[str, Any]:
    """Export ``model`` to float ONNX (parity-checked), quantize it calibrated on ``calib_images`` letterboxed
    train images of ``data``, then measure float and INT8 mAP50-95 (val split, or held-apart train images) and
    ONNX Runtime latency, interleaved. The INT8 file is written only when every step passed."""
    from ..runtimes.onnxrt import onnx_latency
    from .onnx import export_onnx

    if calib_images < 1:
        raise ValueError(f"--calib-images must be at least 1, got {calib_images}")
    output = Path(output)
    files.check_writable(output.parent)  # before the export, calibration and evaluation, not after
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="yolo_mobile_int8_") as tmp:
        calib, eval_data = calibration_split(data, calib_images, Path(tmp))
        float_path = Path(tmp) / "float.onnx"
        report["float"] = export_onnx(model, float_path, imgsz=imgsz, opset=opset)
        staged = Path(tmp) / output.name
        report.update(quantize_onnx(float_path, staged, calib, imgsz, method=method, keep_float=keep_float))
        if evaluate:
            report["map_float"] = onnx_map(float_path, eval_data, imgsz)
            report["map_int8"] = onnx_map(staged, eval_data, imgsz)
            held_apart = eval_data.parent == Path(tmp)
            report["evaluated_on"] = f"{calib_images} train images held apart" if held_apart else "the val split"
        times = onnx_latency({"float": float_path, "int8": staged}, imgsz, runs=runs, warmup=3)
        report["ms_float"], report["ms_int8"] = times["float"]["median_ms"], times["int8"]["median_ms"]
        with files.staged(output) as partial:
            shutil.copyfile(staged, partial)
    report.update(path=output, precision="int8", keep_float=list(keep_float))
    return ExportReport("onnx", imgsz, report)
