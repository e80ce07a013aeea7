"""Rectangular inference in predict/detect: the letterbox shape, what the model is fed, boxes mapped back exactly,
fixed-size ONNX models kept square, mixed-shape batches, and the video path (BGR kept, threads, overlap)."""

import threading

import cv2
import numpy as np
import pytest
import torch
from conftest import video_props

from yolo_mobile import build_model
from yolo_mobile.datasets.letterbox import letterbox, rect_shape, unletterbox_boxes
from yolo_mobile.engine.predictor import detect, input_shape, predict, torch_threads
from yolo_mobile.runtimes import OnnxRuntime, TorchRuntime


def write_video(path, frames=7, size=(320, 180), fps=10.0):
    """A 16:9 test video of smooth gradients (mp4v keeps them close to the original)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    w, h = size
    for k in range(frames):
        frame = np.zeros((h, w, 3), np.uint8)
        frame[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None]  # blue rises left to right
        frame[..., 2] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]  # red rises top to bottom
        frame[..., 1] = 20 * k
        writer.write(frame)
    writer.release()
    return path


class Recording:
    """Wraps a backend and records the shape (and channel order check) of every batch it is given."""

    def __init__(self, backend):
        self.backend, self.shapes, self.inputs = backend, [], []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def __call__(self, x):
        self.shapes.append(tuple(x.shape))
        self.inputs.append(x.clone())
        return self.backend(x)


class OneBox:
    """A fake model: for every image, one box of class 1, score 0.9, at ``xyxy`` in letterboxed pixels."""

    names = ["a", "b", "c"]
    batch = imgsz = None
    nms_inside = False
    stride = 32

    def __init__(self, xyxy=(60.0, 33.0, 100.0, 63.0)):
        self.xyxy = xyxy
        self.shapes = []

    def __call__(self, x):
        self.shapes.append(tuple(x.shape))
        x1, y1, x2, y2 = self.xyxy
        out = torch.zeros(x.shape[0], 4 + 3, 2)
        out[:, :4, 0] = torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
        out[:, 5, 0] = 0.9  # class 1
        out[:, :4, 1] = torch.tensor([5.0, 5.0, 4.0, 4.0])
        out[:, 4, 1] = 0.1  # below conf: dropped
        return out


# ---------------------------------------------------------------------------------------------- shape function
@pytest.mark.parametrize(("shape", "imgsz", "expected"), [
    ((720, 1280), 640, (384, 640)),  # scale 0.5: 360 rows -> 384
    ((720, 1280), 160, (96, 160)),  # scale 0.125: 90 rows -> 96
    ((1280, 720), 640, (640, 384)),  # portrait
    ((1080, 1920), 640, (384, 640)),  # 1/3: 360 rows
    ((480, 640), 640, (480, 640)),  # 4:3 at scale 1: 480 is already a multiple of 32
    ((500, 1000), 320, (160, 320)),
    ((100, 400), 128, (32, 128)),  # 32 rows exactly
    ((50, 70), 64, (64, 64)),  # upscaled: 45.7 -> 46 rows -> 64
    ((640, 640), 640, (640, 640)),
])
def test_rect_shape_hand_computed(shape, imgsz, expected):
    assert rect_shape(shape, imgsz) == expected


def test_rect_shape_stride_and_batch_shape():
    assert rect_shape((720, 1280), 640, stride=64) == (384, 640)
    assert rect_shape((700, 1280), 640, stride=64) == (384, 640)  # 350 rows -> 384
    assert rect_shape((520, 1280), 640, stride=64) == (320, 640)  # 260 rows -> 320 (256 would not hold them)
    # a batch: the largest height and the largest width of the members' rectangles
    assert input_shape([(720, 1280), (480, 1280)], 640) == (384, 640)  # (384, 640) and (256, 640)
    assert input_shape([(720, 1280), (1280, 720)], 640) == (640, 640)  # landscape + portrait: the square
    assert input_shape([(720, 1280)], 640, rect=False) == (640, 640)


# ---------------------------------------------------------------------------------------------- exact inverse
def test_letterbox_into_rect_inverts_known_boxes():
    image = np.zeros((720, 1280, 3), np.uint8)
    boxed, info = letterbox(image, rect_shape((720, 1280), 160))
    assert boxed.shape == (96, 160, 3)
    assert info.scale == (0.125, 0.125) and info.pad == (0, 3)  # 90 rows, 3 above, 3 below
    boxes = torch.tensor([[10.0, 13.0, 50.0, 43.0], [0.0, 3.0, 160.0, 93.0]])
    expected = torch.tensor([[80.0, 80.0, 400.0, 320.0], [0.0, 0.0, 1280.0, 720.0]])
    assert torch.equal(unletterbox_boxes(boxes, info), expected)
    # portrait with a left pad: 100x45 at 64 -> 64 x 29 columns in a 64 x 32 input, 1 column on the left
    boxed, info = letterbox(np.zeros((100, 45, 3), np.uint8), rect_shape((100, 45), 64))
    assert boxed.shape == (64, 32, 3) and info.pad == (1, 0)
    back = unletterbox_boxes(torch.tensor([[1.0, 0.0, 30.0, 64.0]]), info)
    assert torch.allclose(back, torch.tensor([[0.0, 0.0, 45.0, 100.0]]), atol=1e-4)


def test_predict_maps_boxes_back_from_the_rect_input(tmp_path):
    video = write_video(tmp_path / "v.mp4", frames=3, size=(1280, 720))
    backend = OneBox()
    results = list(predict(backend, video, imgsz=160))
    assert backend.shapes == [(1, 3, 96, 160)] * 3
    for r in results:
        # letterboxed (60, 33, 100, 63): x / 0.125, (y - 3) / 0.125
        assert torch.equal(r.boxes, torch.tensor([[480.0, 240.0, 800.0, 480.0]]))
        assert r.classes.tolist() == [1] and r.orig_shape == (720, 1280)


def test_mixed_shape_batch_padded_to_the_largest_rect(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.full((90, 160, 3), 50, np.uint8))  # rect (96, 160) at 160
    cv2.imwrite(str(tmp_path / "b.png"), np.full((60, 160, 3), 50, np.uint8))  # rect (64, 160)
    cv2.imwrite(str(tmp_path / "c.png"), np.full((160, 90, 3), 50, np.uint8))  # rect (160, 96)
    backend = OneBox()
    a, b, c = predict(backend, tmp_path, imgsz=160, batch=2)
    assert backend.shapes == [(2, 3, 96, 160), (1, 3, 160, 96)]
    # scale 1 for a and b, both centred in 96 rows: a 3 rows down, b 18 rows down
    assert torch.equal(a.boxes, torch.tensor([[60.0, 30.0, 100.0, 60.0]]))
    assert torch.equal(b.boxes, torch.tensor([[60.0, 15.0, 100.0, 45.0]]))
    # c alone, in its own (160, 96): 3 columns on the left, and the right edge clipped to its 90 columns
    assert torch.equal(c.boxes, torch.tensor([[57.0, 33.0, 90.0, 63.0]]))


# ---------------------------------------------------------------------------------------------- what the model gets
def test_model_is_fed_the_rect_shape_in_rgb(tmp_path):
    video = write_video(tmp_path / "v.mp4", frames=4)
    backend = Recording(TorchRuntime(build_model("yolov5n.yaml", nc=3).eval()))
    results = list(predict(backend, video, imgsz=160))
    assert backend.shapes == [(1, 3, 96, 160)] * 4  # 320x180 at 160: scale 0.5, 90 rows -> 96
    x = backend.inputs[0]
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    # RGB: red rises top to bottom, blue left to right (the BGR video's channels 2 and 0)
    rows = x[0, :, 3:93, 80]  # a column inside the image, not the pad
    assert rows[0, -1] > rows[0, 0] + 0.5 and abs(float(rows[2, -1] - rows[2, 0])) < 0.1
    # Result.image is the RGB original, converted from the BGR frame on first use
    r = results[0]
    assert r.bgr is not None and r.bgr.shape == (180, 320, 3)
    assert np.array_equal(r.image, r.bgr[..., ::-1])
    before = r.bgr.copy()
    canvas = r.plot()
    assert canvas.shape == (180, 320, 3) and np.array_equal(r.bgr, before)  # drawn on a copy

    square = Recording(TorchRuntime(build_model("yolov5n.yaml", nc=3).eval()))
    list(predict(square, video, imgsz=160, rect=False))
    assert square.shapes == [(1, 3, 160, 160)] * 4


def test_image_results_keep_rgb(tmp_path):
    image = np.zeros((40, 60, 3), np.uint8)
    image[..., 2] = 200  # red in BGR
    cv2.imwrite(str(tmp_path / "a.png"), image)
    (r,) = predict(OneBox(), tmp_path / "a.png", imgsz=64)
    assert r.bgr is None and (r.image[..., 0] == 200).all() and (r.image[..., 2] == 0).all()
    assert (r.plot()[5, 30] == [0, 0, 200]).all()  # plotted back in BGR (a pixel no box touches)


def test_fixed_size_onnx_gets_square_input_and_dynamic_gets_rect(tmp_path):
    from yolo_mobile.export.onnx import export_onnx

    model = build_model("yolov5n.yaml", nc=3).eval()
    video = write_video(tmp_path / "v.mp4", frames=2)
    export_onnx(model, tmp_path / "fixed.onnx", imgsz=128)
    fixed = Recording(OnnxRuntime(tmp_path / "fixed.onnx"))
    assert fixed.imgsz == 128
    results = list(predict(fixed, video, imgsz=160))  # the file's own size wins
    assert fixed.shapes == [(1, 3, 128, 128)] * 2 and len(results) == 2
    export_onnx(model, tmp_path / "dynamic.onnx", imgsz=128, dynamic=True)
    dynamic = Recording(OnnxRuntime(tmp_path / "dynamic.onnx"))
    assert dynamic.imgsz is None
    list(predict(dynamic, video, imgsz=160))
    assert dynamic.shapes == [(1, 3, 96, 160)] * 2


# ---------------------------------------------------------------------------------------------- detect on a video
@pytest.mark.parametrize("overlap", [True, False])
def test_detect_writes_the_full_video_at_rect_size(tmp_path, overlap):
    video = write_video(tmp_path / "clip.mp4", frames=7)
    backend = Recording(OneBox(xyxy=(20.0, 20.0, 140.0, 80.0)))
    threads = torch.get_num_threads()
    stats = detect(backend, video, tmp_path / "out", imgsz=160, progress=False, overlap=overlap, threads=1,
                   save_txt=True)
    assert torch.get_num_threads() == threads  # restored
    assert backend.shapes == [(1, 3, 96, 160)] * 7 and stats["shape"] == (96, 160)
    assert stats["frames"] == 7 and stats["boxes"] == 7 and not stats["interrupted"]
    frames, _fps, width, height = video_props(tmp_path / "out" / "clip.mp4")
    assert (frames, width, height) == (7, 320, 180)
    # the box drawn: letterboxed (20, 20, 140, 80) -> original (40, 34, 280, 154); its edge is class 1's colour
    cap = cv2.VideoCapture(str(tmp_path / "out" / "clip.mp4"))
    ok, frame = cap.read()
    cap.release()
    assert ok and np.abs(frame[94, 40].astype(int) - (151, 157, 255)).max() < 40
    assert (tmp_path / "out" / "labels" / "clip_6.txt").read_text().startswith("1 0.500000 0.522222 0.750000")


def test_torch_threads_are_restored_even_on_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), torch_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_stopping_early_stops_the_reader(tmp_path):
    video = write_video(tmp_path / "v.mp4", frames=6)
    baseline = threading.active_count()
    results = predict(OneBox(), video, imgsz=160)
    next(results)
    assert threading.active_count() > baseline  # reading ahead
    results.close()
    assert threading.active_count() == baseline


# ---------------------------------------------------------------------------------------------- parallel inference
def test_two_workers_give_the_same_results_in_order(tmp_path):
    video = write_video(tmp_path / "v.mp4", frames=9)
    model = build_model("yolov5n.yaml", nc=3)
    for head in model.head.cls:  # scores around 0.5, so there are boxes to compare
        torch.nn.init.normal_(head[-1].bias, 0, 1)
    backend = TorchRuntime(model.eval())
    with torch_threads(1):
        one = list(predict(backend, video, imgsz=160, conf=0.3))
        two = list(predict(backend, video, imgsz=160, conf=0.3, workers=2))
    assert [r.frame for r in two] == list(range(9)) and sum(len(r) for r in one) > 0
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.classes, b.classes)


def test_detect_chooses_parallelism_and_restores_threads(tmp_path):
    from yolo_mobile.engine.predictor import detect_parallelism, resolve_source, usable_cpus

    video = write_video(tmp_path / "v.mp4", frames=5)
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((40, 60, 3), np.uint8))
    backend = TorchRuntime(build_model("yolov5n.yaml", nc=3).eval())
    cpus = usable_cpus()
    expected = (2, cpus // 2) if cpus >= 2 else (1, 1)
    assert detect_parallelism(backend, resolve_source(video)) == expected
    assert detect_parallelism(backend, resolve_source(tmp_path / "a.png")) == (1, None)
    assert detect_parallelism(Recording(backend), resolve_source(video)) == (1, None)  # unknown: one at a time
    before = torch.get_num_threads()
    stats = detect(backend, video, tmp_path / "out", imgsz=160, progress=False)
    assert (stats["workers"], stats["threads"]) == expected and stats["frames"] == 5
    assert torch.get_num_threads() == before
    frames, _fps, width, height = video_props(tmp_path / "out" / "v.mp4")
    assert (frames, width, height) == (5, 320, 180)


def test_an_error_in_a_worker_stops_cleanly(tmp_path):
    video = write_video(tmp_path / "v.mp4", frames=8)

    class Failing(OneBox):
        def __call__(self, x):
            if len(self.shapes) == 3:
                raise RuntimeError("boom")
            return super().__call__(x)

    baseline = threading.active_count()
    seen = []
    with pytest.raises(RuntimeError, match="boom"):
        for r in predict(Failing(), video, imgsz=160, workers=2):
            seen.append(r.frame)
    assert seen == [0, 1, 2][: len(seen)] and len(seen) >= 2  # in order, up to the failing batch
    assert threading.active_count() == baseline
