"""ncnn export: every family converted once at 320 by a module fixture and checked in ncnn against PyTorch, or
refused with a message naming the operator (docs/export.md's list); yolov5n's conversion also serves the failed-check,
val and benchmark tests."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from phone_families import FAMILIES, check_val_of_export, family_cfg
from test_deploy import lively

pytest.importorskip("pnnx", reason="the ncnn extra is not installed: pip install -e '.[ncnn]'")
pytest.importorskip("ncnn", reason="the ncnn extra is not installed: pip install -e '.[ncnn]'")

from yolo_mobile.benchmark import BenchmarkConfig, format_markdown, runtime_latency
from yolo_mobile.cli import main
from yolo_mobile.datasets.synthetic import resolve_data
from yolo_mobile.export import ncnn
from yolo_mobile.export.checks import ConversionError, ExportError, check_parity, fused_copy
from yolo_mobile.runtimes import NcnnRuntime, load_runtime
from yolo_mobile.runtimes import ncnn as ncnn_runtime

pytestmark = pytest.mark.xdist_group("test_phone_export_ncnn")  # one worker builds the module's conversions
SIZE = 320  # the size for the every-family export
# attention that reshapes to 5-6 dimensions (MobileViT's patches, q/k/v splits); ncnn's tensors have at most 4
UNSUPPORTED = {"mobilevit", "emo", "vit"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (model, export report or the ConversionError, the folder asked for), each converted on first use
    and kept for the module."""
    out, done = tmp_path_factory.mktemp("ncnn"), {}

    def get(family):
        if family not in done:
            model, folder = lively(family_cfg(family), nc=4), out / f"{family}_ncnn"
            try:
                done[family] = model, ncnn.export_ncnn(model, folder, imgsz=SIZE), folder
            except ConversionError as e:
                done[family] = model, e, folder
        return done[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_converts_or_names_the_op(converted, family):
    _, report, folder = converted(family)
    if family in UNSUPPORTED:
        assert isinstance(report, ConversionError)
        assert re.fullmatch(rf"{folder}: pnnx left operator\(s\) .*Tensor\.reshape.* that ncnn has no layer for; "
                            r"nothing was written", str(report))
        assert not folder.exists() and not folder.with_name(f".{folder.name}.partial").exists()
        return
    assert report["max_abs_diff"] < 1e-3 and report["checked"] == [f"random and drawn images at 1x3x{SIZE}x{SIZE}"]
    assert folder == report["path"]
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.json", "model.ncnn.bin", "model.ncnn.param"]
    assert json.loads((folder / "metadata.json").read_text())["precision"] == "float32"
    backend = load_runtime(folder)
    assert isinstance(backend, NcnnRuntime) and backend.imgsz == SIZE and backend.names == ["0", "1", "2", "3"]
    n = (SIZE // 8) ** 2 + (SIZE // 16) ** 2 + (SIZE // 32) ** 2
    assert backend(torch.rand(2, 3, SIZE, SIZE)).shape == (2, 8, n)  # image by image: (B, 4 + nc, N) as ever


def test_a_failed_check_leaves_nothing(converted, tmp_path, monkeypatch):
    model, report, folder = converted("cspdarknet")

    def pnnx_again(traced, imgsz, half, workdir):  # pnnx's files as the fixture's conversion wrote them
        for name in (ncnn_runtime.NCNN_PARAM, ncnn_runtime.NCNN_WEIGHTS):
            shutil.copy(folder / name, workdir / name)

    monkeypatch.setattr(ncnn, "_pnnx", pnnx_again)
    real = ncnn_runtime.ncnn_run
    monkeypatch.setattr(NcnnRuntime, "run", lambda self, x: real(self.net, x) + 0.01)  # a runtime that drifts by 0.01
    with pytest.raises(ExportError, match=r"ncnn differs from PyTorch by 1\.0\de-02 .* nothing was written"):
        ncnn.export_ncnn(model, tmp_path / "bad_ncnn", imgsz=SIZE)
    assert list(tmp_path.iterdir()) == []
    runner = ncnn_runtime.ncnn_net(report["path"])
    fused = fused_copy(model)

    def boxes_off_by(px):  # ncnn's float32 output with every box coordinate moved by px
        return lambda x: real(runner, x) + np.r_[np.full(4, px), np.zeros(4)].astype(np.float32)[None, :, None]

    with pytest.raises(ExportError, match=r"ncnn \(float16\) differs from PyTorch by 1\.3 px on boxes"):
        check_parity(fused, boxes_off_by(1.3), SIZE, "ncnn", half=True)  # bound at 320: 320 x 2^-8 = 1.25 px
    assert check_parity(fused, boxes_off_by(1.2), SIZE, "ncnn", half=True)["box_diff"] == pytest.approx(1.2, abs=1e-3)


def test_unsupported_op_is_named(tmp_path):
    (tmp_path / "model.ncnn.param").write_text("7767517\n2 2\nInput in0 0 1 in0\nTensor.reshape r 1 1 in0 out0\n")
    assert ncnn_runtime.unsupported_layers(tmp_path / "model.ncnn.param") == ["Tensor.reshape"]
    with pytest.raises(ValueError, match=r"ncnn has no layer for Tensor\.reshape"):
        ncnn_runtime.ncnn_net(tmp_path)


def test_cli_half_then_detect(tmp_path, capsys):
    """The CLI's float16 export (a conversion of its own, at 64: pnnx costs a few seconds at any size)."""
    assert main(["export", "--cfg", "yolov5n.yaml", "--format", "ncnn", "--half", "--imgsz", "64",
                 "--output", str(tmp_path / "best_ncnn")]) == 0
    assert "ncnn vs PyTorch" in capsys.readouterr().out
    folder = tmp_path / "best_ncnn"
    assert json.loads((folder / "metadata.json").read_text())["precision"] == "float16"
    parameters = sum(p.numel() for p in lively("yolov5n.yaml", nc=80).parameters())
    assert (folder / "model.ncnn.bin").stat().st_size < 2.5 * parameters  # 2 bytes a weight, not 4
    image = next((resolve_data("shapes:16").parent / "images" / "val").iterdir())
    assert main(["detect", "--weights", str(folder), "--source", str(image), "--project", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "exp" / image.name).is_file()


def test_val_runs_the_export(converted, tmp_path, capsys):
    model, report, _ = converted("cspdarknet")
    check_val_of_export(fused_copy(model), report["path"], resolve_data("shapes:16"), tmp_path, capsys, SIZE)


def test_benchmark_latency_column(converted):
    config = BenchmarkConfig(cfgs=["yolov5n.yaml"], imgsz=[SIZE], backends=["ncnn"], runs=2, warmup=0)
    config.check()
    row = runtime_latency({"ncnn": converted("cspdarknet")[1]["path"]}, SIZE, config, torch.device("cpu"))
    assert row["ncnn_ms"] > 0 and row["ncnn_p90_ms"] >= row["ncnn_ms"] and row["runtime_threads"] >= 1
    assert "ncnn ms" in format_markdown([{"model": "m", "imgsz": SIZE, **row}])


def test_threads_default_to_torchs(converted):
    """ncnn waits at every layer for each of its threads: by default it takes torch's count, the process's share
    of the cores (1 in a test worker), not every core."""
    folder = converted("cspdarknet")[2]
    assert ncnn_runtime.ncnn_net(folder).opt.num_threads == torch.get_num_threads()
    assert ncnn_runtime.ncnn_net(folder, threads=3).opt.num_threads == 3
