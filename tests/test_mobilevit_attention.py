"""MobileViT's attention runs through F.scaled_dot_product_attention on a fused kernel (no N x N matrix) in
training, evaluation and tracing, whatever timm's global switches say; its memory-lean training path (BN + SiLU
recomputed in backward) gives what timm's own forward gives."""

import copy
import warnings

import pytest
import timm.layers.config
import torch
from conftest import randomize_bn
from timm.layers import Attention
from timm.layers import attention as timm_attention
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from yolo_mobile.backbones import build_backbone, mobilevit

# non-square, so that no feature map is (..., N, N): patches N = 8 x 12, 4 x 6 and 2 x 3 at strides 8, 16, 32
SHAPE = (2, 3, 128, 192)
FUSED_KERNELS = {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"}
MATRIX_OPS = {"bmm", "baddbmm", "matmul", "_softmax", "softmax", "_safe_softmax", "_softmax_backward_data"}


class AtenOps(TorchDispatchMode):
    """Every aten operator that runs (forward and backward) with the shapes of its outputs."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func.overloadpacket.__name__,
                         [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]))
        return out


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Token counts of each F.scaled_dot_product_attention call made through the name timm's Attention calls."""
    calls = []
    real = timm_attention.F.scaled_dot_product_attention

    def counting(q, k, v, *args, **kwargs):
        calls.append(q.shape[-2])
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(timm_attention.F, "scaled_dot_product_attention", counting)
    return calls


def check_fused(ops, tokens):
    """A fused attention kernel ran, and no batched matmul or softmax produced a (..., N, N) tensor."""
    names = {name for name, _ in ops}
    assert names & FUSED_KERNELS, f"no fused attention kernel ran: {sorted(n for n in names if 'attention' in n)}"
    square = [(name, s) for name, shapes in ops if name in MATRIX_OPS for s in shapes
              if len(s) >= 3 and s[-1] == s[-2] and s[-1] in tokens]
    assert not square, f"attention matrices materialised: {square[:3]}"


def n_attention(backbone):
    return sum(isinstance(m, Attention) for m in backbone.modules())


@pytest.mark.parametrize("timm_switch", ["default", "fused_attn_off", "exportable"])
def test_train_and_eval_run_fused_attention(sdpa_calls, monkeypatch, timm_switch):
    # timm reads these when an Attention is built: TIMM_FUSED_ATTN=0 sets the first, its exportable flag the second
    if timm_switch == "fused_attn_off":
        monkeypatch.setattr(timm.layers.config, "_USE_FUSED_ATTN", 0)
    elif timm_switch == "exportable":
        monkeypatch.setattr(timm.layers.config, "_EXPORTABLE", True)
    backbone = build_backbone("mobilevit", variant="xxs")
    n = n_attention(backbone)
    assert n == 9  # transformer depths 2, 4 and 3
    x = torch.rand(SHAPE)

    sdpa_calls.clear()
    backbone.train()
    with AtenOps() as mode:
        sum(f.mean() for f in backbone(x)).backward()
    tokens = set(sdpa_calls)
    assert len(sdpa_calls) == n and tokens == {96, 24, 6}
    check_fused(mode.ops, tokens)
    assert any(name.endswith("attention_for_cpu_backward") or "attention_backward" in name for name, _ in mode.ops)

    sdpa_calls.clear()
    backbone.eval()
    with torch.no_grad(), AtenOps() as mode:
        backbone(x)
    assert len(sdpa_calls) == n
    check_fused(mode.ops, tokens)


def test_trace_keeps_sdpa():
    """The graph the TorchScript ONNX exporter traces holds the SDPA call (exported as MatMul/Softmax)."""
    backbone = build_backbone("mobilevit", variant="xxs").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(backbone, torch.rand(1, 3, 64, 96), check_trace=False)
    graph = str(traced.inlined_graph)
    assert graph.count("aten::scaled_dot_product_attention") == n_attention(backbone)
    assert "aten::softmax" not in graph


def test_recomputed_training_matches_timm(monkeypatch):
    """Outputs, gradients and BatchNorm statistics equal those of timm's own forwards; the lean path is taken in
    training only."""
    torch.manual_seed(0)
    ours = build_backbone("mobilevit", variant="xxs")
    randomize_bn(ours)
    ref = copy.deepcopy(ours)
    for m in ref.modules():
        m.__dict__.pop("forward", None)  # timm's class forwards
    uses = []
    real = mobilevit._RecomputedNormAct.apply
    monkeypatch.setattr(mobilevit._RecomputedNormAct, "apply", lambda *a: uses.append(1) or real(*a))
    x = torch.rand(2, 3, 64, 96)  # stride-32 map 2 x 3: MobileViT resizes it to whole 2 x 2 patches too
    results = []
    for model in (ours, ref):
        model.train()
        xi = x.clone().requires_grad_()
        feats = model(xi)
        g = torch.Generator().manual_seed(1)
        sum((f * torch.randn(f.shape, generator=g)).sum() for f in feats).backward()
        results.append((feats, xi.grad, {k: p.grad for k, p in model.named_parameters()},
                        dict(model.named_buffers())))
    assert len(uses) == 7 * 2 + 3  # 7 inverted residuals (2 BN + SiLU each), 3 MobileViT blocks (1 each)
    (fa, ga, pa, ba), (fb, gb, pb, bb) = results
    for a, b in zip(fa, fb, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)
    for k in pb:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6, msg=k)
    for k in bb:
        torch.testing.assert_close(ba[k], bb[k], rtol=0, atol=1e-6, msg=k)

    uses.clear()
    ours.eval()
    with torch.no_grad():
        for a, b in zip(ours(x), ref.eval()(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    ours.train()
    with torch.no_grad():
        ours(x)
    assert not uses  # nothing to recompute without autograd
