"""The built-in ``shapes`` dataset: procedurally drawn shapes on varied backgrounds, with exact boxes.

Deterministic by seed and written once, as a YOLO-format dataset with its data YAML, to a cache folder
(``$YOLO_MOBILE_CACHE`` or ``~/.cache/yolo_mobile``), so training works on a fresh machine with no download.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import yaml

from .labels import write_image

CLASSES = ["circle", "square", "triangle", "star"]
VERSION = 2  # 2: the data YAML suggests imgsz and epochs
# Training defaults the set's YAML suggests: its own image size, and epochs that fit about half an hour on a
# 2-core CPU for mobilenetv3_large (docs/training.md: measured)
EPOCHS = 10


def cache_dir() -> Path:
    return Path(os.environ.get("YOLO_MOBILE_CACHE", Path.home() / ".cache" / "yolo_mobile"))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = rng.integers(4)
    c1, c2 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    if kind == 0:  # flat
        img = np.broadcast_to(c1, (size, size, 3)).astype(np.float32)
    elif kind == 1:  # linear gradient
        t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
        img = np.broadcast_to(c1 * (1 - t) + c2 * t, (size, size, 3))
        img = img if rng.random() < 0.5 else img.transpose(1, 0, 2)
    elif kind == 2:  # stripes
        period = rng.integers(8, 40)
        band = ((np.arange(size) // period) % 2).astype(np.float32)[:, None, None]
        img = np.broadcast_to(c1 * (1 - band) + c2 * band, (size, size, 3))
        img = img if rng.random() < 0.5 else img.transpose(1, 0, 2)
    else:  # smooth noise
        small = rng.random((8, 8, 3)).astype(np.float32)
        img = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC) * 255
    img = img + rng.normal(0, 6, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_points(kind: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    if kind == 1:  # square
        a = angle + np.pi / 4 + np.arange(4) * np.pi / 2
        return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], 1)
    if kind == 2:  # triangle
        a = angle + np.arange(3) * 2 * np.pi / 3
        return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], 1)
    a = angle + np.arange(10) * np.pi / 5  # star: 5 points, inner radius 0.45 r
    radius = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    return np.stack([cx + radius * np.cos(a), cy + radius * np.sin(a)], 1)


def draw_sample(rng: np.random.Generator, size: int, max_objects: int = 6,
                background: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One image and its labels (class, x1, y1, x2, y2) in pixels; boxes are the exact extent of each drawn shape.
    ``background`` (size x size x 3 uint8) replaces the random one (tests draw on black to find the shapes)."""
    img = _background(rng, size) if background is None else background.copy()
    boxes: list[list[float]] = []
    for _ in range(rng.integers(1, max_objects + 1)):
        for _try in range(10):  # shapes do not overlap, so every box is fully visible
            r = rng.uniform(0.05, 0.22) * size
            cx, cy = rng.uniform(r, size - r, 2)
            kind = int(rng.integers(len(CLASSES)))
            if kind == 0:
                x1, y1, x2, y2 = cx - r, cy - r, cx + r, cy + r
                pts = None
            else:
                pts = _shape_points(kind, cx, cy, r, rng.uniform(0, 2 * np.pi))
                (x1, y1), (x2, y2) = pts.min(0), pts.max(0)
            if all(x1 > b[3] + 2 or x2 < b[1] - 2 or y1 > b[4] + 2 or y2 < b[2] - 2 for b in boxes):
                break
        else:
            continue
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if pts is None:
            # drawn at 1/16 pixel precision so the disc's extent is the box to a fraction of a pixel
            cv2.circle(img, (round(cx * 16), round(cy * 16)), round(r * 16), colour, -1, cv2.LINE_AA, 4)
        else:
            cv2.fillPoly(img, [np.round(pts * 16).astype(np.int32)], colour, cv2.LINE_AA, 4)
        boxes.append([kind, x1, y1, x2, y2])
    return img, np.array(boxes, np.float32).reshape(-1, 5)


def build_shapes(root: Path | None = None, n_train: int = 800, n_val: int = 200, size: int = 320,
                 seed: int = 0) -> Path:
    """Write the dataset once (atomically, by renaming a finished folder) and return its data YAML."""
    root = Path(root) if root else cache_dir() / f"shapes-v{VERSION}-{n_train}-{n_val}-{size}-{seed}"
    data_yaml = root / "shapes.yaml"
    if data_yaml.is_file():
        return data_yaml
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        (tmp / "images" / split).mkdir(parents=True, exist_ok=True)
        (tmp / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, labels = draw_sample(rng, size)
            name = f"{split}_{i:05d}"
            write_image(tmp / "images" / split / f"{name}.png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            lines = [f"{int(c)} {(x1 + x2) / 2 / size:.6f} {(y1 + y2) / 2 / size:.6f} {(x2 - x1) / size:.6f} "
                     f"{(y2 - y1) / size:.6f}" for c, x1, y1, x2, y2 in labels]
            (tmp / "labels" / split / f"{name}.txt").write_text("\n".join(lines) + "\n")
    doc = {"path": ".", "train": "images/train", "val": "images/val", "names": dict(enumerate(CLASSES)),
           "imgsz": -(-size // 32) * 32, "epochs": EPOCHS}  # imgsz: the drawn size, as a multiple of 32
    (tmp / "shapes.yaml").write_text("# built-in synthetic shapes dataset (yolo_mobile.datasets.synthetic)\n"
                                     + yaml.safe_dump(doc, sort_keys=False))
    try:
        tmp.rename(root)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return data_yaml


def resolve_data(data: str | Path | None) -> Path:
    """``None`` or ``shapes`` means the built-in set (``shapes:N`` for N training images); anything else is a path."""
    if data is None or str(data) == "shapes":
        return build_shapes()
    if str(data).startswith("shapes:"):
        n = int(str(data).split(":", 1)[1])
        return build_shapes(n_train=n, n_val=max(8, n // 4))
    return Path(data)
