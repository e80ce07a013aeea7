"""Backbone plugins. Importing this package registers the built-in families."""

from . import cspdarknet, emo, fastvit, mobile_former, mobilenetv3, mobilevit, timm_any, vit  # noqa: F401  (registration)
from .base import BACKBONES, Backbone, build_backbone, check_backbone, list_backbones, register_backbone

__all__ = ["BACKBONES", "Backbone", "build_backbone", "check_backbone", "list_backbones", "register_backbone"]
