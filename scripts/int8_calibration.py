"""INT8 accuracy by calibration method and image count: one float export, one quantized file per setting, every
file scored by the export's own evaluator on the val split (or held-apart train images).

    python scripts/int8_calibration.py --weights runs/train/exp/weights/best.pt \
        entropy:256 percentile:256 minmax:256 minmax:128 minmax:64

Each setting is ``method:images``; the images are drawn as ``export --int8`` draws them (seed 0), so the row of the
export's defaults reproduces what the export prints.
"""

import argparse
import tempfile
from pathlib import Path

from yolo_mobile.api import load_model
from yolo_mobile.config import load_data_config
from yolo_mobile.datasets.synthetic import resolve_data
from yolo_mobile.export.int8 import CALIB_METHODS, calibration_split, onnx_map, quantize_onnx
from yolo_mobile.export.onnx import export_onnx


def setting(text: str) -> tuple[str, int]:
    method, _, images = text.partition(":")
    if method not in CALIB_METHODS or not images.isdigit() or int(images) < 1:
        raise argparse.ArgumentTypeError(f"'{text}': expected method:images, method one of {', '.join(CALIB_METHODS)}")
    return method, int(images)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("settings", nargs="+", type=setting, help="method:images, e.g. entropy:256")
    p.add_argument("--weights", required=True, help="a trained checkpoint")
    p.add_argument("--data", help="data YAML or shapes (default: the checkpoint's training data)")
    p.add_argument("--imgsz", type=int, help="default: the checkpoint's training size")
    args = p.parse_args()

    model = load_model(args.weights).eval()
    data = resolve_data(args.data or model.train_data)
    imgsz = args.imgsz or model.train_imgsz
    load_data_config(data)  # a bad data YAML fails here, before any export
    with tempfile.TemporaryDirectory(prefix="int8_calibration_") as tmp:
        float_path = Path(tmp) / "float.onnx"
        export_onnx(model, float_path, imgsz=imgsz)
        # without a val split the held-apart images depend on the count, so each row's drop is measured against
        # the float file scored on the same images
        floats: dict[str, dict] = {}
        rows = []
        for method, images in args.settings:
            workdir = Path(tmp) / f"{method}_{images}"
            workdir.mkdir()
            calib, eval_data = calibration_split(data, images, workdir)
            if str(eval_data) not in floats:
                floats[str(eval_data)] = onnx_map(float_path, eval_data, imgsz)
            int8_path = Path(tmp) / f"{method}_{images}.onnx"
            quantize_onnx(float_path, int8_path, calib, imgsz, method=method)
            rows.append((method, images, onnx_map(int8_path, eval_data, imgsz), floats[str(eval_data)]))
            print(f"{method}:{images} mAP50-95 {rows[-1][2]['map']:.4f}", flush=True)
    print(f"\n{args.weights} at {imgsz} on {data}\n")
    print("| calibration | images | float mAP50-95 | INT8 mAP50-95 | drop (points) | INT8 mAP50 |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, images, m, base in rows:
        print(f"| {method} | {images} | {base['map']:.4f} | {m['map']:.4f} | {100 * (base['map'] - m['map']):.2f} "
              f"| {m['map50']:.4f} |")


if __name__ == "__main__":
    main()
