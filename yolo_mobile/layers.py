"""Small layers of the YOLOv5 family (Conv-BN-Act, C3, SPPF), their depthwise-separable variants for light necks
and heads, and Conv+BN folding for deployment.

The activation is always an argument: no class attribute decides it, so building one model never changes another.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

ACTIVATIONS = {
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hardswish": nn.Hardswish,
    "gelu": nn.GELU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "identity": nn.Identity,
}


def make_act(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{name}'; valid: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]()


# YOLOv5's BatchNorm settings: they train better than PyTorch's defaults at small batch sizes
BN_EPS, BN_MOMENTUM = 1e-3, 0.03


def make_divisible(x: float, divisor: int = 8) -> int:
    return max(divisor, int(math.ceil(x / divisor) * divisor))


class ConvBNAct(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> activation, 'same' padding for odd kernels."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1,
                 act: str = "silu") -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2 if p is None else p, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = make_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class DWSConv(nn.Module):
    """Depthwise-separable convolution: depthwise k x k (stride ``s``) then pointwise 1x1, each Conv-BN-Act
    (YOLOX-Nano's DWConv, MobileNet's block without expansion)."""

    def __init__(self, c_in: int, c_out: int, k: int = 3, s: int = 1, act: str = "silu") -> None:
        super().__init__()
        self.dw = ConvBNAct(c_in, c_in, k, s, g=c_in, act=act)
        self.pw = ConvBNAct(c_in, c_out, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


def conv_block(c_in: int, c_out: int, k: int = 1, s: int = 1, act: str = "silu", depthwise: bool = False
               ) -> nn.Module:
    """A k x k Conv-BN-Act, or with ``depthwise`` (and k > 1) its depthwise-separable replacement."""
    if depthwise and k > 1:
        return DWSConv(c_in, c_out, k, s, act=act)
    return ConvBNAct(c_in, c_out, k, s, act=act)


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, c_out: int, shortcut: bool = True, expansion: float = 1.0, act: str = "silu",
                 depthwise: bool = False) -> None:
        super().__init__()
        hidden = int(c_out * expansion)
        self.cv1 = ConvBNAct(c_in, hidden, 1, act=act)
        self.cv2 = conv_block(hidden, c_out, 3, act=act, depthwise=depthwise)
        self.add = shortcut and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP bottleneck with 3 convolutions (YOLOv5); ``depthwise``: the bottlenecks' 3x3 convs depthwise-separable."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = True, act: str = "silu",
                 depthwise: bool = False) -> None:
        super().__init__()
        hidden = c_out // 2
        self.cv1 = ConvBNAct(c_in, hidden, 1, act=act)
        self.cv2 = ConvBNAct(c_in, hidden, 1, act=act)
        self.cv3 = ConvBNAct(2 * hidden, c_out, 1, act=act)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut, 1.0, act, depthwise) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained max-pools equal pools of 5, 9 and 13 (YOLOv5)."""

    def __init__(self, c_in: int, c_out: int, k: int = 5, act: str = "silu") -> None:
        super().__init__()
        hidden = c_in // 2
        self.cv1 = ConvBNAct(c_in, hidden, 1, act=act)
        self.cv2 = ConvBNAct(hidden * 4, c_out, 1, act=act)
        self.pool = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat((x, y1, y2, self.pool(y2)), 1))


class _ConvNormTracer(fx.Tracer):
    """Keeps every conv and norm (timm's BatchNormAct2d included) as one call, whatever package defines it."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(m, qualname)


def _norm_follows_conv(module: nn.Module, norm_name: str) -> bool:
    """Whether ``module.forward`` feeds its ``conv`` child's output to its ``norm_name`` child and nowhere else,
    read from the module's traced graph (a module that cannot be traced is not folded)."""
    try:
        graph = _ConvNormTracer().trace(module)
    except Exception:  # data-dependent control flow and the like: leave the module as it is
        return False
    convs = [n for n in graph.nodes if n.op == "call_module" and n.target == "conv"]
    return len(convs) == 1 and [(u.op, u.target) for u in convs[0].users] == [("call_module", norm_name)]


def _fold(conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> tuple[nn.Module, nn.Module]:
    """Return (conv with the BN folded in, what replaces the BN): identity, or the act of timm's BatchNormAct2d."""
    fused = fuse_conv_bn_eval(conv.eval(), bn.eval(), transpose=isinstance(conv, nn.ConvTranspose2d))
    rest: list[nn.Module] = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
    rest = [m for m in rest if not isinstance(m, nn.Identity)]
    return fused, (nn.Sequential(*rest) if rest else nn.Identity())


def fold_conv_bn(model: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d (or, in a Sequential, a ConvTranspose2d) into the
    conv's weights; returns how many.

    Two patterns are folded: consecutive children of an ``nn.Sequential``, and any module (ours, timm's, a
    backbone's own Conv-Norm-Act) with ``conv`` and ``bn``/``norm`` children whose traced forward sends the conv's
    output to the norm alone. Call in eval mode only.
    """
    folded = 0
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for a, b in itertools.pairwise(names):
                conv, bn = module._modules[a], module._modules[b]
                if type(conv) in (nn.Conv2d, nn.ConvTranspose2d) and isinstance(bn, nn.BatchNorm2d):
                    module._modules[a], module._modules[b] = _fold(conv, bn)
                    folded += 1
            continue
        norm_name = "bn" if hasattr(module, "bn") else "norm"
        conv, bn = getattr(module, "conv", None), getattr(module, norm_name, None)
        if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and _norm_follows_conv(module, norm_name):
            module.conv, new_bn = _fold(conv, bn)
            setattr(module, norm_name, new_bn)
            folded += 1
    return folded
