"""A PyTorch model (a checkpoint, a model YAML or a module) run in eval mode, on the CPU or a GPU."""

from __future__ import annotations

import torch

from .base import RUNTIMES


@RUNTIMES.register("torch")
class TorchRuntime:
    """Any batch and size (multiples of ``stride``); thread-safe, so predict may run batches on several threads.
    ``train_imgsz``: the size a checkpoint was trained at (detect's default size), else None."""

    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu", half: bool = False) -> None:
        self.device = torch.device(device)
        if half and self.device.type != "cuda":
            raise ValueError("--half needs a CUDA device")
        from ..detector import MAX_STRIDE, class_names, inference_copy

        self.model = inference_copy(model, self.device, half)
        self.dtype = torch.float16 if half else torch.float32
        self.names = class_names(model)
        self.batch, self.imgsz, self.nms_inside = None, None, False  # any batch and size (multiples of stride)
        self.stride = max(MAX_STRIDE, *(int(s) for s in getattr(model, "strides", [])))
        self.train_imgsz = getattr(model, "train_imgsz", None)  # detect's default size for a checkpoint

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # predict hands over a channels_last batch: this is then a no-op on CPU
        x = x.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
        return self.model(x).float().cpu()
