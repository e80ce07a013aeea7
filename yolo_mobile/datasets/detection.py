"""Training dataset: YOLO-format or COCO-JSON splits, a label cache, bad data skipped and counted,
4-image mosaic and the rest of the augmentation (:mod:`.augment`), at the (h, w) each batch of the sampler
asks for, from images read once (:mod:`.cache`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..config import ConfigError, DataConfig, read_coco_json
from ..files import write_text
from .augment import RareOps, hsv, hue_rotation, letterbox_tile, mosaic_tiles, render, sv_gain, to_chw_rgb
from .cache import ImageStore
from .labels import LabelError, label_path, read_yolo_labels, yolo_to_xyxy
from .letterbox import letterbox

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: truncated JPEGs are found by the scan


@dataclass
class Sample:
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # (n, 5): class, x1, y1, x2, y2 in original pixels


@dataclass
class AugmentConfig:
    """Augmentation strengths (YOLOv8's defaults, meaning what they mean there: relative to the output image)."""

    mosaic: float = 1.0  # probability of a 4-image mosaic
    scale: float = 0.5  # random zoom in [1 - scale, 1 + scale] about the (mosaic) canvas centre
    translate: float = 0.1  # random shift of that centre, a fraction of the output's width / height
    fliplr: float = 0.5
    hsv_h: float = 0.015  # hue shift, a fraction of the hue circle
    hsv_s: float = 0.7  # saturation gain in [1 - hsv_s, 1 + hsv_s]
    hsv_v: float = 0.4  # value gain in [1 - hsv_v, 1 + hsv_v]
    blur: float = 0.01  # probability of each of blur, median blur, grey, CLAHE
    # HSV through OpenCV's 8-bit HSV and a lookup table, as YOLOv8; False: the same gains on the RGB planes, 4x
    # cheaper (exact S and V gains, hue turned about the grey axis; see yolo_mobile.datasets.augment.sv_gain)
    hsv_exact: bool = True


# ---------------------------------------------------------------------------------------------- reading a split
def _fingerprint(images: list[Path]) -> str:
    h = hashlib.sha1(f"v{CACHE_VERSION}".encode())
    for p in images:
        for f in (p, label_path(p)):
            try:
                st = f.stat()
                h.update(os.fsencode(f) + f":{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                h.update(os.fsencode(f) + b":missing")
    return h.hexdigest()


def _check_image(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()  # structure check without decoding every pixel
    with Image.open(path) as im:
        return im.size


def _truncated_jpeg(path: Path) -> bool:
    """A JPEG (whatever its suffix) that lacks its closing FFD9 marker (some writers pad after it with zeros): a
    cut-off file decodes with grey rows and only libjpeg's "Premature end of JPEG file" on stderr."""
    with open(path, "rb") as f:
        if f.read(2) != b"\xff\xd8":
            return False
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 1024))
        return not f.read().rstrip(b"\0").endswith(b"\xff\xd9")


def _scan(images: list[Path], nc: int) -> tuple[list[dict[str, Any]], list[str]]:
    entries, problems = [], []
    for p in images:
        try:
            w, h = _check_image(p)
        except Exception as e:
            problems.append(f"corrupt image {p}: {e}")
            continue
        if _truncated_jpeg(p):
            problems.append(f"truncated JPEG {p}: no end-of-image marker; re-save or replace the file")
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
                write_text(cache, payload)
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
    gt = read_coco_json(json_path)
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
        if _truncated_jpeg(path):
            problems.append(f"truncated JPEG {path}: no end-of-image marker; re-save or replace the file")
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
    """``dataset[(index, h, w)]`` -> (uint8 CHW RGB image of size h x w, float (n, 5) class + xyxy pixel boxes).

    Images come from an :class:`ImageStore` at the largest size training asks for (``max_size``, default
    ``imgsz``), so every batch size is made from the original pixels. ``cache``: None, ``"ram"`` or ``"disk"``.
    Augmentation (see :mod:`.augment`): mosaic (partners from the buffer of recently read images), random zoom
    and shift, HSV, left-right flip and the rare blur / grey / CLAHE, drawn from one generator per process that
    is seeded from torch's seed: ``--seed`` makes a run repeatable, each DataLoader worker differs.
    """

    def __init__(self, samples: list[Sample], imgsz: int, augment: bool = True, hyp: AugmentConfig | None = None,
                 cache: str | None = None, max_size: int | None = None, buffer_size: int = 128) -> None:
        self.samples, self.imgsz, self.augment = samples, imgsz, augment
        self.hyp = hyp or AugmentConfig()
        self.mosaic = augment and self.hyp.mosaic > 0
        self.store = ImageStore([s.path for s in samples], [(s.height, s.width) for s in samples],
                                max(max_size or imgsz, imgsz), cache=None if cache in ("none", False) else cache,
                                buffer_size=buffer_size)
        self._rng: random.Random | None = None
        # images found unreadable during training, in memory the DataLoader workers share: each is warned
        # about once a run, then passed over, and counted in the run's summary
        self.unreadable = torch.zeros(len(samples), dtype=torch.bool).share_memory_()
        self._rare = RareOps(self.hyp.blur)
        self._scratch: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def rng(self) -> random.Random:
        if self._rng is None:  # first use in this process: torch's seed (a worker's differs from the others')
            self._rng = random.Random(torch.initial_seed())
        return self._rng

    def reseed(self) -> None:
        """Start over as a fresh dataset would: new generator from torch's seed, empty buffer."""
        self._rng = None
        self.store.clear_buffer()

    def _item(self, i: int) -> tuple[np.ndarray, tuple[int, int], np.ndarray]:
        s = self.samples[i]
        return self.store.get(i), (s.height, s.width), s.boxes

    def __getitem__(self, item: int | tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        i, h, w = (item, self.imgsz, self.imgsz) if isinstance(item, int) else item
        for attempt in range(len(self.samples)):
            j = (i + attempt) % len(self.samples)
            if self.unreadable[j]:
                continue
            try:
                return self._get(j, h, w)
            except OSError as e:  # an image that broke after the scan: use the next one
                if not self.unreadable[j]:
                    self.unreadable[j] = True
                    log.warning("skipped unreadable image during training (not read again this run): %s", e)
        raise RuntimeError("no readable image left in the dataset")

    def _get(self, i: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.augment:
            image, (oh, ow), boxes = self._item(i)
            out, info = letterbox(image, (h, w))
            boxes = boxes.copy()
            sx, sy = image.shape[1] / ow * info.scale[0], image.shape[0] / oh * info.scale[1]
            boxes[:, [1, 3]] = boxes[:, [1, 3]] * sx + info.pad[0]
            boxes[:, [2, 4]] = boxes[:, [2, 4]] * sy + info.pad[1]
            return torch.from_numpy(to_chw_rgb(out)), torch.from_numpy(_valid(boxes, w, h))
        rng, hyp = self.rng, self.hyp
        if self.mosaic and rng.random() < hyp.mosaic:
            items = [self._item(i)]  # read first: it joins the buffer the partners are drawn from
            items += [self._item(self.store.random_index(rng)) for _ in range(3)]
            tiles, canvas = mosaic_tiles(items, h, w, rng), (2 * h, 2 * w)
        else:
            tiles, canvas = [letterbox_tile(*self._item(i), h, w)], (h, w)
        zoom = rng.uniform(1 - hyp.scale, 1 + hyp.scale)
        shift = (w * (0.5 + rng.uniform(-hyp.translate, hyp.translate)),
                 h * (0.5 + rng.uniform(-hyp.translate, hyp.translate)))
        scratch = self._scratch.get((h, w))
        if scratch is None:  # per size, reused: the output is copied into the returned CHW array
            scratch = self._scratch[(h, w)] = (np.empty((h, w, 3), np.uint8), np.empty((h, w), np.uint8))
        out, boxes = render(tiles, canvas, (h, w), zoom, shift, out=scratch[0])
        out = self._rare(out, rng)  # blur, grey, CLAHE, then colour, then flip: YOLOv8's order
        jitter = hyp.hsv_h or hyp.hsv_s or hyp.hsv_v
        if jitter and hyp.hsv_exact:
            hsv(out, rng, hyp.hsv_h, hyp.hsv_s, hyp.hsv_v)
        elif jitter:
            dh, ds, dv = (rng.uniform(-1, 1) * g for g in (hyp.hsv_h, hyp.hsv_s, hyp.hsv_v))
            if dh:
                out = cv2.transform(out, hue_rotation(dh))
        flip = rng.random() < hyp.fliplr
        if flip and len(boxes):
            boxes[:, [1, 3]] = w - boxes[:, [3, 1]]
        chw = to_chw_rgb(out, flip)
        if jitter and not hyp.hsv_exact and (ds or dv):
            sv_gain(chw, 1 + ds, 1 + dv, scratch=scratch[1])
        return torch.from_numpy(chw), torch.from_numpy(boxes)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: OpenCV single-threaded (the workers are the parallelism), and a fresh
    generator and buffer per worker, derived from torch's seed for that worker."""
    cv2.setNumThreads(0)
    # a SIGTERM sent to the whole process group (timeout, pkill, a scheduler) ends the worker quietly: the main
    # process gets the same signal and stops training itself; a worker killed by it would make the main process
    # report "DataLoader worker killed by signal" over its own message
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))
    info = torch.utils.data.get_worker_info()
    random.seed(info.seed % 2**32)
    np.random.seed(info.seed % 2**32)
    info.dataset.reseed()


def _valid(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    boxes = boxes.copy()
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, width)
    boxes[:, [2, 4]] = boxes[:, [2, 4]].clip(0, height)
    keep = (boxes[:, 3] - boxes[:, 1] > 1) & (boxes[:, 4] - boxes[:, 2] > 1)
    return boxes[keep].astype(np.float32)


def collate_detection(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) uint8 and targets padded on the CPU to (B, M, 5) [class, x1, y1, x2, y2] with
    class -1 for padding, so the loss needs no host-device sync to batch them."""
    images = [b[0] for b in batch]
    if torch.utils.data.get_worker_info() is not None:
        images = torch.utils.data.default_collate(images)  # stacked straight into shared memory for the main process
    else:  # into a fresh tensor: much faster than letting stack allocate it for uint8
        images = torch.stack(images, out=torch.empty((len(images), *images[0].shape), dtype=images[0].dtype))
    m = max((len(b[1]) for b in batch), default=0)
    targets = torch.zeros(len(batch), m, 5)
    targets[..., 0] = -1
    for k, (_, boxes) in enumerate(batch):
        targets[k, : len(boxes)] = boxes
    return images, targets
