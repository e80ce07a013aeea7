"""MobileNetV3-Large (Howard et al., ICCV 2019) from torchvision, with the reduced tail for detection."""

from __future__ import annotations

import torch
from torchvision.models import mobilenet_v3_large

from .base import IMAGENET_MEAN, IMAGENET_STD, Backbone, pick_variant, register_backbone

# Taps are the last block at each stride: features[6] ends stride 8 (40 ch), features[12] ends stride 16 (112 ch).
# At stride 32 we take features[16], the final 1x1 expansion (480 ch with the reduced tail) rather than
# features[15] (80 ch): at 1/32 resolution it is cheap, and its width is what the classifier learned to use.
TAPS = {"large": (6, 12, 16)}


@register_backbone("mobilenetv3")
class MobileNetV3(Backbone):
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    variants = tuple(TAPS)

    def __init__(self, variant: str = "large", reduced_tail: bool = True, width_mult: float = 1.0) -> None:
        super().__init__()
        taps = pick_variant("mobilenetv3", variant, TAPS)
        features = mobilenet_v3_large(weights=None, reduced_tail=reduced_tail, width_mult=width_mult).features
        # keep only the blocks the taps reach, so the ImageNet key names (features.N...) are unchanged
        self.features = features[: taps[-1] + 1]
        self.taps = list(taps)
        self.channels = [self.features[i].out_channels for i in taps]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i, block in enumerate(self.features):
            x = block(x)
            if i in self.taps:
                outs.append(x)
        return outs

    @staticmethod
    def pretrained_style(keys: set[str]) -> str | None:
        """torchvision's ``mobilenet_v3_large`` weights: ``features.N.block...`` (and its ``classifier``)."""
        if any(k.startswith("features.1.block.") for k in keys) and not any(".token_mixer." in k for k in keys):
            return "torchvision"
        return None

    def map_pretrained(self, tensors: dict[str, torch.Tensor], style: str | None) -> dict[str, torch.Tensor]:
        """torchvision names are ours (``features.N``); the classifier and, with the reduced tail, the
        narrower last blocks do not fit and are reported as skipped."""
        return tensors
