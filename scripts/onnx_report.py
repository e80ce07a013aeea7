"""ONNX report: for each built-in model, file size, export time, parity and ONNX Runtime CPU latency at each
size, beside ultralytics' YOLOv5nu and YOLOv8n exported by ultralytics and timed the same way in this run.

    python scripts/onnx_report.py --imgsz 320 640 --runs 30 --out onnx_report.md
"""

import argparse
import os
import tempfile
from pathlib import Path

from yolo_mobile import build_model
from yolo_mobile.benchmark import onnx_latency
from yolo_mobile.config import list_builtin_models
from yolo_mobile.export.onnx import export_onnx


def ultralytics_onnx(name: str, imgsz: int, folder: Path) -> Path:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    cwd = os.getcwd()
    os.chdir(folder)  # ultralytics writes next to the model name
    try:
        return folder / YOLO(name).export(format="onnx", imgsz=imgsz, simplify=False, dynamic=False, verbose=False)
    finally:
        os.chdir(cwd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--imgsz", type=int, nargs="+", default=[320, 640])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--models", nargs="+", default=list_builtin_models())
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = ["| model | size | ONNX MB | export s | max abs diff | ORT median ms | ORT p90 ms |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for cfg in args.models:
            model = build_model(cfg)
            for imgsz in args.imgsz:
                r = export_onnx(model, folder / f"{Path(cfg).stem}_{imgsz}.onnx", imgsz=imgsz)
                t = onnx_latency(r["path"], imgsz, runs=args.runs)
                rows.append(f"| {Path(cfg).stem} | {imgsz} | {r['size_mb']:.1f} | {r['export_s']:.1f} | "
                            f"{r['max_abs_diff']:.1e} | {t['median_ms']:.1f} | {t['p90_ms']:.1f} |")
                print(rows[-1], flush=True)
        for name in ("yolov5nu.yaml", "yolov8n.yaml"):
            for imgsz in args.imgsz:
                path = ultralytics_onnx(name, imgsz, folder)
                t = onnx_latency(path, imgsz, runs=args.runs)
                rows.append(f"| ultralytics {Path(name).stem} | {imgsz} | {path.stat().st_size / 2**20:.1f} | - | - | "
                            f"{t['median_ms']:.1f} | {t['p90_ms']:.1f} |")
                print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
