"""Where a model's time goes: ONNX Runtime's per-operator profile and torch.profiler's, side by side.

    python scripts/profile_model.py --cfg emo_1m.yaml mobilevit_xxs.yaml --imgsz 640 --threads 1
    python scripts/profile_model.py --onnx best.onnx best_int8.onnx --imgsz 320     # exported files, ORT only
    python scripts/profile_model.py --cfg mobilenetv3_large_lite.yaml yolov5nu.yaml --imgsz 320 --int8

ONNX Runtime: each node's kernel time is the minimum over ``--runs`` runs (robust to a noisy machine), summed by
operator type; with ``--conv-kinds``, convolutions are split by kind (dense, depthwise, depthwise with a channel
multiplier, grouped; kernel size), read from the graph ONNX Runtime optimised; with ``--by-module N``, summed by the
first N parts of the module path in each node's name instead (1: backbone, neck, head; 2: neck.td4, head.box.0, ...;
the head's decode, outside any submodule, as ``head: decode``). PyTorch: self CPU time per aten operator of the
fused channels_last model, over the same runs. One thread by default, so the figures add up and do not depend on the
other core's load.
"""

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from yolo_mobile import build_model
from yolo_mobile.benchmark import ULTRALYTICS_MODELS, UltralyticsDetector, shapes_images
from yolo_mobile.detector import count_flops, inference_copy
from yolo_mobile.export.int8 import quantize_onnx
from yolo_mobile.export.onnx import export_onnx


def conv_kinds(path: Path) -> dict[str, str]:
    """Node name -> 'dense 3x3', 'depthwise 3x3', 'depthwise 3x3 x4 multiplier', 'grouped 1x1 (4 groups)'; a
    QLinearConv (ONNX Runtime's INT8 convolution) is prefixed 'QLinear'."""
    import onnx

    graph = onnx.load(str(path)).graph
    dims = {t.name: list(t.dims) for t in graph.initializer}
    kinds = {}
    for node in graph.node:
        weight = node.input[3] if node.op_type == "QLinearConv" else node.input[1] if len(node.input) > 1 else ""
        if not node.op_type.endswith("Conv") or len(dims.get(weight, [])) != 4:
            continue
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        c_out, c_in_per_group, kh, kw = dims[weight]
        size, conv = f"{kh}x{kw}", "QLinearConv" if node.op_type == "QLinearConv" else "Conv"
        if groups == 1:
            kinds[node.name] = f"{conv} dense {size}"
        elif c_in_per_group == 1:
            multiplier = c_out // groups
            kinds[node.name] = f"{conv} depthwise {size}" + (f" x{multiplier} multiplier" if multiplier > 1 else "")
        else:
            kinds[node.name] = f"{conv} grouped {size} ({groups} groups)"
    return kinds


def module_of(node: str, depth: int) -> str:
    """'/neck/td4/cv1/conv/Conv' -> 'neck' (depth 1) or 'neck.td4' (depth 2); a node of the top module -> 'other',
    one of a module's own ops (the head's decode: '/head/Softmax') -> 'head: decode'."""
    parts = node.removesuffix("_kernel_time").split("/")[1:-1]
    if not parts:
        return "other"
    if len(parts) == 1:
        return f"{parts[0]}: decode" if parts[0] == "head" else parts[0]
    return ".".join(parts[:depth])


def ort_profile(path: Path, imgsz: int, runs: int, threads: int, by_conv_kind: bool = False,
                by_module: int = 0) -> dict[str, float]:
    import onnxruntime as ort

    kinds = {}
    if by_conv_kind:  # node names of the graph as optimised, which is what the profile reports
        optimised = path.with_suffix(".optimised.onnx")
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(optimised)
        options.intra_op_num_threads = threads
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        kinds = conv_kinds(optimised)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    for _ in range(runs):
        session.run(None, {session.get_inputs()[0].name: x})
    events = json.loads(Path(session.end_profiling()).read_text())
    per_node: dict[str, list[int]] = collections.defaultdict(list)
    op_of = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[e["name"]].append(e["dur"])
            op_of[e["name"]] = module_of(e["name"], by_module) if by_module else kinds.get(
                e["name"].removesuffix("_kernel_time"), e["args"]["op_name"])
    by_op: collections.Counter = collections.Counter()
    for node, durations in per_node.items():
        by_op[op_of[node]] += min(durations) / 1000
    return dict(by_op.most_common())


def torch_profile(model, imgsz: int, runs: int) -> dict[str, float]:
    x = torch.rand(1, 3, imgsz, imgsz).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)
        with torch.profiler.profile() as prof:
            for _ in range(runs):
                model(x)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return {e.key: e.self_cpu_time_total / 1000 / runs for e in rows}


def table(title: str, times: dict[str, float], top: int) -> str:
    total = sum(times.values())
    lines = [f"{title}: {total:.1f} ms", "| op | ms | share |", "|---|---:|---:|"]
    lines += [f"| {op} | {ms:.1f} | {100 * ms / total:.1f}% |" for op, ms in list(times.items())[:top]]
    return "\n".join(lines)


def build(cfg: str):
    """Our model YAML, or one of ultralytics' three by name (yolov5nu.yaml, yolov8n.yaml, yolo11n.yaml)."""
    if cfg in ULTRALYTICS_MODELS:
        return UltralyticsDetector(cfg)
    return build_model(cfg, pretrained=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--cfg", nargs="+", help="model YAMLs, built-in names, or ultralytics' yolov5nu.yaml, "
                                                "yolov8n.yaml, yolo11n.yaml")
    group.add_argument("--onnx", nargs="+", type=Path, help="exported files (float or INT8): ONNX Runtime only")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--conv-kinds", action="store_true", help="split ONNX Runtime's Conv time by kind")
    parser.add_argument("--by-module", type=int, default=0, metavar="N",
                        help="sum ONNX Runtime's time by the first N parts of each node's module path")
    parser.add_argument("--int8", action="store_true",
                        help="--cfg: also profile the INT8 file (the benchmark's: min-max on 16 drawn images), and "
                             "end with a table of float and INT8 totals")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def ort_table(path: Path) -> tuple[str, float]:
        times = ort_profile(path, args.imgsz, args.runs, args.threads, args.conv_kinds, args.by_module)
        return table("ONNX Runtime, sum of per-node minimum kernel time", times, args.top), sum(times.values())

    for path in args.onnx or []:
        with tempfile.TemporaryDirectory() as tmp:  # the profile's JSON goes there
            copy = Path(tmp) / path.name
            copy.write_bytes(path.read_bytes())
            print(f"## {path} at {args.imgsz}, {args.threads} thread(s)\n")
            print(ort_table(copy)[0] + "\n")
    totals = []
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in args.cfg or []:
            model = build(cfg)
            gflops = count_flops(model, torch.zeros(1, 3, args.imgsz, args.imgsz)) / 1e9
            path = Path(tmp) / f"{Path(cfg).stem}.onnx"
            export_onnx(model, path, imgsz=args.imgsz)
            print(f"## {cfg} at {args.imgsz}: {gflops:.2f} GFLOPs, {args.threads} thread(s)\n")
            text, float_ms = ort_table(path)
            print(text + "\n")
            if args.int8:
                int8_path = path.with_name(path.stem + "_int8.onnx")
                quantize_onnx(path, int8_path, shapes_images(args.imgsz), args.imgsz, method="minmax")
                text, int8_ms = ort_table(int8_path)
                print(f"INT8 file\n\n{text}\n")
                totals.append(f"| {Path(cfg).stem} | {gflops:.2f} | {float_ms:.1f} | {int8_ms:.1f} | "
                              f"{int8_ms / float_ms:.2f} |")
            print(table("PyTorch eager, self CPU time per run", torch_profile(inference_copy(model), args.imgsz,
                                                                                 args.runs), args.top) + "\n")
    if totals:
        print(f"| model | GFLOPs @{args.imgsz} | ORT float ms | ORT INT8 ms | INT8 / float |")
        print("\n".join(["|---|---:|---:|---:|---:|", *totals]))


if __name__ == "__main__":
    main()
