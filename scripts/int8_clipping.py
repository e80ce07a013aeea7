"""Where an INT8 file's accuracy comes from: rounding to 8 bits, or clipping every activation to its calibrated range.

    python scripts/int8_clipping.py --weights best.pt --calib-method minmax --calib-images 16

Scores, on the val split, the float file, the INT8 file, and float files that copy only the INT8 file's activation
ranges: each QuantizeLinear/DequantizeLinear pair on an activation becomes a Clip to the range the pair can hold,
the weights stay float. ONNX Runtime's quantizer drops a Relu (or Clip) in front of a QuantizeLinear, its range
starting at 0 doing the same work, so every row puts a lower bound of 0 back where a range starts at exactly 0; the
row with nothing else clipped must score what the float file scores, and the script says so when it does not.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from yolo_mobile.api import load_model
from yolo_mobile.config import load_data_config
from yolo_mobile.datasets.synthetic import resolve_data
from yolo_mobile.export.int8 import (
    CALIB_METHODS,
    calibration_split,
    inline_initializer_aliases,
    onnx_map,
    quantize_onnx,
)
from yolo_mobile.export.onnx import export_onnx

PARTS = ("backbone", "neck", "head")  # the detector's top-level modules, as the exported node names begin


def clipped_float(int8: onnx.ModelProto, floats: onnx.ModelProto, clip_part: str | None) -> onnx.ModelProto:
    """A float model with the INT8 file's activation ranges as Clips: every range where ``clip_part`` is "all",
    only the activations whose producer's name starts with ``/clip_part`` otherwise, and lower bounds of 0 only
    (the Relus the quantizer dropped) where it is None."""
    model = onnx.ModelProto()
    model.CopyFrom(int8)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    named = onnx.ModelProto()
    named.CopyFrom(floats)
    inline_initializer_aliases(named)  # the names quantize_onnx gave shared weights
    float_weights = {i.name: i for i in named.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    dropped, added, bounds = set(), [], []
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:  # a weight: its float value instead
            weight = onnx.TensorProto()
            weight.CopyFrom(float_weights[node.input[0].removesuffix("_quantized")])
            weight.name = node.output[0]
            bounds.append(weight)
            dropped.add(node.name)
        elif node.op_type == "QuantizeLinear" and node.input[0] not in inits:
            scale = float(numpy_helper.to_array(inits[node.input[1]]))
            zero = numpy_helper.to_array(inits[node.input[2]])
            low, high = ((float(v) - float(zero)) * scale for v in (np.iinfo(zero.dtype).min, np.iinfo(zero.dtype).max))
            if not (clip_part == "all" or (clip_part and node.input[0].startswith(f"/{clip_part}/"))):
                low, high = (0.0 if low == 0 else -np.inf), np.inf
            dropped.add(node.name)
            for dequantize in readers[node.output[0]]:
                out = dequantize.output[0]
                bounds += [numpy_helper.from_array(np.array(v, np.float32), f"{out}_{side}")
                           for v, side in ((max(low, -3e38), "low"), (min(high, 3e38), "high"))]
                added.append(helper.make_node("Clip", [node.input[0], f"{out}_low", f"{out}_high"], [out],
                                              name=f"{dequantize.name}_clip"))
                dropped.add(dequantize.name)
    nodes = [n for n in graph.node if n.name not in dropped] + added
    graph.initializer.extend(bounds)
    del graph.node[:]
    graph.node.extend(_topological(nodes, {i.name for i in graph.input} | {i.name for i in graph.initializer}))
    return model


def _topological(nodes: list[onnx.NodeProto], known: set[str]) -> list[onnx.NodeProto]:
    ordered, waiting = [], nodes
    while waiting:
        ready = [n for n in waiting if all(not i or i in known for i in n.input)]
        if not ready:
            raise ValueError("the rebuilt graph has a node whose inputs nothing produces")
        for node in ready:
            known.update(node.output)
        ordered += ready
        waiting = [n for n in waiting if n not in ready]
    return ordered


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="a trained checkpoint")
    p.add_argument("--data", help="data YAML or shapes (default: the checkpoint's training data)")
    p.add_argument("--imgsz", type=int, help="default: the checkpoint's training size")
    p.add_argument("--calib-method", default="entropy", choices=CALIB_METHODS)
    p.add_argument("--calib-images", type=int, default=256)
    args = p.parse_args()

    model = load_model(args.weights).eval()
    data = resolve_data(args.data or model.train_data)
    imgsz = args.imgsz or model.train_imgsz
    load_data_config(data)
    with tempfile.TemporaryDirectory(prefix="int8_clipping_") as tmp:
        tmp = Path(tmp)
        export_onnx(model, tmp / "float.onnx", imgsz=imgsz)
        calib, eval_data = calibration_split(data, args.calib_images, tmp)
        quantize_onnx(tmp / "float.onnx", tmp / "int8.onnx", calib, imgsz, method=args.calib_method)
        int8, floats = onnx.load(str(tmp / "int8.onnx")), onnx.load(str(tmp / "float.onnx"))
        rows = [("float", tmp / "float.onnx"), ("INT8", tmp / "int8.onnx")]
        for part in (None, "all", *PARTS):
            path = tmp / f"clip_{part}.onnx"
            onnx.save(clipped_float(int8, floats, part), str(path))
            name = "float, Relu bounds only" if part is None else f"float, {part} activations clipped"
            rows.append((name, path))
        scores = {}
        for name, path in rows:
            scores[name] = onnx_map(path, eval_data, imgsz)
            print(f"{name}: mAP50-95 {scores[name]['map']:.4f}", flush=True)
    print(f"\n{args.weights} at {imgsz}, {args.calib_method} calibration on {len(calib)} images\n")
    print("| file | mAP50-95 | mAP50 |\n|---|---:|---:|")
    for name, m in scores.items():
        print(f"| {name} | {m['map']:.4f} | {m['map50']:.4f} |")
    if abs(scores["float, Relu bounds only"]["map"] - scores["float"]["map"]) > 1e-3:
        print("\nthe Relu-bounds-only file does not score as the float file: a range that starts at 0 was not a "
              "dropped Relu here, and the clipped rows mix in that change")


if __name__ == "__main__":
    main()
