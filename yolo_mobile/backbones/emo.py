"""EMO (Zhang et al., "Rethinking Mobile Block for Efficient Attention-based Models", ICCV 2023).

The network is built from one block, the inverted residual mobile block (iRMB): norm -> (window attention) ->
value projection -> depthwise conv (+ SE) -> 1x1 projection, with a skip when shapes allow. Parameter names
follow the official checkpoints (``stage0.0.convs.0.0.weight``, ``stage3.1.qk.conv.weight``...), so an official
``net.pth`` loads with ``strict=True`` into ``emo_classifier(variant)``, and into the detection backbone without
the classifier's ``norm`` and ``head``.

Window attention groups pixels the way the official code does: with the map padded to a multiple of the window
w and split as rows ``i * n1 + a`` (n1 = H / w), window ``a`` takes every n1-th row (a strided, dilated grid),
not a contiguous w x w block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models._efficientnet_blocks import SqueezeExcite
from torch import nn

from .base import IMAGENET_MEAN, IMAGENET_STD, Backbone, pick_variant, register_backbone

EPS = 1e-6
STEM_DIM = 24
NORMS = ("bn", "bn", "ln", "ln")
ACTS = ("silu", "silu", "gelu", "gelu")
KERNELS = (3, 3, 5, 5)
ATTENTION = (False, False, True, True)  # window attention in stages 3 and 4


@dataclass(frozen=True)
class EMOConfig:
    depths: tuple[int, int, int, int]
    dims: tuple[int, int, int, int]
    expansions: tuple[float, float, float, float]
    head_dims: tuple[int, int, int, int]
    drop_path: float  # the rate of the official ImageNet recipe


CONFIGS = {
    "1m": EMOConfig((2, 2, 8, 3), (32, 48, 80, 168), (2.0, 2.5, 3.0, 3.5), (16, 16, 20, 21), 0.04036),
    "2m": EMOConfig((3, 3, 9, 3), (32, 48, 120, 200), (2.0, 2.5, 3.0, 3.5), (16, 16, 20, 20), 0.05),
    "5m": EMOConfig((3, 3, 9, 3), (48, 72, 160, 288), (2.0, 3.0, 4.0, 4.0), (24, 24, 32, 32), 0.05),
    "6m": EMOConfig((3, 3, 9, 3), (48, 72, 160, 320), (2.0, 3.0, 4.0, 5.0), (16, 24, 20, 32), 0.05),
}


def _act(name: str) -> nn.Module:
    return {"silu": nn.SiLU, "gelu": nn.GELU, "none": nn.Identity}[name]()


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of an NCHW map (the official module wraps nn.LayerNorm as ``.norm``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _norm(kind: str, channels: int) -> nn.Module:
    return {"bn": lambda: nn.BatchNorm2d(channels, eps=EPS), "ln": lambda: LayerNorm2d(channels),
            "none": nn.Identity}[kind]()


class ConvNormAct(nn.Module):
    """Conv -> norm -> act with the official padding, ceil((k - stride) / 2)."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, bias: bool = False,
                 norm: str = "bn", act: str = "none") -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, math.ceil((k - stride) / 2), groups=groups, bias=bias)
        self.norm = _norm(norm, c_out)
        self.act = _act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class PatchEmbed(nn.Module):
    """The stem's 3x3 stride-2 conv + BN (a one-branch MSPatchEmb in the official code, hence ``convs.0``)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Sequential(nn.Conv2d(c_in, c_out, 3, 2, 1), nn.BatchNorm2d(c_out, eps=EPS),
                                                  nn.Identity())])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs[0](x)


class IRMB(nn.Module):
    """Inverted residual mobile block. With ``attention``, multi-head self-attention inside windows runs on the
    normalised input before the value projection (the official ``attn_pre``), so it costs C, not the expanded
    width; then the depthwise conv adds local context."""

    def __init__(self, c_in: int, c_out: int, norm: str = "bn", act: str = "silu", expansion: float = 1.0,
                 kernel: int = 3, stride: int = 1, skip: bool = True, attention: bool = False, head_dim: int = 16,
                 window: int = 7, se_ratio: float = 0.0, v_proj: bool = True, attn_pre: bool = True,
                 attn_drop: float = 0.0, drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        mid = int(c_in * expansion)
        self.norm = _norm(norm, c_in)
        self.has_skip = skip and c_in == c_out and stride == 1
        self.attention = attention
        if attention:
            if c_in % head_dim:
                raise ValueError(f"iRMB: {c_in} channels do not split into heads of {head_dim}")
            self.heads, self.head_dim, self.window, self.attn_pre = c_in // head_dim, head_dim, window, attn_pre
            self.qk = ConvNormAct(c_in, 2 * c_in, 1, bias=True, norm="none")
            self.attn_drop = nn.Dropout(attn_drop)  # kept as a module: its probability is used in forward
        self.v = ConvNormAct(c_in, mid, 1, bias=True, norm="none", act=act) if (v_proj or attention) else nn.Identity()
        self.conv_local = ConvNormAct(mid, mid, kernel, stride, groups=mid, norm="bn", act="silu")
        self.se = SqueezeExcite(mid, rd_ratio=se_ratio, act_layer=type(_act(act))) if se_ratio > 0 else nn.Identity()
        self.proj_drop = nn.Dropout(drop)
        self.proj = ConvNormAct(mid, c_out, 1, norm="none")
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def _window_attention(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        wh, ww = (self.window, self.window) if self.window > 0 else (h, w)
        pad_b, pad_r = (wh - h % wh) % wh, (ww - w % ww) % ww
        x = F.pad(x, (0, pad_r, 0, pad_b))
        n1, n2 = (h + pad_b) // wh, (w + pad_r) // ww

        # Row r = i * n1 + a belongs to window a (columns likewise). The 1x1 convs commute with moving pixels,
        # so they run on whole maps and each tensor is regrouped by one permute: 4C channels are moved per block
        # instead of 5C plus the expanded width (a partition of the input and a reversal after the value conv).
        def to_windows(t: torch.Tensor, groups: int) -> torch.Tensor:  # -> (b * n1 * n2, groups, wh * ww, d)
            t = t.reshape(b, groups, t.shape[1] // groups, wh, n1, ww, n2).permute(0, 4, 6, 1, 3, 5, 2)
            return t.reshape(b * n1 * n2, groups, wh * ww, -1)

        qk = to_windows(self.qk(x), 2 * self.heads)  # padded pixels see the conv's bias, as in the official code
        q, k = qk[:, : self.heads], qk[:, self.heads:]
        values = to_windows(x if self.attn_pre else self.v(x), self.heads)
        out = F.scaled_dot_product_attention(q, k, values, dropout_p=self.attn_drop.p if self.training else 0.0)
        d = out.shape[-1]
        out = out.reshape(b, n1, n2, self.heads, wh, ww, d).permute(0, 3, 6, 4, 1, 5, 2)
        out = out.reshape(b, self.heads * d, h + pad_b, w + pad_r)[:, :, :h, :w]
        return self.v(out) if self.attn_pre else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm(x)
        x = self._window_attention(x) if self.attention else self.v(x)
        local = self.se(self.conv_local(x))
        x = x + local if self.has_skip else local
        x = self.proj(self.proj_drop(x))
        return shortcut + self.drop_path(x) if self.has_skip else x


def _build_stages(module: nn.Module, cfg: EMOConfig, drop_path: float, window: int) -> None:
    """Add stage0 (stem) and stage1..stage4 to ``module``, named as in the official checkpoints."""
    rates = torch.linspace(0, drop_path, sum(cfg.depths)).tolist()
    module.stage0 = nn.ModuleList([
        PatchEmbed(3, STEM_DIM),
        IRMB(STEM_DIM, STEM_DIM, norm="none", act=ACTS[0], expansion=1.0, kernel=KERNELS[0], skip=False,
             se_ratio=1.0, v_proj=False),
    ])
    c_in, n = STEM_DIM, 0
    for i, depth in enumerate(cfg.depths):
        blocks = []
        for j in range(depth):
            first = j == 0  # downsamples: stride 2, no skip, no attention, double expansion
            blocks.append(IRMB(c_in, cfg.dims[i], norm=NORMS[i], act=ACTS[i],
                               expansion=cfg.expansions[i] * (2 if first else 1), kernel=KERNELS[i],
                               stride=2 if first else 1, skip=not first, attention=ATTENTION[i] and not first,
                               head_dim=cfg.head_dims[i], window=window, drop_path=rates[n]))
            c_in, n = cfg.dims[i], n + 1
        setattr(module, f"stage{i + 1}", nn.ModuleList(blocks))


def _run_stages(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    outs = []
    for i in range(5):
        for block in getattr(module, f"stage{i}"):
            x = block(x)
        outs.append(x)
    return outs  # strides 2, 4, 8, 16, 32


class EMOClassifier(nn.Module):
    """The ImageNet classifier, for loading and checking official checkpoints."""

    def __init__(self, variant: str = "1m", num_classes: int = 1000, drop_path_rate: float | None = None,
                 window: int = 7) -> None:
        super().__init__()
        cfg = pick_variant("emo", variant, CONFIGS)
        _build_stages(self, cfg, cfg.drop_path if drop_path_rate is None else drop_path_rate, window)
        self.norm = _norm("ln", cfg.dims[-1])
        self.pre_head = nn.Identity()
        self.head = nn.Linear(cfg.dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(_run_stages(self, x)[-1])
        return self.head(self.pre_head(x.mean((2, 3))))


def emo_classifier(variant: str = "1m", **kwargs) -> EMOClassifier:
    return EMOClassifier(variant, **kwargs)


@register_backbone("emo")
class EMO(Backbone):
    """EMO as a detection backbone: stages 2-4 at strides 8, 16, 32. Official weights load without the
    classifier's ``norm.*`` and ``head.*``."""

    mean, std = IMAGENET_MEAN, IMAGENET_STD
    variants = tuple(CONFIGS)

    def __init__(self, variant: str = "1m", drop_path_rate: float = 0.0, window: int = 7) -> None:
        super().__init__()
        cfg = pick_variant("emo", variant, CONFIGS)
        _build_stages(self, cfg, drop_path_rate, window)
        self.channels = list(cfg.dims[1:])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return _run_stages(self, x)[2:]

    @staticmethod
    def pretrained_style(keys: set[str]) -> str | None:
        """The official zhangzjn/EMO checkpoints (``stage0.0.convs...`` to ``stage4...``, ``norm``, ``head``)."""
        if any(k.startswith("stage0.") for k in keys) and any(k.startswith("stage4.") for k in keys):
            return "official EMO"
        return None

    def map_pretrained(self, tensors: dict[str, torch.Tensor], style: str | None) -> dict[str, torch.Tensor]:
        """Our names are the official ones; the classifier's ``norm`` and ``head`` are reported as not used."""
        return tensors
