"""Every registered backbone, as timm tests every registered model: contract, shapes, gradients, fusing."""

import pytest
import torch
from conftest import BACKBONE_ARGS, randomize_bn

from yolo_mobile import build_model
from yolo_mobile.backbones import build_backbone, fastvit, list_backbones, mobilevit
from yolo_mobile.backbones.base import check_backbone, forward_check
from yolo_mobile.config import ConfigError
from yolo_mobile.layers import BN_MOMENTUM

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


@pytest.mark.parametrize("name", list_backbones())
def test_batchnorm_statistics_keep_up_with_training(name):
    # a slower momentum (torchvision MobileNetV3's 0.01) left the running statistics ~100 steps behind the weights
    # of a short run from scratch: 7 points of mAP50-95 lost in eval mode (issue 14)
    slow = {n: m.momentum for n, m in make(name).named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.momentum is not None
            and m.momentum < BN_MOMENTUM}
    assert not slow, f"BatchNorm momentum below the detector's {BN_MOMENTUM}: {dict(list(slow.items())[:3])}"


FOLDS_ALL_BN = {"mobilevit", "mobilenetv3", "cspdarknet", "mobile_former", "vit"}  # EMO and FastViT keep pre-norm BNs


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


@pytest.mark.parametrize(("variant", "full", "reduced"), [("large", [40, 112, 960], [40, 112, 480]),
                                                     ("small", [24, 48, 576], [24, 48, 288])])
def test_mobilenetv3_variants_and_tails(variant, full, reduced):
    """Small taps features[3]/[8]/[12]; the reduced tail halves the stride-32 map, both ways for both variants."""
    assert make("mobilenetv3", variant=variant, reduced_tail=False).channels == full
    backbone = make("mobilenetv3", variant=variant)
    assert backbone.channels == reduced and backbone.strides == [8, 16, 32]
    forward_check(backbone, torch.rand(1, 3, 64, 96))


def test_mobilenetv3_width_mult_rounds_channels_and_feeds_the_neck():
    backbone = make("mobilenetv3", variant="small", width_mult=0.6)
    # torchvision's rounding to multiples of 8: 24 x 0.6 -> 16, 48 x 0.6 -> 32, 6 x (96 x 0.6 / 2 -> 32) = 192
    assert backbone.channels == [16, 32, 192]
    model = build_model({"nc": 2, "backbone": {"name": "mobilenetv3", "variant": "small", "width_mult": 0.6}})
    assert model.neck.sppf.cv1.conv.in_channels == 192 and model.neck.td3.cv1.conv.in_channels == 64 + 16
    assert model.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 4 + 2, 8 * 8 + 4 * 4 + 2 * 2)


@pytest.mark.parametrize("variant", ["large", "small"])
def test_mobilenetv3_dilated_keeps_stride_16(variant):
    backbone = make("mobilenetv3", variant=variant, dilated=True)
    plain = make("mobilenetv3", variant=variant)
    assert backbone.strides == [8, 16, 16] and backbone.channels == plain.channels
    forward_check(backbone, torch.rand(1, 3, 64, 96))  # the last map is 4 x 6, not 2 x 3


def test_mobilenetv3_bad_options_name_the_yaml_line(tmp_path):
    yaml = tmp_path / "m.yaml"
    for line, message in [("width_mult: 0", "mobilenetv3 width_mult must be a positive number, got 0"),
                          ("dilated: 2", "mobilenetv3 dilated must be true or false, got 2"),
                          ("variant: medium", "unknown mobilenetv3 variant 'medium'; valid: large, small")]:
        yaml.write_text(f"nc: 3\nbackbone:\n  name: mobilenetv3\n  {line}\n")
        with pytest.raises(ConfigError, match=f"m.yaml:2: {message}"):
            build_model(yaml)


def test_strides_must_rise_by_one_or_two():
    class Strided(torch.nn.Module):
        channels = [8, 8, 8]

        def __init__(self, strides):
            super().__init__()
            self.strides = strides

    for ok in ([8, 16, 32], [8, 16, 16], [8, 8, 16]):
        check_backbone(Strided(ok))
    for bad, message in [([8, 32, 32], r"strides \[8, 32, 32\] do not rise by x1 or x2"),
                         ([16, 8, 8], r"strides \[16, 8, 8\] do not rise"),
                         ([8, 16, 64], r"3 ints that divide 32 .* got \[8, 16, 64\]"),
                         ([8, 16], r"got \[8, 16\]")]:
        with pytest.raises(ValueError, match=message):
            check_backbone(Strided(bad), "strided")


def test_timm_unknown_model_says_so():
    with pytest.raises(ValueError, match="not_a_timm_model"):
        build_backbone("timm", model="not_a_timm_model")


class _ConvThenNorm(torch.nn.Module):
    """A Conv-Norm-Act of no known library: folded because its traced forward feeds the conv to the norm."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.norm = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.norm(self.conv(x)))


class _NormOfInput(torch.nn.Module):
    """Pre-norm: the norm reads the input, not the conv, so folding it into the conv would change the output."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(self.bn(x))


def fold_and_compare(module: torch.nn.Module, x: torch.Tensor) -> int:
    from yolo_mobile.layers import fold_conv_bn

    randomize_bn(module)
    module.eval()
    with torch.no_grad():
        before = module(x)
        folded = fold_conv_bn(module)
        torch.testing.assert_close(module(x), before, rtol=1e-4, atol=1e-5)
    return folded


def test_folding_reads_the_forward_not_the_class():
    assert fold_and_compare(_ConvThenNorm(), torch.rand(1, 3, 16, 16)) == 1
    pre_norm = _NormOfInput()
    assert fold_and_compare(pre_norm, torch.rand(1, 4, 16, 16)) == 0
    assert isinstance(pre_norm.bn, torch.nn.BatchNorm2d)
