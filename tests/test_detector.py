"""Every built-in model YAML: build, eval/train outputs, gradients, fuse(), info()."""

import pytest
import torch
from conftest import randomize_bn

from yolo_mobile import build_model
from yolo_mobile.config import list_builtin_models

MODELS = list_builtin_models()
LITE_MODELS = [m for m in MODELS if m.endswith("_lite.yaml")]  # light neck and head: also a training step below


def n_anchors(h: int, w: int) -> int:
    return sum((h // s) * (w // s) for s in (8, 16, 32))


@pytest.mark.parametrize("cfg", MODELS)
def test_model_outputs_gradients_and_fuse(cfg):
    model = build_model(cfg, nc=7)
    # train mode: raw maps per level, box distributions (4 x 16 bins) then class logits
    x = torch.rand(2, 3, 256, 416)
    maps = model.train()(x)
    assert [tuple(m.shape) for m in maps] == [(2, 4 * 16 + 7, 256 // s, 416 // s) for s in (8, 16, 32)]
    sum(m.float().mean() for m in maps).backward()
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)

    # eval mode: (B, 4 + nc, N); the decode's values are checked by hand in test_head.py
    randomize_bn(model)
    for head in model.head.cls:
        torch.nn.init.zeros_(head[-1].bias)  # scores near 0.5, so the fused comparison tests the class branch too
    model.eval()
    for h, w in [(320, 320), (256, 416)]:
        x = torch.rand(1, 3, h, w)
        with torch.no_grad():
            out = model(x)
        assert out.shape == (1, 4 + 7, n_anchors(h, w))

    with torch.no_grad():
        before = model(x)
        fused = model.fuse()
        after = fused(x)
    assert fused is model and model.fused
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.neck.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.head.modules())
    assert (before[:, 4:] - after[:, 4:]).abs().max() < 1e-4  # scores
    assert ((before[:, :4] - after[:, :4]).abs() / max(h, w)).max() < 1e-4  # boxes, relative to the image


@pytest.mark.parametrize("cfg", MODELS)
def test_info_reports_params_and_gflops(cfg):
    model = build_model(cfg)
    info = model.info(imgsz=320)
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert 0 < info["backbone_params"] < info["params"]
    # convolutions scale with pixels (4x from 320 to 640); global attention grows faster, with tokens squared;
    # EMO's windowed attention scales with pixels too, but padding maps to multiples of 7 blurs the ratio
    ratio = model.info(imgsz=640)["gflops"] / info["gflops"]
    if cfg.startswith(("mobilevit", "fastvit_sa", "deit", "convit")):
        assert ratio > 4.02
    elif cfg.startswith("mobile_former"):
        assert 3.85 < ratio < 4  # its global tokens' work (Former, token projections) does not grow with pixels
    else:
        assert ratio == pytest.approx(4, rel=0.1 if cfg.startswith("emo") else 0.01)


def test_yolov5n_rebuilds_yolov5nu():
    """Our CSPDarknet-n + PAN + head is YOLOv5nu: 2,654,816 parameters by ultralytics' count, 16 of which are
    the fixed DFL conv that we compute with a buffer instead."""
    model = build_model("yolov5n.yaml")
    assert sum(p.numel() for p in model.parameters()) == 2_654_816 - 16


def test_neck_channels_come_from_backbone():
    model = build_model("mobilenetv3_large.yaml")
    assert model.neck.sppf.cv1.conv.in_channels == model.backbone.channels[2] == 480
    assert model.neck.td3.cv1.conv.in_channels == 64 + model.backbone.channels[0]


def test_normalization_inside_model():
    """ImageNet-trained backbones get mean/std inside the model; callers always feed [0, 1]."""
    fast = build_model("fastvit_t8.yaml")
    assert fast.normalize and torch.allclose(fast.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    assert not build_model("mobilevit_xxs.yaml").normalize  # timm's MobileViT weights take [0, 1] as is


def test_input_must_be_multiple_of_32():
    model = build_model("yolov5n.yaml").eval()
    with pytest.raises(ValueError, match="multiples of 32, got 300x320"):
        model(torch.rand(1, 3, 300, 320))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(1, 1, 320, 320))


def test_nc_override_and_dict_config():
    model = build_model({"nc": 3, "backbone": {"name": "cspdarknet", "variant": "n"}}, nc=5)
    assert model.nc == 5 and model.config.nc == 5
    assert model.config.to_dict()["backbone"] == {"name": "cspdarknet", "variant": "n"}


def test_flop_count_includes_cpu_attention():
    """timm's MobileViT and FastViT-SA run fused attention; on CPU torch's counter would miss it."""
    from yolo_mobile.detector import count_flops

    class Attention(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.scaled_dot_product_attention(x, x, x)

    b, heads, tokens, dim = 2, 4, 64, 32
    flops = count_flops(Attention(), torch.rand(b, heads, tokens, dim))
    assert flops == 2 * (2 * b * heads * tokens * tokens * dim)  # q @ k^T and attn @ v, 2 FLOPs per MAC


def test_dilated_backbone_strides_8_16_16_through_neck_head_and_loss():
    """The neck joins P4 and P5 as they are (x1) and the head and loss use the declared strides 8/16/16."""
    from yolo_mobile.loss import DetectionLoss

    model = build_model({"nc": 3, "backbone": {"name": "mobilenetv3", "variant": "small", "dilated": True}})
    assert model.strides == model.head.strides == [8, 16, 16]
    assert isinstance(model.neck.up5, torch.nn.Identity) and model.neck.down4.conv.stride == (1, 1)
    assert isinstance(model.neck.up4, torch.nn.Upsample) and model.neck.down3.conv.stride == (2, 2)
    x = torch.rand(2, 3, 64, 96)
    maps = model.train()(x)
    assert [tuple(m.shape[-2:]) for m in maps] == [(8, 12), (4, 6), (4, 6)]
    targets = torch.tensor([[[0, 4.0, 8, 40, 50], [2, 50, 10, 90, 60]], [[1, 30, 30, 62, 62], [-1, 0, 0, 0, 0]]])
    loss, items = DetectionLoss(3, model.strides)(maps, targets)
    assert torch.isfinite(items).all() and items[0] > 0
    loss.backward()
    with torch.no_grad():
        out = model.eval()(x)
    assert out.shape == (2, 4 + 3, 8 * 12 + 2 * 4 * 6)
    # the third map decodes with stride 16: with 32 its centres would reach 6 x 32 = 192 px on a 96 px input
    assert out[:, 0].max() <= 96 and out[:, 1].max() <= 64


def test_strides_the_neck_cannot_join_fail_at_build_with_the_strides():
    from yolo_mobile.backbones import register_backbone
    from yolo_mobile.backbones.base import BACKBONES
    from yolo_mobile.config import ConfigError

    class Skips(torch.nn.Module):
        channels, strides = [8, 8, 8], [8, 32, 32]

    register_backbone("_skips", Skips)
    try:
        with pytest.raises(ConfigError, match=r"strides \[8, 32, 32\] do not rise by x1 or x2"):
            build_model({"backbone": {"name": "_skips"}})
    finally:
        BACKBONES._builders.pop("_skips")


@pytest.mark.parametrize("cfg", ["mobilenetv3_small.yaml", "deit_tiny.yaml", "convit_tiny.yaml",
                                 {"backbone": {"name": "mobilenetv3", "dilated": True}}, *LITE_MODELS],
                         ids=["mobilenetv3_small", "deit", "convit", "dilated", *LITE_MODELS])
def test_one_training_step(cfg):
    from yolo_mobile.loss import DetectionLoss

    model = build_model(cfg, nc=2).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    targets = torch.tensor([[[0, 4.0, 8, 40, 50]], [[1, 20, 30, 60, 62]]])
    loss, items = DetectionLoss(2, model.strides)(model(torch.rand(2, 3, 64, 64)), targets)
    first = next(model.backbone.parameters()).detach().clone()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(items).all() and not torch.equal(first, next(model.backbone.parameters()))


LITE = {"backbone": {"name": "mobilenetv3", "variant": "small"}}


def test_default_neck_and_head_keep_their_keys_and_shapes():
    """The neck's and head's state_dict of existing YAMLs, as written before the light options existed."""
    import json
    from pathlib import Path

    before = json.loads((Path(__file__).parent / "data" / "neck_head_keys.json").read_text())
    for cfg, shapes in before.items():
        state = build_model(cfg, pretrained=False).state_dict()
        assert {k: list(v.shape) for k, v in state.items() if k.startswith(("neck.", "head."))} == shapes


def convs(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]


def test_depthwise_replaces_every_3x3_conv_of_neck_and_head():
    from yolo_mobile.layers import DWSConv

    dense = build_model(LITE, pretrained=False)
    light = build_model({**LITE, "neck": {"depthwise": True}}, pretrained=False)
    for part in ("neck", "head"):
        assert not any(c.groups > 1 for c in convs(getattr(dense, part)))
        assert any(c.kernel_size == (3, 3) for c in convs(getattr(dense, part)))
        for c in convs(getattr(light, part)):  # every 3x3 depthwise, every other a 1x1
            assert c.groups == c.in_channels == c.out_channels if c.kernel_size == (3, 3) else c.kernel_size == (1, 1)
    assert isinstance(light.neck.td3.m[0].cv2, DWSConv) and isinstance(light.neck.down3, DWSConv)
    assert all(isinstance(m, DWSConv) for branch in light.head.box for m in branch[:2])
    assert sum(p.numel() for p in light.parameters()) < sum(p.numel() for p in dense.parameters())


@pytest.mark.parametrize(("neck_dw", "head_dw"), [(True, False), (False, True)])
def test_head_depthwise_overrides_the_neck_option(neck_dw, head_dw):
    model = build_model({**LITE, "neck": {"depthwise": neck_dw}, "head": {"depthwise": head_dw}}, pretrained=False)
    for part, dw in (("neck", neck_dw), ("head", head_dw)):
        assert any(c.groups > 1 for c in convs(getattr(model, part))) == dw
    again = build_model(model.config.to_dict(), pretrained=False)  # as a checkpoint rebuilds it
    assert again.state_dict().keys() == model.state_dict().keys()
    unset = build_model({**LITE, "neck": {"depthwise": True}}, pretrained=False)
    assert unset.config.head.depthwise is None and any(c.groups > 1 for c in convs(unset.head))


@pytest.mark.parametrize("shared", [False, True])
def test_head_channels_set_the_branch_width(shared):
    model = build_model({**LITE, "head": {"channels": 40, "shared": shared}}, nc=3, pretrained=False)
    head = model.head
    assert [b[-1].in_channels for b in (*head.box, *head.cls)] == [40] * 6
    assert [b[-1].out_channels for b in (*head.box, *head.cls)] == [64] * 3 + [3] * 3
    if shared:  # one stack per level; each branch keeps only its 1x1 prediction
        assert [convs(s)[-1].out_channels for s in head.stem] == [40] * 3
        assert all(len(b) == 1 for b in (*head.box, *head.cls))
    else:
        assert head.stem is None
        assert all(c.out_channels == 40 for b in (*head.box, *head.cls) for c in convs(b)[:-1])
    maps = model.train()(torch.rand(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == [64 + 3] * 3


def test_without_sppf_p5_enters_through_one_1x1_conv():
    model = build_model({**LITE, "neck": {"sppf": False, "width": 0.125}}, pretrained=False)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.neck.modules())
    assert [c.kernel_size for c in convs(model.neck.sppf)] == [(1, 1)]
    assert convs(model.neck.sppf)[0].out_channels == model.neck.channels[2] == 128
