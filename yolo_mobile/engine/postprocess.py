"""Decoded model output -> per-image detections: confidence filter, class-aware NMS, top-k.

Shared by val, detect, export and benchmark, so every path keeps the same boxes.
"""

from __future__ import annotations

import torch
from torchvision.ops import box_convert, nms


def class_aware_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou: float) -> torch.Tensor:
    """Indices kept by per-class NMS, best first. Each class is shifted to its own range, measured from the
    smallest coordinate: torchvision's batched_nms measures from 0 and lets classes overlap when boxes reach
    past the image's top or left edge (negative coordinates, common before clipping)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    low, high = boxes.min(), boxes.max()
    shifted = boxes - low + (classes.to(boxes) * (high - low + 1))[:, None]
    return nms(shifted, scores, iou)


# the one place the NMS defaults live: detect, export --nms and the Python API keep CONF; val scores every box
# down to VAL_CONF, as COCO mAP wants the whole precision-recall curve
CONF, VAL_CONF, IOU, MAX_DET = 0.25, 0.001, 0.7, 300


def non_max_suppression(output: torch.Tensor, conf: float = CONF, iou: float = IOU, max_det: int = MAX_DET,
                        classes: list[int] | None = None, multi_label: bool = False, agnostic: bool = False,
                        max_candidates: int = 30000) -> list[dict[str, torch.Tensor]]:
    """``output`` is the model's eval output (B, 4 + nc, N) with cx, cy, w, h boxes.

    Returns per image a dict of ``boxes`` (K, 4) xyxy, ``scores`` (K,) and ``classes`` (K,) int64, best first.
    ``multi_label`` keeps every class above ``conf`` for a box (what mAP evaluation wants); otherwise the best one.
    """
    results = []
    for pred in output.transpose(1, 2):  # (N, 4 + nc)
        boxes = box_convert(pred[:, :4], "cxcywh", "xyxy")
        scores_all = pred[:, 4:]
        if multi_label:
            idx, cls = (scores_all > conf).nonzero(as_tuple=True)
            boxes, scores = boxes[idx], scores_all[idx, cls]
        else:
            scores, cls = scores_all.max(1)
            keep = scores > conf
            boxes, scores, cls = boxes[keep], scores[keep], cls[keep]
        if classes is not None:
            keep = torch.isin(cls, torch.as_tensor(classes, device=cls.device))
            boxes, scores, cls = boxes[keep], scores[keep], cls[keep]
        if scores.numel() > max_candidates:
            top = scores.topk(max_candidates).indices
            boxes, scores, cls = boxes[top], scores[top], cls[top]
        keep = class_aware_nms(boxes.float(), scores.float(), torch.zeros_like(cls) if agnostic else cls, iou)
        keep = keep[:max_det]
        results.append({"boxes": boxes[keep], "scores": scores[keep], "classes": cls[keep]})
    return results
