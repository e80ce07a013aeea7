"""CSPDarknet, the YOLOv5 (v6.0+) backbone, as the in-framework baseline.

Its SPPF lives in our neck (on every backbone's stride-32 map), so ``yolov5n.yaml`` rebuilds YOLOv5nu exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import C3, ConvBNAct, make_divisible
from .base import Backbone, pick_variant, register_backbone

SCALES = {"n": (0.33, 0.25), "s": (0.33, 0.50), "m": (0.67, 0.75), "l": (1.0, 1.0)}  # depth, width multiples
WIDTHS = (64, 128, 256, 512, 1024)
DEPTHS = (3, 6, 9, 3)


@register_backbone("cspdarknet")
class CSPDarknet(Backbone):
    def __init__(self, variant: str = "n", act: str = "silu") -> None:
        super().__init__()
        depth, width = pick_variant("cspdarknet", variant, SCALES)
        c = [make_divisible(w * width) for w in WIDTHS]
        n = [max(round(d * depth), 1) for d in DEPTHS]
        self.stem = ConvBNAct(3, c[0], 6, 2, 2, act=act)  # stride 2
        self.dark2 = nn.Sequential(ConvBNAct(c[0], c[1], 3, 2, act=act), C3(c[1], c[1], n[0], act=act))  # 4
        self.dark3 = nn.Sequential(ConvBNAct(c[1], c[2], 3, 2, act=act), C3(c[2], c[2], n[1], act=act))  # 8
        self.dark4 = nn.Sequential(ConvBNAct(c[2], c[3], 3, 2, act=act), C3(c[3], c[3], n[2], act=act))  # 16
        self.dark5 = nn.Sequential(ConvBNAct(c[3], c[4], 3, 2, act=act), C3(c[4], c[4], n[3], act=act))  # 32
        self.channels = c[2:]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p3 = self.dark3(self.dark2(self.stem(x)))
        p4 = self.dark4(p3)
        return [p3, p4, self.dark5(p4)]
