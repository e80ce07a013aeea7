"""The one door to ultralytics: training's task-aligned assigner, CIoU + DFL box loss and weight EMA, and the
reference models of ``--compare-ultralytics``. Building, evaluating, predicting and exporting never come here.

ultralytics is imported on first use, offline (YOLO_OFFLINE=1 unless the user set it): importing it writes its
settings file and may check online. Every call passes its arguments by keyword, and the first use checks that
the installed version takes those keywords, so a changed signature fails at once with one clear line instead of
misplacing a tensor. No class attribute of ultralytics is read or changed.
"""

from __future__ import annotations

import inspect
import os
from functools import cache
from types import SimpleNamespace
from typing import Any

from torch import nn

# (module, attribute path, the keywords we pass): what this adapter relies on
CALLS = (
    ("ultralytics.utils.tal", "TaskAlignedAssigner", ("topk", "num_classes", "alpha", "beta", "stride")),
    ("ultralytics.utils.tal", "TaskAlignedAssigner.forward",
     ("pd_scores", "pd_bboxes", "anc_points", "gt_labels", "gt_bboxes", "mask_gt")),
    ("ultralytics.utils.loss", "BboxLoss", ("reg_max",)),
    ("ultralytics.utils.loss", "BboxLoss.forward",
     ("pred_dist", "pred_bboxes", "anchor_points", "target_bboxes", "target_scores", "target_scores_sum",
      "fg_mask", "imgsz", "stride")),
    ("ultralytics.utils.torch_utils", "ModelEMA", ("model", "decay", "tau", "updates")),
    ("ultralytics.utils.torch_utils", "ModelEMA.update", ("model",)),
    ("ultralytics.utils.torch_utils", "get_flops", ("model", "imgsz")),
    ("ultralytics.nn.tasks", "DetectionModel", ("cfg", "nc", "verbose")),
)
REQUIREMENT = "ultralytics>=8.4.0,<8.5"


class UltralyticsMismatch(ImportError):
    """ultralytics is missing, or the installed version does not take the keywords this adapter passes."""


def missing_keywords(fn: Any, keywords: tuple[str, ...]) -> list[str]:
    """The ``keywords`` that ``fn`` (a function or a class) does not accept by name."""
    params = inspect.signature(fn).parameters
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return [k for k in keywords if k not in named]


@cache
def load() -> SimpleNamespace:
    """Import the pieces of ultralytics we call and check their signatures; raises ``UltralyticsMismatch``."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    try:
        import ultralytics
    except ImportError:
        raise UltralyticsMismatch(f"training and --compare-ultralytics need ultralytics: pip install "
                                  f"'{REQUIREMENT}'") from None
    from importlib import import_module

    found: dict[str, Any] = {}
    for module_name, path, keywords in CALLS:
        obj: Any = import_module(module_name)
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                raise UltralyticsMismatch(f"ultralytics {ultralytics.__version__} has no {module_name}.{path}; "
                                          f"yolo-mobile needs '{REQUIREMENT}'")
        missing = missing_keywords(obj, keywords)
        if missing:
            raise UltralyticsMismatch(f"ultralytics {ultralytics.__version__}: {module_name}.{path} does not take "
                                      f"{', '.join(missing)}; yolo-mobile needs '{REQUIREMENT}'")
        found[path.replace(".", "_")] = obj
    return SimpleNamespace(**found)


def assigner(topk: int, num_classes: int, alpha: float, beta: float, stride: list[int]) -> nn.Module:
    """ultralytics' TaskAlignedAssigner; call it with the keywords of ``CALLS``."""
    return load().TaskAlignedAssigner(topk=topk, num_classes=num_classes, alpha=alpha, beta=beta, stride=stride)


def bbox_loss(reg_max: int) -> nn.Module:
    """ultralytics' BboxLoss (CIoU + DFL); call it with the keywords of ``CALLS``."""
    return load().BboxLoss(reg_max=reg_max)


def model_ema(model: nn.Module, decay: float = 0.9999, tau: int = 2000, updates: int = 0):
    """ultralytics' ModelEMA: an exponential moving average of weights and buffers, warmed up over ``tau``."""
    return load().ModelEMA(model=model, decay=decay, tau=tau, updates=updates)


def reference_model(yaml_name: str, nc: int = 80) -> nn.Module:
    """Build one of ultralytics' own detectors (e.g. ``yolov8n.yaml``) from its bundled YAML: no download."""
    return load().DetectionModel(cfg=yaml_name, nc=nc, verbose=False)


def reference_info(yaml_name: str, imgsz: int = 640) -> dict[str, float]:
    """Parameters and GFLOPs of an ultralytics detector as ultralytics' own ``info`` counts them."""
    model = reference_model(yaml_name)
    return {"params": sum(p.numel() for p in model.parameters()),
            "gflops": load().get_flops(model=model, imgsz=imgsz)}
