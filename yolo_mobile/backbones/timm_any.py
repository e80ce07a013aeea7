"""Any timm model that supports ``features_only``, tapped at strides 8, 16 and 32."""

from __future__ import annotations

import timm
import torch

from ..layers import fold_conv_bn
from .base import DETECTION_STRIDES, Backbone, register_backbone
from .pretrained import timm_feature_keys


@register_backbone("timm")
class TimmBackbone(Backbone):
    def __init__(self, model: str, drop_path_rate: float | None = None) -> None:
        super().__init__()
        kwargs = {} if drop_path_rate is None else {"drop_path_rate": drop_path_rate}
        try:
            self.model = timm.create_model(model, pretrained=False, features_only=True, **kwargs)
        except RuntimeError as e:  # timm's message for an unknown name is long and ends with the name
            raise ValueError(f"timm cannot build '{model}' as a feature extractor: {e}") from e
        reductions = self.model.feature_info.reduction()
        missing = [s for s in DETECTION_STRIDES if s not in reductions]
        if missing:
            raise ValueError(f"timm model '{model}' has no feature map at stride(s) {missing}; it has {reductions}")
        # the last map at each stride is the deepest one there
        self.indices = [max(i for i, r in enumerate(reductions) if r == s) for s in DETECTION_STRIDES]
        channels = self.model.feature_info.channels()
        self.channels = [channels[i] for i in self.indices]
        cfg = self.model.pretrained_cfg
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.model(x)
        return [feats[i] for i in self.indices]

    def map_pretrained(self, tensors: dict[str, torch.Tensor], style: str | None) -> dict[str, torch.Tensor]:
        """A timm checkpoint of the same model: names as its feature wrapper holds them."""
        if isinstance(getattr(self.model, "model", None), torch.nn.Module):  # FeatureGetterNet keeps the model
            return {f"model.model.{k}": v for k, v in tensors.items()}
        return timm_feature_keys(tensors, self.model, prefix="model.")

    def reparameterize(self) -> None:
        from timm.utils.model import reparameterize_model

        reparameterize_model(self.model, inplace=True)
        fold_conv_bn(self)
