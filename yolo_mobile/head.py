"""The anchor-free decoupled detection head of YOLOv5u / YOLOv8, with DFL box regression.

Training returns the raw per-level maps (box distribution channels first, then class logits), the layout
ultralytics' detection loss reads. Eval returns ``(B, 4 + nc, N)``: cx, cy, w, h in input pixels, then class
scores, the layout of ultralytics' ONNX files. The decode (anchor points, distances to boxes) is our own, so
inference and export never import ultralytics.

Options for light models (defaults: YOLOv8's head): ``channels`` sets the box and class branches' width apart from
the neck's (PicoDet, NanoDet); ``depthwise`` makes each 3x3 conv depthwise 3x3 + pointwise 1x1 (YOLOX-Nano);
``shared`` runs the two 3x3 convs once per level for both branches, which keep only their 1x1 predictions
(NanoDet-Plus, GFL).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import conv_block


def anchor_points(maps: list[torch.Tensor], strides: list[int], offset: float = 0.5
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres of every level, row-major, level after level: points (N, 2) as (x, y) in grid units of their
    level and each point's stride (N, 1). Shapes are read from the maps, so they stay symbolic when traced."""
    points, point_strides = [], []
    for m, stride in zip(maps, strides, strict=True):
        h, w = m.shape[-2:]
        xs = torch.arange(w, device=m.device, dtype=m.dtype) + offset
        ys = torch.arange(h, device=m.device, dtype=m.dtype) + offset
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((grid_x, grid_y), -1).view(-1, 2))
        point_strides.append(torch.full((h * w, 1), stride, device=m.device, dtype=m.dtype))
    return torch.cat(points), torch.cat(point_strides)


def distances_to_boxes(distances: torch.Tensor, points: torch.Tensor, xywh: bool = True, dim: int = -1
                       ) -> torch.Tensor:
    """Boxes from (left, top, right, bottom) distances to their anchor points along ``dim``: cx, cy, w, h when
    ``xywh``, else x1, y1, x2, y2; in the units of the inputs."""
    left_top, right_bottom = distances.chunk(2, dim)
    top_left_corner, bottom_right_corner = points - left_top, points + right_bottom
    if xywh:
        return torch.cat(((top_left_corner + bottom_right_corner) / 2, bottom_right_corner - top_left_corner), dim)
    return torch.cat((top_left_corner, bottom_right_corner), dim)


def _convs(c_in: int, c_out: int, act: str, depthwise: bool) -> list[nn.Module]:
    """A branch's two 3x3 Conv-BN-Acts."""
    return [conv_block(c_in, c_out, 3, act=act, depthwise=depthwise),
            conv_block(c_out, c_out, 3, act=act, depthwise=depthwise)]


class DetectHead(nn.Module):
    def __init__(self, nc: int, in_channels: list[int], strides: list[int], reg_max: int = 16,
                 act: str = "silu", channels: int = 0, depthwise: bool = False, shared: bool = False) -> None:
        super().__init__()
        self.nc, self.reg_max, self.strides = nc, reg_max, list(strides)
        self.no = nc + 4 * reg_max
        # YOLOv8's widths unless ``channels`` sets both
        c_box = channels or max(16, in_channels[0] // 4, reg_max * 4)
        c_cls = channels or max(in_channels[0], min(nc, 100))
        self.stem: nn.ModuleList | None = None
        if shared:
            c_box = c_cls = max(c_box, c_cls)
            self.stem = nn.ModuleList(nn.Sequential(*_convs(c, c_cls, act, depthwise)) for c in in_channels)
        self.box = nn.ModuleList(
            nn.Sequential(*([] if shared else _convs(c, c_box, act, depthwise)), nn.Conv2d(c_box, 4 * reg_max, 1))
            for c in in_channels
        )
        self.cls = nn.ModuleList(
            nn.Sequential(*([] if shared else _convs(c, c_cls, act, depthwise)), nn.Conv2d(c_cls, nc, 1))
            for c in in_channels
        )
        self.register_buffer("bins", torch.arange(reg_max, dtype=torch.float32), persistent=False)
        self._anchor_cache: tuple | None = None
        self.init_biases()

    def init_biases(self, imgsz: int = 640) -> None:
        """Box logits start flat; class logits start at the prior of ~5 objects per image (YOLOv5's rule)."""
        for box, cls, s in zip(self.box, self.cls, self.strides, strict=True):
            nn.init.constant_(box[-1].bias, 1.0)
            nn.init.constant_(cls[-1].bias, math.log(5 / self.nc / (imgsz / s) ** 2))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor] | torch.Tensor:
        if self.stem is not None:
            feats = [stem(f) for f, stem in zip(feats, self.stem, strict=True)]
        maps = [torch.cat((box(f), cls(f)), 1) for f, box, cls in zip(feats, self.box, self.cls, strict=True)]
        return maps if self.training else self.decode(maps)

    def anchors(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Anchor centres (N, 2) in grid units and their strides (N, 1), cached per input size."""
        key = (tuple(m.shape[-2:] for m in maps), maps[0].device, maps[0].dtype)
        tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        cached = self._anchor_cache  # read once: predict's frame workers share this module
        if tracing or cached is None or cached[0] != key:
            points, strides = anchor_points(maps, self.strides)
            if tracing:  # shapes must stay symbolic in an exported graph
                return points, strides
            cached = self._anchor_cache = (key, points, strides)
        return cached[1], cached[2]

    def decode(self, maps: list[torch.Tensor]) -> torch.Tensor:
        b = maps[0].shape[0]
        x = torch.cat([m.flatten(2) for m in maps], 2)  # (B, no, N)
        box, cls = x.split((4 * self.reg_max, self.nc), 1)
        # DFL: each side's distance is the expectation of a softmax over reg_max bins
        dist = box.view(b, 4, self.reg_max, -1).softmax(2)
        dist = (dist * self.bins.to(dist.dtype).view(1, 1, -1, 1)).sum(2)  # (B, 4, N)
        points, strides = self.anchors(maps)
        boxes = distances_to_boxes(dist, points.T.unsqueeze(0), xywh=True, dim=1) * strides.T
        return torch.cat((boxes, cls.sigmoid()), 1)
