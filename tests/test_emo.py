"""EMO: official parameter names and shapes, sizes, counts against the paper, gradients, window grouping."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from yolo_mobile.backbones import build_backbone
from yolo_mobile.backbones.base import forward_check
from yolo_mobile.backbones.emo import CONFIGS, IRMB, emo_classifier
from yolo_mobile.detector import count_flops

OFFICIAL_1M = json.loads((Path(__file__).parent / "data" / "emo_1m_official_keys.json").read_text())["keys"]
# official code's counts (EMO_*().parameters()) and the paper's MACs at 224
OFFICIAL_PARAMS = {"1m": 1_361_168, "2m": 2_377_472, "5m": 5_108_848, "6m": 6_168_496}
PAPER_MMACS = {"1m": 261, "2m": 439, "5m": 903, "6m": 961}


def test_state_dict_matches_official_keys_and_shapes():
    ours = {k: list(v.shape) for k, v in emo_classifier("1m").state_dict().items()}
    assert ours == OFFICIAL_1M


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_params_and_macs(variant):
    model = emo_classifier(variant).eval()
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[variant]
    mmacs = count_flops(model, torch.zeros(1, 3, 224, 224)) / 2e6
    assert mmacs == pytest.approx(PAPER_MMACS[variant], rel=0.03)


def test_detection_backbone_loads_the_classifier_file_and_gives_its_features():
    torch.manual_seed(0)
    classifier = emo_classifier("1m").eval()
    state = {k: v for k, v in classifier.state_dict().items() if not k.startswith(("norm.", "head."))}
    backbone = build_backbone("emo", variant="1m").eval()
    backbone.load_state_dict(state, strict=True)
    x = torch.rand(1, 3, 224, 288)
    feats = backbone(x)
    from yolo_mobile.backbones.emo import _run_stages

    with torch.no_grad():
        expected = _run_stages(classifier, x)[2:]
    for f, e in zip(feats, expected, strict=True):
        assert torch.equal(f, e)


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_shapes_and_strides_at_odd_size(variant):
    backbone = build_backbone("emo", variant=variant)
    assert backbone.channels == list(CONFIGS[variant].dims[1:]) and backbone.strides == [8, 16, 32]
    feats = forward_check(backbone, torch.rand(1, 3, 330, 250))  # sizes that are not multiples of 7 or 32
    assert [tuple(f.shape[-2:]) for f in feats] == [(42, 32), (21, 16), (11, 8)]


def test_gradients_reach_every_block():
    backbone = build_backbone("emo", variant="1m", drop_path_rate=0.1)
    sum(f.mean() for f in backbone(torch.rand(2, 3, 128, 160))).backward()
    no_grad = [n for n, p in backbone.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, no_grad[:5]


def reference_window_attention(block: IRMB, x: torch.Tensor) -> torch.Tensor:
    """The official grouping, written out pixel by pixel: window (a, b) holds rows a, a + n1, a + 2 n1, ...
    and columns b, b + n2, ... of the map padded to a multiple of the window."""
    _, c, h, w = x.shape
    ws = block.window
    ph, pw = -(-h // ws) * ws, -(-w // ws) * ws
    xp = F.pad(x, (0, pw - w, 0, ph - h))
    n1, n2 = ph // ws, pw // ws
    out = torch.zeros(1, block.v.conv.out_channels, ph, pw)
    for a in range(n1):
        for b in range(n2):
            rows, cols = torch.arange(ws) * n1 + a, torch.arange(ws) * n2 + b
            win = xp[:, :, rows][:, :, :, cols]  # (1, c, ws, ws)
            qk = block.qk(win).reshape(1, 2, block.heads, block.head_dim, ws * ws)
            q, k = qk[:, 0].transpose(-1, -2), qk[:, 1].transpose(-1, -2)
            attn = (q @ k.transpose(-1, -2) * block.head_dim**-0.5).softmax(-1)
            vals = win.reshape(1, block.heads, block.head_dim, ws * ws).transpose(-1, -2)
            mixed = (attn @ vals).transpose(-1, -2).reshape(1, c, ws, ws)
            out[:, :, rows[:, None], cols[None, :]] = block.v(mixed)
    return out[:, :, :h, :w]


@pytest.mark.parametrize("size", [(14, 21), (7, 7), (13, 10), (5, 9)])
def test_window_attention_groups_pixels_as_the_official_code(size):
    torch.manual_seed(0)
    block = IRMB(40, 40, norm="ln", act="gelu", expansion=2.0, kernel=5, attention=True, head_dim=20).eval()
    x = torch.rand(1, 40, *size)
    with torch.no_grad():
        assert torch.allclose(block._window_attention(x), reference_window_attention(block, x), atol=1e-5)
