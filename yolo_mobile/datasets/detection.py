"""Training dataset: YOLO-format or COCO-JSON splits, a label cache, bad data skipped and counted,
4-image mosaic and albumentations augmentation, at the (h, w) each batch of the sampler asks for."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..config import ConfigError, DataConfig
from .labels import LabelError, label_path, read_image, read_yolo_labels, yolo_to_xyxy
from .letterbox import PAD_VALUE, letterbox

log = logging.getLogger(__name__)
CACHE_VERSION = 1


@dataclass
class Sample:
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # (n, 5): class, x1, y1, x2, y2 in original pixels


@dataclass
class AugmentConfig:
    """Augmentation strengths (YOLOv8's defaults)."""

    mosaic: float = 1.0  # probability of a 4-image mosaic
    scale: float = 0.5  # random zoom in [1 - scale, 1 + scale]
    translate: float = 0.1  # random shift, fraction of the size
    fliplr: float = 0.5
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    blur: float = 0.01


# ---------------------------------------------------------------------------------------------- reading a split
def _fingerprint(images: list[Path]) -> str:
    h = hashlib.sha1(f"v{CACHE_VERSION}".encode())
    for p in images:
        for f in (p, label_path(p)):
            try:
                st = f.stat()
                h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                h.update(f"{f}:missing".encode())
    return h.hexdigest()


def _check_image(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()  # structure check without decoding every pixel
    with Image.open(path) as im:
        return im.size


def _scan(images: list[Path], nc: int) -> tuple[list[dict[str, Any]], list[str]]:
    entries, problems = [], []
    for p in images:
        try:
            w, h = _check_image(p)
        except Exception as e:
            problems.append(f"corrupt image {p}: {e}")
            continue
        try:
            labels = read_yolo_labels(label_path(p), nc)
        except LabelError as e:
            problems.append(f"bad label {e}")
            continue
        entries.append({"path": str(p), "width": w, "height": h, "labels": labels.tolist()})
    return entries, problems


def _cache_path(images: list[Path]) -> Path | None:
    """``labels/<split>.cache.json`` beside the labels, unless that folder is read-only (root ignores the
    mode bits, so they are read here: a dataset shipped read-only is never written to)."""
    labels_dir = label_path(images[0]).parent
    parent = labels_dir.parent
    try:
        writable = os.access(parent, os.W_OK) and parent.stat().st_mode & stat.S_IWUSR
    except OSError:
        writable = False
    return labels_dir.with_name(labels_dir.name + ".cache.json") if writable else None


def load_yolo_samples(images: list[Path], nc: int) -> tuple[list[Sample], list[str]]:
    """Scan images and labels once; the result is cached next to the labels (or in the user cache when that
    folder is read-only) and rebuilt when any image or label file changes."""
    from .synthetic import cache_dir

    key = _fingerprint(images)
    candidates = [c for c in (_cache_path(images), cache_dir() / "labels" / f"{key}.json") if c is not None]
    for cache in candidates:
        try:
            data = json.loads(cache.read_text())
            if data.get("key") == key and data.get("nc") == nc:
                entries, problems = data["entries"], data["problems"]
                break
        except (OSError, ValueError):
            continue
    else:
        entries, problems = _scan(images, nc)
        payload = json.dumps({"key": key, "nc": nc, "entries": entries, "problems": problems})
        for cache in candidates:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(cache.name + ".tmp")
                tmp.write_text(payload)
                tmp.replace(cache)
                break
            except OSError:
                continue
    samples = []
    for e in entries:
        labels = np.array(e["labels"], np.float32).reshape(-1, 5)
        boxes = np.concatenate([labels[:, :1], yolo_to_xyxy(labels, e["width"], e["height"])], 1)
        samples.append(Sample(Path(e["path"]), e["width"], e["height"], boxes.astype(np.float32)))
    return samples, problems


def load_coco_samples(json_path: Path, image_dir: Path) -> tuple[list[Sample], list[str], list[str]]:
    """Samples of a COCO instances file; class index i is the i-th category id in sorted order."""
    gt = json.loads(json_path.read_text(encoding="utf-8"))
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(cats)}
    by_image: dict[int, list] = {}
    for a in gt["annotations"]:
        if not a.get("iscrowd", 0):
            by_image.setdefault(a["image_id"], []).append(a)
    samples, problems = [], []
    for im in gt["images"]:
        path = image_dir / im["file_name"]
        if not path.is_file():
            problems.append(f"missing image {path}")
            continue
        rows = [[index[a["category_id"]], x, y, x + w, y + h]
                for a in by_image.get(im["id"], []) for x, y, w, h in [a["bbox"]] if w > 0 and h > 0]
        samples.append(Sample(path, im["width"], im["height"], np.array(rows, np.float32).reshape(-1, 5)))
    return samples, problems, [c["name"] for c in cats]


def load_split(data: DataConfig, split: str) -> list[Sample]:
    """All usable samples of a split, with a warning per skipped file and a summary line."""
    part = data.split(split)
    if part.coco_json is not None:
        samples, problems, _ = load_coco_samples(part.coco_json, part.image_dir)
    else:
        samples, problems = load_yolo_samples(part.images, data.nc)
    for p in problems:
        log.warning("skipped %s", p)
    kinds = Counter(p.split(" ", 2)[0] + " " + p.split(" ", 2)[1] for p in problems)
    background = sum(len(s.boxes) == 0 for s in samples)
    summary = ", ".join(f"{n} {k}" for k, n in kinds.items()) or "none"
    log.info("%s '%s': %d images, %d objects, %d without objects; skipped: %s", data.source, split, len(samples),
             sum(len(s.boxes) for s in samples), background, summary)
    if not samples:
        raise ConfigError(f"{data.source}: '{split}' has no usable images ({len(problems)} skipped)")
    return samples


# ------------------------------------------------------------------------------------------------ the dataset
class DetectionDataset(Dataset):
    """``dataset[(index, h, w)]`` -> (uint8 CHW image of size h x w, float (n, 5) class + xyxy pixel boxes)."""

    def __init__(self, samples: list[Sample], imgsz: int, augment: bool = True,
                 hyp: AugmentConfig | None = None) -> None:
        self.samples, self.imgsz, self.augment = samples, imgsz, augment
        self.hyp = hyp or AugmentConfig()
        self.mosaic = augment and self.hyp.mosaic > 0
        self._pipelines: dict[tuple[int, int, bool], A.Compose] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _pipeline(self, h: int, w: int, mosaic: bool) -> A.Compose:
        key = (h, w, mosaic)
        if key not in self._pipelines:
            hyp = self.hyp
            ops = [
                A.Affine(scale=(1 - hyp.scale, 1 + hyp.scale), translate_percent=(-hyp.translate, hyp.translate),
                         border_mode=cv2.BORDER_CONSTANT, fill=PAD_VALUE, p=1.0),
                # a mosaic canvas is 2h x 2w around its centre: the crop keeps the centre region
                *([A.CenterCrop(h, w)] if mosaic else []),
                A.HorizontalFlip(p=hyp.fliplr),
                A.HueSaturationValue(hue_shift_limit=int(hyp.hsv_h * 180), sat_shift_limit=int(hyp.hsv_s * 100),
                                     val_shift_limit=int(hyp.hsv_v * 100), p=0.8),
                A.Blur(blur_limit=(3, 7), p=hyp.blur),
                A.MedianBlur(blur_limit=(3, 7), p=hyp.blur),
                A.ToGray(p=hyp.blur),
                A.CLAHE(p=hyp.blur),
            ]
            bbox = A.BboxParams(format="pascal_voc", label_fields=["classes"], min_visibility=0.25, min_area=4,
                                clip=True, filter_invalid_bboxes=True)
            # seeded from torch: each DataLoader worker differs, and --seed makes the run repeatable
            self._pipelines[key] = A.Compose(ops, bbox_params=bbox, seed=torch.initial_seed() % 2**32)
        return self._pipelines[key]

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image resized so it fits the base size (keeping its ratio) and its boxes in those pixels."""
        s = self.samples[i]
        image = read_image(s.path)
        r = self.imgsz / max(s.height, s.width)
        if r != 1:
            image = cv2.resize(image, (max(1, round(s.width * r)), max(1, round(s.height * r))),
                               interpolation=cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR)
        boxes = s.boxes.copy()
        boxes[:, [1, 3]] *= image.shape[1] / s.width
        boxes[:, [2, 4]] *= image.shape[0] / s.height
        return image, boxes

    def _load_mosaic(self, i: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        canvas = np.full((2 * h, 2 * w, 3), PAD_VALUE, np.uint8)
        cx, cy = int(random.uniform(0.5 * w, 1.5 * w)), int(random.uniform(0.5 * h, 1.5 * h))
        all_boxes = []
        indices = [i] + [random.randrange(len(self.samples)) for _ in range(3)]
        for k, j in enumerate(indices):
            image, boxes = self.load(j)
            image, boxes = _fit(image, boxes, h, w)
            ih, iw = image.shape[:2]
            # quadrants around the centre: top-left, top-right, bottom-left, bottom-right
            x0 = cx - iw if k in (0, 2) else cx
            y0 = cy - ih if k in (0, 1) else cy
            xa, ya = max(x0, 0), max(y0, 0)
            xb, yb = min(x0 + iw, 2 * w), min(y0 + ih, 2 * h)
            canvas[ya:yb, xa:xb] = image[ya - y0: yb - y0, xa - x0: xb - x0]
            boxes = boxes.copy()
            boxes[:, [1, 3]] = (boxes[:, [1, 3]] + x0).clip(xa, xb)
            boxes[:, [2, 4]] = (boxes[:, [2, 4]] + y0).clip(ya, yb)
            all_boxes.append(boxes)
        return canvas, np.concatenate(all_boxes)

    def __getitem__(self, item: int | tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        i, h, w = (item, self.imgsz, self.imgsz) if isinstance(item, int) else item
        for attempt in range(len(self.samples)):
            j = (i + attempt) % len(self.samples)
            try:
                return self._get(j, h, w)
            except OSError as e:  # an image that broke after the scan: use the next one
                log.warning("skipped unreadable image during training: %s", e)
        raise RuntimeError("no readable image left in the dataset")

    def _get(self, i: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        use_mosaic = self.mosaic and random.random() < self.hyp.mosaic
        if use_mosaic:
            image, boxes = self._load_mosaic(i, h, w)
        else:
            image, boxes = self.load(i)
            image, info = letterbox(image, (h, w))
            boxes = boxes.copy()
            boxes[:, [1, 3]] = boxes[:, [1, 3]] * info.scale[0] + info.pad[0]
            boxes[:, [2, 4]] = boxes[:, [2, 4]] * info.scale[1] + info.pad[1]
        boxes = _valid(boxes, image.shape[1], image.shape[0])
        if self.augment:
            out = self._pipeline(h, w, use_mosaic)(image=image, bboxes=boxes[:, 1:], classes=boxes[:, 0])
            image = out["image"]
            b = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
            boxes = np.concatenate([np.asarray(out["classes"], np.float32).reshape(-1, 1), b], 1)
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return tensor, torch.from_numpy(boxes.astype(np.float32))


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: fresh augmentation pipelines (and RNG) per worker, derived from torch's seed."""
    info = torch.utils.data.get_worker_info()
    random.seed(info.seed % 2**32)
    np.random.seed(info.seed % 2**32)
    info.dataset._pipelines.clear()


def _fit(image: np.ndarray, boxes: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize so the image fits in (h, w) keeping its ratio (the batch size may differ from the base size)."""
    r = min(h / image.shape[0], w / image.shape[1])
    if abs(r - 1) < 1e-3:
        return image, boxes
    nh, nw = max(1, round(image.shape[0] * r)), max(1, round(image.shape[1] * r))
    image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR)
    boxes = boxes.copy()
    boxes[:, 1:] *= r
    return image, boxes


def _valid(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    boxes = boxes.copy()
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, width)
    boxes[:, [2, 4]] = boxes[:, [2, 4]].clip(0, height)
    keep = (boxes[:, 3] - boxes[:, 1] > 1) & (boxes[:, 4] - boxes[:, 2] > 1)
    return boxes[keep]


def collate_detection(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) uint8 and targets padded on the CPU to (B, M, 5) [class, x1, y1, x2, y2] with
    class -1 for padding, so the loss needs no host-device sync to batch them."""
    images = torch.stack([b[0] for b in batch])
    m = max((len(b[1]) for b in batch), default=0)
    targets = torch.zeros(len(batch), m, 5)
    targets[..., 0] = -1
    for k, (_, boxes) in enumerate(batch):
        targets[k, : len(boxes)] = boxes
    return images, targets
