"""The benchmark command: every column is measured (never copied), files are written, bad requests fail early.
No timing is asserted: only that measurements exist and are consistent with what they measure."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from yolo_mobile import build_model
from yolo_mobile.benchmark import (
    BenchmarkConfig,
    UltralyticsDetector,
    format_markdown,
    peak_forward_memory_mb,
    plot_points,
    read_map_file,
    run_benchmark,
    save_results,
)
from yolo_mobile.cli import main
from yolo_mobile.config import ConfigError
from yolo_mobile.loss import DetectionLoss


def test_rows_hold_every_measurement(benchmark_rows):
    _, result = benchmark_rows
    assert [(r["model"], r["imgsz"]) for r in result] == [("yolov5n", 64), ("yolov5n", 96)]
    info = build_model("yolov5n.yaml").info(96)
    r = result[1]
    assert r["params_m"] == pytest.approx(info["params"] / 1e6)
    assert r["backbone_params_m"] == pytest.approx(info["backbone_params"] / 1e6)
    assert r["gflops"] == pytest.approx(info["gflops"])
    for key in ("torch_ms", "torch_p90_ms", "ort_ms", "ort_p90_ms", "throughput", "train_img_s"):
        assert r[key] > 0, key
    assert r["onnx_max_diff"] < 1e-3  # the ONNX file timed is one that passed the parity check
    assert r["onnx_mb"] > 1 and r["export_s"] > 0
    assert r["ort_provider"] == "CPUExecutionProvider" and r["batch"] == 2 and r["train_batch"] == 2
    assert "compiled_ms" not in r  # not asked for


def test_time_fn_reports_the_median_and_90th_percentile_of_the_timed_runs(monkeypatch):
    """On a scripted clock: each call of fn() takes k ms on the k-th timed run; warm-up runs are not counted."""
    import yolo_mobile.benchmark as benchmark_module

    clock = {"now": 0.0, "calls": 0}

    def fn():
        clock["calls"] += 1
        clock["now"] += (clock["calls"] - 2) / 1000 if clock["calls"] > 2 else 1.0  # two slow warm-up calls

    monkeypatch.setattr(benchmark_module.time, "perf_counter", lambda: clock["now"])
    result = benchmark_module.time_fn(fn, runs=10, warmup=2)
    assert result["runs"] == 10 and clock["calls"] == 12
    assert result["median_ms"] == pytest.approx(5.5) and result["p90_ms"] == pytest.approx(9.1)


def test_markdown_has_measured_columns_only(benchmark_rows):
    _, result = benchmark_rows
    table = format_markdown(result)
    header = table.splitlines()[0]
    assert "ORT ms" in header and "train img/s" in header and "compiled" not in header
    assert len(table.splitlines()) == 2 + len(result)
    assert f"{result[0]['gflops']:.2f}" in table.splitlines()[2]
    torch_only = [{k: v for k, v in r.items() if not k.startswith("ort")} for r in result]
    assert "ORT" not in format_markdown(torch_only)


def test_save_results_writes_markdown_csv_and_plot(benchmark_rows, tmp_path):
    config, result = benchmark_rows
    files = save_results(result, tmp_path / "out" / "results.md", config)
    assert set(files) == {"markdown", "csv", "plot"}
    assert files["markdown"].read_text().startswith("| model | size |")
    assert "batch 1, the fused model in channels_last" in files["markdown"].read_text()
    with files["csv"].open() as f:
        table = list(csv.DictReader(f))
    assert [int(r["imgsz"]) for r in table] == [64, 96]
    assert float(table[0]["ort_ms"]) == pytest.approx(result[0]["ort_ms"])
    assert files["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_map_file_plot_and_errors(benchmark_rows, tmp_path):
    config, result = benchmark_rows
    good = tmp_path / "map.csv"
    good.write_text("model,mAP50-95\nyolov5n.yaml,0.28\nmobilevit_s,0.31\n")
    assert read_map_file(good) == {"yolov5n": 0.28, "mobilevit_s": 0.31}
    config = BenchmarkConfig(cfgs=config.cfgs, map_file=good)
    assert "plot" in save_results(result, tmp_path / "m.md", config)
    bad = tmp_path / "bad.csv"
    bad.write_text("model,mAP50-95\nyolov5n,0.2\nyolov5s,high\n")
    with pytest.raises(ConfigError, match=r"bad.csv:3: 'high' is not a number"):
        read_map_file(bad)
    (tmp_path / "cols.csv").write_text("name,score\n")
    with pytest.raises(ConfigError, match="'model' and 'mAP50-95'"):
        read_map_file(tmp_path / "cols.csv")


def test_plot_has_float_and_int8_markers_against_gflops_and_map(benchmark_rows):
    _, result = benchmark_rows
    points = plot_points(result)
    for r in result:
        mine = {(p.kind, p.x, p.y) for p in points if p.imgsz == r["imgsz"]}
        assert mine == {("float", r["gflops"], r["ort_ms"]), ("int8", r["gflops"], r["ort_int8_ms"])}
    assert {p.panel for p in points} == {"gflops"}
    # with scores: the float model's and, under "name int8", its INT8 file's; a model without a score is left out
    rows = [*result, {**result[0], "model": "ultralytics yolov8n", "source": "ultralytics"}]
    scored = [p for p in plot_points(rows, {"yolov5n": 0.3, "yolov5n int8": 0.29}) if p.panel == "map"]
    assert {(p.model, p.kind, p.x, p.y) for p in scored if p.imgsz == 64} == {
        ("yolov5n", "float", result[0]["ort_ms"], 0.3), ("yolov5n", "int8", result[0]["ort_int8_ms"], 0.29)}
    torch_only = [{k: v for k, v in r.items() if not k.startswith("ort")} for r in result]
    assert {(p.kind, p.y) for p in plot_points(torch_only)} == {("float", r["torch_ms"]) for r in result}


@pytest.mark.parametrize("kwargs, message", [
    ({"cfgs": ["no_such.yaml"]}, "no_such.yaml: no such model YAML"),
    ({"backends": ["tensorrt"]}, "unknown backend"),
    ({"imgsz": [100]}, "--imgsz must be a positive multiple of 32, got 100"),
    ({"half": True}, "--half needs a CUDA device"),
    ({"batch": 0}, "at least 1"),
    ({"map_file": Path("missing.csv")}, "missing.csv: mAP results file not found"),
])
def test_bad_requests_fail_before_work(kwargs, message):
    config = BenchmarkConfig(**{"cfgs": ["yolov5n.yaml"], **kwargs})
    with pytest.raises((ConfigError, ValueError), match=message):
        config.check()


def test_ultralytics_model_measured_like_ours():
    """Eval output in our layout; training output as per-level maps our loss takes (same values as theirs)."""
    model = UltralyticsDetector("yolov8n.yaml", nc=3)
    assert model.strides == [8, 16, 32]
    assert 0 < model.backbone_params < sum(p.numel() for p in model.parameters())
    x = torch.rand(2, 3, 64, 96)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model.model(x)[0])
        assert model(x).shape == (2, 4 + 3, (8 * 12) + (4 * 6) + (2 * 3))
    model.train()
    maps = model(x)
    assert [tuple(m.shape) for m in maps] == [(2, 64 + 3, 8, 12), (2, 67, 4, 6), (2, 67, 2, 3)]
    raw = model.model(x)
    assert torch.equal(maps[1].flatten(2)[:, :64], raw["boxes"][..., 96:120])
    assert torch.equal(maps[2].flatten(2)[:, 64:], raw["scores"][..., 120:])
    targets = torch.tensor([[[0, 4.0, 4.0, 40.0, 30.0], [2, 50.0, 10.0, 90.0, 60.0]]] * 2)
    loss, terms = DetectionLoss(3, model.strides)(maps, targets)
    loss.backward()
    assert torch.isfinite(terms).all() and model.model.model[0].conv.weight.grad is not None


def test_compare_ultralytics_rows(tmp_path):
    config = BenchmarkConfig(cfgs=["yolov5n.yaml"], imgsz=[64], runs=1, warmup=0, backends=["torch"],
                             compare_ultralytics=True)
    result = run_benchmark(config, progress=False)
    assert [r["model"] for r in result] == ["yolov5n", "ultralytics yolov5nu", "ultralytics yolov8n",
                                            "ultralytics yolo11n"]
    # YOLOv5nu is the same network as our yolov5n: same parameters (but their 16 fixed DFL weights), same FLOPs
    assert result[1]["params_m"] * 1e6 - result[0]["params_m"] * 1e6 == pytest.approx(16)
    assert result[1]["gflops"] == pytest.approx(result[0]["gflops"], rel=1e-3)  # their DFL is a counted conv
    assert all(r["torch_ms"] > 0 and "ort_ms" not in r for r in result)


def test_every_models_exported_files_are_timed_together(monkeypatch):
    """One interleaved timing holds every model's files at a size, so ratios between models share its time."""
    import yolo_mobile.runtimes.timing

    timed = []

    def fake(calls, runs, warmup):
        timed.append(sorted(calls))
        return {k: {"median_ms": 2.0 + k[0], "p90_ms": 9.0} for k in calls}

    monkeypatch.setattr(yolo_mobile.runtimes.timing, "interleaved_latency", fake)
    config = BenchmarkConfig(cfgs=["yolov5n.yaml", "mobilenetv3_small_lite.yaml"], imgsz=[32], runs=1,
                             warmup=0, backends=["onnxruntime"])
    rows = run_benchmark(config, progress=False)
    assert timed == [[(0, "onnxruntime"), (1, "onnxruntime")]]  # one timing, both models in it
    assert [(r["model"], r["ort_ms"]) for r in rows] == [("yolov5n", 2.0), ("mobilenetv3_small_lite", 3.0)]


def test_compile_column():
    config = BenchmarkConfig(cfgs=["yolov5n.yaml"], imgsz=[64], runs=1, warmup=0, backends=["torch"], compile=True)
    (row,) = run_benchmark(config, progress=False)
    assert row["compiled_ms"] > 0 and row["compile_s"] > 0


def test_peak_memory_sees_an_allocation():
    if peak_forward_memory_mb(lambda: None, torch.device("cpu")) is None:
        pytest.skip("no /proc/self/clear_refs here")
    mb = peak_forward_memory_mb(lambda: np.ones(100 * 2**20 // 8).sum(), torch.device("cpu"))
    assert 90 < mb < 400


def test_cli_benchmark_writes_files(tmp_path, capsys):
    out = tmp_path / "bench" / "results.md"
    assert main(["benchmark", "--cfg", "yolov5n.yaml", "--imgsz", "64", "--runs", "1", "--warmup", "0",
                 "--backend", "torch", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| yolov5n | 64 |" in printed and "results.csv" in printed
    assert out.is_file() and out.with_suffix(".csv").is_file() and out.with_suffix(".png").is_file()
    assert main(["benchmark", "--cfg", "yolov5n.yaml", "--imgsz", "64", "100"]) == 2
    assert "multiple of 32, got 100" in capsys.readouterr().err


def profile_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("profile_model", Path(__file__).parents[1] / "scripts" /
                                                  "profile_model.py")
    profile_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_model)
    return profile_model


def test_profile_script_sums_by_module():
    module_of = profile_script().module_of
    assert module_of("/neck/td4/cv1/conv/Conv_kernel_time", 1) == "neck"
    assert module_of("/neck/td4/cv1/conv/Conv_kernel_time", 2) == "neck.td4"
    assert module_of("/head/Softmax_kernel_time", 2) == "head: decode"
    assert module_of("Sub_kernel_time", 1) == "other"


def test_profile_script_labels_convolutions_by_kind(tmp_path):
    profile_model = profile_script()
    convs = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
                                torch.nn.Conv2d(8, 32, 3, padding=1, groups=8), torch.nn.Conv2d(32, 16, 1, groups=4))
    path = tmp_path / "convs.onnx"
    torch.onnx.export(convs, (torch.rand(1, 4, 8, 8),), str(path), dynamo=False)
    assert sorted(profile_model.conv_kinds(path).values()) == [
        "Conv dense 3x3", "Conv depthwise 3x3", "Conv depthwise 3x3 x4 multiplier", "Conv grouped 1x1 (4 groups)"]
