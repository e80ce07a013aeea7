"""Backbone plugins. Importing this package imports every module in it, so a built-in family is one file here
(plus its model YAML): its ``@register_backbone`` runs without an edit to this list."""

import pkgutil
from importlib import import_module

from .base import BACKBONES, Backbone, build_backbone, check_backbone, list_backbones, register_backbone

for _module in pkgutil.iter_modules(__path__):
    import_module(f"{__name__}.{_module.name}")

__all__ = ["BACKBONES", "Backbone", "build_backbone", "check_backbone", "list_backbones", "register_backbone"]
