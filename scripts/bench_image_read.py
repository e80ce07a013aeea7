"""Image reading through bytes (``decode_image``: np.fromfile + cv2.imdecode, which any file name survives) beside
OpenCV's own ``cv2.imread`` (which crashes on a name that is not UTF-8), interleaved per image, the one going first
alternating; the pixels must be equal. Prints ms per image and the ratio, full decode and the 1/2 reduced decode.

    python scripts/bench_image_read.py [FOLDER] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np

from yolo_mobile.datasets.labels import decode_image

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "coco128" / "images" / "train2017"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, default=DEFAULT)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    files = sorted(args.folder.glob("*.jpg"))
    if not files:
        raise SystemExit(f"{args.folder}: no .jpg files")
    cv2.setNumThreads(1)
    for label, flags in (("full", cv2.IMREAD_COLOR), ("reduced 1/2", cv2.IMREAD_REDUCED_COLOR_2)):
        flags |= cv2.IMREAD_IGNORE_ORIENTATION
        readers = {"cv2.imread": lambda f, flags=flags: cv2.imread(str(f), flags),
                   "decode_image": lambda f, flags=flags: decode_image(f, flags)}
        seconds = dict.fromkeys(readers, 0.0)
        for k in range(args.repeats * len(files)):
            f = files[k % len(files)]
            order = list(readers) if k % 2 else list(reversed(readers))
            images = {}
            for name in order:
                t0 = time.perf_counter()
                images[name] = readers[name](f)
                seconds[name] += time.perf_counter() - t0
            assert np.array_equal(*images.values()), f
        n = args.repeats * len(files)
        ours, theirs = seconds["decode_image"], seconds["cv2.imread"]
        print(f"{label}: cv2.imread {1000 * theirs / n:.2f} ms, decode_image {1000 * ours / n:.2f} ms per image; "
              f"ratio {ours / theirs:.3f} ({n} reads each)")


if __name__ == "__main__":
    main()
