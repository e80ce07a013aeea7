"""Live sources in predict/detect: the newest frame is processed and stale ones dropped, so a model slower than
the camera stays a bounded number of frames behind; files keep every frame; the flags override."""

import re
import threading

import numpy as np
import pytest
import torch

from yolo_mobile.cli import main
from yolo_mobile.engine import predictor
from yolo_mobile.engine.predictor import Source, live_drops, predict

PER_CALL = 10  # camera frames that pass while the slow model runs once
TOTAL = 300


class Clock:
    """Logical time, counted in camera frames: frame i exists once ``now`` is above i. Only the model moves it,
    so how far behind the processed frames are is a count, whatever the machine's speed."""

    def __init__(self, total: int = TOTAL) -> None:
        self.now, self.total = 1, total  # the stream ends after `total` frames
        self.changed = threading.Condition()

    def advance(self, frames: int) -> None:
        with self.changed:
            self.now += frames
            self.changed.notify_all()

    def behind(self, frame: int) -> int:
        """Frames the camera has delivered since ``frame``."""
        return min(self.now, self.total) - 1 - frame


class FakeCamera:
    """A cv2.VideoCapture of a live stream on ``clock``: ``read`` returns the oldest frame not yet read (as a
    stream's buffer does), waiting until it exists; the stream ends after the clock's ``total`` frames."""

    def __init__(self, clock: Clock) -> None:
        self.clock, self.next = clock, 0

    def isOpened(self) -> bool:
        return True

    def get(self, prop) -> float:
        return 0.0

    def read(self):
        with self.clock.changed:
            if self.next >= self.clock.total:
                return False, None
            if not self.clock.changed.wait_for(lambda: self.clock.now > self.next, timeout=60):
                return False, None  # a stalled stream (a bug here): end rather than hang the test
        frame = np.full((64, 64, 3), self.next % 256, np.uint8)
        self.next += 1
        return True, frame

    def release(self) -> None:
        pass


class SlowModel:
    """A model that takes as long as PER_CALL camera frames (it moves the clock on) and finds nothing."""

    names = ["a"]
    batch = imgsz = None
    nms_inside = False
    stride = 32

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.advance(PER_CALL * len(x))
        return torch.zeros(len(x), 5, 16)


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(predictor, "_capture", lambda target: FakeCamera(clock))
    return clock


def run(clock: Clock, **kwargs) -> tuple[list[int], list[int], dict]:
    """Frame indices processed, and how many frames behind the camera each was when its result came out."""
    stats: dict = {}
    frames, behind = [], []
    for r in predict(SlowModel(clock), 0, imgsz=64, stats=stats, resolved=Source("stream", [0]), **kwargs):
        frames.append(r.frame)
        behind.append(clock.behind(r.frame))
    return frames, behind, stats


def test_live_source_drops_stale_frames_and_lag_stays_bounded(clock):
    frames, behind, stats = run(clock)
    assert stats["drop_frames"] and stats["dropped"] > 0
    assert stats["read_frames"] == TOTAL == stats["frames"] + stats["dropped"]
    assert frames == sorted(frames) and frames[-1] == TOTAL - 1  # in order; the stream's last frame is shown
    # the frame handed to the model was the newest held; while the model ran, PER_CALL more came
    assert max(behind) <= 2 * PER_CALL + 2, behind
    assert len(frames) < TOTAL // 2


def test_keep_frames_processes_every_frame_and_falls_behind(clock):
    frames, behind, stats = run(clock, drop_frames=False)
    assert not stats["drop_frames"] and stats["dropped"] == 0
    assert frames == list(range(TOTAL)) and stats["read_frames"] == TOTAL
    assert max(behind) > 10 * PER_CALL  # the lag the default avoids: it grows with every frame


def test_which_sources_drop():
    stream, video, images = Source("stream", [0]), Source("video", ["a.mp4"]), Source("images", ["a.jpg"])
    assert live_drops(stream) and not live_drops(video) and not live_drops(images)
    assert not live_drops(stream, False) and live_drops(video, True) and not live_drops(images, True)


@pytest.mark.parametrize("flag", [None, "--keep-frames"])
def test_detect_closing_line_counts_frames(flag, clock, tmp_path, capsys):
    clock.total = clock.now = 20  # every frame already there: a stream that got ahead of the model
    args = ["detect", "--cfg", "yolov5n.yaml", "--source", "0", "--imgsz", "64", "--device", "cpu",
            "--project", str(tmp_path), "--name", "live"] + ([flag] if flag else [])
    assert main(args) == 0
    out = capsys.readouterr().out
    line = re.search(r"(\d+) frames read, (\d+) processed, (\d+) dropped", out)
    if flag:
        assert line is None and out.startswith("20 frames;")
    else:
        read, processed, dropped = map(int, line.groups())
        assert read == 20 and processed + dropped == 20 and processed >= 1
