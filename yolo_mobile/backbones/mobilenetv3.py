"""MobileNetV3 Large and Small (Howard et al., ICCV 2019) from torchvision, with every construction option it has:
``width_mult``, ``reduced_tail`` (the paper's detection tail, on by default) and ``dilated``."""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.models import mobilenet_v3_large, mobilenet_v3_small

from ..layers import BN_MOMENTUM
from .base import IMAGENET_MEAN, IMAGENET_STD, Backbone, pick_variant, register_backbone

# Taps are the last block at each stride. Large: features[6] ends stride 8 (40 ch), features[12] ends stride 16
# (112 ch). Small: features[3] (24 ch) and features[8] (48 ch). At stride 32 both take the final 1x1 expansion
# (Large 960, Small 576; half that with the reduced tail) rather than the last block (160 / 96): at 1/32
# resolution it is cheap, and its width is what the classifier learned to use.
VARIANTS = {"large": (mobilenet_v3_large, (6, 12, 16)), "small": (mobilenet_v3_small, (3, 8, 12))}


@register_backbone("mobilenetv3")
class MobileNetV3(Backbone):
    """``dilated=True`` keeps the last stage at stride 16 (atrous depthwise convolutions): strides 8/16/16."""

    mean, std = IMAGENET_MEAN, IMAGENET_STD
    variants = tuple(VARIANTS)

    def __init__(self, variant: str = "large", reduced_tail: bool = True, width_mult: float = 1.0,
                 dilated: bool = False) -> None:
        super().__init__()
        build, taps = pick_variant("mobilenetv3", variant, VARIANTS)
        if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not width_mult > 0:
            raise ValueError(f"mobilenetv3 width_mult must be a positive number, got {width_mult!r}")
        for name, flag in (("reduced_tail", reduced_tail), ("dilated", dilated)):
            if not isinstance(flag, bool):
                raise ValueError(f"mobilenetv3 {name} must be true or false, got {flag!r}")
        features = build(weights=None, reduced_tail=reduced_tail, width_mult=float(width_mult),
                         dilated=dilated).features
        # keep only the blocks the taps reach, so the ImageNet key names (features.N...) are unchanged
        self.features = features[: taps[-1] + 1]
        # torchvision's momentum 0.01 (for 600 ImageNet epochs) leaves the running statistics ~100 steps behind
        # the weights of a short run: 10 epochs from scratch scored 0.437 mAP50-95 with it, 0.574 with the
        # detector's 0.03 (docs/training.md); eps is already 1e-3.
        for m in self.features.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = BN_MOMENTUM
        self.taps = list(taps)
        # torchvision rounds every width to a multiple of 8, so the channels are read from the blocks
        self.channels = [self.features[i].out_channels for i in taps]
        self.strides = [_stride(self.features[: i + 1]) for i in taps]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i, block in enumerate(self.features):
            x = block(x)
            if i in self.taps:
                outs.append(x)
        return outs

    @staticmethod
    def pretrained_style(keys: set[str]) -> str | None:
        """torchvision's ``mobilenet_v3_large``/``_small`` weights: ``features.N.block...`` (and ``classifier``)."""
        if any(k.startswith("features.1.block.") for k in keys) and not any(".token_mixer." in k for k in keys):
            return "torchvision"
        return None

    def map_pretrained(self, tensors: dict[str, torch.Tensor], style: str | None) -> dict[str, torch.Tensor]:
        """torchvision names are ours (``features.N``); the classifier and, with the reduced tail or another
        width, the blocks whose shapes differ do not fit and are reported as skipped."""
        return tensors


def _stride(blocks: nn.Module) -> int:
    """The stride of a chain of blocks: the product of its convolutions' strides (squeeze-excite's are 1)."""
    return math.prod(m.stride[0] for m in blocks.modules() if isinstance(m, nn.Conv2d))
