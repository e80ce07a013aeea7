"""Plain vision transformers from timm (DeiT, ViT, ConViT) with ViTDet's simple feature pyramid.

A plain ViT has one map, at stride 16. The pyramid (Li et al., ViTDet, ECCV 2022) builds the three detection maps
from it: stride 8 by a 2x transposed convolution, stride 16 as it is (after the ViT's own final LayerNorm), stride
32 by a 2x2 stride-2 convolution, the two new ones each with a BatchNorm (folded away by ``reparameterize``).

Any input that is a multiple of 32 works. The position embeddings are resampled to the input's patch grid on every
forward (timm's ``resample_abs_pos_embed``, bicubic without antialiasing: ONNX opset 17 has no antialiased
resize), and ConViT's gated positional self-attention (GPSA) is given the relative positions of that grid; timm's
ConViT takes its grid from the square root of the token count, which is only right for square inputs, and would
freeze the export size into an ONNX graph.
"""

from __future__ import annotations

import re

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.convit import GPSA, ConVit
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn import functional as F

from ..layers import BN_EPS, BN_MOMENTUM
from .base import Backbone, register_backbone

PATCH_STRIDE = 16


@register_backbone("vit")
class ViT(Backbone):
    """``model``: a timm VisionTransformer with 16x16 patches (``deit_tiny_patch16_224``, ``deit_small_...``,
    ``deit_tiny_distilled_...``, ``vit_small_patch16_224``, ...) or a ConViT (``convit_tiny``, ``convit_small``).
    Class and distillation tokens are dropped before the map is formed."""

    def __init__(self, model: str, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        try:
            net = timm.create_model(model, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate)
        except (RuntimeError, TypeError) as e:  # unknown name; a model without drop_path_rate
            raise ValueError(f"timm cannot build '{model}' as a plain ViT: {e}") from e
        if not isinstance(net, (VisionTransformer, ConVit)):
            raise ValueError(f"timm model '{model}' is a {type(net).__name__}; the vit backbone takes timm's "
                             "VisionTransformer family (DeiT, ViT) and ConViT (for others try `name: timm`)")
        proj = net.patch_embed.proj
        if not (isinstance(proj, nn.Conv2d) and tuple(proj.stride) == (PATCH_STRIDE, PATCH_STRIDE)) or \
                getattr(net, "pos_embed", None) is None:
            raise ValueError(f"timm model '{model}' is not a plain ViT with {PATCH_STRIDE}x{PATCH_STRIDE} patches "
                             "and absolute position embeddings")
        # the classifier side is never used here: without it every parameter gets a gradient
        for name in ("fc_norm", "head_drop", "head", "head_dist", "attn_pool"):
            if isinstance(getattr(net, name, None), nn.Module):
                setattr(net, name, nn.Identity())
        self.model = net
        self.grid = tuple(net.patch_embed.grid_size)  # the grid the position embeddings were trained at
        dim = net.embed_dim
        self.pyramid = SimpleFeaturePyramid(dim)
        self.channels = self.pyramid.channels
        cfg = net.pretrained_cfg
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Patch tokens (B, h*w, C) in row-major order, and their grid (h, w)."""
        x = self.model.patch_embed.proj(x)
        h, w = x.shape[-2:]
        x = self.model.patch_embed.norm(x.flatten(2).transpose(1, 2))
        return x, h, w

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b = x.shape[0]
        x, h, w = self.tokens(x)
        run = _convit_blocks if isinstance(self.model, ConVit) else _vit_blocks
        x = run(self.model, x, self.grid, h, w)
        x = self.model.norm(x)
        x = x[:, x.shape[1] - h * w:]  # patch tokens are last; class and distillation tokens go
        return self.pyramid(x.transpose(1, 2).reshape(b, -1, h, w))

    @staticmethod
    def pretrained_style(keys: set[str]) -> str | None:
        """timm's ViT/DeiT/ConViT checkpoints: ``pos_embed``, ``patch_embed.proj``, ``blocks.N.attn``."""
        if any(re.match(r"(model\.)?blocks\.0\.attn\.", k) for k in keys) and \
                any(re.fullmatch(r"(model\.)?pos_embed", k) for k in keys):
            return "timm ConViT" if any(k.endswith(".attn.gating_param") for k in keys) else "timm ViT"
        return None

    def map_pretrained(self, tensors: dict[str, torch.Tensor], style: str | None) -> dict[str, torch.Tensor]:
        """timm names -> ours: the timm model sits under ``model.``; its head is not used."""
        return {k if k.startswith(("model.", "pyramid.")) else f"model.{k}": v for k, v in tensors.items()}


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid from one stride-16 map: channels dim/2, dim, dim at strides 8, 16, 32."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        # YOLOv5's BN settings, as everywhere else in the detector
        self.up = nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, 2, bias=False),
                                nn.BatchNorm2d(dim // 2, eps=BN_EPS, momentum=BN_MOMENTUM))
        self.down = nn.Sequential(nn.Conv2d(dim, dim, 2, 2, bias=False),
                                  nn.BatchNorm2d(dim, eps=BN_EPS, momentum=BN_MOMENTUM))
        self.channels = [dim // 2, dim, dim]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.up(x), x, self.down(x)]


def _position_embedding(pos_embed: torch.Tensor, grid: tuple[int, int], h: int, w: int,
                        prefix: int) -> torch.Tensor:
    """The trained embeddings resampled from ``grid`` to (h, w); the first ``prefix`` (class, distillation) kept."""
    return resample_abs_pos_embed(pos_embed, new_size=[h, w], old_size=list(grid), num_prefix_tokens=prefix,
                                  antialias=False)


def _vit_blocks(net: VisionTransformer, x: torch.Tensor, grid: tuple[int, int], h: int, w: int) -> torch.Tensor:
    """timm's VisionTransformer.forward_features with the position embeddings resampled to (h, w)."""
    prefix = [t.expand(x.shape[0], -1, -1) for t in (net.cls_token, getattr(net, "dist_token", None),
                                                     net.reg_token) if t is not None]
    if net.no_embed_class:  # DeiT III and later: the embeddings cover the patches only
        x = torch.cat([*prefix, x + _position_embedding(net.pos_embed, grid, h, w, 0)], 1)
    else:  # DeiT, original ViT: the embeddings include the class (and distillation) tokens
        x = torch.cat([*prefix, x], 1) + _position_embedding(net.pos_embed, grid, h, w, len(prefix))
    x = net.norm_pre(net.pos_drop(x))
    return net.blocks(x)


def _convit_blocks(net: ConVit, x: torch.Tensor, grid: tuple[int, int], h: int, w: int) -> torch.Tensor:
    """timm's ConVit.forward_features with the embeddings resampled and GPSA given the (h, w) grid's offsets."""
    x = net.pos_drop(x + _position_embedding(net.pos_embed, grid, h, w, 0))
    offsets = grid_offsets(h, w, x.dtype, x.device)
    for i, block in enumerate(net.blocks):
        if i == net.local_up_to_layer:  # the class token joins after the local (GPSA) blocks, as in timm
            x = torch.cat((net.cls_token.expand(x.shape[0], -1, -1), x), 1)
        if isinstance(block.attn, GPSA):
            x = x + block.drop_path(gpsa(block.attn, block.norm1(x), offsets))
            x = x + block.drop_path(block.mlp(block.norm2(x)))
        else:
            x = block(x)
    return x


def grid_offsets(h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(3, N, N) for the N = h*w patches in row-major order: x offset, y offset and squared distance from patch n
    to patch m at [:, n, m], the relative positions ConViT's GPSA projects (timm's ``get_rel_indices``, channels
    first, for any grid). Kept as tensor arithmetic on h and w so an ONNX trace stays valid at every size."""
    index = torch.arange(h * w, device=device)
    rows, cols = (index // w).to(dtype), (index % w).to(dtype)
    dx, dy = cols[None, :] - cols[:, None], rows[None, :] - rows[:, None]
    return torch.stack((dx, dy, dx * dx + dy * dy))


def gpsa(attn: GPSA, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """timm's GPSA.forward with the relative positions given, not derived from the token count.

    GPSA attends with (1 - g) softmax(q k^T) + g softmax(positions) per head. Both rows sum to 1, so timm's
    renormalisation is a no-op and the output splits into fused attention on the content plus one product with
    the position weights, which are the same for every image: no content score matrix is stored (2.8x faster
    than timm's on a 640x640 input's grid, scripts/bench_gpsa.py). With attention dropout (0 in every timm
    ConViT) each part gets its own dropout mask."""
    b, n, c = x.shape
    heads = attn.num_heads
    drop = attn.attn_drop.p if attn.training else 0.0
    q, k = attn.qk(x).reshape(b, n, 2, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    v = attn.v(x).reshape(b, n, heads, -1).transpose(1, 2)
    content = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=attn.scale)
    # pos_proj as one matrix product on channel-first offsets: scores come out (heads, N, N), ready for the softmax
    position = torch.addmm(attn.pos_proj.bias[:, None], attn.pos_proj.weight, offsets.flatten(1))
    position = attn.attn_drop(position.reshape(1, heads, n, n).softmax(-1))
    gate = attn.gating_param.view(1, -1, 1, 1).sigmoid()
    out = (1.0 - gate) * content + gate * (position @ v)
    return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(b, n, c)))
