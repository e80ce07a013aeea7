"""Every registered backbone, as timm tests every registered model: contract, shapes, gradients, fusing."""

import pytest
import torch
from conftest import BACKBONE_ARGS, randomize_bn

from yolo_mobile.backbones import build_backbone, fastvit, list_backbones, mobilevit
from yolo_mobile.backbones.base import forward_check

SIZES = [(320, 320), (256, 416)]


def make(name: str, **kwargs):
    return build_backbone(name, **{**BACKBONE_ARGS.get(name, {}), **kwargs})


@pytest.mark.parametrize("name", list_backbones())
def test_contract_shapes_and_gradients(name):
    backbone = make(name)
    assert list(backbone.strides) == [8, 16, 32]
    for h, w in SIZES:
        feats = forward_check(backbone, torch.rand(2, 3, h, w))  # raises on any channel/size mismatch
        assert len(feats) == 3
    sum(f.mean() for f in feats).backward()
    no_grad = [n for n, p in backbone.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters that get no gradient: {no_grad[:5]}"


@pytest.mark.parametrize("name", list_backbones())
def test_reparameterize_keeps_outputs(name):
    backbone = make(name)
    randomize_bn(backbone)
    backbone.eval()
    x = torch.rand(1, 3, 256, 320)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    with torch.no_grad():
        before = backbone(x)
        backbone.reparameterize()
        after = backbone(x)
    for a, b in zip(before, after, strict=True):
        assert (a - b).abs().max().item() < 1e-4
    n_left = sum(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    # BNs that follow a conv are folded; FastViT's attention blocks keep a BN that normalises a residual input
    assert n_left == 0 if name in FOLDS_ALL_BN else n_left < n_bn


FOLDS_ALL_BN = {"mobilevit", "mobilenetv3", "cspdarknet", "mobile_former"}  # EMO and FastViT keep pre-norm BNs


@pytest.mark.parametrize("variant", list(fastvit.VARIANTS)[:4])
def test_fastvit_reparameterize_removes_branches(variant):
    backbone = make("fastvit", variant=variant)
    randomize_bn(backbone)
    backbone.eval()
    x = torch.rand(1, 3, 128, 192)
    n_before = sum(1 for _ in backbone.modules())
    with torch.no_grad():
        before = backbone(x)
        backbone.reparameterize()
        after = backbone(x)
    assert sum(1 for _ in backbone.modules()) < n_before
    for a, b in zip(before, after, strict=True):
        assert (a - b).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant", list(mobilevit.VARIANTS))
def test_mobilevit_drops_final_conv(variant):
    backbone = make("mobilevit", variant=variant)
    expected = {"xxs": [48, 64, 80], "xs": [64, 80, 96], "s": [96, 128, 160]}[variant]
    assert backbone.channels == expected  # L3/L4/L5, not the 1x1 expansion (640 for S)
    # inputs that are not multiples of 64 (odd maps at stride 32)
    forward_check(backbone, torch.rand(1, 3, 96, 160))


def test_mobilenetv3_reduced_tail_taps():
    backbone = make("mobilenetv3")
    assert backbone.channels == [40, 112, 480]
    assert make("mobilenetv3", reduced_tail=False).channels == [40, 112, 960]


def test_timm_unknown_model_says_so():
    with pytest.raises(ValueError, match="not_a_timm_model"):
        build_backbone("timm", model="not_a_timm_model")
