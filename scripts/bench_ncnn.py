"""ncnn beside ONNX Runtime on one model, to tell how yolo-mobile drives ncnn from ncnn's own speed: the same
export run by ``NcnnRuntime`` (ours) and by a bare ncnn loop (Net, one Extractor per image, nothing else), at the
thread count ORT gets, and ncnn and ORT at 1 thread, timed interleaved. ``--busy N`` starts N spinning processes for
the run, to show what a busy machine does to each runtime. Prints median ms, the ratios to ORT and the load
average.

    python scripts/bench_ncnn.py [--cfg yolov5n.yaml] [--imgsz 320] [--runs 30] [--busy 0]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from yolo_mobile import build_model
from yolo_mobile.export.ncnn import export_ncnn
from yolo_mobile.export.onnx import export_onnx
from yolo_mobile.resources import usable_cpus
from yolo_mobile.runtimes import NcnnRuntime, OnnxRuntime
from yolo_mobile.runtimes.ncnn import NCNN_PARAM, NCNN_WEIGHTS
from yolo_mobile.runtimes.timing import interleaved_latency


def spin() -> None:
    while True:
        pass


def bare_ncnn(folder: Path, threads: int, x: np.ndarray):
    """ncnn as its own examples drive it: options, load, then per image an Extractor, input, extract."""
    import ncnn

    net = ncnn.Net()
    net.opt.num_threads = threads
    net.opt.use_fp16_storage = net.opt.use_fp16_packed = net.opt.use_fp16_arithmetic = False  # a float32 export
    net.load_param(str(folder / NCNN_PARAM))
    net.load_model(str(folder / NCNN_WEIGHTS))
    image = ncnn.Mat(x[0])

    def run():
        extractor = net.create_extractor()
        extractor.input("in0", image)
        return np.array(extractor.extract("out0")[1])

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", default="yolov5n.yaml")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--busy", type=int, default=0, help="spinning processes started for the timed run")
    args = parser.parse_args()
    threads = usable_cpus()
    model = build_model(args.cfg).eval()
    x = np.random.default_rng(0).random((1, 3, args.imgsz, args.imgsz), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, folder = Path(tmp) / "m.onnx", Path(tmp) / "m_ncnn"
        export_onnx(model, onnx_path, imgsz=args.imgsz)
        export_ncnn(model, folder, imgsz=args.imgsz)
        session, single = OnnxRuntime(onnx_path, threads=threads), OnnxRuntime(onnx_path, threads=1)
        ours = NcnnRuntime(folder, threads)
        tensor = torch.from_numpy(x)
        calls = {f"ORT {threads}t": lambda: session.run(x),
                 f"ncnn ours {threads}t": lambda: ours(tensor),
                 f"ncnn bare {threads}t": bare_ncnn(folder, threads, x),
                 "ORT 1t": lambda: single.run(x),
                 "ncnn bare 1t": bare_ncnn(folder, 1, x)}
        spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.busy)]
        for p in spinners:
            p.start()
        load = os.getloadavg()[0]
        try:
            times = interleaved_latency(calls, runs=args.runs, warmup=3)
        finally:
            for p in spinners:
                p.terminate()
    base = times[f"ORT {threads}t"]["median_ms"]
    print(f"{args.cfg} at {args.imgsz}, {threads} usable CPUs, {args.busy} spinning process(es), load average "
          f"{load:.2f} -> {os.getloadavg()[0]:.2f}")
    for name, t in times.items():
        print(f"  {name:16s} {t['median_ms']:8.1f} ms (p90 {t['p90_ms']:8.1f})  x{t['median_ms'] / base:.2f} of ORT")


if __name__ == "__main__":
    main()
