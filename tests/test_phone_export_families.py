"""Every backbone family exported at 320 to ncnn and to LiteRT, each checked in its runtime against PyTorch (float32
within 1e-3 on random and drawn images), or failing with a message that names the operator (README's list).

One conversion per family and format. ncnn's run by default (a few seconds each); LiteRT's cost 15-60 s of CPU
each (litert-torch runs torch.export's decompositions several times), so the sweep runs where
YOLO_MOBILE_SLOW_EXPORTS=1 is set (.ci/run sets it), and the plain suite converts yolov5n only
(test_phone_export.py)."""

import os

import pytest
from conftest import model_for_backbone
from test_deploy import lively

from yolo_mobile import list_backbones
from yolo_mobile.engine.predictor import load_backend

FAMILIES = {name: model_for_backbone(name) for name in list_backbones()} | {"convit": "convit_tiny.yaml"}
NCNN_UNSUPPORTED = {"mobilevit", "emo", "vit", "convit"}  # attention reshapes to 5-6 dims; ncnn has at most 4
SIZE = 320


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ncnn_family(tmp_path, family):
    pytest.importorskip("pnnx", reason="the ncnn extra is not installed: pip install -e '.[ncnn]'")
    pytest.importorskip("ncnn", reason="the ncnn extra is not installed: pip install -e '.[ncnn]'")
    from yolo_mobile.export.ncnn import ConversionError, export_ncnn

    model, out = lively(FAMILIES[family], nc=4), tmp_path / f"{family}_ncnn"
    if family in NCNN_UNSUPPORTED:
        with pytest.raises(ConversionError, match=r"pnnx left operator\(s\) .*Tensor\.reshape.* that ncnn has no "
                                                  r"layer for; nothing was written"):
            export_ncnn(model, out, imgsz=SIZE)
        assert not out.exists() and list(tmp_path.iterdir()) == []
        return
    report = export_ncnn(model, out, imgsz=SIZE)
    assert report["max_abs_diff"] < 1e-3
    assert load_backend(out).imgsz == SIZE


@pytest.mark.skipif(os.environ.get("YOLO_MOBILE_SLOW_EXPORTS") != "1",
                    reason="LiteRT's every-family sweep (~5 min of CPU): YOLO_MOBILE_SLOW_EXPORTS=1 runs it")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tflite_family(tmp_path, family):
    pytest.importorskip("litert_torch", reason="the tflite extra is not installed: pip install -e '.[tflite]'")
    pytest.importorskip("ai_edge_litert", reason="the tflite extra is not installed: pip install -e '.[tflite]'")
    from yolo_mobile.export.tflite import export_tflite

    report = export_tflite(lively(FAMILIES[family], nc=4), tmp_path / f"{family}.tflite", imgsz=SIZE)
    assert report["max_abs_diff"] < 1e-3
    backend = load_backend(report["path"])
    assert backend.imgsz == SIZE and backend.names == ["0", "1", "2", "3"]
