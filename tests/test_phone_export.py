"""LiteRT (TFLite) and ncnn exports: each checked in its own runtime, run by detect, val and benchmark; bad
requests named. The every-family sweep is in test_phone_export_families.py. The LiteRT INT8 export runs where
YOLO_MOBILE_SLOW_EXPORTS=1 is set (.ci/run sets it): a LiteRT conversion costs 15-60 s of CPU."""

import json
import os

import numpy as np
import pytest
import torch
from test_deploy import lively

pytest.importorskip("litert_torch", reason="the tflite extra is not installed: pip install -e '.[tflite]'")
pytest.importorskip("ai_edge_litert", reason="the tflite extra is not installed: pip install -e '.[tflite]'")
pytest.importorskip("pnnx", reason="the ncnn extra is not installed: pip install -e '.[ncnn]'")
pytest.importorskip("ncnn", reason="the ncnn extra is not installed: pip install -e '.[ncnn]'")

from yolo_mobile import build_model
from yolo_mobile.benchmark import BenchmarkConfig, format_markdown, runtime_latency
from yolo_mobile.cli import main
from yolo_mobile.config import ConfigError
from yolo_mobile.datasets.synthetic import resolve_data
from yolo_mobile.engine import runtimes
from yolo_mobile.engine.predictor import NcnnBackend, TfliteBackend, load_backend
from yolo_mobile.export import ncnn, tflite
from yolo_mobile.export.checks import check_inputs, check_parity, fused_copy
from yolo_mobile.export.onnx import ExportError, export_onnx

SIZE = 64  # the CLI tests' size: the conversions cost the same at any size, the runs do not


def parameters(nc):
    return sum(p.numel() for p in build_model("yolov5n.yaml", nc=nc).parameters())


@pytest.fixture(scope="module")
def shapes():
    return resolve_data("shapes:16")


@pytest.fixture(scope="module")
def float_exports(tmp_path_factory):
    """yolov5n (4 classes) exported float32 to both formats once, shared by the tests below."""
    out = tmp_path_factory.mktemp("phone")
    model = lively("yolov5n.yaml", nc=4)
    return {"model": model, "tflite": tflite.export_tflite(model, out / "m.tflite", imgsz=SIZE),
            "ncnn": ncnn.export_ncnn(model, out / "m_ncnn", imgsz=SIZE)}


def test_float32_parity_and_layout(float_exports):
    for fmt in ("tflite", "ncnn"):
        report = float_exports[fmt]
        assert report["max_abs_diff"] < 1e-3 and report["checked"] == f"random and drawn images at 1x3x{SIZE}x{SIZE}"
    backend = load_backend(float_exports["tflite"]["path"])
    assert isinstance(backend, TfliteBackend) and backend.imgsz == SIZE and backend.names == ["0", "1", "2", "3"]
    details = backend.runner.get_input_details()[0]
    assert list(details["shape"]) == [1, 3, SIZE, SIZE] and details["dtype"] == np.float32  # NCHW kept
    folder = float_exports["ncnn"]["path"]
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.json", "model.ncnn.bin", "model.ncnn.param"]
    backend = load_backend(folder)
    assert isinstance(backend, NcnnBackend) and backend.imgsz == SIZE
    assert json.loads((folder / "metadata.json").read_text())["precision"] == "float32"
    x = torch.rand(2, 3, SIZE, SIZE)
    n = (SIZE // 8) ** 2 + (SIZE // 16) ** 2 + (SIZE // 32) ** 2
    assert backend(x).shape == (2, 8, n)  # ncnn runs a batch image by image: (B, 4 + nc, N) as ever


def test_a_failed_check_leaves_nothing(float_exports, tmp_path, monkeypatch):
    model = float_exports["model"]
    real = runtimes.ncnn_run
    monkeypatch.setattr(ncnn, "ncnn_run", lambda net, x: real(net, x) + 0.01)  # a runtime that drifts by 0.01
    with pytest.raises(ExportError, match=r"ncnn differs from PyTorch by 1\.0\de-02 .* nothing was written"):
        ncnn.export_ncnn(model, tmp_path / "bad_ncnn", imgsz=SIZE)
    assert list(tmp_path.iterdir()) == []
    runner = runtimes.ncnn_net(float_exports["ncnn"]["path"])
    fused = fused_copy(model)

    def boxes_off_by(px):  # ncnn's float32 output with every box coordinate moved by px
        return lambda x: real(runner, x) + np.r_[np.full(4, px), np.zeros(4)].astype(np.float32)[None, :, None]

    with pytest.raises(ExportError, match=r"ncnn \(float16\) differs from PyTorch by 0\.3 px on boxes"):
        check_parity(fused, boxes_off_by(0.3), SIZE, "ncnn", half=True)  # bound at 64: 64 x 2^-8 = 0.25 px
    assert check_parity(fused, boxes_off_by(0.2), SIZE, "ncnn", half=True)["box_diff"] == pytest.approx(0.2, abs=1e-3)


def test_unsupported_op_is_named(tmp_path):
    (tmp_path / "model.ncnn.param").write_text("7767517\n2 2\nInput in0 0 1 in0\nTensor.reshape r 1 1 in0 out0\n")
    assert runtimes.unsupported_layers(tmp_path / "model.ncnn.param") == ["Tensor.reshape"]
    with pytest.raises(ValueError, match=r"ncnn has no layer for Tensor\.reshape"):
        runtimes.ncnn_net(tmp_path)


def test_tflite_float16_weights_and_detect(float_exports, tmp_path, shapes, capsys):
    """--half is the float32 conversion with its weights cast (checked here on the shared file's flatbuffer, which
    spares a second conversion), then the float16 parity check."""
    from yolo_mobile.export.checks import metadata
    from yolo_mobile.export.tflite import _float16_weights, with_metadata

    model, float_file = float_exports["model"], float_exports["tflite"]["path"]
    half_file = tmp_path / "m16.tflite"
    half_file.write_bytes(with_metadata(_float16_weights(float_file.read_bytes()), metadata(model, SIZE, "float16")))
    assert half_file.stat().st_size < 0.55 * float_file.stat().st_size  # 2 bytes a weight, not 4
    runner = runtimes.tflite_interpreter(half_file)
    report = check_parity(fused_copy(model), lambda x: runtimes.tflite_run(runner, x), SIZE, "LiteRT", half=True)
    assert 0 < report["box_diff"] <= SIZE * 2**-8 and report["score_diff"] <= 2**-7  # float16 moved it, within bounds
    assert runtimes.tflite_metadata(half_file)["precision"] == "float16"
    image = next((shapes.parent / "images" / "val").iterdir())
    assert main(["detect", "--weights", str(half_file), "--source", str(image), "--project", str(tmp_path)]) == 0
    assert (tmp_path / "exp" / image.name).is_file()


def test_cli_ncnn_half_then_detect_and_val(tmp_path, shapes, capsys):
    assert main(["export", "--cfg", "yolov5n.yaml", "--format", "ncnn", "--half", "--imgsz", str(SIZE),
                 "--output", str(tmp_path / "best_ncnn")]) == 0
    assert "ncnn vs PyTorch" in capsys.readouterr().out
    folder = tmp_path / "best_ncnn"
    assert json.loads((folder / "metadata.json").read_text())["precision"] == "float16"
    assert (folder / "model.ncnn.bin").stat().st_size < 2.5 * parameters(80)  # 2 bytes a weight, not 4
    image = next((shapes.parent / "images" / "val").iterdir())
    assert main(["detect", "--weights", str(folder), "--source", str(image), "--project", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "exp" / image.name).is_file()


@pytest.mark.skipif(os.environ.get("YOLO_MOBILE_SLOW_EXPORTS") != "1",
                    reason="LiteRT INT8 (two conversions, two val runs: 1-2 min of CPU): YOLO_MOBILE_SLOW_EXPORTS=1 "
                           "runs it")
def test_cli_tflite_int8_by_map(tmp_path, shapes, capsys):
    out = tmp_path / "m_int8.tflite"
    assert main(["export", "--cfg", "yolov5n.yaml", "--format", "tflite", "--int8", "--data", str(shapes),
                 "--calib-images", "4", "--imgsz", str(SIZE), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "PT2E static INT8 calibrated on 4 letterboxed train images" in text
    assert "mAP50-95 on the val split: PyTorch" in text and "LiteRT INT8" in text
    assert out.stat().st_size < 1.5 * parameters(4)  # 1 byte a weight, not 4
    runner = runtimes.tflite_interpreter(out)
    assert runner.get_input_details()[0]["dtype"] == np.int8  # full-integer input; run() quantizes
    assert "int8" in runtimes.tflite_metadata(out)["input"]
    model = fused_copy(lively("yolov5n.yaml", nc=4))
    for _, x in check_inputs(SIZE):
        ref, got = model(x).detach().numpy()[0], runtimes.tflite_run(runner, x.numpy())[0]
        assert got.shape == ref.shape and got[4:].max() > 0.01  # a quantized decode would round scores to 0
    assert torch.is_tensor(TfliteBackend(out)(torch.rand(1, 3, SIZE, SIZE)))


@pytest.mark.parametrize(("args", "message"), [
    (["--format", "ncnn", "--int8", "--data", "shapes"], "--int8 is for --format onnx or tflite"),
    (["--format", "tflite", "--nms"], "--nms: for --format onnx only"),
    (["--format", "tflite", "--dynamic", "--batch", "2"], "--batch, --dynamic: for --format onnx only"),
    (["--format", "tflite", "--int8", "--half", "--data", "shapes"], "two precisions"),
])
def test_cli_refuses_what_a_phone_format_cannot_do(tmp_path, capsys, args, message):
    assert main(["export", "--cfg", "yolov5n.yaml", "--output", str(tmp_path / "x"), *args]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_benchmark_latency_columns(float_exports, tmp_path):
    onnx_path = tmp_path / "m.onnx"
    export_onnx(float_exports["model"], onnx_path, imgsz=SIZE)
    config = BenchmarkConfig(cfgs=["yolov5n.yaml"], imgsz=[SIZE], backends=["onnxruntime", "tflite", "ncnn"],
                             runs=2, warmup=0)
    config.check()
    files = {"onnxruntime": onnx_path, "tflite": float_exports["tflite"]["path"],
             "ncnn": float_exports["ncnn"]["path"]}
    row = runtime_latency(files, SIZE, config, torch.device("cpu"))
    assert row["ort_ms"] > 0 and row["tflite_ms"] > 0 and row["ncnn_ms"] > 0 and row["runtime_threads"] >= 1
    table = format_markdown([{"model": "m", "imgsz": SIZE, **row}])
    assert "LiteRT ms" in table and "ncnn ms" in table and "ORT ms" in table


def test_benchmark_names_a_missing_extra(monkeypatch):
    def absent():
        raise ImportError('--format ncnn needs pnnx and ncnn: pip install -e ".[ncnn]"')

    monkeypatch.setattr(runtimes, "require_ncnn", absent)
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[ncnn\]"'):
        BenchmarkConfig(cfgs=["yolov5n.yaml"], backends=["ncnn"], runs=1).check()


@pytest.mark.parametrize("fmt", ["tflite", "ncnn"])
def test_val_runs_the_export(float_exports, shapes, tmp_path, capsys, fmt):
    weights = float_exports[fmt]["path"]
    assert main(["val", "--weights", str(weights), "--data", str(shapes), "--project", str(tmp_path),
                 "--workers", "0"]) == 0
    assert '"map":' in capsys.readouterr().out


def test_benchmark_keeps_going_past_a_model_the_converter_refuses(monkeypatch, tmp_path):
    from yolo_mobile.benchmark import phone_export
    from yolo_mobile.export.checks import ConversionError

    def refuse(model, output, imgsz):
        raise ConversionError("pnnx left operator(s) Tensor.reshape that ncnn has no layer for")

    monkeypatch.setattr(ncnn, "export_ncnn", refuse)
    row = {}
    assert phone_export("ncnn", None, tmp_path / "m_320", 320, row) == {}
    assert "Tensor.reshape" in row["ncnn_error"] and "ncnn_ms" not in row


def test_tflite_conversion_failure_names_the_op_and_leaves_nothing(monkeypatch, tmp_path):
    import litert_torch

    def refuse(*args, **kwargs):
        raise RuntimeError("Lowering not found: aten._upsample_bicubic2d_aa.default")

    monkeypatch.setattr(litert_torch, "convert", refuse)
    with pytest.raises(tflite.ConversionError, match=r"m\.tflite: litert-torch cannot convert this model \(operator "
                                                     r"aten\._upsample_bicubic2d_aa\.default\).*nothing was written"):
        tflite.export_tflite(lively("yolov5n.yaml", nc=4), tmp_path / "m.tflite", imgsz=SIZE)
    assert list(tmp_path.iterdir()) == []
