"""INT8 ONNX: every family quantizes with its box decode left in float, and export, val, detect and benchmark
run the INT8 file."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import BACKBONE_ARGS
from test_deploy import lively

from yolo_mobile.benchmark import format_markdown, shapes_images
from yolo_mobile.cli import main
from yolo_mobile.config import list_builtin_models, load_data_config
from yolo_mobile.datasets.synthetic import draw_sample, resolve_data
from yolo_mobile.export.int8 import QuantizationError, calibration_split, decode_nodes, quantize_onnx
from yolo_mobile.export.onnx import export_onnx

SIZE = 64  # every family's strides divide it; quantization does not depend on the size


def run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def float_onnx(tmp_path_factory):
    """The float file of a model config at SIZE (lively, 4 classes), exported once for this module's tests."""
    exported = {}

    def path_for(cfg) -> Path:
        key = json.dumps(cfg, sort_keys=True)
        if key not in exported:
            exported[key] = tmp_path_factory.mktemp("float") / "m.onnx"
            export_onnx(lively(cfg, nc=4), exported[key], imgsz=SIZE)
        return exported[key]

    return path_for


# the families int8 export was checked on (test_deploy's export parity now loops over the whole registry)
FAMILY_CFGS = ["yolov5n.yaml", "mobilevit_xxs.yaml", "mobilenetv3_large.yaml", "fastvit_t8.yaml", "emo_1m.yaml",
               {"backbone": {"name": "timm", **BACKBONE_ARGS["timm"]}}]
# the light neck and head (narrow, shared head, no SPPF) on every mobile family: ONNX export, then INT8
LITE_CFGS = [m for m in list_builtin_models() if m.endswith("_lite.yaml")]
# the lite YAMLs' convs are dense: the depthwise neck and head option goes through INT8 here
DEPTHWISE_LITE = {"backbone": {"name": "mobilenetv3", "variant": "large"},
                  "neck": {"width": 0.1875, "act": "relu", "depthwise": True, "sppf": False},
                  "head": {"channels": 48, "shared": True, "act": "relu"}}


@pytest.mark.parametrize("cfg", [*FAMILY_CFGS, "mobile_former_96m.yaml", *LITE_CFGS, DEPTHWISE_LITE],
                         ids=["cspdarknet", "mobilevit", "mobilenetv3", "fastvit", "emo", "timm", "mobile_former",
                              *LITE_CFGS, "depthwise_lite"])
def test_every_family_quantizes_with_a_float_decode(tmp_path, float_onnx, cfg):
    float_path, int8_path = float_onnx(cfg), tmp_path / "m_int8.onnx"
    report = quantize_onnx(float_path, int8_path, shapes_images(SIZE, 1), SIZE)
    graph = onnx.load(str(int8_path)).graph
    assert report["quantize_linear"] > 10
    assert any(i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4 for i in graph.initializer)  # conv weights
    # nothing the decode computes is quantized: no QuantizeLinear reads a decode node's output
    decode = set(decode_nodes(onnx.load(str(float_path)).graph))
    assert decode <= set(report["float_nodes"])
    decode_outputs = {o for n in graph.node if n.name in decode for o in n.output}
    assert decode_outputs and not any(n.op_type == "QuantizeLinear" and n.input[0] in decode_outputs
                                      for n in graph.node)
    # and stays so in the graph ONNX Runtime runs: no Softmax (DFL, attention) fused into QLinearSoftmax
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"])
    assert "QLinearSoftmax" not in {n.op_type for n in onnx.load(str(tmp_path / "optimised.onnx")).graph.node}
    image = draw_sample(np.random.default_rng(7), SIZE)[0]
    x = np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32) / 255
    ref, out = run(float_path, x)[0], run(int8_path, x)[0]
    # scores keep their ranking and boxes their place (a quantized decode rounds scores to 0 and boxes to 16 px)
    assert np.corrcoef(ref[4:].ravel(), out[4:].ravel())[0, 1] > 0.95
    assert np.median(np.abs(ref[:4] - out[:4])) < 2.0
    meta = {p.key: p.value for p in onnx.load(str(int8_path)).metadata_props}
    assert json.loads(meta["names"]) == ["0", "1", "2", "3"] and json.loads(meta["quantization"])["format"] == "QDQ"


def test_shared_initializers_are_quantized_like_the_others(tmp_path):
    """torch's exporter shares equal biases (zeros here) through Identity nodes; each Conv must still get an int32
    bias from a DequantizeLinear, or ONNX Runtime runs it in float between a DequantizeLinear and a QuantizeLinear."""
    import torch

    nn = torch.nn
    convs = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1))
    for m in convs[::2]:
        torch.nn.init.zeros_(m.bias)
    float_path, int8_path = tmp_path / "convs.onnx", tmp_path / "convs_int8.onnx"
    torch.onnx.export(convs, (torch.rand(1, 3, SIZE, SIZE),), str(float_path), dynamo=False)
    assert any(n.op_type == "Identity" for n in onnx.load(str(float_path)).graph.node)  # what is being tested
    quantize_onnx(float_path, int8_path, shapes_images(SIZE, 1), SIZE)
    graph = onnx.load(str(int8_path)).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    biases = [producer.get(n.input[2]) for n in graph.node if n.op_type == "Conv"]
    assert biases == ["DequantizeLinear"] * 3


def test_convs_without_a_fast_int8_kernel_stay_float_in_onnx_runtime(tmp_path):
    """A depthwise conv with a channel multiplier (Mobile-Former's) ran ~10x slower as QLinearConv: it stays a
    float Conv in the graph ONNX Runtime runs, while the plain and depthwise convs around it are quantized."""
    import torch

    nn = torch.nn
    convs = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 16, 3, padding=1, groups=8),
                          nn.ReLU6(), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(), nn.Conv2d(16, 8, 1))
    float_path, int8_path = tmp_path / "convs.onnx", tmp_path / "convs_int8.onnx"
    torch.onnx.export(convs, (torch.rand(1, 3, SIZE, SIZE),), str(float_path), dynamo=False)
    report = quantize_onnx(float_path, int8_path, shapes_images(SIZE, 1), SIZE)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(tmp_path / "optimised.onnx")).graph
    weights = {t.name: list(t.dims) for t in graph.initializer}
    quantized = [(weights[n.input[3]][:2], next((a.i for a in n.attribute if a.name == "group"), 1))
                 for n in graph.node if n.op_type == "QLinearConv"]
    assert ([8, 3], 1) in quantized and ([16, 1], 8) not in quantized  # (out, in per group), groups
    assert any(n.op_type in ("Conv", "FusedConv") and next(a.i for a in n.attribute if a.name == "group") == 8
               for n in graph.node)  # float, its Clip fused in
    assert len(report["float_nodes"]) == 1
    x = np.random.default_rng(0).random((1, 3, SIZE, SIZE), dtype=np.float32)
    assert np.corrcoef(run(float_path, x).ravel(), run(int8_path, x).ravel())[0, 1] > 0.99


def test_decode_found_in_ultralytics_head(tmp_path):
    from yolo_mobile.benchmark import UltralyticsDetector

    path = tmp_path / "v8.onnx"
    export_onnx(UltralyticsDetector("yolov8n.yaml", nc=4), path, imgsz=SIZE)
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node if n.name in set(decode_nodes(graph))}
    assert {"Softmax", "Sigmoid", "Concat"} <= ops  # the DFL and the class scores
    assert not any(n.op_type == "Conv" and not n.name.endswith("dfl/conv/Conv") and n.name in set(decode_nodes(graph))
                   for n in graph.node)


def test_quantizer_failure_names_the_op_and_leaves_no_file(tmp_path, float_onnx, monkeypatch):
    import onnxruntime.quantization as quantization

    def refuse(*args, **kwargs):
        raise RuntimeError("Could not find an implementation for ConvInteger(10) node with name '/conv'")

    monkeypatch.setattr(quantization, "quantize_static", refuse)
    with pytest.raises(QuantizationError, match=r"cannot quantize this graph \(operator ConvInteger\)"):
        quantize_onnx(float_onnx("yolov5n.yaml"), tmp_path / "m_int8.onnx", shapes_images(SIZE, 1), SIZE)
    assert not (tmp_path / "m_int8.onnx").exists()


def test_without_val_split_evaluation_images_are_held_apart(tmp_path):
    data = resolve_data("shapes:16")
    no_val = tmp_path / "train_only.yaml"
    no_val.write_text(f"path: {data.parent}\ntrain: images/train\nnames: [circle, square, triangle, star]\n")
    calib, held_yaml = calibration_split(no_val, 5, tmp_path)
    held = {str(p) for p in load_data_config(held_yaml).split("val").images}
    assert len(calib) == 5 and len(held) == 5 and not {str(p.resolve()) for p in calib} & held
    assert calibration_split(data, 5, tmp_path)[1] == data  # a val split of its own is used as is


def test_cli_int8_export_then_val_and_detect(tmp_path, capsys):
    data = resolve_data("shapes:16")
    out = tmp_path / "m_int8.onnx"
    assert main(["export", "--cfg", "yolov5n.yaml", "--imgsz", str(SIZE), "--int8", "--data", str(data),
                 "--calib-images", "4", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "QDQ int8, entropy calibration on 4 letterboxed train images" in text
    assert "mAP50-95 on the val split: float" in text and "INT8" in text and "latency" in text
    assert main(["val", "--weights", str(out), "--data", str(data), "--project", str(tmp_path / "val")]) == 0
    assert '"map":' in capsys.readouterr().out
    image = next((data.parent / "images" / "val").iterdir())
    assert main(["detect", "--weights", str(out), "--source", str(image), "--project", str(tmp_path / "det")]) == 0
    assert (tmp_path / "det" / "exp" / image.name).is_file()


def test_cli_int8_needs_data_and_a_plain_graph(tmp_path, capsys):
    assert main(["export", "--cfg", "yolov5n.yaml", "--int8", "--output", str(tmp_path / "m.onnx")]) == 2
    assert "--int8 needs --data" in capsys.readouterr().err
    assert main(["export", "--cfg", "yolov5n.yaml", "--int8", "--nms", "--data", "shapes"]) == 2
    assert "drop --half, --nms" in capsys.readouterr().err


def test_benchmark_int8_columns(benchmark_rows):
    config, rows = benchmark_rows  # conftest's run: every backend by default, onnxruntime-int8 included
    assert "onnxruntime-int8" in config.backends
    for row in rows:
        assert row["ort_int8_ms"] > 0 and row["int8_ratio"] == pytest.approx(row["ort_int8_ms"] / row["ort_ms"])
        assert row["int8_mb"] < row["onnx_mb"] / 2  # int8 weights
    assert "ORT INT8 ms" in format_markdown(rows) and "INT8 / float" in format_markdown(rows)


def test_clipping_script_rebuilds_float_with_int8_ranges(tmp_path, float_onnx):
    import importlib.util

    spec = importlib.util.spec_from_file_location("int8_clipping", Path(__file__).parents[1] / "scripts" /
                                                  "int8_clipping.py")
    int8_clipping = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(int8_clipping)
    float_path, int8_path = float_onnx("mobilenetv3_large.yaml"), tmp_path / "m_int8.onnx"  # Relus, and hard-swish
    quantize_onnx(float_path, int8_path, shapes_images(SIZE, 1), SIZE, method="minmax")
    floats, int8 = onnx.load(str(float_path)), onnx.load(str(int8_path))
    assert not any(n.op_type == "Relu" for n in int8.graph.node)  # the quantizer folds them into the ranges
    x = np.random.default_rng(3).random((1, 3, SIZE, SIZE), dtype=np.float32)
    paths = {}
    for part in (None, "all"):
        paths[part] = tmp_path / f"clip_{part}.onnx"
        onnx.save(int8_clipping.clipped_float(int8, floats, part), str(paths[part]))
        graph = onnx.load(str(paths[part])).graph
        assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)
    ref = run(float_path, x)
    # the Relus put back and nothing else clipped: the float model again (fails without the lower bounds)
    np.testing.assert_allclose(run(paths[None], x), ref, atol=1e-3)
    # every range clipped, 4x the input: far outside calibration, so the clips bind and the float model is not met
    clipped, loud = run(paths["all"], 4 * x), run(float_path, 4 * x)
    assert np.abs(clipped - loud).max() > 1e-2
    # within range the clipped file is the INT8 file without its rounding
    assert np.corrcoef(run(paths["all"], x)[0, 4:].ravel(), run(int8_path, x)[0, 4:].ravel())[0, 1] > 0.9
