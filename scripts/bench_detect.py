"""End-to-end video detection speed, ours against ultralytics, interleaved in one run: read, letterbox, forward,
NMS, draw and write the annotated video.

    python scripts/bench_detect.py --frames 80 --rounds 5 --imgsz 640
    python scripts/bench_detect.py --pairs yolov5n.yaml:yolov5nu.yaml mobilenetv3_large.yaml:yolov8n.yaml

Ours: ``yolo_mobile.engine.predictor.detect`` on ``yolo_mobile.runtimes.load_runtime(cfg=...)``, saving the video as
the CLI does.
Theirs: ``YOLO(yaml).predict(source, stream=True, save=True, verbose=False)``, iterated. Both untrained (built
from YAML, no download), on CPU, at the same conf and iou. Without ``--video`` a 16:9 video is made from coco128
images (letterboxed with the package's letterbox, written with mp4v). Each round runs every model once in turn;
round 0 is a warm-up and the median frames/s of the others is reported.
"""

import os

os.environ.setdefault("YOLO_OFFLINE", "1")  # before anything imports ultralytics

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import torch

from yolo_mobile.datasets.labels import read_image
from yolo_mobile.datasets.letterbox import letterbox
from yolo_mobile.engine.predictor import detect, resolve_source
from yolo_mobile.runtimes import load_runtime

COCO128 = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "coco128" / "images"


def make_video(path: Path, frames: int, size: tuple[int, int], images: Path, fps: float = 30.0) -> Path:
    """``frames`` images letterboxed to ``size`` = (width, height), written with mp4v."""
    files = sorted(images.rglob("*.jpg"))
    if not files:
        sys.exit(f"no images under {images}: pass --video or --images")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for k in range(frames):
        rgb, _ = letterbox(read_image(files[k % len(files)]), (size[1], size[0]))
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def run_ours(backend, video: Path, out: Path, args) -> dict:
    t, cpu = time.perf_counter(), time.process_time()
    stats = detect(backend, video, out, imgsz=args.imgsz, conf=args.conf, iou=args.iou, progress=False,
                   threads=args.threads, workers=args.workers, overlap=not args.no_overlap)
    ms = stats["ms_per_frame"]
    return {"s": time.perf_counter() - t, "cpu": time.process_time() - cpu, "frames": stats["frames"],
            "boxes": stats["boxes"],
            "shape": stats["shape"], "parallel": (stats["workers"], stats["threads"]),
            "ms": {"read": ms["read"], "pre": ms["pre"], "inference": ms["inference"], "nms": ms["nms"],
                   "draw+write": ms["draw"]}}


def run_theirs(model, video: Path, out: Path, args) -> dict:
    shapes = set()
    if model.predictor is not None:  # after the first run: note the input size, a function call per frame
        predictor = model.predictor
        preprocess = predictor.__class__.preprocess.__get__(predictor)

        def noting(im):
            x = preprocess(im)
            shapes.add(tuple(x.shape[2:]))
            return x

        predictor.preprocess = noting
    t, cpu = time.perf_counter(), time.process_time()
    frames = boxes = 0
    for r in model.predict(source=str(video), imgsz=args.imgsz, conf=args.conf, iou=args.iou, save=True,
                           stream=True, verbose=False, device="cpu", project=str(out.parent), name=out.name,
                           exist_ok=True):
        frames += 1
        boxes += len(r.boxes)
    elapsed, cpu = time.perf_counter() - t, time.process_time() - cpu
    speed = model.predictor.speed or {}
    return {"s": elapsed, "cpu": cpu, "frames": frames, "boxes": boxes, "shape": next(iter(shapes), None),
            "ms": {"pre": speed.get("preprocess", 0.0), "inference": speed.get("inference", 0.0),
                   "nms": speed.get("postprocess", 0.0)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, help="an existing video (default: make a 16:9 one from coco128)")
    parser.add_argument("--images", type=Path, default=COCO128, help="images for the made video")
    parser.add_argument("--frames", type=int, default=80, help="frames in the made video")
    parser.add_argument("--size", type=int, nargs=2, default=(1280, 720), metavar=("W", "H"))
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds, after one warm-up round")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--conf", type=float, default=0.25)
    parser.add_argument("--iou", type=float, default=0.7)
    parser.add_argument("--threads", type=int, default=None, help="ours: torch threads (default: detect's choice)")
    parser.add_argument("--workers", type=int, default=None, help="ours: frames at once (default: detect's choice)")
    parser.add_argument("--no-overlap", action="store_true", help="ours: no reading ahead / writing behind")
    parser.add_argument("--pairs", nargs="+", default=["yolov5n.yaml:yolov5nu.yaml"],
                        help="ours:theirs model YAMLs, e.g. mobilenetv3_large.yaml:yolov8n.yaml")
    args = parser.parse_args()

    from ultralytics import YOLO

    tmp = Path(tempfile.mkdtemp(prefix="bench_detect_"))
    video = args.video or make_video(tmp / "video.mp4", args.frames, tuple(args.size), args.images)
    src = resolve_source(video)
    pairs = [tuple(p.split(":")) for p in args.pairs]
    models = {}
    for ours, theirs in pairs:
        models[("ours", ours)] = load_runtime(cfg=ours)
        models[("theirs", theirs)] = YOLO(theirs)
    load = os.getloadavg()[0]  # other work on the machine skews everything: say how much there was
    fps: dict[tuple, list[float]] = {key: [] for key in models}
    last: dict[tuple, dict] = {}
    for k in range(args.rounds + 1):
        for key, model in models.items():
            run = run_ours if key[0] == "ours" else run_theirs
            last[key] = run(model, video, tmp / f"{key[0]}_{Path(key[1]).stem}", args)
            if k:
                fps[key].append(last[key]["frames"] / last[key]["s"])
        print(f"round {k}: " + ", ".join(f"{who} {name} {last[(who, name)]['frames'] / last[(who, name)]['s']:.2f}"
                                         for who, name in models) + " frames/s" + (" (warm-up)" if not k else ""),
              file=sys.stderr)

    workers, threads = next(d["parallel"] for (who, _), d in last.items() if who == "ours")
    print(f"\n`python scripts/bench_detect.py {' '.join(sys.argv[1:])}`  ")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"(ours: {workers} worker(s) x {threads} thread(s){', no overlap' if args.no_overlap else ''}; "
          f"theirs: {torch.get_num_threads()} thread(s), as ultralytics sets them); "
          f"video {src.size[0]}x{src.size[1]}, {src.frames} frames, mp4v; "
          f"conf {args.conf}, iou {args.iou}; median of {args.rounds} interleaved rounds after a warm-up; "
          f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n")
    print("| ours | frames/s | ultralytics | frames/s | ours / theirs | input HxW (ours, theirs) | "
          "boxes/frame (ours, theirs) |")
    print("|---|---:|---|---:|---:|---|---|")
    for ours, theirs in pairs:
        fo, ft = statistics.median(fps[("ours", ours)]), statistics.median(fps[("theirs", theirs)])
        lo, lt = last[("ours", ours)], last[("theirs", theirs)]
        shape = " and ".join("x".join(map(str, d["shape"])) if d["shape"] else "?" for d in (lo, lt))
        print(f"| {ours} | {fo:.2f} | {theirs} | {ft:.2f} | {fo / ft:.2f} | {shape} | "
              f"{lo['boxes'] / max(lo['frames'], 1):.1f}, {lt['boxes'] / max(lt['frames'], 1):.1f} |")
    print("\nms per frame, last round (ours: read and letterbox run ahead and draw+write behind on worker threads, so "
          "they overlap inference; theirs: ultralytics' own speed dict, the rest of its wall time is read, draw, "
          "write):")
    for (who, name), d in last.items():
        rest = 1000 * d["s"] / max(d["frames"], 1) - (sum(d["ms"].values()) if who == "theirs" else 0)
        print(f"- {who} {name}: {1000 * d['s'] / max(d['frames'], 1):.1f} wall, "
              f"{1000 * d['cpu'] / max(d['frames'], 1):.1f} CPU (all threads); "
              + ", ".join(f"{k} {v:.1f}" for k, v in d["ms"].items())
              + (f", other {rest:.1f}" if who == "theirs" else ""))


if __name__ == "__main__":
    main()
