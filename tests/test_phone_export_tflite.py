"""LiteRT (TFLite) export: every family converted once at 320 by a module fixture and checked in the LiteRT
interpreter against PyTorch; yolov5n's conversion also serves float16, detect, val and the benchmark columns.
A LiteRT conversion costs 15-60 s of CPU (litert-torch runs torch.export's decompositions several times), so
nothing here converts twice."""

import os

import numpy as np
import pytest
import torch
from phone_families import FAMILIES, check_val_of_export, family_cfg
from test_deploy import lively

pytest.importorskip("litert_torch", reason="the tflite extra is not installed: pip install -e '.[tflite]'")
pytest.importorskip("ai_edge_litert", reason="the tflite extra is not installed: pip install -e '.[tflite]'")

from yolo_mobile.benchmark import BenchmarkConfig, format_markdown, runtime_latency
from yolo_mobile.cli import main
from yolo_mobile.datasets.synthetic import resolve_data
from yolo_mobile.export import tflite
from yolo_mobile.export.checks import check_inputs, check_parity, fused_copy, metadata
from yolo_mobile.export.onnx import export_onnx
from yolo_mobile.runtimes import TfliteRuntime, litert, load_runtime

pytestmark = pytest.mark.xdist_group("test_phone_export_tflite")  # cspdarknet's conversion serves several tests
SIZE = 320  # the size for the every-family export


def own_group(family: str):
    """A family's conversion test in an xdist group of its own (15-80 s each: the two workers share them), but
    cspdarknet's with the module's tests that reuse its conversion."""
    return family if family == "cspdarknet" else pytest.param(family, marks=pytest.mark.xdist_group(f"tflite-{family}"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (model, export report), each family converted on first use and kept for the module."""
    out, done = tmp_path_factory.mktemp("tflite"), {}

    def get(family):
        if family not in done:
            model = lively(family_cfg(family), nc=4)
            done[family] = model, tflite.export_tflite(model, out / f"{family}.tflite", imgsz=SIZE)
        return done[family]

    return get


@pytest.fixture(scope="module")
def shapes():
    return resolve_data("shapes:16")


@pytest.mark.parametrize("family", [own_group(family) for family in FAMILIES])
def test_every_family_converts_and_matches_pytorch(converted, family):
    _, report = converted(family)
    assert report["max_abs_diff"] < 1e-3 and report["checked"] == [f"random and drawn images at 1x3x{SIZE}x{SIZE}"]
    backend = load_runtime(report["path"])
    assert isinstance(backend, TfliteRuntime) and backend.imgsz == SIZE and backend.names == ["0", "1", "2", "3"]
    details = backend.runner.get_input_details()[0]
    assert list(details["shape"]) == [1, 3, SIZE, SIZE] and details["dtype"] == np.float32  # NCHW kept
    n = (SIZE // 8) ** 2 + (SIZE // 16) ** 2 + (SIZE // 32) ** 2
    assert backend(torch.rand(1, 3, SIZE, SIZE)).shape == (1, 8, n)  # (B, 4 + nc, N) as the ONNX file


def test_float16_weights_then_detect(converted, tmp_path, shapes):
    """--half is the float32 conversion with its weights cast (checked here on yolov5n's flatbuffer, which spares
    a second conversion), then the float16 parity check."""
    model, report = converted("cspdarknet")
    float_file, half_file = report["path"], tmp_path / "m16.tflite"
    half_bytes = tflite._float16_weights(float_file.read_bytes())
    half_file.write_bytes(tflite.with_metadata(half_bytes, metadata(model, SIZE, "float16")))
    assert half_file.stat().st_size < 0.55 * float_file.stat().st_size  # 2 bytes a weight, not 4
    runner = litert.tflite_interpreter(half_file)
    half = check_parity(fused_copy(model), lambda x: litert.tflite_run(runner, x), SIZE, "LiteRT", half=True)
    assert 0 < half["box_diff"] <= SIZE * 2**-8 and half["score_diff"] <= 2**-7  # float16 moved it, within bounds
    assert litert.tflite_metadata(half_file)["precision"] == "float16"
    image = next((shapes.parent / "images" / "val").iterdir())
    assert main(["detect", "--weights", str(half_file), "--source", str(image), "--project", str(tmp_path)]) == 0
    assert (tmp_path / "exp" / image.name).is_file()


def test_val_runs_the_export(converted, shapes, tmp_path, capsys):
    model, report = converted("cspdarknet")
    check_val_of_export(fused_copy(model), report["path"], shapes, tmp_path, capsys, SIZE)


def test_benchmark_latency_column(converted, tmp_path):
    model, report = converted("cspdarknet")
    onnx_path = tmp_path / "m.onnx"
    export_onnx(model, onnx_path, imgsz=SIZE)
    config = BenchmarkConfig(cfgs=["yolov5n.yaml"], imgsz=[SIZE], backends=["onnxruntime", "tflite"], runs=2,
                             warmup=0)
    config.check()
    row = runtime_latency({"onnxruntime": onnx_path, "tflite": report["path"]}, SIZE, config, torch.device("cpu"))
    assert row["ort_ms"] > 0 and row["tflite_ms"] > 0 and row["runtime_threads"] >= 1 and "ncnn_ms" not in row
    table = format_markdown([{"model": "m", "imgsz": SIZE, **row}])
    assert "LiteRT ms" in table and "ORT ms" in table


def test_native_log_lines_are_held_back(capfd, converted):
    """absl, MLIR and JAX write to file descriptor 2 from native code during a conversion and when an interpreter
    starts; none of it reaches the export's output, but an error line comes back as a warning."""
    capfd.readouterr()
    with litert.native_logs_filtered("a test"):
        os.write(2, b"I0000 00:00:1 flatbuffer_export.cc:1] Estimated count of arithmetic ops\n")
    litert.tflite_interpreter(converted("cspdarknet")[1]["path"])
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    severe = r"a test logged: E0000 00:00:1 x\.cc:2\] the lowering failed"
    with pytest.warns(RuntimeWarning, match=severe), litert.native_logs_filtered("a test"):
        os.write(2, b"W0000 a warning\nE0000 00:00:1 x.cc:2] the lowering failed\n")


def test_cli_int8_by_map_with_our_lines_only(tmp_path, shapes, capfd):
    out = tmp_path / "m_int8.tflite"
    assert main(["export", "--cfg", "yolov5n.yaml", "--format", "tflite", "--int8", "--data", str(shapes),
                 "--calib-images", "4", "--imgsz", "64", "--output", str(out)]) == 0
    captured = capfd.readouterr()  # file descriptors 1 and 2: the converter's native logging included
    assert "PT2E static INT8 calibrated on 4 letterboxed train images" in captured.out
    assert "mAP50-95 on the val split: PyTorch" in captured.out and "LiteRT INT8" in captured.out
    assert captured.err == ""
    parameters = sum(p.numel() for p in lively("yolov5n.yaml", nc=4).parameters())
    assert out.stat().st_size < 1.5 * parameters  # 1 byte a weight, not 4
    runner = litert.tflite_interpreter(out)
    assert runner.get_input_details()[0]["dtype"] == np.int8  # full-integer input; run() quantizes
    assert "int8" in litert.tflite_metadata(out)["input"]
    model = fused_copy(lively("yolov5n.yaml", nc=4))
    for _, x in check_inputs(64):
        ref, got = model(x).detach().numpy()[0], litert.tflite_run(runner, x.numpy())[0]
        assert got.shape == ref.shape and got[4:].max() > 0.01  # a quantized decode would round scores to 0
    assert torch.is_tensor(TfliteRuntime(out)(torch.rand(1, 3, 64, 64)))


def test_conversion_failure_names_the_op_and_leaves_nothing(monkeypatch, tmp_path):
    import litert_torch

    def refuse(*args, **kwargs):
        raise RuntimeError("Lowering not found: aten._upsample_bicubic2d_aa.default")

    monkeypatch.setattr(litert_torch, "convert", refuse)
    with pytest.raises(tflite.ConversionError, match=r"m\.tflite: litert-torch cannot convert this model \(operator "
                                                     r"aten\._upsample_bicubic2d_aa\.default\).*nothing was written"):
        tflite.export_tflite(lively("yolov5n.yaml", nc=4), tmp_path / "m.tflite", imgsz=64)
    assert list(tmp_path.iterdir()) == []
