"""INT8 calibration in chunks: ONNX Runtime never holds more than a chunk of images' activations, and chunking
changes no min-max range."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from yolo_mobile.export import int8
from yolo_mobile.export.int8 import calibration_chunk, quantize_onnx


@pytest.fixture(scope="module")
def small_graph(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "small.onnx"
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    torch.onnx.export(net, torch.zeros(1, 3, 32, 32), str(path), input_names=["images"], output_names=["output"],
                      opset_version=17, dynamo=False)
    return path


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (24 + i, 40, 3), dtype=np.uint8) for i in range(n)]


def _scales(path) -> dict[str, np.ndarray]:
    graph = onnx.load(str(path)).graph
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith("_scale")}


@pytest.mark.parametrize(("n", "most", "chunk"), [(256, 16, 16), (20, 16, 10), (17, 16, 1), (3, 16, 3), (1, 16, 1)])
def test_chunk_is_the_largest_divisor_not_above_the_limit(n, most, chunk):
    assert calibration_chunk(n, most) == chunk


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_calibration_reads_a_chunk_at_a_time(small_graph, tmp_path, monkeypatch, method):
    served: list[int] = []  # images served between two range changes (what ONNX Runtime holds at once)
    make_reader = int8.calibration_reader

    def counting_reader(*args, **kwargs):
        reader = make_reader(*args, **kwargs)
        get_next, set_range = reader.get_next, reader.set_range

        def counted_get_next():
            feed = get_next()
            if feed is not None:
                served[-1] += 1
            return feed

        def counted_set_range(start_index, end_index):
            served.append(0)
            set_range(start_index, end_index)

        reader.get_next, reader.set_range = counted_get_next, counted_set_range
        return reader

    monkeypatch.setattr(int8, "calibration_reader", counting_reader)
    quantize_onnx(small_graph, tmp_path / "q.onnx", _images(12), 32, method=method, keep_float=(), chunk=4)
    assert served == [4, 4, 4]


def test_chunked_min_max_gives_the_same_scales(small_graph, tmp_path):
    images = _images(6)
    quantize_onnx(small_graph, tmp_path / "whole.onnx", images, 32, method="minmax", keep_float=(), chunk=6)
    quantize_onnx(small_graph, tmp_path / "chunked.onnx", images, 32, method="minmax", keep_float=(), chunk=2)
    whole, chunked = _scales(tmp_path / "whole.onnx"), _scales(tmp_path / "chunked.onnx")
    assert whole.keys() == chunked.keys() and len(whole) >= 4
    for name, scale in whole.items():
        np.testing.assert_array_equal(scale, chunked[name], err_msg=name)


def test_histogram_calibration_prints_nothing(small_graph, tmp_path, capsys):
    quantize_onnx(small_graph, tmp_path / "q.onnx", _images(2), 32, method="entropy", keep_float=(), chunk=1)
    assert capsys.readouterr().out == ""


def test_cli_calibration_choices_are_the_exporters():
    from yolo_mobile.cli import build_parser, options
    from yolo_mobile.export.config import ExportConfig

    args = build_parser().parse_args(["export", "--weights", "m.pt", "--int8"])
    assert options(args, ExportConfig).calib_method == int8.CALIB_METHOD
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "--weights", "m.pt", "--calib-method", "kl"])
    for method in int8.CALIB_METHODS:
        assert build_parser().parse_args(["export", "--weights", "m.pt", "--calib-method", method]).calib_method \
            == method
