"""The models that stand for each backbone family in the phone-export tests: the smallest built-in model of every
registered backbone (ConViT-Tiny for vit: DeiT's plain attention blocks are among its own). Resolved when a test
asks, so that collecting the test modules builds nothing."""

from conftest import model_for_backbone

from yolo_mobile import list_backbones

FAMILIES = sorted(list_backbones())


def family_cfg(family: str) -> str | dict:
    return model_for_backbone(family)
