"""MobileViT (Mehta & Rastegari, ICLR 2022) from timm, as a detection backbone.

Detection uses the outputs of stages L3/L4/L5 (strides 8/16/32) without the final 1x1 expansion conv,
as the paper's SSDLite does: that conv (160 -> 640 for S) only serves the classifier.
"""

from __future__ import annotations

import re
import types

import timm
import torch
import torch.nn.functional as F
from timm.models.mobilevit import MobileVitBlock

from .base import Backbone, pick_variant, register_backbone

VARIANTS = {"xxs": "mobilevit_xxs", "xs": "mobilevit_xs", "s": "mobilevit_s"}
STAGES = [2, 3, 4]  # timm stage indices of L3, L4, L5


@register_backbone("mobilevit")
class MobileViT(Backbone):
    variants = tuple(VARIANTS)

    def __init__(self, variant: str = "s", drop_path_rate: float = 0.0) -> None:
        super().__init__()
        model_name = pick_variant("mobilevit", variant, VARIANTS)
        self.model = timm.create_model(model_name, pretrained=False, drop_path_rate=drop_path_rate)
        self.model.prune_intermediate_layers(STAGES, prune_head=True)
        self.model.final_conv = torch.nn.Identity()  # never run (exclude_final_conv), so drop its weights
        for block in self.model.modules():
            if isinstance(block, MobileVitBlock):  # per instance: timm's class is left as it is
                block.forward = types.MethodType(_traceable_block_forward, block)
        # feature_info describes stage 4 by the final conv it ends in, so read channels off a dry run
        with torch.no_grad():
            feats = self.forward(torch.zeros(1, 3, 64, 64))
        self.channels = [f.shape[1] for f in feats]
        self.strides = [self.model.feature_info[i]["reduction"] for i in STAGES]
        # timm's MobileViT weights were trained on [0, 1] inputs without mean/std normalisation
        cfg = self.model.pretrained_cfg
        if tuple(cfg["mean"]) != (0.0, 0.0, 0.0) or tuple(cfg["std"]) != (1.0, 1.0, 1.0):
            self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # timm interpolates MobileViT's 2x2 patches, so sizes that are not multiples of 64 work too
        return self.model.forward_intermediates(x, indices=STAGES, intermediates_only=True, exclude_final_conv=True)


    @staticmethod
    def pretrained_style(keys: set[str]) -> str | None:
        """timm's MobileViT checkpoints (``stages.N.M.transformer...``), the classifier or this backbone."""
        if any(re.match(r"(model\.)?stages\.\d+\.\d+\.transformer\.", k) for k in keys):
            return "timm"
        return None

    def map_pretrained(self, tensors: dict[str, torch.Tensor], style: str | None) -> dict[str, torch.Tensor]:
        """timm names -> ours: the timm model sits under ``model.``; its final conv and head are not used."""
        return {k if k.startswith("model.") else f"model.{k}": v for k, v in tensors.items()}


def _traceable_block_forward(self: MobileVitBlock, x: torch.Tensor) -> torch.Tensor:
    """timm's MobileVitBlock.forward with sizes kept as tensor arithmetic, so an ONNX trace stays valid at any
    height and width (timm's ``math.ceil`` turns them into constants). Same results in eager mode."""
    shortcut = x
    x = self.conv_1x1(self.conv_kxk(x))
    ph, pw = self.patch_size
    b, c, h, w = x.shape
    new_h, new_w = (h + ph - 1) // ph * ph, (w + pw - 1) // pw * pw  # ceil to a multiple of the patch
    nh, nw = new_h // ph, new_w // pw
    tracing = torch.jit.is_tracing()
    resize = tracing or new_h != h or new_w != w  # traced: always (a same-size bilinear resize is the identity)
    if resize:
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    # unfold: (B, C, H, W) -> (B * P, N, C) with P = ph * pw pixels per patch and N = nh * nw patches
    x = x.reshape(b * c * nh, ph, nw, pw).transpose(1, 2)
    x = x.reshape(b, c, nh * nw, self.patch_area).transpose(1, 3).reshape(b * self.patch_area, nh * nw, -1)
    x = self.norm(self.transformer(x))
    # fold back
    x = x.contiguous().view(b, self.patch_area, nh * nw, -1)
    x = x.transpose(1, 3).reshape(b * c * nh, nw, ph, pw)
    x = x.transpose(1, 2).reshape(b, c, nh * ph, nw * pw)
    if resize:
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    x = self.conv_proj(x)
    if self.conv_fusion is not None:
        x = self.conv_fusion(torch.cat((shortcut, x), dim=1))
    return x
