"""YOLOv8 detection loss: task-aligned assignment, BCE classification, CIoU box and DFL terms.

The assigner and the box/DFL criterion are ultralytics', reached through ``_ultralytics`` (keywords only, their
signatures checked on first use); the anchors and the box decode are the head's own. This module feeds them our
head's maps and our padded xyxy targets, with every hyperparameter passed in.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _ultralytics
from .head import anchor_points, distances_to_boxes


class DetectionLoss:
    def __init__(self, nc: int, strides: list[int], reg_max: int = 16, box: float = 7.5, cls: float = 0.5,
                 dfl: float = 1.5, topk: int = 10, alpha: float = 0.5, beta: float = 6.0) -> None:
        self.nc, self.strides, self.reg_max = nc, list(strides), reg_max
        self.gains = torch.tensor([box, cls, dfl])
        self.assigner = _ultralytics.assigner(topk=topk, num_classes=nc, alpha=alpha, beta=beta, stride=list(strides))
        self.bbox_loss = _ultralytics.bbox_loss(reg_max=reg_max)
        self.bce = nn.BCEWithLogitsLoss(reduction="none")

    def __call__(self, maps: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``maps``: the head's training output; ``targets`` (B, M, 5) of class, x1, y1, x2, y2 in input pixels,
        class -1 for padding. Returns (sum of the weighted terms x batch size, detached [box, cls, dfl])."""
        b = maps[0].shape[0]
        device = maps[0].device
        pred = torch.cat([m.flatten(2) for m in maps], 2).transpose(1, 2)  # (B, N, 4 * reg_max + nc)
        pred_dist, pred_scores = pred.split((4 * self.reg_max, self.nc), 2)
        anchors, stride_t = anchor_points(maps, self.strides)
        imgsz = torch.tensor(maps[0].shape[2:], device=device, dtype=pred.dtype) * self.strides[0]

        targets = targets.to(device)
        gt_labels, gt_boxes = targets[..., :1], targets[..., 1:]
        mask_gt = (gt_labels >= 0).float()
        gt_labels = gt_labels.clamp(min=0)

        proj = torch.arange(self.reg_max, device=device, dtype=pred.dtype)
        dist = pred_dist.view(b, -1, 4, self.reg_max).softmax(3).matmul(proj)
        pred_boxes = distances_to_boxes(dist, anchors, xywh=False)  # grid units

        _, target_boxes, target_scores, fg_mask, _ = self.assigner(
            pd_scores=pred_scores.detach().sigmoid(), pd_bboxes=(pred_boxes.detach() * stride_t).type(gt_boxes.dtype),
            anc_points=anchors * stride_t, gt_labels=gt_labels, gt_bboxes=gt_boxes, mask_gt=mask_gt)
        target_scores_sum = target_scores.sum().clamp(min=1)  # stays on the device: no sync

        loss_cls = self.bce(pred_scores, target_scores.to(pred_scores.dtype)).sum() / target_scores_sum
        loss_box, loss_dfl = self.bbox_loss(
            pred_dist=pred_dist, pred_bboxes=pred_boxes, anchor_points=anchors, target_bboxes=target_boxes / stride_t,
            target_scores=target_scores, target_scores_sum=target_scores_sum, fg_mask=fg_mask, imgsz=imgsz,
            stride=stride_t)
        terms = torch.stack([loss_box, loss_cls, loss_dfl]) * self.gains.to(device)
        return terms.sum() * b, terms.detach()
