import functools
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

# pytest-xdist runs the suite in parallel workers (pyproject's addopts: -n auto --dist loadgroup): each worker
# gets an equal share of the cores, so two workers on two cores do not each start two torch threads
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# modules whose tests share one session fixture run on one worker, so it is built once
SHARED_GROUPS = {"test_benchmark": "benchmark_rows", "test_int8": "benchmark_rows"}
# the heaviest xdist groups, most CPU first (pytest --durations, whole suite, 2 workers, idle): xdist hands groups
# out in collection order (--no-loadscope-reorder), so these start first and no worker runs a long one at the end
HEAVY_GROUPS = ["benchmark_rows", "test_phone_export_tflite", "tflite-mobile_former", "tflite-vit",
                "tflite-mobilevit", "tflite-emo", "tflite-timm", "tflite-mobilenetv3", "tflite-fastvit",
                "test_phone_export_ncnn", "test_first_hour", "test_train", "test_deploy"]


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """One worker per core, at most 4: every worker imports torch and builds its own models (~1-3 GB each)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks to group the tests
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each module's tests stay on one worker (their module-scoped fixtures, exports and trained models, are
    built once), as with --dist loadfile; modules in SHARED_GROUPS share a worker. Then the HEAVY_GROUPS go first,
    in that order (a stable sort: the same order on every worker, as xdist requires)."""
    for item in items:
        if not any(item.iter_markers("xdist_group")):
            module = item.module.__name__.rsplit(".", 1)[-1] if item.module else item.nodeid.split("::")[0]
            item.add_marker(pytest.mark.xdist_group(SHARED_GROUPS.get(module, module)))
    rank = {group: i for i, group in enumerate(HEAVY_GROUPS)}
    items.sort(key=lambda item: rank.get(xdist_group(item), len(rank)))


def xdist_group(item: pytest.Item) -> str:
    """The group xdist sends ``item`` with: its closest xdist_group mark (a test's own before its module's)."""
    mark = item.get_closest_marker("xdist_group")
    return mark.args[0] if mark.args else mark.kwargs.get("name", "default")


COCO128 = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "coco128"
needs_coco128 = pytest.mark.skipif(not (COCO128 / "coco128.yaml").is_file(), reason="../shared/datasets/coco128 absent")

# Arguments for registered backbones that cannot be built without any; every other backbone is built bare.
BACKBONE_ARGS = {"timm": {"model": "efficientvit_b0"}, "vit": {"model": "deit_tiny_patch16_224"}}


@functools.cache
def model_for_backbone(name: str) -> str | dict:
    """The model config that stands for a registered backbone in tests that loop over the registry: its smallest
    built-in YAML (by backbone parameters), or a bare config with ``BACKBONE_ARGS`` where no built-in uses it."""
    from yolo_mobile.backbones import build_backbone
    from yolo_mobile.config import list_builtin_models, load_model_config

    sizes = {}
    for cfg in list_builtin_models():
        backbone = load_model_config(cfg).backbone
        if backbone["name"] == name:
            kwargs = {k: v for k, v in backbone.items() if k not in ("name", "pretrained", "strict")}
            sizes[cfg] = sum(p.numel() for p in build_backbone(name, **kwargs).parameters())
    if not sizes:
        return {"backbone": {"name": name, **BACKBONE_ARGS.get(name, {})}}
    return min(sizes, key=sizes.get)


@pytest.fixture(scope="session")
def benchmark_rows():
    """One benchmark run for test_benchmark and test_int8 (whose INT8 columns it holds): yolov5n at two sizes,
    every backend, training speed; the (config, rows) pair."""
    from yolo_mobile.benchmark import BenchmarkConfig, run_benchmark

    config = BenchmarkConfig(cfgs=["yolov5n.yaml"], imgsz=[64, 96], batch=2, runs=2, warmup=1,
                             train_speed=True, train_batch=2)
    return config, run_benchmark(config, progress=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize_bn(model: torch.nn.Module) -> None:
    """Give every BatchNorm non-trivial statistics, so that folding it is a real test."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)


def make_yolo_dataset(root: Path, labels: dict[str, str | None], names=("a", "b", "c"),
                      sizes: dict[str, tuple[int, int]] | None = None) -> Path:
    """A tiny YOLO dataset: one image per key (label text, or None for no label file); returns its data YAML."""
    rng = np.random.default_rng(0)
    (root / "images" / "val").mkdir(parents=True, exist_ok=True)
    (root / "labels" / "val").mkdir(parents=True, exist_ok=True)
    for stem, text in labels.items():
        h, w = (sizes or {}).get(stem, (48, 64))
        cv2.imwrite(str(root / "images" / "val" / f"{stem}.jpg"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        if text is not None:
            (root / "labels" / "val" / f"{stem}.txt").write_text(text)
    yaml_path = root / "data.yaml"
    yaml_path.write_text(f"path: .\ntrain: images/val\nval: images/val\nnames: {list(names)}\n")
    return yaml_path


def video_props(path) -> tuple[int, float, int, int]:
    """Frames (counted by reading them), fps, width and height of a video file."""
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    props = (n, round(cap.get(cv2.CAP_PROP_FPS), 2), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
             int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    cap.release()
    return props
