"""Time COCOEvaluator.summarize() with each backend on synthetic data, and check they agree.

    python scripts/bench_evaluator.py --images 5000 --dets 100
"""

import argparse
import time

import numpy as np

from yolo_mobile.engine.evaluator import METRIC_KEYS, COCOEvaluator


def synthetic(n_images: int, dets: int, nc: int = 80, seed: int = 0):
    rng = np.random.default_rng(seed)
    images, anns, preds = [], [], []
    for i in range(n_images):
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480})
        k = rng.integers(1, 15)
        xy = rng.random((k, 2)) * [540, 380]
        wh = rng.random((k, 2)) * [100, 100] + 4
        cls = rng.integers(0, nc, k)
        for b, c in zip(np.hstack([xy, wh]), cls, strict=True):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c), "bbox": b.tolist(),
                         "area": float(b[2] * b[3]), "iscrowd": 0})
        # detections: the objects, jittered, then random boxes up to `dets`
        m = dets - k
        boxes = np.vstack([np.hstack([xy, xy + wh]) + rng.normal(0, 3, (k, 4)),
                           np.hstack([rng.random((m, 2)) * 540, rng.random((m, 2)) * 540])])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        classes = np.concatenate([cls, rng.integers(0, nc, m)])
        preds.append({"boxes": boxes, "scores": rng.random(dets), "classes": classes})
    gt = {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in range(nc)]}
    return gt, list(range(n_images)), preds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets", type=int, default=100)
    args = parser.parse_args()
    gt, ids, preds = synthetic(args.images, args.dets)
    results = {}
    for backend in ("pycocotools", "faster"):
        try:
            ev = COCOEvaluator(gt, ids, [c["name"] for c in gt["categories"]], list(range(80)), backend)
        except ImportError as e:
            print(f"{backend}: {e}")
            continue
        ev.update(ids, preds)
        t = time.perf_counter()
        results[backend] = ev.summarize()
        print(f"{backend:>12}: summarize() {time.perf_counter() - t:7.2f} s  "
              f"({args.images} images x {args.dets} detections)  mAP {results[backend]['map']:.4f}")
    if len(results) == 2:
        diff = max(abs(results["pycocotools"][k] - results["faster"][k]) for k in METRIC_KEYS)
        print(f"max difference over the 12 COCO metrics: {diff:.2e}")


if __name__ == "__main__":
    main()
