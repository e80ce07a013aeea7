"""The one door to ultralytics: imported lazily, offline, so `import yolo_mobile` stays fast and silent.

Importing ultralytics creates its settings file and may check online; YOLO_OFFLINE=1 (unless the user set it)
keeps it off the network. Only pieces that take explicit arguments are used: no class attribute is changed.
"""

from __future__ import annotations

import os
from types import ModuleType


def tal() -> ModuleType:
    """``ultralytics.utils.tal``: make_anchors, dist2bbox, bbox2dist, TaskAlignedAssigner."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics.utils import tal as module

    return module


def reference_model(yaml_name: str, nc: int = 80):
    """Build one of ultralytics' own detectors (e.g. ``yolov8n.yaml``) from its bundled YAML: no download."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel(yaml_name, nc=nc, verbose=False)


def reference_info(yaml_name: str, imgsz: int = 640) -> dict[str, float]:
    """Parameters and GFLOPs of an ultralytics detector as ultralytics' own ``info`` counts them."""
    from ultralytics.utils.torch_utils import get_flops

    model = reference_model(yaml_name)
    return {"params": sum(p.numel() for p in model.parameters()), "gflops": get_flops(model, imgsz)}


def loss() -> ModuleType:
    """``ultralytics.utils.loss``: BboxLoss (CIoU + DFL), which takes its arguments explicitly."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics.utils import loss as module

    return module


def model_ema(model, decay: float = 0.9999, tau: int = 2000, updates: int = 0):
    """ultralytics' ModelEMA: an exponential moving average of weights and buffers, warmed up over ``tau``."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics.utils.torch_utils import ModelEMA

    return ModelEMA(model, decay=decay, tau=tau, updates=updates)
