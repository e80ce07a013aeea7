"""MobileViT (Mehta & Rastegari, ICLR 2022) from timm, as a detection backbone.

Detection uses the outputs of stages L3/L4/L5 (strides 8/16/32) without the final 1x1 expansion conv,
as the paper's SSDLite does: that conv (160 -> 640 for S) only serves the classifier.

Training memory: attention runs through ``F.scaled_dot_product_attention`` (a fused kernel, no N x N matrix),
whatever timm's global switches say; and in training, each BatchNorm + SiLU that feeds a convolution is
recomputed in backward from the BatchNorm's input instead of being kept (two of the three maps a
Conv-BN-SiLU keeps; the inverted-residual blocks at strides 2 and 4 are most of the memory). The forward
runs the same modules on the same inputs, so outputs are unchanged.
"""

from __future__ import annotations

import re
import types

import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention, BatchNormAct2d
from timm.models.byobnet import BottleneckBlock
from timm.models.mobilevit import MobileVitBlock
from torch import nn
from torch.autograd.function import once_differentiable

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
        for block in self.model.modules():  # per instance: timm's classes and global flags are left as they are
            if isinstance(block, MobileVitBlock):
                block.forward = types.MethodType(_traceable_block_forward, block)
            elif isinstance(block, BottleneckBlock) and _is_inverted_residual(block):
                block.forward = types.MethodType(_bottleneck_forward, block)
            elif isinstance(block, Attention):
                # timm decides at construction (TIMM_FUSED_ATTN, its exportable flag); ONNX export handles SDPA
                block.fused_attn = True
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
    height and width (timm's ``math.ceil`` turns them into constants). Same results in eager mode; the unfold and
    the fold are one permute (one copy) each where timm's chains of reshapes make two."""
    shortcut = x
    x = _norm_act_conv(self.conv_kxk.conv(x), self.conv_kxk.bn, self.conv_1x1)  # timm builds conv_kxk without aa
    ph, pw = self.patch_size
    b, c, h, w = x.shape
    new_h, new_w = (h + ph - 1) // ph * ph, (w + pw - 1) // pw * pw  # ceil to a multiple of the patch
    nh, nw = new_h // ph, new_w // pw
    tracing = torch.jit.is_tracing()
    resize = tracing or new_h != h or new_w != w  # traced: always (a same-size bilinear resize is the identity)
    if resize:
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    # unfold: (B, C, H, W) -> (B * P, N, C), P = ph * pw pixels per patch (index i * pw + j), N = nh * nw patches
    x = x.reshape(b, c, nh, ph, nw, pw).permute(0, 3, 5, 2, 4, 1).reshape(b * self.patch_area, nh * nw, c)
    x = self.norm(self.transformer(x))
    # fold back: the inverse permutation
    x = x.reshape(b, ph, pw, nh, nw, c).permute(0, 5, 3, 1, 4, 2).reshape(b, c, nh * ph, nw * pw)
    if resize:
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    x = self.conv_proj(x)
    if self.conv_fusion is not None:
        x = self.conv_fusion(torch.cat((shortcut, x), dim=1))
    return x


def _bottleneck_forward(self: BottleneckBlock, x: torch.Tensor) -> torch.Tensor:
    """timm's BottleneckBlock.forward (MobileNetV2's inverted residual here) with the expanded maps' BN + SiLU
    recomputed in backward (:func:`_norm_act_conv`) rather than kept."""
    shortcut = x
    x = _norm_act_conv(self.conv1_1x1.conv(x), self.conv1_1x1.bn, self.conv2_kxk.conv)
    x = _norm_act_conv(x, self.conv2_kxk.bn, self.conv3_1x1.conv)
    x = self.drop_path(self.conv3_1x1.bn(x))
    if self.shortcut is not None:
        x = x + self.shortcut(shortcut)
    return self.act(x)


def _is_inverted_residual(block: BottleneckBlock) -> bool:
    """The layout of MobileViT's BottleneckBlocks (1x1 expand, kxk depthwise, 1x1 project, no extra conv,
    attention or anti-aliasing), the one :func:`_bottleneck_forward` is written for."""
    return all(isinstance(m, nn.Identity) for m in (block.conv2b_kxk, block.attn, block.attn_last)) and all(
        getattr(m, "aa", None) is None for m in (block.conv1_1x1, block.conv2_kxk, block.conv3_1x1))


def _norm_act_conv(x: torch.Tensor, norm: nn.Module, conv: nn.Module) -> torch.Tensor:
    """``conv(norm(x))``; in training with autograd, through :class:`_RecomputedNormAct`, which keeps only ``x``
    for backward (eager PyTorch would keep ``x``, norm's output and the activation's output)."""
    if not (norm.training and torch.is_grad_enabled() and type(norm) is BatchNormAct2d and norm.affine
            and isinstance(getattr(norm, "drop", nn.Identity()), nn.Identity) and type(conv) is nn.Conv2d
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str) and not _autocast(x)
            and not torch.jit.is_tracing() and not torch.jit.is_scripting()):
        return conv(norm(x))
    return _RecomputedNormAct.apply(x, norm, conv, norm.weight, norm.bias, conv.weight, conv.bias)


def _autocast(x: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


class _RecomputedNormAct(torch.autograd.Function):
    """``conv(norm_act(x))`` for a training-mode BatchNormAct2d: the forward runs the modules themselves (batch
    statistics, running statistics updated once); backward recomputes ``norm_act(x)`` from the saved ``x`` with the
    same batch statistics (running statistics left alone), takes the conv's gradients with
    ``aten.convolution_backward`` and BN + activation's by autograd on the recomputed piece."""

    @staticmethod
    def forward(ctx, x, norm, conv, norm_weight, norm_bias, conv_weight, conv_bias):
        ctx.modules = norm, conv
        ctx.save_for_backward(x, norm_weight, norm_bias, conv_weight, conv_bias)
        return conv(norm(x))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, norm_weight, norm_bias, conv_weight, conv_bias = ctx.saved_tensors
        norm, conv = ctx.modules
        need_x, _, _, need_nw, need_nb, need_cw, need_cb = ctx.needs_input_grad
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(need) for t, need in
                      ((x, need_x), (norm_weight, need_nw), (norm_bias, need_nb))]
            act = getattr(norm, "act", nn.Identity())
            a = act(F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], True, 0.0, norm.eps))
        grad_a, grad_cw, grad_cb = torch.ops.aten.convolution_backward(
            grad, a.detach(), conv_weight, None if conv_bias is None else [conv_bias.shape[0]], conv.stride,
            conv.padding, conv.dilation, False, [0] * len(conv.stride), conv.groups,
            [True, need_cw, conv_bias is not None and need_cb])
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(a, wanted, grad_a) if wanted else ())
        grad_x, grad_nw, grad_nb = (next(grads) if t.requires_grad else None for t in leaves)
        return grad_x, None, None, grad_nw, grad_nb, grad_cw, grad_cb if conv_bias is not None else None
