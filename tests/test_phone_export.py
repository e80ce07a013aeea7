"""Phone exports (LiteRT, ncnn) without a conversion: the CLI's refusals, the benchmark's handling of a missing
extra and of a model a converter refuses. The conversions are in test_phone_export_tflite.py and _ncnn.py."""

import pytest

pytest.importorskip("litert_torch", reason="the tflite extra is not installed: pip install -e '.[tflite]'")
pytest.importorskip("pnnx", reason="the ncnn extra is not installed: pip install -e '.[ncnn]'")

from yolo_mobile.benchmark import BenchmarkConfig, phone_export
from yolo_mobile.cli import main
from yolo_mobile.config import ConfigError
from yolo_mobile.export import ncnn
from yolo_mobile.export.checks import ConversionError
from yolo_mobile.runtimes import ncnn as ncnn_runtime

pytestmark = pytest.mark.xdist_group("test_phone_export")


@pytest.mark.parametrize(("args", "message"), [
    (["--format", "ncnn", "--int8", "--data", "shapes"], "--int8 is for --format onnx or tflite"),
    (["--format", "tflite", "--nms"], "--nms: for --format onnx only"),
    (["--format", "tflite", "--dynamic", "--batch", "2"], "--batch, --dynamic: for --format onnx only"),
    (["--format", "tflite", "--calib-method", "minmax", "--int8", "--data", "shapes"],
     "--calib-method: for --format onnx only"),
    (["--format", "tflite", "--int8", "--half", "--data", "shapes"], "two precisions"),
])
def test_cli_refuses_what_a_phone_format_cannot_do(tmp_path, capsys, args, message):
    assert main(["export", "--cfg", "yolov5n.yaml", "--output", str(tmp_path / "x"), *args]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_benchmark_names_a_missing_extra(monkeypatch):
    def absent():
        raise ImportError('--format ncnn needs pnnx and ncnn: pip install -e ".[ncnn]"')

    monkeypatch.setattr(ncnn_runtime, "require_ncnn", absent)
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[ncnn\]"'):
        BenchmarkConfig(cfgs=["yolov5n.yaml"], backends=["ncnn"], runs=1).check()


def test_benchmark_default_leaves_the_phone_runtimes_out():
    assert not {"tflite", "ncnn"} & set(BenchmarkConfig(cfgs=["yolov5n.yaml"]).backends)


def test_benchmark_keeps_going_past_a_model_the_converter_refuses(monkeypatch, tmp_path):
    def refuse(model, output, imgsz):
        raise ConversionError("pnnx left operator(s) Tensor.reshape that ncnn has no layer for")

    monkeypatch.setattr(ncnn, "export_ncnn", refuse)
    row = {}
    assert phone_export("ncnn", None, tmp_path / "m_320", 320, row) == {}
    assert "Tensor.reshape" in row["ncnn_error"] and "ncnn_ms" not in row
