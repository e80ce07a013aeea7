"""Validation: letterbox -> model -> NMS -> boxes back in original pixels -> COCOEvaluator."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import ConfigError, check_imgsz, flag, load_data_config
from ..datasets.inference import LetterboxImages, collate_letterboxed
from ..datasets.letterbox import unletterbox_boxes
from ..files import write_text
from .evaluator import COCOEvaluator
from .memory import default_workers
from .postprocess import IOU, MAX_DET, VAL_CONF, non_max_suppression

log = logging.getLogger(__name__)

MODEL_HELP = {"weights": "a checkpoint (.pt) or an exported model (.onnx, .tflite, an ncnn folder)",
              "cfg": "a model YAML or built-in name: an untrained model, for pipeline checks"}


@dataclass
class ValConfig:
    """``yolo-mobile val``: its flags are these fields (cli.py builds the parser from them)."""

    weights: str | None = flag(None, MODEL_HELP["weights"], group="model", required=True)
    cfg: str | None = flag(None, MODEL_HELP["cfg"], group="model")
    data: str | None = flag(None, "data YAML (ultralytics format: path, train, val, names), or shapes; default: the "
                                  "data a --weights checkpoint was trained on")
    split: str = flag("val", "which split of the data YAML")
    imgsz: int | None = flag(None, "letterbox size, a multiple of 32 (default: the checkpoint's training size, "
                                   "else 640)")
    batch: int = flag(32, "images per forward pass", type="positive")
    conf: float = flag(VAL_CONF, "confidence threshold before NMS", type="fraction")
    iou: float = flag(IOU, "NMS IoU threshold", type="fraction")
    max_det: int = flag(MAX_DET, "detections kept per image", type="positive")
    device: str = flag("", "cpu, or a GPU index such as 0 (default: GPU 0 if present)")
    save_json: bool = flag(False, "also write predictions.json (COCO results format)")
    eval_backend: str = flag("pycocotools", "COCO evaluator: pycocotools, or faster-coco-eval (.[faster])",
                             choices=("pycocotools", "faster"))
    workers: int | None = flag(None, "data loader processes", type="non_negative")
    project: str = flag("runs/val", "results go to PROJECT/NAME")
    name: str = flag("exp", "run name (numbered when it exists)")

    def check(self) -> None:
        if (self.weights is None) == (self.cfg is None):
            raise ConfigError("val needs one of --weights or --cfg")
        if self.imgsz is not None:
            check_imgsz(self.imgsz, "--imgsz")


def split_items(data_yaml: str | Path, split: str, evaluator: COCOEvaluator) -> list[tuple[Any, Path]]:
    """(image_id, path) for every image the evaluator knows, found on disk the way the data YAML says."""
    data = load_data_config(data_yaml)
    part = data.split(split)
    if part.coco_json is not None:
        return [(im["id"], part.image_dir / im["file_name"]) for im in evaluator.gt["images"]]
    known = set(evaluator.image_ids)  # without the images the evaluator skipped as unreadable
    return [(p.stem, p) for p in part.images if p.stem in known]


@torch.no_grad()
def validate(model: torch.nn.Module | Callable, data: str | Path, *, split: str = "val", imgsz: int = 640,
             batch: int = 32, conf: float = VAL_CONF, iou: float = IOU, max_det: int = MAX_DET,
             device: torch.device | str = "cpu", backend: str = "pycocotools", workers: int | None = None,
             save_dir: Path | None = None, save_json: bool = False, evaluator: COCOEvaluator | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Evaluate ``model`` (a module, or a runtime such as ``OnnxRuntime`` taking a float batch) on a split;
    returns COCOEvaluator.summarize()'s dict plus timing and skipped counts."""
    check_imgsz(imgsz)
    evaluator = evaluator or COCOEvaluator.from_yolo(data, split, backend=backend)
    evaluator.reset()
    items = split_items(data, split, evaluator)
    module = isinstance(model, torch.nn.Module)  # else a backend (an ONNX file in ONNX Runtime): float32 in
    fixed_batch = None if module else getattr(model, "batch", None)
    batch = fixed_batch or batch  # an ONNX file exported with a fixed batch
    workers = default_workers() if workers is None else workers
    loader = DataLoader(LetterboxImages(items, imgsz), batch_size=batch, shuffle=False, num_workers=workers,
                        collate_fn=collate_letterboxed, pin_memory=torch.device(device).type == "cuda")
    was_training = module and model.training
    if module:
        model.eval()
    dtype = next(model.parameters()).dtype if module else torch.float32
    skipped, seconds = len(evaluator.skipped), {"inference": 0.0, "nms": 0.0}
    for images, ids, infos, n_bad in tqdm(loader, desc="val", unit="batch", disable=not progress, leave=False):
        skipped += n_bad
        if not ids:
            continue
        x = images.to(device, non_blocking=True).to(dtype) / 255
        t0 = time.perf_counter()
        if fixed_batch and len(x) < fixed_batch:  # the last batch, padded to the file's batch
            x = torch.cat([x, x[-1:].expand(fixed_batch - len(x), -1, -1, -1)])
        out = model(x)[: len(ids)]
        t1 = time.perf_counter()
        dets = non_max_suppression(out.float(), conf=conf, iou=iou, max_det=max_det, multi_label=True)
        seconds["inference"] += t1 - t0
        seconds["nms"] += time.perf_counter() - t1
        for d, info in zip(dets, infos, strict=True):
            d["boxes"] = unletterbox_boxes(d["boxes"], info)
        evaluator.update(ids, dets)
    if module:
        model.train(was_training)
    if skipped:
        left_out = len(evaluator.skipped)  # no size, so no ground truth; the others' objects are in it
        log.warning("%d unreadable image(s) skipped: %d without a readable size are left out, the objects of the "
                    "other %d count as missed", skipped, left_out, skipped - left_out)
    results = evaluator.summarize()
    if not results:  # a non-zero DDP rank
        return results
    n = max(1, len(items) + len(evaluator.skipped) - skipped)
    results["ms_per_image"] = {k: 1000 * v / n for k, v in seconds.items()}
    results["skipped_images"] = skipped
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        write_text(save_dir / "metrics.json", json.dumps(results, indent=2))
        write_text(save_dir / "results.txt", format_table(results) + "\n")
        if save_json:
            evaluator.save_json(save_dir / "predictions.json")
    return results


def format_table(results: dict[str, Any]) -> str:
    """All classes, then one row per class that has objects: images, instances, AP50, AP."""
    head = f"{'class':>22} {'images':>8} {'instances':>10} {'AP50':>8} {'AP50-95':>8}"
    lines = [head, f"{'all':>22} {results['images']:>8} {results['instances']:>10} "
                   f"{results['map50']:>8.4f} {results['map']:>8.4f}"]
    for c in results["per_class"]:
        if c["instances"]:
            lines.append(f"{c['name']:>22} {c['images']:>8} {c['instances']:>10} {c['ap50']:>8.4f} {c['ap']:>8.4f}")
    return "\n".join(lines)
