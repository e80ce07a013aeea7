"""How much memory a training step needs, per model and input size: a fixed part and a part per image.

    python scripts/train_memory.py --cfg mobilevit_s.yaml mobilenetv3_large.yaml --imgsz 320 640 --batch 1 4

Each (model, size, batch) is measured by ``yolo_mobile.benchmark.train_step_peak_memory_mb`` (train-mode
forward, DetectionLoss, backward; the peak above the built model) in a fresh process, so no measurement
inherits another's heap. The fixed and per-image MB are the line through the batch sizes' peaks (least squares
when more than two). The attention column says how a training step computes attention
(``yolo_mobile.benchmark.train_step_attention``): ``fused`` is scaled_dot_product_attention on a fused kernel.
"""

import argparse
import multiprocessing
import os
from pathlib import Path

import numpy as np
import torch

from yolo_mobile import build_model
from yolo_mobile.benchmark import cpu_name, train_step_attention, train_step_peak_memory_mb


def peak_mb(cfg: str, imgsz: int, batch: int, device: str) -> float | None:
    return train_step_peak_memory_mb(build_model(cfg, pretrained=False), imgsz, batch, device)


def attention(cfg: str, imgsz: int, device: str) -> str:
    return train_step_attention(build_model(cfg, pretrained=False), imgsz, device)


def in_fresh_process(fn, *args):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cfg", nargs="+", required=True, help="model YAMLs or built-in names")
    parser.add_argument("--imgsz", nargs="+", type=int, default=[320, 640])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4], help="at least two batch sizes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--at-batch", type=int, default=16, help="also show the fitted need at this batch")
    parser.add_argument("--attention-imgsz", type=int, default=128, help="input size of the attention check")
    args = parser.parse_args()
    batches = sorted(set(args.batch))
    if len(batches) < 2:
        parser.error("--batch needs at least two different sizes to separate fixed and per-image memory")

    peaks = " | ".join(f"MB @{b}" for b in batches)
    print(f"| model | size | {peaks} | MB fixed | MB per image | MB @{args.at_batch} (fit) | attention |")
    print("|---" + "|---:" * (len(batches) + 4) + "|---|")
    for cfg in args.cfg:
        kind = in_fresh_process(attention, cfg, args.attention_imgsz, args.device)
        for imgsz in args.imgsz:
            mb = [in_fresh_process(peak_mb, cfg, imgsz, b, args.device) for b in batches]
            if any(m is None for m in mb):
                cells = ["-"] * (len(batches) + 3)
            else:
                per_image, fixed = np.polyfit(batches, mb, 1)
                cells = [f"{m:.0f}" for m in mb] + [f"{fixed:.0f}", f"{per_image:.0f}",
                                                    f"{fixed + per_image * args.at_batch:.0f}"]
            print(f"| {Path(cfg).name.removesuffix('.yaml')} | {imgsz} | {' | '.join(cells)} | {kind} |", flush=True)
    where = "CPU peak resident set (VmHWM)" if args.device == "cpu" else "CUDA allocator peak"
    print(f"\nTraining step (train-mode forward + DetectionLoss + backward, float32) on {args.device} "
          f"({cpu_name()}, {os.cpu_count()} cores), torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{where} above the built model, each measurement in a fresh process.")


if __name__ == "__main__":
    main()
