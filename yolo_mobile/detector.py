"""Detector = input normalisation -> backbone -> PAN neck -> detection head, built from a model YAML."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .backbones import build_backbone
from .backbones.base import MAX_STRIDE
from .config import ConfigError, ModelConfig, default_names, load_model_config
from .head import DetectHead
from .layers import fold_conv_bn
from .neck import PAN


class Detector(nn.Module):
    """Takes RGB in [0, 1], shape (B, 3, H, W) with H, W multiples of 32.

    ``train()`` mode returns the head's raw maps; ``eval()`` mode returns ``(B, 4 + nc, N)``
    (cx, cy, w, h in input pixels, then class scores).
    """

    def __init__(self, backbone: nn.Module, neck: PAN, head: DetectHead, config: ModelConfig) -> None:
        super().__init__()
        mean, std = getattr(backbone, "mean", None), getattr(backbone, "std", None)
        self.normalize = mean is not None
        if self.normalize:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.backbone, self.neck, self.head = backbone, neck, head
        self.config = config
        self.nc = head.nc
        self.names = default_names(self.nc)  # set from the data or the checkpoint
        # what a trained checkpoint says it was trained with: the defaults of val, detect and export
        self.train_imgsz: int | None = None
        self.train_data: str | None = None
        self.strides = list(backbone.strides)
        self.fused = False

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()):
            check_input(x)
        if self.normalize:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.head(self.neck(self.backbone(x)))

    @torch.no_grad()
    def fuse(self) -> Detector:
        """Prepare for deployment: eval mode, backbone reparameterization, Conv+BN folding. Outputs are unchanged."""
        if self.fused:
            return self
        self.eval()
        reparameterize = getattr(self.backbone, "reparameterize", None)
        if callable(reparameterize):
            reparameterize()
        fold_conv_bn(self.neck)
        fold_conv_bn(self.head)
        self.fused = True
        return self

    @torch.no_grad()
    def info(self, imgsz: int | tuple[int, int] = 640) -> dict[str, Any]:
        """Parameters (total, backbone) and GFLOPs (2 x multiply-adds, as ultralytics reports) at ``imgsz``."""
        h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
        p = next(self.parameters())
        return {
            "params": sum(q.numel() for q in self.parameters()),
            "backbone_params": sum(q.numel() for q in self.backbone.parameters()),
            "gflops": count_flops(self, torch.zeros(1, 3, h, w, device=p.device, dtype=p.dtype)) / 1e9,
            "imgsz": (h, w),
            "fused": self.fused,
        }


def class_names(model: nn.Module) -> list[str]:
    """``model.names``, or the class indices of a model without names (any module with ``nc``)."""
    return list(getattr(model, "names", None) or default_names(model.nc))


def inference_copy(model: nn.Module, device: torch.device | str = "cpu", half: bool = False) -> nn.Module:
    """A fused eval-mode copy on ``device`` in channels_last, fp16 when ``half``; the caller's model is left as
    it was. channels_last lets oneDNN (CPU) and cuDNN (GPU) skip a layout reorder around every convolution:
    measured 5-40% faster on CPU for our models (docs/benchmark.md)."""
    fused = copy.deepcopy(model).eval()
    fuse = getattr(fused, "fuse", None)
    if callable(fuse):
        fused = fuse()
    return fused.to(device=device, dtype=torch.float16 if half else torch.float32, memory_format=torch.channels_last)


def _shape(out: object) -> str:
    if hasattr(out, "shape"):
        return "x".join(str(s) for s in out.shape[1:])
    if isinstance(out, (list, tuple)):
        return ", ".join(_shape(o) for o in out)
    return "-"


def layer_table(model: Detector, imgsz: int) -> list[tuple[str, str, int, str]]:
    """(name, type, params, output shape) for the detector's parts and their direct children."""
    rows: dict[str, list] = {}
    hooks = []
    for part in ("backbone", "neck", "head"):
        module = getattr(model, part)
        children = list(module.named_children())
        # timm and torchvision backbones wrap one model: list that model's children instead
        if len(children) == 1 and list(children[0][1].children()):
            prefix, inner = children[0]
            children = [(f"{prefix}.{n}", m) for n, m in inner.named_children()]
        named = []
        for n, m in children:
            named.append((f"{part}.{n}", m))
            # containers iterated rather than called (timm stages, the head's per-level branches): list their parts
            if isinstance(m, (torch.nn.Sequential, torch.nn.ModuleList)):
                named += [(f"{part}.{n}.{k}", c) for k, c in m.named_children()]
        for name, child in [(part, module), *named]:
            rows[name] = [name, type(child).__name__, sum(p.numel() for p in child.parameters()), "-"]

            def hook(_m, _i, out, key=name):
                rows[key][3] = _shape(out)

            hooks.append(child.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, imgsz, imgsz))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return [tuple(r) for r in rows.values() if r[2] or r[3] != "-"]


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's counter knows the CUDA attention kernels but not the CPU one that timm's fused attention runs
_EXTRA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


@torch.no_grad()
def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one eval forward (2 per multiply-add: convolutions, matmuls and attention)."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS)
    with counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops()


def check_input(x: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected an RGB batch of shape (B, 3, H, W), got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % MAX_STRIDE or w % MAX_STRIDE:
        raise ValueError(f"input height and width must be multiples of {MAX_STRIDE}, got {h}x{w} "
                         "(letterbox or resize the image first)")


def pretrained_weights(config: ModelConfig, pretrained: bool | str | Path = True) -> str | None:
    """The weights file a build will load (``pretrained`` as in ``build_model``; a path replaces the YAML's
    in ``config``), checked to exist so a missing file fails before any work."""
    if pretrained is False:
        return None
    if pretrained is not True:
        config.backbone["pretrained"] = str(pretrained)
    weights = config.backbone.get("pretrained")
    if weights is not None and not Path(weights).expanduser().is_file():
        raise ConfigError(f"{config.backbone_at}: pretrained weights file {weights} not found")
    return weights


def build_model(cfg: str | Path | dict[str, Any] | ModelConfig, nc: int | None = None,
                pretrained: bool | str | Path = True, model_class: type[Detector] = Detector) -> Detector:
    """Build a detector from a model YAML path, a built-in name (``"mobilevit_s.yaml"``) or a dict.

    ``nc`` overrides the YAML's number of classes. ``pretrained``: True loads the file the YAML names under
    ``backbone.pretrained`` (if any), a path loads that file instead, False loads none (a checkpoint's weights
    follow). What was loaded is in ``model.pretrained_report``. ``model_class``: a subclass of ``Detector`` to
    build (the public API's ``Model`` adds ``save`` and ``predict``).
    """
    from .backbones.pretrained import load_pretrained

    config = load_model_config(cfg)
    if nc is not None:
        if nc < 1:
            raise ConfigError(f"nc must be a positive integer, got {nc}")
        config.nc = nc
    weights = pretrained_weights(config, pretrained)
    kwargs = {k: v for k, v in config.backbone.items() if k not in ("name", "pretrained", "strict")}
    try:
        backbone = build_backbone(config.backbone["name"], **kwargs)
        report = None if weights is None else load_pretrained(
            backbone, weights, strict=config.backbone.get("strict", True), family=config.backbone["name"])
    except (KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"{config.backbone_at}: {e}") from e
    try:
        neck = PAN(list(backbone.channels), list(backbone.strides), depth=config.neck.depth, width=config.neck.width,
                   act=config.neck.act, sppf_kernel=config.neck.sppf_kernel, depthwise=config.neck.depthwise,
                   sppf=config.neck.sppf)
        head_depthwise = config.neck.depthwise if config.head.depthwise is None else config.head.depthwise
        head = DetectHead(config.nc, neck.channels, list(backbone.strides), reg_max=config.head.reg_max,
                          act=config.head.act, channels=config.head.channels, depthwise=head_depthwise,
                          shared=config.head.shared)
    except ValueError as e:
        raise ConfigError(f"{config.source}: {e}") from e
    model = model_class(backbone, neck, head, config)
    model.pretrained_report = report
    return model
