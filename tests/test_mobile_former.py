"""Mobile-Former: the reference's parameter names and shapes, counts against the reference and the paper, the
bridges against their formulas, the detection backbone (maps, weights loader, training step, ONNX export)."""

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import randomize_bn

from yolo_mobile import build_model
from yolo_mobile.backbones import build_backbone
from yolo_mobile.backbones.base import forward_check
from yolo_mobile.backbones.mobile_former import (
    CONFIGS,
    Former,
    Former2Mobile,
    Mobile2Former,
    MobileFormerBlock,
    dynamic_relu,
    mobile_former_classifier,
)
from yolo_mobile.detector import count_flops
from yolo_mobile.export.onnx import export_onnx
from yolo_mobile.loss import DetectionLoss

# key names and shapes of AAboys/MobileFormer's mobile_former_<variant>().state_dict(): in full for three
# variants, as a sha256 of the sorted (name, shape) list for all seven
REFERENCE = json.loads((Path(__file__).parent / "data" / "mobile_former_reference_keys.json").read_text())
# the reference code's parameter counts and the paper's (Table 9: params, MAdds at 224)
REFERENCE_PARAMS = {"26m": 3_232_788, "52m": 3_469_092, "96m": 4_585_252, "151m": 7_595_828, "214m": 9_425_920,
                    "294m": 11_422_648, "508m": 13_976_976}
PAPER_PARAMS_M = {"26m": 3.2, "52m": 3.5, "96m": 4.6, "151m": 7.6, "214m": 9.4, "294m": 11.4, "508m": 14.0}
PAPER_MMADDS = {"26m": 26, "52m": 52, "96m": 96, "151m": 151, "214m": 214, "294m": 294, "508m": 508}
YAMLS = ["mobile_former_96m.yaml", "mobile_former_151m.yaml", "mobile_former_294m.yaml", "mobile_former_508m.yaml"]


def _layout(variant: str) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in mobile_former_classifier(variant).state_dict().items()}


@pytest.mark.parametrize("variant", list(REFERENCE["keys"]))
def test_state_dict_matches_reference_keys_and_shapes(variant):
    assert _layout(variant) == REFERENCE["keys"][variant]


def test_every_variant_matches_the_reference_layout_digest():
    assert set(REFERENCE["sha256"]) == set(CONFIGS)
    for variant in CONFIGS:
        digest = hashlib.sha256(json.dumps(sorted(_layout(variant).items())).encode()).hexdigest()
        assert digest == REFERENCE["sha256"][variant], variant


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_params_match_the_reference_and_the_paper(variant):
    params = sum(p.numel() for p in mobile_former_classifier(variant).parameters())
    assert params == REFERENCE_PARAMS[variant]
    assert params / 1e6 == pytest.approx(PAPER_PARAMS_M[variant], rel=0.03)


@pytest.mark.parametrize("variant", ["26m", "508m"])
def test_multiply_adds_at_224_are_close_to_the_paper(variant):
    # torch's counter skips element-wise work, mostly the dynamic ReLUs: ours reads 9% (26M) to 2% (508M) lower
    mmadds = count_flops(mobile_former_classifier(variant), torch.zeros(1, 3, 224, 224)) / 2e6
    assert 0.88 * PAPER_MMADDS[variant] < mmadds < PAPER_MMADDS[variant]


def _attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def test_bridges_and_former_follow_their_formulas():
    """Heads split channels into contiguous halves (quarters for the Former); the map is used without
    projection on the Mobile->Former side and as the query of Former->Mobile."""
    torch.manual_seed(0)
    b, c, h, w, t, d = 2, 8, 3, 5, 3, 12
    x, tokens = torch.randn(b, c, h, w), torch.randn(b, t, d)
    m2f, former, f2m = Mobile2Former(c, d).eval(), Former(d).eval(), Former2Mobile(c, d).eval()
    for module in (m2f, former, f2m):
        for p in module.parameters():
            torch.nn.init.normal_(p, 0, 0.5)
    pixels = x.flatten(2).transpose(1, 2)  # (b, hw, c)
    with torch.no_grad():
        q = m2f.q(tokens)
        gathered = torch.cat([_attention(q[..., i:i + c // 2], pixels[..., i:i + c // 2], pixels[..., i:i + c // 2])
                              for i in (0, c // 2)], -1)
        gate = torch.clamp(m2f.alpha[0](tokens) / 6 + 0.5, 0, 1) * 2
        expected = torch.nn.functional.layer_norm(tokens + m2f.proj(gathered * gate), (d,),
                                                  m2f.layer_norm.weight, m2f.layer_norm.bias)
        assert torch.allclose(m2f(x, tokens), expected, atol=1e-5)

        q, n = former.q(tokens), d // 4
        mixed = torch.cat([_attention(q[..., i:i + n], tokens[..., i:i + n], tokens[..., i:i + n])
                           for i in range(0, d, n)], -1)
        mid = former.layer_norm(tokens + former.channel_mlp(mixed))
        assert torch.allclose(former(tokens), former.ffn_norm(mid + former.ffn(mid)), atol=1e-5)

        k, v = f2m.k(tokens), f2m.proj(tokens)
        out = torch.cat([_attention(pixels[..., i:i + c // 2], k[..., i:i + c // 2], v[..., i:i + c // 2])
                         for i in (0, c // 2)], -1)
        assert torch.allclose(f2m(x, tokens), x + out.transpose(1, 2).reshape(b, c, h, w), atol=1e-5)


def test_dynamic_relu_slopes_come_from_the_first_token():
    torch.manual_seed(0)
    block = MobileFormerBlock(8, 8, expansion=2, token_dim=16).eval()
    x, coeffs = torch.randn(2, 4, 3, 3), torch.rand(2, 8, 1, 1)
    a1, a2 = coeffs[:, :4] * 2, coeffs[:, 4:] * 2 - 1  # (a - 0.5) * 2 + 1 and (a - 0.5) * 2
    assert torch.allclose(dynamic_relu(x, coeffs), torch.maximum(x * a1, x * a2))
    tokens = torch.randn(2, 3, 16)
    changed = tokens.clone()
    changed[:, 1:] += 1.0  # the other tokens do not drive the slopes
    assert torch.equal(block.hyper1(tokens), block.hyper1(changed))


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_maps_at_strides_8_16_32_end_each_stride(variant):
    backbone = build_backbone("mobile_former", variant=variant)
    blocks = CONFIGS[variant].blocks
    # the tap is the block after which the next one downsamples (or the last block)
    ends = [i for i in range(len(blocks)) if i == len(blocks) - 1 or blocks[i + 1][2] == 2]
    assert backbone.channels == [blocks[i][1] for i in ends[-3:]] and backbone.strides == [8, 16, 32]
    feats = forward_check(backbone, torch.rand(1, 3, 100, 68))  # not multiples of 32
    assert [tuple(f.shape[-2:]) for f in feats] == [(13, 9), (7, 5), (4, 3)]


def test_detection_backbone_loads_a_reference_state_dict_through_the_yaml(tmp_path):
    torch.manual_seed(0)
    classifier = mobile_former_classifier("96m")
    randomize_bn(classifier)
    classifier.eval()
    weights = tmp_path / "mobile_former_96m.pth"
    torch.save({k: v for k, v in classifier.state_dict().items() if not k.startswith("classifier.")}, weights)
    cfg = tmp_path / "mf.yaml"
    cfg.write_text(f"nc: 3\nbackbone: {{name: mobile_former, variant: 96m, pretrained: {weights}}}\n")
    model = build_model(cfg).eval()
    report = model.pretrained_report
    assert report.style == "AAboys/MobileFormer" and report.fraction == 1.0
    assert not report.missing and not report.mismatched
    assert {k.split(".")[0] for k in report.unexpected} == {"local_global"}  # the classifier's last bridge

    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        feats = model.backbone(x)
        h, tokens = classifier.stem(x), classifier.tokens.weight[None]
        expected = []
        for i, block in enumerate(classifier.features):
            h, tokens = block(h, tokens)
            if i in model.backbone.taps:
                expected.append(h)
    for f, e in zip(feats, expected, strict=True):
        assert torch.equal(f, e)


@pytest.mark.parametrize("cfg", [YAMLS[0], YAMLS[-1]])  # test_detector runs every YAML forward and backward
def test_yaml_trains_a_step(cfg):
    torch.manual_seed(0)
    model = build_model(cfg, nc=2).train()
    criterion = DetectionLoss(2, model.strides)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    tokens_before = model.backbone.tokens.weight.detach().clone()
    images = torch.rand(2, 3, 64, 96)
    targets = torch.tensor([[[0, 8.0, 8.0, 40.0, 50.0]], [[1, 30.0, 10.0, 90.0, 60.0]]])
    loss, items = criterion(model(images), targets)
    assert torch.isfinite(items).all()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert not torch.equal(model.backbone.tokens.weight, tokens_before)  # the global tokens learn


def test_export_parity_with_dynamic_sizes(tmp_path):
    torch.manual_seed(0)
    model = build_model("mobile_former_96m.yaml", nc=3)
    randomize_bn(model)
    report = export_onnx(model.eval(), tmp_path / "mf.onnx", imgsz=96, dynamic=True)
    assert report["checked"][1].endswith("2x3x32x160") and report["max_abs_diff"] < 1e-3
