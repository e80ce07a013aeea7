"""FastViT (Vasu et al., ICCV 2023) from timm: structural reparameterization makes its train-time branches
(MobileOne blocks, RepMixer, RepCPE) single convolutions for deployment."""

from __future__ import annotations

from types import SimpleNamespace

import timm
import torch
from timm.models.fastvit import checkpoint_filter_fn
from timm.utils.model import reparameterize_model

from ..layers import fold_conv_bn
from .base import IMAGENET_MEAN, IMAGENET_STD, Backbone, pick_variant, register_backbone
from .pretrained import timm_feature_keys

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

    variants = tuple(VARIANTS)

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

    @staticmethod
    def pretrained_style(keys: set[str]) -> str | None:
        """timm's FastViT checkpoints, or apple/ml-fastvit's originals (``patch_embed``, ``network.N``)."""
        if any(".token_mixer." in k for k in keys):
            if any(k.startswith(("stem.0.", "model.stem_0.")) for k in keys):
                return "timm"
            if any(k.startswith(("patch_embed.", "network.")) for k in keys):
                return "ml-fastvit"
        return None

    def map_pretrained(self, tensors: dict[str, torch.Tensor], style: str | None) -> dict[str, torch.Tensor]:
        """Original names -> timm's (timm's own converter), then timm's -> its features_only wrapper's."""
        if style == "ml-fastvit" or any(k.startswith(("patch_embed.", "network.")) for k in tensors):
            # the model argument is only read for a CLIP projection head, which the backbone drops anyway
            tensors = checkpoint_filter_fn(tensors, SimpleNamespace(head=None))
        return timm_feature_keys(tensors, self.model, prefix="model.")
