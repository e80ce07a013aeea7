"""ConViT's gated positional self-attention: timm's GPSA.forward against ours (``yolo_mobile.backbones.vit.gpsa``),
one ConViT-Ti block's attention on the patch grid of a square input, where timm's own grid is right.

    python scripts/bench_gpsa.py --imgsz 224 640 --runs 10 --threads 1

The two run interleaved (timm, ours, timm, ours, ...) so a busy machine slows both alike; the table gives the
median milliseconds of each, their ratio and the largest difference between their outputs.
"""

import argparse
import statistics
import time

import timm
import torch

from yolo_mobile.backbones.vit import gpsa, grid_offsets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imgsz", type=int, nargs="+", default=[224, 640])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="convit_tiny")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    attn = timm.create_model(args.model).blocks[0].attn.eval()
    print(f"| {args.model} GPSA, input | tokens | timm ms | ours ms | timm / ours | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for size in args.imgsz:
        side = size // 16
        x = torch.randn(1, side * side, attn.dim)
        offsets = grid_offsets(side, side, x.dtype, x.device)
        times: dict[str, list[float]] = {"timm": [], "ours": []}
        runs = {"timm": lambda: attn(x), "ours": lambda: gpsa(attn, x, offsets)}  # noqa: B023 (called in the loop)
        with torch.no_grad():
            diff = (runs["timm"]() - runs["ours"]()).abs().max().item()  # also the warm-up
            for _ in range(args.runs):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run()
                    times[name].append(1000 * (time.perf_counter() - start))
        timm_ms, ours_ms = statistics.median(times["timm"]), statistics.median(times["ours"])
        print(f"| {size}x{size} | {side * side} | {timm_ms:.1f} | {ours_ms:.1f} | {timm_ms / ours_ms:.2f} | "
              f"{diff:.1e} |")


if __name__ == "__main__":
    main()
