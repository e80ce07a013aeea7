"""The backbone contract: 3 feature maps, with their channels and strides declared (8/16/32 for most; strides
that rise by x1 or x2 and divide 32 are allowed, e.g. 8/16/16 for a dilated last stage)."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from ..layers import fold_conv_bn
from ..registry import Registry

BACKBONES = Registry("backbone", group="yolo_mobile.backbones")
DETECTION_STRIDES = [8, 16, 32]
MAX_STRIDE = 32  # inputs are multiples of this, so every map of a stride that divides it tiles the input exactly

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """Base class for built-in backbones.

    ``forward(x)`` takes an RGB tensor in [0, 1] that the detector has already normalised with ``mean``/``std``
    (None means the backbone wants [0, 1] as it is) and returns 3 maps whose channels and strides are
    ``channels`` and ``strides``.

    The optional hooks below have defaults that mean "not offered"; a family overrides those it has. A third-party
    backbone need not subclass this class: any ``nn.Module`` with ``channels`` and ``strides`` works, and the
    hooks are looked up on it by name.
    """

    channels: list[int]
    strides: list[int]
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    #: the names ``variant=`` accepts; ``yolo-mobile weights inspect`` tries each against a weights file
    variants: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.strides = list(DETECTION_STRIDES)  # each instance its own list: no state shared through the class

    def reparameterize(self) -> None:
        """Fuse for deployment (Conv+BN folding here; families with train-time branches do more)."""
        fold_conv_bn(self)

    @staticmethod
    def pretrained_style(keys: set[str]) -> str | None:
        """The name of the key style (e.g. "timm", "official") when a weights file with these tensor names is
        this family's, else None. ``weights inspect`` and ``pretrained:`` use it to recognise a file."""
        return None

    def map_pretrained(self, tensors: dict[str, torch.Tensor], style: str | None) -> dict[str, torch.Tensor] | None:
        """A weights file's tensors renamed (and reshaped where needed) to this backbone's state_dict keys, for the
        ``style`` that ``pretrained_style`` named (None when unrecognised); None when the family has no mapping,
        and the names as saved are tried alone."""
        return None


def register_backbone(name: str, builder: Any = None):
    """Register a backbone builder (a class or function taking keyword arguments) under ``name``."""
    return BACKBONES.register(name, builder)


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build the backbone registered as ``name`` and check that it keeps the contract."""
    backbone = BACKBONES.build(name, **kwargs)
    check_backbone(backbone, name)
    return backbone


def list_backbones() -> list[str]:
    return BACKBONES.list()


def check_backbone(backbone: nn.Module, name: str = "") -> None:
    label = f"backbone '{name or type(backbone).__name__}'"
    channels, strides = getattr(backbone, "channels", None), getattr(backbone, "strides", None)
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"{label} is a {type(backbone).__name__}, not an nn.Module")
    if not (isinstance(channels, (list, tuple)) and len(channels) == 3 and all(int(c) > 0 for c in channels)):
        raise ValueError(f"{label} must declare `channels` as 3 positive ints, got {channels!r}")
    try:
        stride_steps(strides)
    except ValueError as e:
        raise ValueError(f"{label}: {e}") from None


def stride_steps(strides: list[int]) -> list[int]:
    """The factor between consecutive strides (each 1 or 2: the neck joins maps by nearest upsampling and stride-2
    convolutions); raises ValueError naming the strides for anything else."""
    strides = list(strides or [])
    if not (len(strides) == 3 and all(isinstance(s, int) and s > 0 and MAX_STRIDE % s == 0 for s in strides)):
        raise ValueError(f"`strides` must be 3 ints that divide {MAX_STRIDE} (usually {DETECTION_STRIDES}), "
                         f"got {strides!r}")
    steps = [b // a if b % a == 0 else 0 for a, b in itertools.pairwise(strides)]
    if any(step not in (1, 2) for step in steps):
        raise ValueError(f"strides {strides} do not rise by x1 or x2 from map to map; the neck joins maps of "
                         "equal stride or of twice the stride only")
    return steps


def pick_variant(family: str, variant: str, table: dict[str, Any]) -> Any:
    if variant not in table:
        raise ValueError(f"unknown {family} variant '{variant}'; valid: {', '.join(table)}")
    return table[variant]


def forward_check(backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Run the backbone and verify each map against its declared channels and strides (used by tests and info)."""
    feats = backbone(x)
    h, w = x.shape[-2:]
    for f, c, s in zip(feats, backbone.channels, backbone.strides, strict=True):
        expected = (c, -(-h // s), -(-w // s))
        if tuple(f.shape[1:]) != expected:
            raise ValueError(f"{type(backbone).__name__}: map of stride {s} is {tuple(f.shape[1:])}, "
                             f"declared {expected} for input {h}x{w}")
    return feats
