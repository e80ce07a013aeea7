"""FastViT (Vasu et al., ICCV 2023) from timm: structural reparameterization makes its train-time branches
(MobileOne blocks, RepMixer, RepCPE) single convolutions for deployment."""

from __future__ import annotations

import timm
import torch
from timm.utils.model import reparameterize_model

from ..layers import fold_conv_bn
from .base import IMAGENET_MEAN, IMAGENET_STD, Backbone, pick_variant, register_backbone

VARIANTS = {
    "t8": "fastvit_t8",
    "t12": "fastvit_t12",
    "s12": "fastvit_s12",
    "sa12": "fastvit_sa12",
    "sa24": "fastvit_sa24",
    "sa36": "fastvit_sa36",
    "ma36": "fastvit_ma36",
}
STAGES = (1, 2, 3)  # strides 8, 16, 32


@register_backbone("fastvit")
class FastViT(Backbone):
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, variant: str = "t8", drop_path_rate: float = 0.0) -> None:
        super().__init__()
        model_name = pick_variant("fastvit", variant, VARIANTS)
        self.model = timm.create_model(
            model_name, pretrained=False, features_only=True, out_indices=STAGES, drop_path_rate=drop_path_rate
        )
        self.channels = self.model.feature_info.channels()
        self.strides = self.model.feature_info.reduction()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model(x)

    def reparameterize(self) -> None:
        reparameterize_model(self.model, inplace=True)
        fold_conv_bn(self)
