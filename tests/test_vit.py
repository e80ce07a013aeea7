"""Plain ViTs (DeiT, ConViT) from timm with the simple feature pyramid: timm's features at 224, any grid beyond."""

import pytest
import timm
import torch
from timm.models.convit import GPSA

from yolo_mobile.backbones import build_backbone
from yolo_mobile.backbones.base import forward_check
from yolo_mobile.backbones.vit import ViT, gpsa, grid_offsets


def _with_timm_reference(name: str):
    backbone = build_backbone("vit", model=name).eval()
    reference = timm.create_model(name, pretrained=False).eval()
    own = {k.removeprefix("model."): v for k, v in backbone.state_dict().items() if k.startswith("model.")}
    missing, unexpected = reference.load_state_dict(own, strict=False)
    assert not unexpected and all(k.startswith("head") for k in missing)
    return backbone, reference


@pytest.mark.parametrize("name", ["deit_tiny_distilled_patch16_224", "convit_tiny"])
def test_stride_16_map_is_timms_last_block_at_224(name):
    """Class (and distillation) tokens dropped, final LayerNorm applied: timm's own last-block features."""
    backbone, reference = _with_timm_reference(name)
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        p3, p4, p5 = backbone(x)
        expected = reference.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
    assert (p4 - expected).abs().max() < 1e-4
    assert p3.shape == (1, 96, 28, 28) and p5.shape == (1, 192, 7, 7) and backbone.channels == [96, 192, 192]


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "convit_tiny"])
def test_any_multiple_of_32_works(name):
    backbone = build_backbone("vit", model=name)
    for h, w in [(64, 64), (96, 160)]:
        feats = forward_check(backbone, torch.rand(1, 3, h, w))
    sum(f.mean() for f in feats).backward()
    assert all(p.grad is not None for p in backbone.parameters())  # the classifier side is gone


def test_grid_offsets_are_timms_on_square_grids_and_row_major_on_others():
    gpsa_module = timm.create_model("convit_tiny").blocks[0].attn
    for side in (3, 5):
        timm_offsets = gpsa_module.get_rel_indices(side * side)[0].permute(2, 0, 1)  # (3, N, N)
        assert torch.equal(grid_offsets(side, side, torch.float32, torch.device("cpu")), timm_offsets)
    h, w = 2, 3  # patch n = row * 3 + col; patch 1 is (0, 1), patch 5 is (1, 2)
    offsets = grid_offsets(h, w, torch.float32, torch.device("cpu"))
    assert offsets[:, 1, 5].tolist() == [1.0, 1.0, 2.0] and offsets[:, 5, 1].tolist() == [-1.0, -1.0, 2.0]
    assert offsets[:, 0, 3].tolist() == [0.0, 1.0, 1.0]  # straight below: timm's sqrt(6) -> 2 columns gets (1, 1)


@pytest.mark.parametrize(("h", "w"), [(6, 6), (4, 9)])
def test_gpsa_matches_timms_given_the_grid(h, w):
    """On a square grid timm's GPSA derives the right positions itself; on a 4x9 grid (a 64x144 input) it cannot
    (sqrt(36) -> 6x6), so it is handed ours. Either way our GPSA (fused content attention + position weights
    shared by the batch) gives timm's output."""
    torch.manual_seed(0)
    attn = GPSA(dim=48, num_heads=4, locality_strength=1.0).eval()
    attn.local_init()
    torch.nn.init.normal_(attn.gating_param, 0, 1)  # mixed gates, so both parts count
    x = torch.randn(2, h * w, 48)
    offsets = grid_offsets(h, w, x.dtype, x.device)
    with torch.no_grad():
        if h != w:
            attn.rel_indices = offsets.permute(1, 2, 0).unsqueeze(0)  # timm's layout (1, N, N, 3)
        expected = attn(x)
        got = gpsa(attn, x, offsets)
    assert (got - expected).abs().max() < 1e-5
    if h != w:  # what timm would use on its own is another grid
        assert not torch.equal(attn.get_rel_indices(h * w), attn.rel_indices)


def test_parameter_counts_are_timms():
    """Without the classifier, as the issue lists them: DeiT-Ti 5.52M, DeiT-S 21.67M, ConViT-Ti 5.52M,
    ConViT-S 27.34M; the pyramid's parameters are its own."""
    expected = {"deit_tiny_patch16_224": (5_524_416, 221_760), "deit_small_patch16_224": (21_665_664, 885_888),
                "convit_tiny": (5_517_512, 221_760), "convit_small": (27_344_322, 1_121_040)}
    for name, (vit, pyramid) in expected.items():
        with torch.device("meta"):  # counts only: no memory, no initialisation
            backbone = ViT(model=name)
        assert sum(p.numel() for p in backbone.model.parameters()) == vit, name
        assert sum(p.numel() for p in backbone.pyramid.parameters()) == pyramid, name


@pytest.mark.parametrize(("model", "message"), [("resnet18", "is a ResNet; the vit backbone takes"),
                                                ("not_a_timm_model", "timm cannot build 'not_a_timm_model'")])
def test_not_a_plain_vit_says_so(model, message):
    with pytest.raises(ValueError, match=message):
        build_backbone("vit", model=model)
