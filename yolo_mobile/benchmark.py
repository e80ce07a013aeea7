"""``yolo-mobile benchmark``: params, GFLOPs, latency, throughput, memory and training speed, side by side.

Every row is measured in the same process, on the same input, the same way: our models and (with
``compare_ultralytics``) ultralytics' YOLOv5nu, YOLOv8n and YOLO11n built from their bundled YAMLs, so ratios
between rows come from one run on one machine.
"""

from __future__ import annotations

import copy
import csv
import io
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import default_names, flag
from .engine.memory import peak_bytes, random_targets
from .files import write_text, write_with

ULTRALYTICS_MODELS = ("yolov5nu.yaml", "yolov8n.yaml", "yolo11n.yaml")
# the API's default: the phone runtimes (optional extras, a LiteRT conversion costs 15-60 s) are asked for by name
DEFAULT_BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8")
BACKENDS = (*DEFAULT_BACKENDS, "tflite", "ncnn")
RUNTIMES = ("onnxruntime", "onnxruntime-int8", "tflite", "ncnn")  # timed interleaved, at the same thread count
INT8_CALIBRATION_IMAGES = 16  # drawn shapes-set images: the benchmark needs no data


def time_fn(fn: Callable[[], object], runs: int = 30, warmup: int = 5) -> dict[str, float]:
    """Median and 90th-percentile wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)), "runs": runs}


@dataclass
class BenchmarkConfig:
    """``yolo-mobile benchmark``: what to measure; its flags are these fields (cli.py builds the parser from them).
    ``cfgs`` are model YAMLs or built-in names (none: every built-in model); sizes are square inputs."""

    cfgs: list[str] = flag([], "model YAMLs or built-in names (default: all built-in models)", flag="--cfg",
                           nargs="+", group="models")
    imgsz: list[int] = flag([320, 640], "square input sizes", nargs="+")
    batch: int = flag(1, "batch for the throughput and memory columns", type="positive")
    device: str = flag("cpu", "cpu or a GPU index such as 0")
    backends: list[str] = flag(list(DEFAULT_BACKENDS), "PyTorch eager (fused), ONNX Runtime (CUDA provider on a GPU "
                               "when installed), ONNX Runtime on the INT8 file (calibrated on drawn shapes-set "
                               "images), LiteRT with XNNPACK (.[tflite]), ncnn (.[ncnn]); the exported files are "
                               "timed interleaved at one thread count", flag="--backend", nargs="+", choices=BACKENDS)
    half: bool = flag(False, "fp16 (GPU only)")
    compile: bool = flag(False, "also time torch.compile (the compile time is reported)")
    compare_ultralytics: bool = flag(False, "also measure ultralytics' YOLOv5nu, YOLOv8n, YOLO11n (built from their "
                                            "YAMLs)")
    train_speed: bool = flag(False, "training img/s: forward, loss, backward, step")
    train_batch: int = flag(16, "batch for --train-speed", type="positive")
    runs: int = flag(30, "timed runs per measurement (after --warmup)", type="positive")
    warmup: int = flag(5, "untimed runs before them", type="non_negative")
    map_file: Path | None = flag(None, "CSV of model,mAP50-95: the plot shows mAP against latency", flag="--map")

    def __post_init__(self) -> None:
        if not self.cfgs:
            from .config import list_builtin_models

            self.cfgs = list_builtin_models()

    def check(self) -> None:
        """Everything that can be wrong with the request, before any model is built."""
        from .config import ConfigError, check_imgsz, load_model_config
        from .engine.device import select_device

        for cfg in self.cfgs:
            load_model_config(cfg)  # a missing or bad YAML fails here, naming the file
        unknown = sorted(set(self.backends) - set(BACKENDS))
        if unknown:
            raise ConfigError(f"unknown backend(s) {unknown}; valid: {list(BACKENDS)}")
        for size in self.imgsz:
            check_imgsz(size, "--imgsz")
        if self.batch < 1 or self.train_batch < 1 or self.runs < 1 or self.warmup < 0:
            raise ConfigError("--batch, --train-batch and --runs must be at least 1, --warmup at least 0")
        device = select_device(self.device, "benchmark")
        if self.half and device.type != "cuda":
            raise ConfigError("--half needs a CUDA device (fp16 kernels do not run on the CPU): add --device 0")
        if {"onnxruntime", "onnxruntime-int8"} & set(self.backends):
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                raise ConfigError("--backend onnxruntime needs onnxruntime: pip install onnxruntime") from None
        if "onnxruntime-int8" in self.backends and self.half:
            raise ConfigError("--backend onnxruntime-int8 quantizes the float32 export: drop --half")
        phone = [b for b in ("tflite", "ncnn") if b in self.backends]
        if phone and self.half:
            raise ConfigError(f"--backend {' '.join(phone)} times the float32 export on the CPU: drop --half")
        for backend in phone:
            from .runtimes import litert, ncnn

            try:
                (litert.require_tflite if backend == "tflite" else ncnn.require_ncnn)()
            except ImportError as e:
                raise ConfigError(str(e)) from None
        if self.map_file is not None:
            read_map_file(self.map_file)


def read_map_file(path: str | Path) -> dict[str, float]:
    """``model,mAP50-95`` rows (a CSV with a header; ``map`` or ``mAP`` also accepted as the column name)."""
    from .config import ConfigError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: mAP results file not found")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        column = next((c for c in ("mAP50-95", "map", "mAP") if c in columns), None)
        if "model" not in columns or column is None:
            raise ConfigError(f"{path}: needs a header with 'model' and 'mAP50-95' columns, found {columns}")
        scores = {}
        for line, row in enumerate(reader, start=2):
            try:
                scores[row["model"].removesuffix(".yaml")] = float(row[column])
            except (TypeError, ValueError):
                raise ConfigError(f"{path}:{line}: '{row[column]}' is not a number") from None
    return scores


class UltralyticsDetector(nn.Module):
    """An ultralytics ``DetectionModel`` built from its bundled YAML (no download), measured exactly as ours:
    eval output ``(B, 4 + nc, N)``, training output our head's per-level maps, ``fuse()`` theirs."""

    def __init__(self, yaml_name: str, nc: int = 80) -> None:
        from . import _ultralytics

        super().__init__()
        self.model = _ultralytics.reference_model(yaml_name, nc=nc)
        self.nc, self.names = nc, default_names(nc)
        self.strides = [int(s) for s in self.model.stride]
        n_backbone = len(self.model.yaml["backbone"])  # their backbone includes SPPF; ours leaves it to the neck
        self.backbone_params = sum(p.numel() for p in self.model.model[:n_backbone].parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out = self.model(x)
        if not self.training:
            return out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(out, dict):  # ultralytics 8.4: flattened boxes and scores, plus the level maps
            joined, maps, start = torch.cat([out["boxes"], out["scores"]], 1), [], 0
            for feat in out["feats"]:
                h, w = feat.shape[2:]
                maps.append(joined[..., start:start + h * w].unflatten(2, (h, w)))
                start += h * w
            return maps
        return out

    def fuse(self) -> UltralyticsDetector:
        self.eval()
        self.model.fuse(verbose=False)
        return self


def peak_forward_memory_mb(fn: Callable[[], object], device) -> float | None:
    """Memory one call of ``fn`` needs above what is already held (activations and workspace, not weights), in
    MB: CUDA's allocator peak on a GPU, the process's peak resident set on Linux CPUs; None where unreadable."""
    peak = peak_bytes(fn, device)
    return None if peak is None else peak / 2**20


def _synced(fn: Callable[[], object], device) -> Callable[[], object]:
    if device.type != "cuda":
        return fn

    def run() -> object:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def train_speed(model, imgsz: int, batch: int, device, steps: int = 5, warmup: int = 2,
                amp: bool = False) -> float:
    """Training images per second: forward, our detection loss, backward and an SGD step, on random images
    with random boxes at a fixed ``batch`` (the nominal batch: no accumulation)."""
    from .engine.trainer import param_groups
    from .loss import DetectionLoss

    model = copy.deepcopy(model).to(device).train()
    optimizer = torch.optim.SGD(param_groups(model, 5e-4), lr=0.01, momentum=0.937, nesterov=True)
    criterion = DetectionLoss(model.nc, list(model.strides))
    x = torch.rand(batch, 3, imgsz, imgsz, device=device)
    targets = random_targets(batch, imgsz, imgsz, model.nc).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss, _ = criterion(model(x), targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    timing = time_fn(_synced(step, device), runs=steps, warmup=warmup)
    return batch * 1000 / timing["median_ms"]


def shapes_images(imgsz: int, n: int = INT8_CALIBRATION_IMAGES) -> list[np.ndarray]:
    """Images of the built-in shapes set, drawn in memory at ``imgsz`` (the INT8 columns' calibration set)."""
    from .datasets.synthetic import draw_sample

    rng = np.random.default_rng(0)
    return [draw_sample(rng, imgsz)[0] for _ in range(n)]


@dataclass
class Candidate:
    """One model to measure: its display name, where it comes from and how to build it (untrained)."""

    name: str
    source: str
    build: Callable[[], Any]


def candidates(config: BenchmarkConfig) -> list[Candidate]:
    from .detector import build_model

    models = [Candidate(Path(cfg).name.removesuffix(".yaml"), "yolo-mobile",
                        lambda cfg=cfg: build_model(cfg, pretrained=False)) for cfg in config.cfgs]
    if config.compare_ultralytics:
        models += [Candidate(f"ultralytics {name.removesuffix('.yaml')}", "ultralytics",
                             lambda name=name: UltralyticsDetector(name)) for name in ULTRALYTICS_MODELS]
    return models


def measure(candidate: Candidate, imgsz: int, config: BenchmarkConfig, workdir: Path
            ) -> tuple[dict[str, Any], dict[str, Path]]:
    """All measurements of one model at one size but the exported files' latency: the row, and the files (in
    ``workdir``) that :func:`runtime_latencies` times with those of the other models at that size."""
    from .detector import count_flops, inference_copy
    from .engine.device import select_device
    from .export.int8 import quantize_onnx
    from .export.onnx import export_onnx

    device = select_device(config.device)
    model = candidate.build()
    params = sum(p.numel() for p in model.parameters())
    backbone_params = getattr(model, "backbone_params", None)
    if backbone_params is None:
        backbone_params = sum(p.numel() for p in model.backbone.parameters())
    row: dict[str, Any] = {
        "model": candidate.name, "source": candidate.source, "imgsz": imgsz, "device": str(device),
        "dtype": "float16" if config.half else "float32", "batch": config.batch,
        "backbone_params_m": backbone_params / 1e6, "params_m": params / 1e6,
        "gflops": count_flops(model, torch.zeros(1, 3, imgsz, imgsz)) / 1e9,
    }
    dtype = torch.float16 if config.half else torch.float32
    x1 = torch.rand(1, 3, imgsz, imgsz, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    xb = torch.rand(config.batch, 3, imgsz, imgsz, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    if "torch" in config.backends:
        fused = inference_copy(model, device, config.half)  # what `yolo-mobile detect` runs
        with torch.inference_mode():
            t = time_fn(_synced(lambda: fused(x1), device), config.runs, config.warmup)
            row["torch_ms"], row["torch_p90_ms"] = t["median_ms"], t["p90_ms"]
            tb = t if config.batch == 1 else time_fn(_synced(lambda: fused(xb), device), config.runs, config.warmup)
            row["throughput"] = config.batch * 1000 / tb["median_ms"]
            row["peak_mb"] = peak_forward_memory_mb(lambda: fused(xb), device)
        if config.compile:
            compiled = torch.compile(fused, dynamic=False)
            with torch.inference_mode():
                start = time.perf_counter()
                compiled(x1)  # the first call compiles
                row["compile_s"] = time.perf_counter() - start
                t = time_fn(_synced(lambda: compiled(x1), device), config.runs, config.warmup)
            row["compiled_ms"], row["compiled_p90_ms"] = t["median_ms"], t["p90_ms"]
            torch._dynamo.reset()  # compiled graphs hold memory; the next model starts clean
        del fused
    files: dict[str, Path] = {}
    if {"onnxruntime", "onnxruntime-int8"} & set(config.backends):
        path = workdir / f"{candidate.name.replace(' ', '_')}_{imgsz}.onnx"
        report = export_onnx(model, path, imgsz=imgsz, half=config.half,
                             device=str(device.index if device.type == "cuda" else "cpu"))
        row["onnx_max_diff"], row["onnx_mb"], row["export_s"] = report["max_abs_diff"], report["size_mb"], \
            report["export_s"]
        files["onnxruntime"] = path
    if "onnxruntime-int8" in config.backends:
        files["onnxruntime-int8"] = int8_path = path.with_name(path.stem + "_int8.onnx")
        # latency does not depend on how the ranges were found: the cheapest method
        row["int8_mb"] = quantize_onnx(path, int8_path, shapes_images(imgsz), imgsz, method="minmax")["size_mb"]
    stem = workdir / f"{candidate.name.replace(' ', '_')}_{imgsz}"
    for fmt in ("tflite", "ncnn"):
        if fmt in config.backends:
            files.update(phone_export(fmt, model, stem, imgsz, row))
    if config.train_speed:
        row["train_img_s"] = train_speed(model, imgsz, config.train_batch, device, amp=config.half)
        row["train_batch"] = config.train_batch
    return row, files


def phone_export(fmt: str, model, stem: Path, imgsz: int, row: dict[str, Any]) -> dict[str, Path]:
    """Export to ``fmt`` (tflite, ncnn) for timing; its parity and size go in ``row``. A model the converter
    cannot take (an ncnn exception in README's list) gets its reason in ``row`` and no column, not a stopped run."""
    from .export.checks import ConversionError
    from .export.ncnn import export_ncnn
    from .export.tflite import export_tflite

    try:
        if fmt == "tflite":
            report = export_tflite(model, stem.with_suffix(".tflite"), imgsz=imgsz)
        else:
            report = export_ncnn(model, stem.with_name(stem.name + "_ncnn"), imgsz=imgsz)
    except ConversionError as e:
        row[f"{fmt}_error"] = str(e)
        return {}
    row[f"{fmt}_max_diff"], row[f"{fmt}_mb"] = report["max_abs_diff"], report["size_mb"]
    return {fmt: report["path"]}


def runtime_latency(files: dict[str, Path], imgsz: int, config: BenchmarkConfig, device) -> dict[str, Any]:
    """The latency columns of one model's exported files (:func:`runtime_latencies` for one model)."""
    return runtime_latencies([files], imgsz, config, device)[0]


def runtime_latencies(models: list[dict[str, Path]], imgsz: int, config: BenchmarkConfig, device
                      ) -> list[dict[str, Any]]:
    """Latency columns of several models' exported files, each file in its own runtime, all timed interleaved
    with one another at one thread count (the CPUs this process may use): ONNX Runtime, LiteRT with XNNPACK, ncnn.
    Ratios between models and between a model's float and INT8 files then come from the same stretch of time,
    whatever else the machine was doing."""
    from .resources import usable_cpus
    from .runtimes import RUNTIMES
    from .runtimes.timing import interleaved_latency

    threads = usable_cpus()
    calls: dict[tuple[int, str], Callable[[], object]] = {}
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)  # the exports are batch 1
    providers = {}
    for i, files in enumerate(models):
        for key, path in files.items():
            if key.startswith("onnxruntime"):
                runtime = RUNTIMES.get("onnxruntime")(path, device, threads)
                feed = x.astype(np.float16) if config.half else x
                calls[i, key] = lambda runtime=runtime, feed=feed: runtime.run(feed)
                providers[i, key] = runtime.provider
            elif key in ("tflite", "ncnn"):
                runtime = RUNTIMES.get(key)(path, threads)
                calls[i, key] = lambda runtime=runtime: runtime.run(x)
    # ncnn's per-layer fork-join waits on any thread another process holds back (README: Benchmark)
    load = os.getloadavg()[0]
    times = interleaved_latency(calls, config.runs, config.warmup)
    prefix = {"onnxruntime": "ort", "onnxruntime-int8": "ort_int8", "tflite": "tflite", "ncnn": "ncnn"}
    rows = []
    for i in range(len(models)):
        row: dict[str, Any] = {"runtime_threads": threads, "runtime_load": load}
        for (j, key), t in times.items():
            if j == i:
                row[f"{prefix[key]}_ms"], row[f"{prefix[key]}_p90_ms"] = t["median_ms"], t["p90_ms"]
        if (i, "onnxruntime") in providers:
            row["ort_provider"] = providers[i, "onnxruntime"]
        if "ort_int8_ms" in row and "ort_ms" in row:
            row["int8_ratio"] = row["ort_int8_ms"] / row["ort_ms"]
        rows.append(row)
    return rows


def run_benchmark(config: BenchmarkConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Measure every model at every size; rows in model order, sizes ascending."""
    from tqdm import tqdm

    from .engine.device import select_device

    config.check()
    models = candidates(config)
    jobs = [(m, s) for m in models for s in sorted(config.imgsz)]
    rows, files = [], []
    with tempfile.TemporaryDirectory(prefix="yolo_mobile_bench_") as tmp:
        bar = tqdm(jobs, desc="benchmark", unit="model", disable=not progress)
        for candidate, imgsz in bar:
            bar.set_postfix_str(f"{candidate.name} @{imgsz}")
            row, exported = measure(candidate, imgsz, config, Path(tmp))
            rows.append(row)
            files.append(exported)
        device = select_device(config.device)
        for size in sorted(config.imgsz):  # every model's files at one size, timed together
            timed = [i for i, row in enumerate(rows) if row["imgsz"] == size and files[i]]
            if timed:
                bar.set_postfix_str(f"exported files @{size}")
                for i, columns in zip(timed, runtime_latencies([files[i] for i in timed], size, config, device),
                                      strict=True):
                    rows[i].update(columns)
    return rows


COLUMNS: list[tuple[str, str, str]] = [  # key, Markdown header, format
    ("model", "model", "{}"),
    ("imgsz", "size", "{}"),
    ("backbone_params_m", "backbone params (M)", "{:.2f}"),
    ("params_m", "params (M)", "{:.2f}"),
    ("gflops", "GFLOPs", "{:.2f}"),
    ("torch_ms", "torch ms", "{:.1f}"),
    ("torch_p90_ms", "torch p90", "{:.1f}"),
    ("compiled_ms", "compiled ms", "{:.1f}"),
    ("compiled_p90_ms", "compiled p90", "{:.1f}"),
    ("ort_ms", "ORT ms", "{:.1f}"),
    ("ort_p90_ms", "ORT p90", "{:.1f}"),
    ("ort_int8_ms", "ORT INT8 ms", "{:.1f}"),
    ("ort_int8_p90_ms", "ORT INT8 p90", "{:.1f}"),
    ("int8_ratio", "INT8 / float", "{:.2f}"),
    ("tflite_ms", "LiteRT ms", "{:.1f}"),
    ("tflite_p90_ms", "LiteRT p90", "{:.1f}"),
    ("ncnn_ms", "ncnn ms", "{:.1f}"),
    ("ncnn_p90_ms", "ncnn p90", "{:.1f}"),
    ("throughput", "img/s @batch", "{:.1f}"),
    ("peak_mb", "peak MB", "{:.0f}"),
    ("train_img_s", "train img/s", "{:.1f}"),
]


def format_markdown(rows: list[dict[str, Any]]) -> str:
    """A Markdown table with the columns that were measured."""
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |",
             "|" + "|".join("---" if k == "model" else "---:" for k, _, _ in cols) + "|"]
    for r in rows:
        cells = [("-" if r.get(k) is None else fmt.format(r[k])) for k, _, fmt in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform module says."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(config: BenchmarkConfig, rows: list[dict[str, Any]]) -> str:
    """One paragraph under the table: the machine and how each column was measured."""
    device = rows[0]["device"] if rows else config.device
    where = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"{cpu_name()}, {os.cpu_count()} cores"
    dtype = rows[0]["dtype"] if rows else "float32"
    eager = "eager" + (" and torch.compile" if config.compile else "")
    text = (f"Device {device} ({where}), torch {torch.__version__} with {torch.get_num_threads()} threads, {dtype}. "
            f"Latency: median and p90 of {config.runs} runs after {config.warmup} warm-up, batch 1, the fused "
            f"model in channels_last, {eager}")
    if "onnxruntime" in config.backends:
        text += "; ONNX Runtime on the file `yolo-mobile export` writes"
    if "onnxruntime-int8" in config.backends:
        text += ("; INT8: that file quantized (QDQ, per-channel int8 weights, uint8 activations, box decode, "
                 f"softmaxes and grouped convs in float) on {INT8_CALIBRATION_IMAGES} drawn shapes-set images")
    phone = [name for key, name in (("tflite", "LiteRT (XNNPACK) on the .tflite"), ("ncnn", "ncnn on the pnnx "
             "export")) if key in config.backends]
    if phone:
        text += f"; {' and '.join(phone)} `yolo-mobile export` writes (float32, parity-checked)"
    if set(RUNTIMES) & set(config.backends):
        loads = [r["runtime_load"] for r in rows if "runtime_load" in r]
        text += (f"; every runtime at {rows[0].get('runtime_threads', '-') if rows else '-'} threads, every "
                 "model's files at one size timed interleaved with one another, so their ratios share one stretch "
                 "of time")
        if loads:
            busy = ": ncnn slows most on a busy machine" if "ncnn" in config.backends else ""
            text += f" (load average {min(loads):.1f}-{max(loads):.1f} as they started{busy})"
    text += (f". img/s: batch {config.batch}, torch eager. peak MB: memory one forward at that batch needs above "
             "the loaded model.")
    if config.train_speed:
        text += f" train img/s: forward + loss + backward + SGD step at batch {config.train_batch}."
    return text


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, table.getvalue())


def latency_key(rows: Iterable[dict[str, Any]]) -> str:
    """The latency the plot uses: ONNX Runtime's when measured, else eager PyTorch's."""
    rows = list(rows)
    return "ort_ms" if any(r.get("ort_ms") is not None for r in rows) else "torch_ms"


@dataclass
class PlotPoint:
    """One marker of the benchmark plot: a model's float or INT8 file at one size on one panel."""

    panel: str  # "gflops" (latency against GFLOPs) or "map" (mAP50-95 against latency)
    imgsz: int
    model: str  # without the "ultralytics " prefix
    source: str  # yolo-mobile or ultralytics
    kind: str  # "float" or "int8"
    x: float
    y: float


def map_score(scores: dict[str, float], model: str, kind: str) -> float | None:
    """A model's mAP50-95 from a ``--map`` file: ``name`` for the float model, ``name int8`` (or ``name-int8``,
    ``name_int8``) for its INT8 file."""
    if kind == "float":
        return scores.get(model)
    return next((scores[k] for k in (f"{model} int8", f"{model}-int8", f"{model}_int8") if k in scores), None)


def plot_points(rows: list[dict[str, Any]], map_scores: dict[str, float] | None = None) -> list[PlotPoint]:
    """What the plot draws: every row's float latency (ONNX Runtime's when measured, else eager PyTorch's) and,
    where measured, its ONNX Runtime INT8 latency, against GFLOPs; with ``map_scores``, the models that have a
    score again as mAP50-95 against latency."""
    key = latency_key(rows)
    points = []
    for r in rows:
        name = r["model"].removeprefix("ultralytics ")
        for kind, latency_column in (("float", key), ("int8", "ort_int8_ms")):
            latency = r.get(latency_column)
            if latency is None:
                continue
            common = {"imgsz": r["imgsz"], "model": name, "source": r["source"], "kind": kind}
            points.append(PlotPoint("gflops", x=r["gflops"], y=latency, **common))
            score = None if map_scores is None else map_score(map_scores, name, kind)
            if score is not None:
                points.append(PlotPoint("map", x=latency, y=score, **common))
    return points


def plot(rows: list[dict[str, Any]], path: str | Path, map_scores: dict[str, float] | None = None) -> Path | None:
    """Latency against GFLOPs, one panel per size, and below it mAP50-95 against latency when ``map_scores`` is
    given. Circles: yolo-mobile, squares: ultralytics; filled: float, hollow: INT8, a thin line joins a model's
    two. Drawn on a matplotlib Figure directly: no pyplot, no global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    points = plot_points(rows, map_scores)
    if not points:
        return None
    sizes = sorted({p.imgsz for p in points})
    panels = [panel for panel in ("gflops", "map") if any(p.panel == panel for p in points)]
    fig = Figure(figsize=(7 * len(sizes), 5.5 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    runtime = "ONNX Runtime" if latency_key(rows) == "ort_ms" else "PyTorch eager"
    style = {"yolo-mobile": ("o", "tab:blue"), "ultralytics": ("s", "tab:orange")}
    for row, panel in enumerate(panels):
        for col, size in enumerate(sizes):
            ax = fig.add_subplot(len(panels), len(sizes), row * len(sizes) + col + 1)
            here = [p for p in points if p.panel == panel and p.imgsz == size]
            pairs: dict[str, list[PlotPoint]] = {}
            for p in here:
                pairs.setdefault(p.model, []).append(p)
            for model, pair in pairs.items():
                marker, color = style.get(pair[0].source, ("^", "tab:green"))
                if len(pair) == 2:
                    ax.plot([q.x for q in pair], [q.y for q in pair], color=color, lw=0.6, alpha=0.5)
                for q in pair:
                    ax.scatter(q.x, q.y, marker=marker, edgecolors=color,
                               facecolors=color if q.kind == "float" else "none")
                ax.annotate(model, (pair[0].x, pair[0].y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            if panel == "gflops":
                ax.set_xlabel("GFLOPs")
                ax.set_ylabel(f"{runtime} latency (ms)")
            else:
                ax.set_xlabel(f"{runtime} latency (ms)")
                ax.set_ylabel("mAP50-95")
            ax.set_title(f"{size}x{size}, {rows[0]['device']}", fontsize=9)
            ax.grid(True, alpha=0.3)
            if row == 0 and col == 0:
                handles = [Line2D([], [], ls="", marker=style[source][0], markeredgecolor=style[source][1],
                                  markerfacecolor=style[source][1] if kind == "float" else "none",
                                  label=f"{source} {'float' if kind == 'float' else 'INT8'}")
                           for source in style for kind in ("float", "int8")
                           if any(p.source == source and p.kind == kind for p in points)]
                ax.legend(handles=handles, fontsize=7, loc="best")
    write_with(path, lambda f: fig.savefig(f, format="png", dpi=120))
    return Path(path)


def save_results(rows: list[dict[str, Any]], out: str | Path, config: BenchmarkConfig) -> dict[str, Path]:
    """results.md (table + how it was measured), results.csv and results.png beside each other."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = out if out.suffix == ".md" else out.with_suffix(".md")
    write_text(md, format_markdown(rows) + "\n\n" + describe(config, rows) + "\n")
    files = {"markdown": md, "csv": write_csv(rows, md.with_suffix(".csv"))}
    scores = read_map_file(config.map_file) if config.map_file else None
    png = plot(rows, md.with_suffix(".png"), scores)
    if png is not None:
        files["plot"] = png
    return files


def _train_step_fn(model: nn.Module, imgsz: int, batch: int, device) -> Callable[[], None]:
    """One training step without the optimizer: train-mode forward, DetectionLoss on random boxes, backward."""
    from .loss import DetectionLoss

    criterion = DetectionLoss(model.nc, list(model.strides))
    x = torch.rand(batch, 3, imgsz, imgsz, device=device)
    targets = random_targets(batch, imgsz, imgsz, model.nc).to(device)

    def step() -> None:
        loss, _ = criterion(model(x), targets)
        loss.backward()

    return step


def train_step_peak_memory_mb(model: nn.Module, imgsz: int, batch: int,
                              device: str | torch.device = "cpu") -> float | None:
    """Memory one training step (train-mode forward, DetectionLoss, backward, gradients included) needs above the
    built model, measured as :func:`peak_forward_memory_mb` measures a forward. One unmeasured step first, so
    lazy one-off allocations (thread pools, kernel caches) are not counted. Weights are left as they were;
    BatchNorm statistics move as in training. Fixed and per-image costs come from two batch sizes."""
    from .engine.device import select_device

    device = select_device(device) if isinstance(device, str) else device
    model = model.to(device).train()
    step = _train_step_fn(model, imgsz, batch, device)
    step()
    model.zero_grad(set_to_none=True)
    peak = peak_forward_memory_mb(step, device)
    model.zero_grad(set_to_none=True)
    return peak


_FUSED_ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
                        "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_fused_attention")


def train_step_attention(model: nn.Module, imgsz: int = 128, device: str | torch.device = "cpu") -> str:
    """How a training step (batch 1) computes attention, from torch.profiler's operator list: ``fused`` when
    scaled_dot_product_attention runs a fused kernel (flash, memory-efficient, cuDNN: no N x N matrix is kept),
    ``math`` when it falls back to its reference path, ``explicit`` for a softmax over a square (..., N, N)
    tensor outside it, ``-`` when the model has no attention. Combinations are joined with ``+``."""
    from torch.profiler import profile

    from .engine.device import select_device

    device = select_device(device) if isinstance(device, str) else device
    model = model.to(device).train()
    step = _train_step_fn(model, imgsz, 1, device)
    with profile(record_shapes=True) as prof:
        step()
    model.zero_grad(set_to_none=True)
    kinds = set()
    for event in prof.events():
        if event.name.startswith(_FUSED_ATTENTION_OPS):
            kinds.add("fused")
        elif event.name == "aten::_scaled_dot_product_attention_math":
            kinds.add("math")
        elif event.name == "aten::softmax" and not _inside(event, "aten::scaled_dot_product_attention"):
            shape = (event.input_shapes or [[]])[0]
            if len(shape) >= 2 and shape[-1] == shape[-2] > 1:
                kinds.add("explicit")
    return "+".join(k for k in ("fused", "math", "explicit") if k in kinds) or "-"


def _inside(event: Any, name: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == name:
            return True
        parent = parent.cpu_parent
    return False


def model_table(cfgs: list[str], imgsz: int, compare_ultralytics: bool = False) -> list[str]:
    """Markdown rows: backbone params, detector params and GFLOPs (torch's FLOP counter) at ``imgsz``. A backbone
    with a feature pyramid of its own (the ViTs) shows it apart: ``5.52 + 0.22 pyramid``."""
    from .detector import build_model, count_flops

    rows = [f"| model | backbone params (M) | detector params (M) | GFLOPs @{imgsz} |", "|---|---:|---:|---:|"]
    for cfg in cfgs:
        model = build_model(cfg, pretrained=False)
        info = model.info(imgsz)
        pyramid = getattr(model.backbone, "pyramid", None)
        extra = sum(p.numel() for p in pyramid.parameters()) if pyramid is not None else 0
        backbone = f"{(info['backbone_params'] - extra) / 1e6:.2f}" + (f" + {extra / 1e6:.2f} pyramid" if extra else "")
        rows.append(f"| {cfg.removesuffix('.yaml')} | {backbone} | {info['params'] / 1e6:.2f} | {info['gflops']:.2f} |")
    if compare_ultralytics:
        from . import _ultralytics

        for name in ULTRALYTICS_MODELS:
            theirs = _ultralytics.reference_info(name, imgsz)
            ours = count_flops(_ultralytics.reference_model(name), torch.zeros(1, 3, imgsz, imgsz)) / 1e9
            rows.append(f"| ultralytics {name.removesuffix('.yaml')} | - | {theirs['params'] / 1e6:.2f} | "
                        f"{ours:.2f} (their info: {theirs['gflops']:.1f}) |")
    return rows
