"""Mobile-Former (Chen et al., "Mobile-Former: Bridging MobileNet and Transformer", CVPR 2022).

A MobileNet (the Mobile sub-blocks, on the feature map) and a tiny transformer (the Former, on 3-6 global tokens)
run side by side, joined at every block by a two-way bridge:

- Mobile->Former: each token attends to the map's pixels; the map is used as keys and values as it is (no
  projection on the map side), the token side has a query projection, an output projection and post-norm;
- Former: token self-attention (keys and values are the tokens themselves) and an FFN, both post-norm;
- Mobile: an inverted bottleneck whose activations are dynamic ReLUs, max(a1 x, a2 x) per channel, with the
  slopes computed from the first global token;
- Former->Mobile: each pixel attends to the tokens (keys and values are projections of the tokens) and the
  result is added to the map.

Parameter names and shapes follow the public implementation (AAboys/MobileFormer, ``mobile_former.py`` and
``dna_blocks.py``), so its ImageNet state dicts load with ``strict=True`` into ``mobile_former_classifier(variant)``,
and into the detection backbone without the classifier's last bridge (``local_global.*``) and ``classifier.*``.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from .base import IMAGENET_MEAN, IMAGENET_STD, Backbone, pick_variant, register_backbone

BRIDGE_HEADS = 2  # heads of Mobile->Former and Former->Mobile
FORMER_HEADS = 4  # heads of the token self-attention
FFN_EXPANSION = 2
HYPER_REDUCTION = 4  # token -> dynamic ReLU coefficients: token_dim -> token_dim / 4 -> 2 x channels
DYRELU_SCALE = 2.0
MERGE_EXPANSION = 6  # the classifier's 1x1 expansion of the last map


@dataclass(frozen=True)
class MobileFormerConfig:
    stem: int
    # (expansion, channels, stride, second expansion) per block, as published. Block 0 is the lite bottleneck
    # (depthwise -> pointwise, no bridge); stride-2 blocks are dw -> pw -> dw -> pw with the second expansion;
    # the others are pw -> dw -> pw, where the second expansion is unused.
    blocks: tuple[tuple[int, int, int, int], ...]
    tokens: int
    token_dim: int
    head_features: int  # width of the classifier's hidden layer
    groups: int = 1  # groups of the pointwise convolutions (26M), with channel shuffles


_SMALL = ((3, 12, 2, 0), (3, 12, 1, 3), (6, 24, 2, 4), (3, 24, 1, 3), (6, 48, 2, 4), (4, 48, 1, 4), (6, 64, 1, 4),
          (6, 96, 2, 4), (6, 96, 1, 4))
CONFIGS = {
    "26m": MobileFormerConfig(8, _SMALL, tokens=3, token_dim=128, head_features=1024, groups=4),
    "52m": MobileFormerConfig(8, _SMALL, tokens=3, token_dim=128, head_features=1024),
    "96m": MobileFormerConfig(12, ((2, 12, 1, 0), (6, 16, 2, 4), (6, 32, 2, 4), (3, 32, 1, 3), (6, 64, 2, 4),
                                   (4, 64, 1, 4), (6, 88, 1, 4), (6, 128, 2, 4), (6, 128, 1, 4)),
                              tokens=4, token_dim=128, head_features=1280),
    "151m": MobileFormerConfig(12, ((2, 12, 1, 0), (6, 16, 2, 4), (3, 16, 1, 3), (6, 32, 2, 4), (3, 32, 1, 3),
                                    (6, 64, 2, 4), (4, 64, 1, 4), (6, 88, 1, 4), (6, 88, 1, 4), (6, 128, 2, 4),
                                    (6, 128, 1, 4), (6, 128, 1, 4)),
                               tokens=6, token_dim=192, head_features=1280),
    "214m": MobileFormerConfig(12, ((2, 12, 1, 0), (6, 20, 2, 4), (3, 20, 1, 4), (6, 40, 2, 4), (4, 40, 1, 4),
                                    (6, 80, 2, 4), (4, 80, 1, 4), (6, 112, 1, 4), (6, 112, 1, 4), (6, 160, 2, 4),
                                    (6, 160, 1, 4), (6, 160, 1, 4)),
                               tokens=6, token_dim=192, head_features=1600),
    "294m": MobileFormerConfig(16, ((2, 16, 1, 0), (6, 24, 2, 4), (4, 24, 1, 4), (6, 48, 2, 4), (4, 48, 1, 4),
                                    (6, 96, 2, 4), (4, 96, 1, 4), (6, 128, 1, 4), (6, 128, 1, 4), (6, 192, 2, 4),
                                    (6, 192, 1, 4), (6, 192, 1, 4)),
                               tokens=6, token_dim=192, head_features=1920),
    "508m": MobileFormerConfig(24, ((2, 24, 1, 0), (6, 40, 2, 4), (3, 40, 1, 3), (6, 72, 2, 4), (3, 72, 1, 3),
                                    (6, 128, 2, 4), (4, 128, 1, 4), (6, 176, 1, 4), (6, 176, 1, 4), (6, 240, 2, 4),
                                    (6, 240, 1, 4), (6, 240, 1, 4)),
                               tokens=6, token_dim=192, head_features=1920),
}


class ChannelShuffle(nn.Module):
    """Interleave ``groups`` channel groups (torch's nn.ChannelShuffle has no ONNX export)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.reshape(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def _shuffle_or_identity(groups: int, enabled: bool) -> nn.Module:
    return ChannelShuffle(groups) if enabled else nn.Identity()


def _conv_bn(c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]


def _drop_path(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0 else nn.Identity()


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C / heads), each head a contiguous slice of channels."""
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, D) -> (B, N, heads * D)."""
    b, heads, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, heads * d)


class DynamicReLUCoefficients(nn.Module):
    """The first global token -> 2 x channels slopes in [0, 1] (hard sigmoid), as (B, 2C, 1, 1)."""

    def __init__(self, token_dim: int, channels: int) -> None:
        super().__init__()
        squeezed = token_dim // HYPER_REDUCTION
        self.hyper = nn.Sequential(nn.Linear(token_dim, squeezed), nn.ReLU(), nn.Linear(squeezed, 2 * channels),
                                   nn.Hardsigmoid())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hyper(tokens[:, 0])[:, :, None, None]


def dynamic_relu(x: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """max(a1 x, a2 x) per channel, a1 in [0, 2] around 1 and a2 in [-1, 1] around 0 (identity-like at init)."""
    a1, a2 = coefficients.chunk(2, dim=1)
    return torch.maximum(x * ((a1 - 0.5) * DYRELU_SCALE + 1.0), x * ((a2 - 0.5) * DYRELU_SCALE))


class Mobile2Former(nn.Module):
    """Tokens attend to the map's pixels (keys = values = the map, split into heads by channel), scaled per channel
    by a gate computed from the tokens, projected to the token width, added and post-normalised."""

    def __init__(self, channels: int, token_dim: int, drop_path: float = 0.0) -> None:
        super().__init__()
        if channels % BRIDGE_HEADS:
            raise ValueError(f"Mobile->Former: {channels} channels do not split into {BRIDGE_HEADS} heads")
        self.alpha = nn.Sequential(nn.Linear(token_dim, channels), nn.Hardsigmoid())
        self.q = nn.Linear(token_dim, channels)
        self.proj = nn.Linear(channels, token_dim)
        self.layer_norm = nn.LayerNorm(token_dim)
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        pixels = x.reshape(b, BRIDGE_HEADS, c // BRIDGE_HEADS, -1).transpose(-1, -2)  # (B, heads, HW, C / heads)
        gathered = _merge_heads(F.scaled_dot_product_attention(_split_heads(self.q(tokens), BRIDGE_HEADS),
                                                               pixels, pixels))
        gathered = gathered * (self.alpha(tokens) * 2.0)
        return self.layer_norm(tokens + self.drop_path(self.proj(gathered)))


class Former(nn.Module):
    """Token self-attention (query projection only; keys and values are the tokens) and a GELU FFN, post-norm."""

    def __init__(self, token_dim: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.q = nn.Linear(token_dim, token_dim)
        self.channel_mlp = nn.Linear(token_dim, token_dim)
        self.layer_norm = nn.LayerNorm(token_dim)
        self.drop_path = _drop_path(drop_path)
        self.ffn = nn.Sequential(nn.Linear(token_dim, FFN_EXPANSION * token_dim), nn.GELU(),
                                 nn.Linear(FFN_EXPANSION * token_dim, token_dim))
        self.ffn_norm = nn.LayerNorm(token_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keys = _split_heads(tokens, FORMER_HEADS)
        mixed = _merge_heads(F.scaled_dot_product_attention(_split_heads(self.q(tokens), FORMER_HEADS), keys, keys))
        tokens = self.layer_norm(tokens + self.drop_path(self.channel_mlp(mixed)))
        return self.ffn_norm(tokens + self.ffn(tokens))


class Former2Mobile(nn.Module):
    """Pixels attend to the tokens (the map itself is the query; keys and values are projected tokens); the
    result is added to the map."""

    def __init__(self, channels: int, token_dim: int, drop_path: float = 0.0) -> None:
        super().__init__()
        if channels % BRIDGE_HEADS:
            raise ValueError(f"Former->Mobile: {channels} channels do not split into {BRIDGE_HEADS} heads")
        self.k = nn.Linear(token_dim, channels)
        self.proj = nn.Linear(token_dim, channels)
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        pixels = x.reshape(b, BRIDGE_HEADS, c // BRIDGE_HEADS, -1).transpose(-1, -2)  # (B, heads, HW, C / heads)
        out = F.scaled_dot_product_attention(pixels, _split_heads(self.k(tokens), BRIDGE_HEADS),
                                             _split_heads(self.proj(tokens), BRIDGE_HEADS))
        return x + self.drop_path(out.transpose(-1, -2).reshape(b, c, h, w))


class LiteBottleneck(nn.Module):
    """Block 0: depthwise 3x3 (with expansion) -> ReLU6 -> pointwise, no bridge; the tokens pass unchanged."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int, groups: int = 1) -> None:
        super().__init__()
        mid = c_in * expansion
        self.has_skip = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(*_conv_bn(c_in, mid, 3, stride, groups=c_in), nn.ReLU6(),
                                  _shuffle_or_identity(c_in, groups > 1), *_conv_bn(mid, c_out, groups=groups))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.conv(x)
        return (out + x if self.has_skip else out), tokens


class _BridgedBlock(nn.Module, abc.ABC):
    """The bridge around a Mobile sub-block: Mobile->Former and Former update the tokens from the block's input,
    the Mobile sub-block (``_mobile``) runs with dynamic ReLUs driven by the new tokens, the block's skip (if
    any) is added, and Former->Mobile ends it."""

    has_skip: bool

    def _add_bridge(self, c_in: int, c_out: int, token_dim: int, drop_path: float) -> None:
        self.drop_path = _drop_path(drop_path)
        self.local_global = Mobile2Former(c_in, token_dim, drop_path)
        self.global_block = Former(token_dim, drop_path)
        self.global_local = Former2Mobile(c_out, token_dim, drop_path)

    @abc.abstractmethod
    def _mobile(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The Mobile sub-block's output, before the skip and Former->Mobile."""

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.global_block(self.local_global(x, tokens))
        out = self._mobile(x, tokens)
        if self.has_skip:
            out = x + self.drop_path(out)
        return self.global_local(out, tokens), tokens


class MobileFormerBlock(_BridgedBlock):
    """Stride-1 block: pw (expansion) -> dynamic ReLU -> dw 3x3 -> dynamic ReLU -> pw, skip when shapes allow,
    then Former->Mobile."""

    def __init__(self, c_in: int, c_out: int, expansion: int, token_dim: int, groups: int = 1,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        mid = c_in * expansion
        self.has_skip = c_in == c_out
        self.conv1 = nn.Sequential(*_conv_bn(c_in, mid, groups=groups), _shuffle_or_identity(groups, groups > 1))
        self.hyper1 = DynamicReLUCoefficients(token_dim, mid)
        self.conv2 = nn.Sequential(*_conv_bn(mid, mid, 3, groups=mid))
        self.hyper2 = DynamicReLUCoefficients(token_dim, mid)
        self.conv3 = nn.Sequential(*_conv_bn(mid, c_out, groups=groups), _shuffle_or_identity(groups, groups > 1))
        self._add_bridge(c_in, c_out, token_dim, drop_path)

    def _mobile(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        out = dynamic_relu(self.conv1(x), self.hyper1(tokens))
        out = dynamic_relu(self.conv2(out), self.hyper2(tokens))
        return self.conv3(out)


class MobileFormerDownBlock(_BridgedBlock):
    """Stride-2 block: dw 3x3 stride 2 (expansion) -> dynamic ReLU -> pw -> [dw 3x3 (second expansion) ->
    dynamic ReLU -> pw] with an inner skip, then Former->Mobile."""

    has_skip = False

    def __init__(self, c_in: int, c_out: int, expansion: int, expansion2: int, token_dim: int, groups: int = 1,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        mid1, mid2 = c_in * expansion, c_out * expansion2
        self.conv1 = nn.Sequential(*_conv_bn(c_in, mid1, 3, 2, groups=c_in),
                                   _shuffle_or_identity(c_in, groups > 1))
        self.hyper1 = DynamicReLUCoefficients(token_dim, mid1)
        self.conv2 = nn.Sequential(*_conv_bn(mid1, c_out, groups=groups))
        self.conv3 = nn.Sequential(*_conv_bn(c_out, mid2, 3, groups=c_out), _shuffle_or_identity(c_out, groups > 1))
        self.hyper3 = DynamicReLUCoefficients(token_dim, mid2)
        self.conv4 = nn.Sequential(*_conv_bn(mid2, c_out, groups=groups))
        self._add_bridge(c_in, c_out, token_dim, drop_path)

    def _mobile(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        narrow = self.conv2(dynamic_relu(self.conv1(x), self.hyper1(tokens)))
        out = self.conv4(dynamic_relu(self.conv3(narrow), self.hyper3(tokens)))
        return narrow + self.drop_path(out)


def _build_blocks(module: nn.Module, cfg: MobileFormerConfig, drop_path: float) -> list[int]:
    """Add ``tokens``, ``stem`` and ``features`` to ``module``, named as in the reference; returns the
    cumulative stride after each block."""
    module.tokens = nn.Embedding(cfg.tokens, cfg.token_dim)
    module.stem = nn.Sequential(*_conv_bn(3, cfg.stem, 3, 2), nn.ReLU6())
    blocks: list[nn.Module] = []
    strides, c_in, stride = [], cfg.stem, 2
    for i, (expansion, c_out, s, expansion2) in enumerate(cfg.blocks):
        rate = drop_path * (i + 1) / len(cfg.blocks)  # the reference's linear schedule over blocks
        if i == 0:
            blocks.append(LiteBottleneck(c_in, c_out, s, expansion, cfg.groups))
        elif s == 2:
            blocks.append(MobileFormerDownBlock(c_in, c_out, expansion, expansion2, cfg.token_dim, cfg.groups, rate))
        else:
            blocks.append(MobileFormerBlock(c_in, c_out, expansion, cfg.token_dim, cfg.groups, rate))
        c_in, stride = c_out, stride * s
        strides.append(stride)
    module.features = nn.ModuleList(blocks)
    return strides


def _init_weights(module: nn.Module) -> None:
    """He-normal convolutions (fan-out), small normal linear layers, as the paper's training started from."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def _start(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stem's map and the learned global tokens, one copy per image: (B, tokens, token_dim)."""
    # a copy, not a view: a view of the parameter made under no_grad would claim a gradient it cannot have
    tokens = module.tokens.weight[None].repeat(x.shape[0], 1, 1)
    return module.stem(x), tokens


class MergeClassifier(nn.Module):
    """The last map expanded 6x, ReLU6, pooled and hard-swished, concatenated with the first token -> FC ->
    BN -> hard swish -> dropout -> logits."""

    def __init__(self, c_in: int, token_dim: int, hidden: int, num_classes: int, groups: int = 1,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        expanded = c_in * MERGE_EXPANSION
        self.conv = nn.Sequential(_shuffle_or_identity(groups, groups > 1), *_conv_bn(c_in, expanded, groups=groups))
        self.act = nn.ReLU6()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Hardswish())
        self.fc = nn.Sequential(nn.Linear(expanded + token_dim, hidden), nn.BatchNorm1d(hidden), nn.Hardswish())
        self.classifier = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(self.act(self.conv(x))).flatten(1)
        return self.classifier(self.fc(torch.cat([pooled, tokens[:, 0]], dim=1)))


class MobileFormerClassifier(nn.Module):
    """The ImageNet classifier, for loading and checking the reference implementation's state dicts."""

    def __init__(self, variant: str = "508m", num_classes: int = 1000, drop_path_rate: float = 0.0,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        cfg = pick_variant("mobile_former", variant, CONFIGS)
        _build_blocks(self, cfg, drop_path_rate)
        c_last = cfg.blocks[-1][1]
        self.local_global = Mobile2Former(c_last, cfg.token_dim, drop_path_rate)
        self.classifier = MergeClassifier(c_last, cfg.token_dim, cfg.head_features, num_classes, cfg.groups,
                                          drop_rate)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, tokens = _start(self, x)
        for block in self.features:
            x, tokens = block(x, tokens)
        return self.classifier(x, self.local_global(x, tokens))


def mobile_former_classifier(variant: str = "508m", **kwargs) -> MobileFormerClassifier:
    """Mobile-Former ImageNet classifier with the reference implementation's parameter names and shapes."""
    return MobileFormerClassifier(variant, **kwargs)


@register_backbone("mobile_former")
class MobileFormer(Backbone):
    """Mobile-Former as a detection backbone: the maps of the last block at strides 8, 16 and 32; the global
    tokens flow through every block. Reference ImageNet weights load without ``local_global.*`` (the
    classifier's last bridge, whose tokens only the classifier reads) and ``classifier.*``."""

    mean, std = IMAGENET_MEAN, IMAGENET_STD
    variants = tuple(CONFIGS)

    def __init__(self, variant: str = "96m", drop_path_rate: float = 0.0) -> None:
        super().__init__()
        cfg = pick_variant("mobile_former", variant, CONFIGS)
        block_strides = _build_blocks(self, cfg, drop_path_rate)
        # the last block at each stride ends that stride's stage
        self.taps = [max(i for i, s in enumerate(block_strides) if s == stride) for stride in self.strides]
        self.channels = [cfg.blocks[i][1] for i in self.taps]
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, tokens = _start(self, x)
        outs = []
        for i, block in enumerate(self.features[: self.taps[-1] + 1]):
            x, tokens = block(x, tokens)
            if i in self.taps:
                outs.append(x)
        return outs

    @staticmethod
    def pretrained_style(keys: set[str]) -> str | None:
        """The reference AAboys/MobileFormer state dicts (``tokens.weight``, ``features.N.local_global...``)."""
        if "tokens.weight" in keys and any(k.startswith("features.") and ".global_block." in k for k in keys):
            return "AAboys/MobileFormer"
        return None

    def map_pretrained(self, tensors: dict[str, torch.Tensor], style: str | None) -> dict[str, torch.Tensor]:
        """Our names are the reference's; its last bridge and classifier are reported as not used."""
        return tensors
