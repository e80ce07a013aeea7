"""`yolo-mobile detect` and ONNX export: same answers from PyTorch and ONNX Runtime, bad inputs named."""

import json

import cv2
import numpy as np
import pytest
import torch
from conftest import COCO128, model_for_backbone, needs_coco128, randomize_bn, video_props
from torchvision.ops import box_iou

from yolo_mobile import build_model, list_backbones
from yolo_mobile.cli import main
from yolo_mobile.datasets.inference import SourceError
from yolo_mobile.engine.postprocess import non_max_suppression
from yolo_mobile.engine.predictor import detect, predict, resolve_source
from yolo_mobile.export.onnx import canonical_order, export_onnx
from yolo_mobile.runtimes import OnnxRuntime, TorchRuntime


def lively(cfg="yolov5n.yaml", nc=80):
    """An untrained model whose scores spread around 0.5, so NMS and thresholds have real work to do."""
    torch.manual_seed(0)
    model = build_model(cfg, nc=nc)
    randomize_bn(model)
    for head in model.head.cls:
        torch.nn.init.normal_(head[-1].bias, 0, 1)
    # varied box sizes: an untrained box branch predicts one size per level, and boxes on a lattice have
    # IoUs that sit exactly on the NMS threshold, where float noise between runtimes decides
    for head in model.head.box:
        torch.nn.init.normal_(head[-1].weight, 0, 0.3)
        torch.nn.init.normal_(head[-1].bias, 0, 2)
    return model.eval()


def write_video(path, frames=13, size=(160, 120), fps=15.0):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    writer.release()
    return path


def test_video_keeps_frame_count_size_and_fps(tmp_path, capsys):
    video = write_video(tmp_path / "in.mp4")
    rc = main(["detect", "--cfg", "yolov5n.yaml", "--source", str(video), "--imgsz", "96",
               "--project", str(tmp_path / "runs"), "--save-txt", "--save-json"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "13 frames; per frame:" in out and "inference" in out and "NMS" in out and "drawing" in out
    assert video_props(tmp_path / "runs" / "exp" / "in.mp4") == video_props(video) == (13, 15.0, 160, 120)
    assert len(list((tmp_path / "runs" / "exp" / "labels").glob("in_*.txt"))) == 13
    assert isinstance(json.loads((tmp_path / "runs" / "exp" / "predictions.json").read_text()), list)


def test_ctrl_c_leaves_a_playable_video(tmp_path):
    video = write_video(tmp_path / "in.mp4", frames=10)
    backend = TorchRuntime(build_model("yolov5n.yaml").eval())
    calls = {"n": 0}
    real = backend.__call__

    class Interrupting:
        def __getattr__(self, name):
            return getattr(backend, name)

        def __call__(self, x):
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt
            return real(x)

    stats = detect(Interrupting(), video, tmp_path / "out", imgsz=64, progress=False)
    assert stats["interrupted"] and stats["frames"] == 4
    assert video_props(tmp_path / "out" / "in.mp4")[0] == 4


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p / "missing.jpg", "missing.jpg: no such file or folder"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "empty: folder has no images"),
    (lambda p: (p / "bad.mp4").write_text("not a video") and p / "bad.mp4", "bad.mp4: OpenCV cannot open"),
    (lambda p: str(p / "*.png"), r"\*.png: the pattern matches no images"),
])
def test_bad_sources_fail_before_work(tmp_path, capsys, make, message):
    source = make(tmp_path)
    with pytest.raises(SourceError, match=message):
        resolve_source(source)
    assert main(["detect", "--cfg", "yolov5n.yaml", "--source", str(source), "--project", str(tmp_path / "r")]) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_unreadable_image_is_skipped_and_counted(tmp_path):
    cv2.imwrite(str(tmp_path / "a.jpg"), np.zeros((40, 60, 3), np.uint8))
    (tmp_path / "b.jpg").write_bytes(b"broken")
    stats = {}
    results = list(predict(TorchRuntime(build_model("yolov5n.yaml").eval()), tmp_path, imgsz=64, stats=stats))
    assert len(results) == 1 and stats["skipped"] == 1
    assert results[0].orig_shape == (40, 60)


def test_python_predict_api(tmp_path):
    """model.predict = letterbox, the fused model, NMS and the letterbox inverse, composed by hand here."""
    from yolo_mobile.datasets.labels import read_image
    from yolo_mobile.datasets.letterbox import letterbox_chw, unletterbox_boxes
    from yolo_mobile.detector import inference_copy

    cv2.imwrite(str(tmp_path / "a.png"), np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    model = lively(nc=3)
    model.names = ["x", "y", "z"]
    (r,) = list(model.predict(tmp_path / "a.png", imgsz=64, conf=0.3))
    assert r.names == ["x", "y", "z"] and len(r) > 0
    assert r.boxes.shape == (len(r), 4) and r.scores.shape == (len(r),) and r.classes.dtype == torch.int64
    chw, info = letterbox_chw(read_image(tmp_path / "a.png"), (64, 64))  # 50x70 at 64: a 64x64 input
    with torch.no_grad():
        out = inference_copy(model)(torch.from_numpy(chw)[None].float() / 255)
    (expected,) = non_max_suppression(out, conf=0.3, iou=0.7)
    assert torch.equal(r.classes, expected["classes"])
    torch.testing.assert_close(r.scores, expected["scores"], rtol=0, atol=1e-4)
    torch.testing.assert_close(r.boxes, unletterbox_boxes(expected["boxes"], info), rtol=0, atol=1e-2)


@pytest.mark.parametrize("backbone", list_backbones())
def test_export_parity_static_and_dynamic(tmp_path, backbone):
    cfg = model_for_backbone(backbone)
    model = lively(cfg)
    report = export_onnx(model, tmp_path / "m.onnx", imgsz=320, dynamic=True)
    # checked at 1x3x320x320 and, dynamic, at 2x3x256x384, on random and drawn images; raises above 1e-3
    assert report["checked"][1].endswith("2x3x256x384") and report["max_abs_diff"] < 1e-3
    assert not model.fused  # the caller's model is left unfused


@pytest.mark.parametrize("cfg", ["deit_tiny.yaml", "convit_tiny.yaml",
                                 {"backbone": {"name": "mobilenetv3", "variant": "small", "dilated": True}}],
                         ids=["deit", "convit", "dilated"])
def test_export_parity_dynamic_small_sizes(tmp_path, cfg):
    """ViTs resample position embeddings (and ConViT its grid offsets) per input: the graph must stay dynamic."""
    report = export_onnx(lively(cfg), tmp_path / "m.onnx", imgsz=128, dynamic=True)
    assert report["checked"][1].endswith("2x3x64x192") and report["max_abs_diff"] < 1e-3


def test_nms_in_graph_matches_pytorch_path(tmp_path):
    """The embedded NMS keeps exactly what the PyTorch post-processing keeps from the same raw predictions."""
    model = lively()
    report = export_onnx(model, tmp_path / "nms.onnx", imgsz=256, batch=2, nms=True, conf=0.55, iou=0.6,
                         max_det=300)
    assert report["max_abs_diff"] < 1e-3
    export_onnx(model, tmp_path / "raw.onnx", imgsz=256, batch=2)
    backend, raw = OnnxRuntime(tmp_path / "nms.onnx"), OnnxRuntime(tmp_path / "raw.onnx")
    assert backend.nms_inside and backend.batch == 2 and len(backend.names) == 80
    x = torch.rand(2, 3, 256, 256)
    dets, counts = backend(x)
    ref = non_max_suppression(raw(x), conf=0.55, iou=0.6, max_det=300)
    for k in range(2):
        n = int(counts[k])
        assert n == len(ref[k]["scores"]) > 0
        expected = torch.cat([ref[k]["boxes"], ref[k]["scores"][:, None], ref[k]["classes"][:, None].float()], 1)
        assert np.abs(canonical_order(dets[k, :n].numpy()) - canonical_order(expected.numpy())).max() < 1e-3
        assert (dets[k, n:] == 0).all()


@needs_coco128
def test_pt_and_onnx_give_the_same_detections(tmp_path):
    model = lively()
    model.names = [f"c{i}" for i in range(80)]
    model.save(tmp_path / "m.pt")
    assert main(["export", "--weights", str(tmp_path / "m.pt"), "--imgsz", "320"]) == 0
    assert (tmp_path / "m.onnx").is_file()  # next to the weights by default
    source = tmp_path / "images"
    source.mkdir()
    for p in sorted((COCO128 / "images" / "val2017").glob("*.jpg"))[:4]:
        (source / p.name).symlink_to(p)
    from yolo_mobile.runtimes import load_runtime

    # conf 0.9: this untrained model predicts dense clusters of near-equal boxes lower down, where 1e-5 noise
    # between runtimes can flip a greedy NMS decision and cascade; a trained model has no such clusters
    # square letterbox for PyTorch too: the ONNX file has a fixed 320x320 input
    torch_results = list(predict(load_runtime(tmp_path / "m.pt"), source, imgsz=320, conf=0.9, rect=False))
    onnx_backend = load_runtime(tmp_path / "m.onnx")
    assert onnx_backend.names == model.names  # class names travel in the ONNX metadata
    onnx_results = list(predict(onnx_backend, source, imgsz=320, conf=0.9))
    assert len(torch_results) == len(onnx_results) == 4
    total = 0
    for a, b in zip(torch_results, onnx_results, strict=True):
        assert len(a) == len(b)
        if len(a):  # every box has its twin: same class, IoU > 0.99
            iou = box_iou(a.boxes, b.boxes) * (a.classes[:, None] == b.classes[None, :])
            assert (iou.max(1).values > 0.99).all()
        total += len(a)
    assert total > 0


def test_simplified_export_keeps_parity(tmp_path):
    pytest.importorskip("onnxslim")
    report = export_onnx(lively("mobilevit_xxs.yaml"), tmp_path / "s.onnx", imgsz=256, dynamic=True, simplify=True)
    assert report["max_abs_diff"] < 1e-3 and len(report["checked"]) == 2


def test_parity_bounds_boxes_by_the_input_size_and_scores_absolutely():
    from yolo_mobile.export.checks import BOX_TOLERANCE, PARITY_TOLERANCE
    from yolo_mobile.export.checks import output_difference as _difference

    # (B, 4 + nc, N): a trained mobilenetv3_large's corners moved up to ~5e-3 px in ONNX Runtime, scores 2e-6
    ref = np.zeros((1, 6, 3))
    out = ref.copy()
    out[0, 2, 1], out[0, 5, 0] = 5e-3, 2e-6
    boxes, scores = _difference(out, ref, box_axis=1)
    assert boxes == 5e-3 and scores == 2e-6
    assert boxes < BOX_TOLERANCE * 320 and scores < PARITY_TOLERANCE
    out[0, 4, 2] = 5e-3  # the same difference on a score is an error
    assert _difference(out, ref, box_axis=1)[1] >= PARITY_TOLERANCE
