"""The YOLOv5 PAN neck: SPPF on the stride-32 map, a top-down path, then a bottom-up path.

Its input channels are the backbone's ``channels``; the YAML gives only depth and width multiples. Two maps are
joined by the ratio of the strides the backbone declares: x2 (upsample, stride-2 convolution) or x1 (as they are,
stride-1 convolution), so a dilated backbone with strides 8/16/16 works unchanged. ``depthwise`` makes every 3x3
convolution (the two downsampling ones and the C3 bottlenecks') depthwise 3x3 + pointwise 1x1, as YOLOX-Nano's;
``sppf=False`` leaves out the spatial pyramid pooling on P5.
"""

from __future__ import annotations

import torch
from torch import nn

from .backbones.base import DETECTION_STRIDES, stride_steps
from .layers import C3, SPPF, ConvBNAct, conv_block, make_divisible

# YOLOv5's head widths for P3, P4, P5 and C3 depth at multiples 1.0
BASE_WIDTHS = (256, 512, 1024)
BASE_DEPTH = 3


class PAN(nn.Module):
    def __init__(self, in_channels: list[int], strides: list[int] | None = None, depth: float = 0.33,
                 width: float = 0.25, act: str = "silu", sppf_kernel: int = 5, depthwise: bool = False,
                 sppf: bool = True) -> None:
        super().__init__()
        c3, c4, c5 = in_channels
        step34, step45 = stride_steps(strides or DETECTION_STRIDES)
        w3, w4, w5 = (make_divisible(c * width) for c in BASE_WIDTHS)
        n = max(round(BASE_DEPTH * depth), 1)
        # without SPPF (PicoDet and NanoDet have none) P5 enters the PAN through a 1x1 conv to its width
        self.sppf = SPPF(c5, w5, sppf_kernel, act=act) if sppf else ConvBNAct(c5, w5, 1, act=act)
        # top-down
        self.lateral5 = ConvBNAct(w5, w4, 1, act=act)
        self.up5 = _upsample(step45)  # P5's grid to P4's
        self.up4 = _upsample(step34)
        self.td4 = C3(w4 + c4, w4, n, shortcut=False, act=act, depthwise=depthwise)
        self.lateral4 = ConvBNAct(w4, w3, 1, act=act)
        self.td3 = C3(w3 + c3, w3, n, shortcut=False, act=act, depthwise=depthwise)
        # bottom-up
        self.down3 = conv_block(w3, w3, 3, step34, act=act, depthwise=depthwise)
        self.bu4 = C3(w3 + w3, w4, n, shortcut=False, act=act, depthwise=depthwise)
        self.down4 = conv_block(w4, w4, 3, step45, act=act, depthwise=depthwise)
        self.bu5 = C3(w4 + w4, w5, n, shortcut=False, act=act, depthwise=depthwise)
        self.channels = [w3, w4, w5]

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        p3, p4, p5 = feats
        l5 = self.lateral5(self.sppf(p5))
        t4 = self.td4(torch.cat((self.up5(l5), p4), 1))
        l4 = self.lateral4(t4)
        out3 = self.td3(torch.cat((self.up4(l4), p3), 1))
        out4 = self.bu4(torch.cat((self.down3(out3), l4), 1))
        out5 = self.bu5(torch.cat((self.down4(out4), l5), 1))
        return [out3, out4, out5]


def _upsample(step: int) -> nn.Module:
    return nn.Upsample(scale_factor=2, mode="nearest") if step == 2 else nn.Identity()
