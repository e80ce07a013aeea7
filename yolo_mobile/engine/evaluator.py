"""COCO mAP, computed by pycocotools (the reference) or faster-coco-eval (same numbers, faster).

Ground truth comes from a YOLO-format split (converted in memory, with each image's real size) or a COCO
``instances_*.json``. Predictions are xyxy boxes in original-image pixels with 0-based class indices.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, load_data_config, read_coco_json
from ..datasets.labels import image_size, label_path, read_yolo_labels, yolo_to_xyxy
from ..files import write_text

log = logging.getLogger(__name__)
METRIC_KEYS = ("map", "map50", "map75", "map_small", "map_medium", "map_large",
               "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large")
BACKENDS = ("pycocotools", "faster")


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _coco_api(backend: str):
    """(COCO, COCOeval) classes of a backend; faster-coco-eval is optional."""
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    if backend == "faster":
        try:
            from faster_coco_eval import COCO, COCOeval_faster
        except ImportError:
            raise ImportError("--eval-backend faster needs faster-coco-eval: pip install faster-coco-eval") from None
        return COCO, COCOeval_faster
    raise ValueError(f"unknown eval backend '{backend}'; valid: {', '.join(BACKENDS)}")


class COCOEvaluator:
    """``update(image_ids, predictions)`` per batch, then ``summarize()`` once (on every rank under DDP)."""

    def __init__(self, gt: dict[str, Any], image_ids: list[Any], names: list[str], category_ids: list[int],
                 backend: str = "pycocotools", source: str = "", distributed: bool | None = None) -> None:
        """``distributed``: gather predictions over ranks in ``summarize()``; None means whenever torch.distributed
        is initialised. False when only one rank evaluates (a trainer validating on rank 0)."""
        _coco_api(backend)  # fail now, not after a whole validation run
        self.distributed = distributed
        self.gt, self.names, self.category_ids = gt, names, category_ids
        self.image_ids = image_ids
        self.backend, self.source = backend, source
        self._coco_id = {img: im["id"] for img, im in zip(image_ids, gt["images"], strict=True)}
        self.skipped: list[Path] = []  # images of the split left out of the ground truth (unreadable)
        self.first_image: Path | None = None  # a YOLO split's first image, for messages about its labels
        self._dets: dict[int, np.ndarray] = {}  # COCO image id -> rows (image_id, x, y, w, h, score, category_id)
        self.summary_text = ""

    # ---------------------------------------------------------------------------------------- ground truth
    @classmethod
    def from_yolo(cls, data_yaml: str | Path, split: str = "val", backend: str = "pycocotools",
                  distributed: bool | None = None) -> COCOEvaluator:
        """Ground truth from a YOLO-format split of an ultralytics data YAML; image ids are file stems."""
        data = load_data_config(data_yaml)
        part = data.split(split)
        if part.coco_json is not None:
            return cls.from_coco_json(part.coco_json, backend=backend, distributed=distributed)
        images, annotations, ids, skipped = [], [], [], []
        seen: dict[str, Path] = {}
        for index, path in enumerate(part.images):
            if path.stem in seen:
                raise ConfigError(f"{data.source}: image id '{path.stem}' is used by both {seen[path.stem]} "
                                  f"and {path}; image file names must be unique within a split")
            seen[path.stem] = path
            try:
                width, height = image_size(path)
            except OSError as e:  # empty, corrupt or unreadable: counted by validate, its objects not evaluated
                log.warning("skipped: %s: cannot read image size (%s)", path, e)
                skipped.append(path)
                continue
            labels = read_yolo_labels(label_path(path), data.nc)
            images.append({"id": index, "file_name": path.name, "width": width, "height": height})
            for (c, *_), (x1, y1, x2, y2) in zip(labels, yolo_to_xyxy(labels, width, height), strict=True):
                w, h = float(x2 - x1), float(y2 - y1)
                annotations.append({"id": len(annotations) + 1, "image_id": index, "category_id": int(c),
                                    "bbox": [float(x1), float(y1), w, h], "area": w * h, "iscrowd": 0})
            ids.append(path.stem)
        categories = [{"id": i, "name": n} for i, n in enumerate(data.names)]
        gt = {"images": images, "annotations": annotations, "categories": categories}
        evaluator = cls(gt, ids, data.names, list(range(data.nc)), backend, source=data.source,
                        distributed=distributed)
        evaluator.skipped = skipped
        evaluator.first_image = next(iter(seen.values()), None)
        return evaluator

    def check_ground_truth(self) -> None:
        """Raise ConfigError when the split has no object at all: every image would score mAP 0, which reads
        as a model that found nothing rather than as labels that were never found."""
        if self.gt["annotations"]:
            return
        images = self.gt["images"]
        where = (f"no label file with an object for any of its {len(images)} images (YOLO labels are looked for in "
                 f"the 'labels' folder beside 'images', e.g. {label_path(self.first_image)})"
                 if self.first_image is not None else f"its annotations list is empty ({len(images)} images)")
        raise ConfigError(f"{self.source}: no ground truth: {where}; mAP cannot be measured")

    @classmethod
    def from_coco_json(cls, path: str | Path, backend: str = "pycocotools",
                       distributed: bool | None = None) -> COCOEvaluator:
        """Ground truth from a COCO ``instances_*.json``; image ids and category ids are COCO's own."""
        path = Path(path)
        gt = read_coco_json(path)
        cats = sorted(gt["categories"], key=lambda c: c["id"])  # class index i <-> i-th category id
        return cls(gt, [im["id"] for im in gt["images"]], [c["name"] for c in cats], [c["id"] for c in cats],
                   backend, source=str(path), distributed=distributed)

    # ------------------------------------------------------------------------------------------ predictions
    def reset(self) -> None:
        self._dets.clear()

    def update(self, image_ids: list[Any], predictions: list[dict[str, Any]]) -> None:
        """Per image, ``boxes`` (N, 4) xyxy in original pixels, ``scores`` (N,), ``classes`` (N,) 0-based."""
        for image_id, pred in zip(image_ids, predictions, strict=True):
            if image_id not in self._coco_id:
                raise KeyError(f"image id {image_id!r} is not in the ground truth of {self.source}")
            boxes = _to_numpy(pred["boxes"]).astype(np.float64).reshape(-1, 4)
            scores = _to_numpy(pred["scores"]).astype(np.float64).reshape(-1)
            classes = _to_numpy(pred["classes"]).astype(np.int64).reshape(-1)
            if len(classes) and (classes.min() < 0 or classes.max() >= len(self.names)):
                raise ValueError(f"class index outside 0..{len(self.names) - 1} in predictions for {image_id!r}")
            rows = np.empty((len(scores), 7))
            rows[:, 0] = self._coco_id[image_id]
            rows[:, 1:3] = boxes[:, :2]
            rows[:, 3:5] = boxes[:, 2:] - boxes[:, :2]
            rows[:, 5] = scores
            rows[:, 6] = np.asarray(self.category_ids)[classes] if len(classes) else []
            self._dets[self._coco_id[image_id]] = rows

    def _gathers(self) -> bool:
        initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
        return initialised if self.distributed is None else self.distributed and initialised

    def synchronize(self) -> None:
        """Under DDP, gather every rank's predictions on every rank (an image seen twice is kept once)."""
        if self._gathers():
            gathered: list[dict[int, np.ndarray]] = [{} for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather_object(gathered, self._dets)
            for part in gathered:
                self._dets.update(part)

    def detections(self) -> np.ndarray:
        return np.concatenate(list(self._dets.values())) if self._dets else np.zeros((0, 7))

    # ------------------------------------------------------------------------------------------------ results
    def summarize(self) -> dict[str, Any]:
        """Run COCOeval (bbox). Call on every rank under DDP; rank 0 gets the numbers, the others ``{}``."""
        self.synchronize()
        if self._gathers() and torch.distributed.get_rank():
            return {}
        COCO, COCOeval = _coco_api(self.backend)
        per_class_gt = self._gt_counts()
        dets = self.detections()
        if len(dets) == 0:  # pycocotools cannot load an empty result set
            stats, ap, ap50 = np.zeros(12), np.zeros(len(self.names)), np.zeros(len(self.names))
        else:
            quiet = io.StringIO()
            with contextlib.redirect_stdout(quiet):
                coco_gt = COCO()
                coco_gt.dataset = self.gt
                coco_gt.createIndex()
                coco_dt = coco_gt.loadRes(dets)
                ev = COCOeval(coco_gt, coco_dt, "bbox")
                ev.params.imgIds = [im["id"] for im in self.gt["images"]]
                ev.params.catIds = self.category_ids
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
            self.summary_text = quiet.getvalue()
            stats = np.asarray(ev.stats[:12], dtype=np.float64)
            precision = ev.eval["precision"]  # (iou thresholds, recall, class, area, max dets)
            ap, ap50 = [], []
            for k in range(len(self.names)):
                p = precision[:, :, k, 0, -1]
                ap.append(float(p[p > -1].mean()) if (p > -1).any() else -1.0)
                p50 = precision[0, :, k, 0, -1]
                ap50.append(float(p50[p50 > -1].mean()) if (p50 > -1).any() else -1.0)
        results: dict[str, Any] = {k: float(v) for k, v in zip(METRIC_KEYS, stats, strict=True)}
        results["per_class"] = [
            {"class": k, "name": name, "images": per_class_gt[k][0], "instances": per_class_gt[k][1],
             "ap50": float(ap50[k]), "ap": float(ap[k])}
            for k, name in enumerate(self.names)
        ]
        results["images"] = len(self.gt["images"])
        results["instances"] = sum(not a.get("iscrowd", 0) for a in self.gt["annotations"])
        return results

    def _gt_counts(self) -> list[tuple[int, int]]:
        index = {c: k for k, c in enumerate(self.category_ids)}
        images: list[set] = [set() for _ in self.names]
        counts = [0] * len(self.names)
        for a in self.gt["annotations"]:
            k = index.get(a["category_id"])
            if k is not None and not a.get("iscrowd", 0):
                images[k].add(a["image_id"])
                counts[k] += 1
        return [(len(i), c) for i, c in zip(images, counts, strict=True)]

    def save_json(self, path: str | Path) -> Path:
        """Predictions in the COCO results format (image_id, category_id, bbox as xywh, score)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        dets = self.detections()
        yolo_ids = {v: k for k, v in self._coco_id.items()}
        is_yolo = self.image_ids != [im["id"] for im in self.gt["images"]]
        records = [
            {"image_id": _json_image_id(yolo_ids[int(r[0])]) if is_yolo else int(r[0]), "category_id": int(r[6]),
             "bbox": [round(float(v), 3) for v in r[1:5]], "score": round(float(r[5]), 5)}
            for r in dets
        ]
        return write_text(path, json.dumps(records))


def _json_image_id(stem: str) -> int | str:
    """A numeric stem (COCO's 000000000139) becomes its integer, as COCO tools expect; others stay strings."""
    return int(stem) if stem.isdigit() else stem
