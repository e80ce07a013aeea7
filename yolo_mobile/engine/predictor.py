"""Prediction on images, folders, globs, videos, webcams and streams, with a PyTorch or ONNX Runtime model.

Sources are checked before any work starts; frames are read with OpenCV, letterboxed, batched, run, passed
through the shared NMS and mapped back to original pixels.

Each frame is letterboxed to the smallest stride multiple that holds it at ``imgsz`` ("rectangular" inference: a
1280x720 frame at 640 runs at 384x640), unless the model has a fixed input size (a static ONNX export), which gets
the ``imgsz`` square. A batch of images of different shapes is padded to one shape: the largest height and the
largest width of their rectangles (never more than the square). Video frames stay in OpenCV's BGR order from
decoding to the saved video; ``Result.image`` (RGB) is converted on first use. Reading and letterboxing run one
batch ahead on a worker thread, drawing and writing one frame behind on another, while the model runs: OpenCV and
torch release the GIL, so decoding and encoding overlap the forward pass.

A live source (a webcam or a stream) is read on its own thread as fast as it delivers, and only the newest frame
is kept: the model always gets the latest frame and stale ones are dropped and counted, so the lag stays bounded
however slow the model is. Files keep every frame. ``drop_frames`` overrides either way; on a video file it also
paces reading at the file's frame rate, as a camera would deliver it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ..config import IMAGE_SUFFIXES, ConfigError, check_imgsz, flag
from ..datasets.inference import SourceError
from ..datasets.labels import read_image, write_image
from ..datasets.letterbox import LetterboxInfo, letterbox_batch, rect_shape, unletterbox_boxes
from ..files import publish, write_text
from ..resources import usable_cpus
from ..runtimes import TorchRuntime
from .postprocess import CONF, IOU, MAX_DET, non_max_suppression

log = logging.getLogger(__name__)


@dataclass
class DetectConfig:
    """``yolo-mobile detect``: its flags are these fields (cli.py builds the parser from them)."""

    weights: str | None = flag(None, "a checkpoint (.pt) or an exported model (.onnx, .tflite, an ncnn folder)",
                               group="model", required=True)
    cfg: str | None = flag(None, "a model YAML or built-in name: an untrained model", group="model")
    source: str = flag("", "image, folder, glob, video, webcam index (0) or stream URL", required=True)
    imgsz: int | None = flag(None, "inference size (default: the checkpoint's training size, else 640)")
    conf: float = flag(CONF, "confidence threshold", type="fraction")
    iou: float = flag(IOU, "NMS IoU threshold", type="fraction")
    max_det: int = flag(MAX_DET, "detections kept per image or frame", type="positive")
    classes: list[int] | None = flag(None, "keep only these class indices", nargs="+", type="non_negative")
    batch: int = flag(1, "frames per forward pass", type="positive")
    device: str = flag("", "cpu or a GPU index (default: GPU 0 if present)")
    half: bool = flag(False, "fp16 on CUDA")
    save_txt: bool = flag(False, "YOLO labels with confidences, one file per image/frame")
    save_json: bool = flag(False, "all detections in predictions.json")
    show: bool = flag(False, "show frames in a window")
    drop_frames: bool | None = flag(
        None, "process the newest frame, drop stale ones (the default for webcams and streams); on a video file, "
              "read it at its frame rate as a camera would deliver it",
        off_flag="--keep-frames", off_help="process every frame, however far behind (the default for files)")
    project: str = flag("runs/detect", "results go to PROJECT/NAME")
    name: str = flag("exp", "run name (numbered when it exists)")

    def check(self) -> None:
        if (self.weights is None) == (self.cfg is None):
            raise ConfigError("detect needs one of --weights or --cfg")
        if not str(self.source):
            raise ConfigError("detect needs --source")
        if self.imgsz is not None:
            check_imgsz(self.imgsz, "--imgsz")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".wmv", ".mpeg", ".mpg")
STREAM_PREFIXES = ("rtsp://", "rtmp://", "http://", "https://")


@dataclass
class Result:
    """Detections of one image or frame: xyxy boxes in original pixels, scores, 0-based classes.

    The original is ``image`` (RGB) or ``bgr`` (as OpenCV decodes it); either may be given, and ``image`` is
    converted from ``bgr`` on first use (video frames stay BGR, so drawing and saving them needs no conversion).
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor
    names: list[str]
    path: str
    frame: int | None = None  # index within a video or stream
    orig_shape: tuple[int, int] = (0, 0)  # (height, width)
    image: np.ndarray | None = field(default=None, repr=False)  # RGB original (a property, see below)
    bgr: np.ndarray | None = field(default=None, repr=False)  # BGR original, when read by OpenCV

    def __len__(self) -> int:
        return len(self.scores)

    def plot(self) -> np.ndarray:
        """A copy of the original image (BGR, for OpenCV) with boxes and labels drawn."""
        canvas = self.bgr.copy() if self.bgr is not None else cv2.cvtColor(self.image, cv2.COLOR_RGB2BGR)
        thickness = max(1, round(sum(canvas.shape[:2]) / 600))
        for (x1, y1, x2, y2), s, c in zip(self.boxes.tolist(), self.scores.tolist(), self.classes.tolist(),
                                          strict=True):
            colour = _colour(int(c))
            p1, p2 = (int(x1), int(y1)), (int(x2), int(y2))
            cv2.rectangle(canvas, p1, p2, colour, thickness, cv2.LINE_AA)
            label = f"{self.names[int(c)]} {s:.2f}"
            (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, thickness / 3, max(1, thickness - 1))
            top = p1[1] - th - 3 if p1[1] - th - 3 >= 0 else p1[1] + th + 3
            cv2.rectangle(canvas, (p1[0], top), (p1[0] + tw, p1[1]), colour, -1, cv2.LINE_AA)
            cv2.putText(canvas, label, (p1[0], max(p1[1] - 2, th)), cv2.FONT_HERSHEY_SIMPLEX, thickness / 3,
                        (255, 255, 255), max(1, thickness - 1), cv2.LINE_AA)
        return canvas

    def yolo_lines(self) -> list[str]:
        """YOLO label lines with confidence: class cx cy w h conf, normalised."""
        h, w = self.orig_shape
        lines = []
        for (x1, y1, x2, y2), s, c in zip(self.boxes.tolist(), self.scores.tolist(), self.classes.tolist(),
                                          strict=True):
            lines.append(f"{int(c)} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} "
                         f"{(y2 - y1) / h:.6f} {s:.5f}")
        return lines


def _rgb_image(self: Result) -> np.ndarray | None:
    if self._rgb is None and self.bgr is not None:
        self._rgb = cv2.cvtColor(self.bgr, cv2.COLOR_BGR2RGB)
    return self._rgb


def _set_rgb_image(self: Result, value: np.ndarray | None) -> None:
    self._rgb = value


# after the dataclass is made: its __init__ (and any assignment) stores through the setter
Result.image = property(_rgb_image, _set_rgb_image, doc="The RGB original, converted from ``bgr`` on first use.")


def _colour(c: int) -> tuple[int, int, int]:
    palette = [(56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207), (10, 249, 72),
               (23, 204, 146), (134, 219, 61), (52, 147, 26), (187, 212, 0), (168, 153, 44), (255, 194, 0),
               (147, 69, 52), (255, 115, 100), (236, 24, 0), (255, 56, 132), (133, 0, 82), (255, 56, 203)]
    return palette[c % len(palette)]


# ----------------------------------------------------------------------------------------------------- sources
@dataclass
class Source:
    """What to read: ``kind`` is images, video or stream; ``items`` are image paths or one capture target."""

    kind: str
    items: list[Any]
    fps: float = 30.0
    size: tuple[int, int] = (0, 0)  # video (width, height)
    frames: int = 0  # video frame count as the container says (0 for streams)
    root: Path | None = None  # images: the folder their outputs' subfolders are taken relative to


def _images_of(files: list[Path], where: str) -> list[Path]:
    """The images among ``files``; videos among them are named in a warning, as a folder is read for images."""
    videos = [f for f in files if f.suffix.lower() in VIDEO_SUFFIXES]
    if videos:
        shown = ", ".join(str(v) for v in videos[:3]) + (", ..." if len(videos) > 3 else "")
        log.warning("%s: %d video(s) left out (%s): a folder or pattern is read for its images; give each video as "
                    "its own --source", where, len(videos), shown)
    return [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]


def _common_folder(files: list[Path]) -> Path:
    return Path(os.path.commonpath([str(f.parent.absolute()) for f in files]))


def output_names(source: Source) -> dict[str, tuple[Path, Path]]:
    """Image path -> (annotated image, label file), relative to the run folder: the image's path below the
    source folder (so ``a/img.jpg`` and ``b/img.jpg`` keep a file each) and its label beside under ``labels/``;
    two images that differ only in suffix (``img.jpg``, ``img.png``) get ``img.jpg.txt`` and ``img.png.txt``."""
    if source.kind != "images":
        return {}
    root = (source.root or _common_folder(source.items)).absolute()
    relative = {str(p): (p.absolute().relative_to(root) if p.absolute().is_relative_to(root) else Path(p.name))
                for p in source.items}
    stems: dict[Path, int] = {}
    for rel in relative.values():
        stems[rel.with_suffix("")] = stems.get(rel.with_suffix(""), 0) + 1
    names = {}
    for path, rel in relative.items():
        label = rel.with_suffix(".txt") if stems[rel.with_suffix("")] == 1 else rel.with_name(rel.name + ".txt")
        names[path] = (rel, Path("labels") / label)
    shared = sorted({str(rel.with_suffix("")) for rel in relative.values() if stems[rel.with_suffix("")] > 1})
    if shared:
        log.warning("%d image name(s) differ only in their suffix (%s): their label files keep the suffix "
                    "(<name>.<suffix>.txt) so that none overwrites another", len(shared), ", ".join(shared[:3]))
    if any(rel.parent != Path() for rel, _ in names.values()):
        log.info("outputs mirror the subfolders of %s", root)
    return names


def resolve_source(source: str | int | Path) -> Source:
    """Check a source and say what it is; a missing file, an empty folder or an unopenable video fails here."""
    text = str(source)
    if text.isdigit():  # webcam index
        return _open_capture(int(text), "stream", text)
    if text.lower().startswith(STREAM_PREFIXES):
        return _open_capture(text, "stream", text)
    path = Path(text).expanduser()
    if any(ch in text for ch in "*?["):
        images = _images_of(sorted(Path(p) for p in glob.glob(text, recursive=True)), text)
        if not images:
            raise SourceError(f"{text}: the pattern matches no images")
        return Source("images", images, root=_common_folder(images))
    if path.is_dir():
        images = _images_of(sorted(path.rglob("*")), str(path))
        if not images:
            raise SourceError(f"{path}: folder has no images ({', '.join(IMAGE_SUFFIXES)})")
        return Source("images", images, root=path)
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return _open_capture(str(path), "video", str(path))
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return Source("images", [path])
    raise SourceError(f"{path}: not an image ({', '.join(IMAGE_SUFFIXES)}) or video ({', '.join(VIDEO_SUFFIXES)})")


@contextlib.contextmanager
def _opencv_name(target: str | int) -> Iterator[str | int]:
    """``target`` as OpenCV may be given it: OpenCV's Python binding crashes (segfault) on a name that is not
    valid UTF-8, so such a file is reached through a symlink with a plain name in a temporary folder, for as
    long as the context lasts (an opened capture keeps the file open after the link is gone)."""
    if not isinstance(target, str) or opencv_safe(target) == target:
        yield target
        return
    with tempfile.TemporaryDirectory(prefix="yolo-mobile-") as tmp:
        link = Path(tmp) / ("source" + opencv_safe(Path(target).suffix))
        link.symlink_to(Path(target).resolve())
        yield str(link)


def opencv_safe(name: str) -> str:
    """``name`` with the bytes that are not valid UTF-8 (surrogate escapes in Python) shown as U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _capture(target: str | int) -> cv2.VideoCapture:
    with _opencv_name(target) as name:
        return cv2.VideoCapture(name)


def _open_capture(target: str | int, kind: str, label: str) -> Source:
    cap = _capture(target)
    ok = cap.isOpened()
    if ok:
        fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
        size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if kind == "video" else 0
    cap.release()
    if not ok:
        raise SourceError(f"{label}: OpenCV cannot open this {'video' if kind == 'video' else 'stream or camera'}")
    return Source(kind, [target], fps=fps if fps > 0 else 30.0, size=size, frames=max(frames, 0))


Frame = tuple[np.ndarray, str, "int | None", bool]  # (image, path or URL, frame index, is BGR)


def read_frames(source: Source, stats: dict[str, Any], realtime: bool = False) -> Iterator[Frame]:
    """(image, path or URL, frame index, is BGR): images are read as RGB, video and stream frames stay BGR as
    OpenCV decodes them; unreadable images and frames are skipped and counted. Seconds spent reading add up in
    ``stats["read"]``, frames read in ``stats["read_frames"]``. ``realtime``: a video file is read no faster than
    its frame rate, as a camera delivers frames."""
    stats.setdefault("read", 0.0)
    stats.setdefault("read_frames", 0)
    if source.kind == "images":
        for p in source.items:
            t0 = time.perf_counter()
            try:
                image = read_image(p)
            except OSError as e:
                stats["skipped"] += 1
                log.warning("skipped: %s", e)
                continue
            finally:
                stats["read"] += time.perf_counter() - t0
            stats["read_frames"] += 1
            yield image, str(p), None, False
        return
    cap = _capture(source.items[0])
    index, misses = 0, 0
    start = time.perf_counter()
    try:
        while True:
            if realtime and source.kind == "video":
                time.sleep(max(0.0, start + (index + misses) / source.fps - time.perf_counter()))
            t0 = time.perf_counter()
            ok, frame = cap.read()
            stats["read"] += time.perf_counter() - t0
            if not ok:
                # a video ends when reading fails at its end; a failure before the end is a bad frame
                if source.kind == "video" and index + misses < source.frames and misses < 30:
                    misses += 1
                    stats["skipped"] += 1
                    continue
                break
            stats["read_frames"] += 1
            yield frame, str(source.items[0]), index, True
            index += 1
    finally:
        cap.release()


class _NewestFrame:
    """Reads ``frames`` on its own thread as fast as they come, holding only the newest ``keep``: an older held
    frame is dropped (counted in ``stats["dropped"]``) when a new one arrives, so a slow consumer always gets a
    frame at most ``keep`` frames old when it takes one."""

    def __init__(self, frames: Iterator[Frame], stats: dict[str, Any], keep: int = 1) -> None:
        self.frames, self.stats = frames, stats
        self.held: deque[Frame] = deque()
        self.keep = keep
        self.changed = threading.Condition()
        self.done, self.stop, self.error = False, False, None
        self.thread = threading.Thread(target=self._read, name="yolo-mobile-live", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for item in self.frames:
                with self.changed:
                    if self.stop:
                        break
                    self.held.append(item)
                    while len(self.held) > self.keep:
                        self.held.popleft()
                        self.stats["dropped"] += 1
                    self.changed.notify()
        except BaseException as e:  # handed to the consumer, which raises it
            self.error = e
        finally:
            close = getattr(self.frames, "close", None)
            if callable(close):  # the reading thread closes its own generator (releases the capture)
                close()
            with self.changed:
                self.done = True
                self.changed.notify()

    def take(self) -> Frame | None:
        """The newest frame (waiting for one), or None when the source has ended."""
        with self.changed:
            while not self.held and not self.done:
                self.changed.wait()
            if self.held:
                return self.held.popleft()
        if self.error is not None:
            raise self.error
        return None

    def close(self, wait: float = 5.0) -> None:
        """Stop reading; a read blocked in a stalled stream is left to end on its own after ``wait`` seconds."""
        with self.changed:
            self.stop = True
            self.stats["dropped"] += len(self.held)  # read, never processed
            self.held.clear()
        self.thread.join(wait)


def newest_frames(frames: Iterator[Frame], stats: dict[str, Any], keep: int = 1) -> Iterator[Frame]:
    """``frames`` read ahead on a thread, each item taken being the newest read (see ``_NewestFrame``)."""
    stats.setdefault("dropped", 0)
    reader = _NewestFrame(frames, stats, keep)
    try:
        while (item := reader.take()) is not None:
            yield item
    finally:
        reader.close()


def _run_ahead(items: Iterator, depth: int = 1) -> Iterator:
    """``items``, each produced on a worker thread up to ``depth`` items before it is needed. OpenCV (decode,
    resize) releases the GIL, so this overlaps reading and letterboxing with the model. Closing the result (or an
    error) stops the worker and closes ``items``."""
    if depth < 1:
        yield from items
        return
    end = object()
    pool = ThreadPoolExecutor(1, thread_name_prefix="yolo-mobile-read")
    pending: deque[Future] = deque(pool.submit(next, items, end) for _ in range(depth))
    try:
        while (item := pending.popleft().result()) is not end:
            pending.append(pool.submit(next, items, end))
            yield item
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)  # the one running next() finishes before items is closed
        close = getattr(items, "close", None)
        if callable(close):
            close()


class _Behind:
    """Runs calls in order on one worker thread, at most ``depth`` behind the caller; ``depth`` 0 runs them
    inline. Errors surface at the next ``submit`` or at ``finish``, which waits for every call made so far."""

    def __init__(self, depth: int = 1) -> None:
        self.depth = depth
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="yolo-mobile-write") if depth > 0 else None
        self.pending: deque[Future] = deque()

    def submit(self, fn: Callable, *args: Any) -> None:
        if self.pool is None:
            fn(*args)
            return
        self.pending.append(self.pool.submit(fn, *args))
        while len(self.pending) > self.depth:
            self.pending.popleft().result()

    def finish(self) -> None:
        if self.pool is None:
            return
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True)


def check_classes(classes: list[int] | None, names: list[str]) -> None:
    """``classes`` (a filter on class indices) must name classes the model has."""
    wrong = [c for c in classes or [] if not 0 <= c < len(names)]
    if wrong and names:
        raise ValueError(f"classes {wrong} outside 0..{len(names) - 1} (the model has {len(names)} classes)")


# -------------------------------------------------------------------------------------------------- predicting
def input_shape(shapes: Iterable[tuple[int, int]], imgsz: int, stride: int = 32,
                rect: bool = True) -> tuple[int, int]:
    """The (height, width) a batch of images of ``shapes`` is letterboxed to: the largest height and the largest
    width of their ``rect_shape``s, or the ``imgsz`` square when not ``rect``."""
    if not rect:
        return imgsz, imgsz
    hw = [rect_shape(s, imgsz, stride) for s in shapes]
    return max(h for h, _ in hw), max(w for _, w in hw)


def _batches(frames: Iterator[Frame], batch: int) -> Iterator[list[Frame]]:
    pending: list[Frame] = []
    with contextlib.closing(frames):
        for item in frames:
            pending.append(item)
            if len(pending) == batch:
                yield pending
                pending = []
    if pending:
        yield pending


def predict(backend, source: str | int | Path, imgsz: int = 640, conf: float = CONF, iou: float = IOU,
            max_det: int = MAX_DET, classes: list[int] | None = None, batch: int = 1,
            stats: dict[str, Any] | None = None, resolved: Source | None = None, rect: bool = True,
            prefetch: int = 1, workers: int = 1, drop_frames: bool | None = None) -> Iterator[Result]:
    """Yield one Result per image or frame, in order. ``stats`` (if given) collects counts and per-stage seconds
    (summed per call: with ``prefetch`` or ``workers`` the stages overlap, so they add up to more than the wall time).

    ``rect``: letterbox to the smallest stride multiple holding each frame at ``imgsz`` (a fixed-size ONNX model
    always gets its square). ``prefetch``: batches read and letterboxed ahead on a worker thread (0: inline).
    ``workers``: for a video or stream (every batch the same shape), batches run through ``backend`` (and NMS) on
    this many threads at once; the backend must be thread-safe (``TorchRuntime`` and ``OnnxRuntime`` are), and
    workers x torch threads should not exceed the CPUs (``detect`` sets both). Images run one batch at a time.
    ``drop_frames``: process the newest frame and drop stale ones (default: for webcams and streams, not files;
    see ``live_drops``); ``stats`` then counts frames read, processed ("frames") and dropped.
    """
    stats = stats if stats is not None else {}
    stats.update({"frames": 0, "skipped": 0, "boxes": 0, "read": 0.0, "pre": 0.0, "inference": 0.0, "nms": 0.0,
                  "read_frames": 0, "dropped": 0})
    src = resolved or resolve_source(source)
    drop = live_drops(src, drop_frames)
    stats["drop_frames"] = drop
    if drop:
        prefetch = 0  # a batch letterboxed ahead would wait for the model and grow stale
    size = check_imgsz(backend.imgsz or imgsz)
    check_classes(classes, backend.names)
    stride = int(getattr(backend, "stride", 32))
    square = not rect or backend.imgsz is not None
    batch = backend.batch or batch
    workers = 1 if src.kind == "images" else max(1, workers)

    def prepared():
        frames = read_frames(src, stats, realtime=drop)
        if drop:
            frames = newest_frames(frames, stats)
        with contextlib.closing(_batches(frames, batch)) as batches:
            for items in batches:
                t0 = time.perf_counter()
                shape = input_shape((img.shape[:2] for img, *_ in items), size, stride, rect=not square)
                x, infos = letterbox_batch([f[0] for f in items], shape, [f[3] for f in items])
                yield items, x, infos, time.perf_counter() - t0

    def infer(items: list[Frame], x: torch.Tensor, infos: list[LetterboxInfo], pre_s: float):
        t1 = time.perf_counter()
        n = len(items)
        if backend.batch and n < backend.batch:  # a fixed-batch ONNX model: pad the last batch
            x = torch.cat([x, x[-1:].expand(backend.batch - n, -1, -1, -1)])
        out = backend(x)
        t2 = time.perf_counter()
        if backend.nms_inside:
            dets, counts = out
            results = []
            for k in range(n):
                d = dets[k, : int(counts[k])]
                keep = d[:, 4] > conf
                if classes is not None:
                    keep &= torch.isin(d[:, 5].long(), torch.as_tensor(classes))
                d = d[keep]
                results.append({"boxes": d[:, :4], "scores": d[:, 4], "classes": d[:, 5].long()})
        else:
            results = non_max_suppression(out[:n], conf=conf, iou=iou, max_det=max_det, classes=classes)
        times = {"pre": pre_s, "inference": t2 - t1, "nms": time.perf_counter() - t2}
        return items, infos, results, times, tuple(x.shape[2:])

    def emit(items, infos, results, times, shape) -> Iterator[Result]:
        for k, v in times.items():
            stats[k] += v
        stats["shape"] = shape  # (height, width) the model ran at, last batch
        for (img, path, frame, bgr), info, r in zip(items, infos, results, strict=True):
            stats["frames"] += 1
            stats["boxes"] += len(r["scores"])
            yield Result(unletterbox_boxes(r["boxes"], info), r["scores"], r["classes"], backend.names, path,
                         frame, img.shape[:2], image=None if bgr else img, bgr=img if bgr else None)

    batches = _run_ahead(prepared(), prefetch)
    with contextlib.closing(batches):
        if workers == 1:
            for b in batches:
                yield from emit(*infer(*b))
            return
        pool = ThreadPoolExecutor(workers, thread_name_prefix="yolo-mobile-infer")
        in_flight: deque[Future] = deque()
        try:
            for b in batches:
                in_flight.append(pool.submit(infer, *b))
                if len(in_flight) == workers:
                    yield from emit(*in_flight.popleft().result())
            while in_flight:
                yield from emit(*in_flight.popleft().result())
        finally:
            for f in in_flight:
                f.cancel()
            pool.shutdown(wait=True)


def live_drops(source: Source, drop_frames: bool | None = None) -> bool:
    """Whether ``predict`` drops stale frames: ``drop_frames`` if given (images never drop), else for a live
    source (webcam, stream) only: a file waits for the model, a camera does not."""
    if source.kind == "images":
        return False
    return source.kind == "stream" if drop_frames is None else drop_frames


def detect_parallelism(backend, source: Source) -> tuple[int, int | None]:
    """(inference workers, torch threads) for ``detect``: a video or stream on the CPU through our PyTorch backend
    runs two frames at once, each on half the usable CPUs (2 cores: 1 thread each). Measured on a 2-core CPU
    (yolov5n, 384x640): 85 ms a frame on 1 thread, 58 ms on 2, 46 ms with two 1-thread workers; and 2 threads
    are 10x slower when another process keeps a core busy (each of the hundreds of parallel regions waits for a
    descheduled thread), while 1-thread workers just share it. Anything else (images, CUDA, ONNX Runtime, a
    wrapped backend whose thread-safety is unknown) runs one batch at a time with torch's threads as they are."""
    if source.kind == "images" or type(backend) is not TorchRuntime or backend.device.type != "cpu":
        return 1, None
    cpus = usable_cpus()
    workers = 2 if cpus >= 2 else 1
    return workers, max(1, cpus // workers)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Set torch's intra-op threads to ``n`` (None: leave them) and restore the previous count on exit."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _draw_and_save(r: Result, writer_args: tuple, state: dict, save_dir: Path, save: bool, show: bool,
                   output: Path | None) -> None:
    canvas = r.plot()
    if save and output is not None:
        (save_dir / output).parent.mkdir(parents=True, exist_ok=True)
        write_image(save_dir / output, canvas)
    elif save:
        if state.get("writer") is None:
            h, w = canvas.shape[:2]
            path, fps = writer_args
            # written under a temporary name (the suffix tells OpenCV the container) and renamed once closed
            path = Path(opencv_safe(str(path)))  # OpenCV writes the name with bytes that are not UTF-8 as U+FFFD
            state["video"] = (path.with_name(f".{path.stem}.partial{path.suffix}"), path)
            state["writer"] = cv2.VideoWriter(str(state["video"][0]), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
        state["writer"].write(canvas)
    if show:
        cv2.imshow("yolo-mobile", canvas)
        cv2.waitKey(1)


def detect(backend, source: str | int | Path, save_dir: Path, imgsz: int = 640, conf: float = CONF,
           iou: float = IOU, max_det: int = MAX_DET, classes: list[int] | None = None, batch: int = 1,
           save: bool = True, save_txt: bool = False, save_json: bool = False, show: bool = False,
           progress: bool = True, rect: bool = True, threads: int | None = None, workers: int | None = None,
           overlap: bool = True, drop_frames: bool | None = None) -> dict[str, Any]:
    """Run ``predict`` and write annotated images or a video, labels and JSON under ``save_dir``.

    ``workers``, ``threads``: batches run at once and torch intra-op threads while this runs (default
    ``detect_parallelism``; the caller's thread count is restored afterwards; ``threads`` alone keeps one worker).
    ``overlap``: read and letterbox ahead, and draw and write behind, on worker threads
    (``show`` draws on the calling thread, as GUI calls must). Ctrl-C stops cleanly: a video written so far is
    closed and stays playable. ``drop_frames``: as in ``predict`` (default: live sources drop stale frames).
    """
    from tqdm import tqdm

    src = resolve_source(source)  # fails before any output folder or model work
    if show and os.name == "posix" and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        log.warning("--show needs a display; none is set, so frames are only saved")
        show = False
    save_dir.mkdir(parents=True, exist_ok=True)
    stats: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    state: dict[str, Any] = {"writer": None}
    total = len(src.items) if src.kind == "images" else (src.frames or None)
    bar = tqdm(total=total, unit="frame", desc="detect", disable=not progress, dynamic_ncols=True)
    timed = {"draw": 0.0, "labels": 0.0}  # seconds on the drawing thread, and on this one

    outputs = output_names(src)

    def draw(r: Result, stem: str) -> None:
        t0 = time.perf_counter()
        output = outputs[r.path][0] if src.kind == "images" else None
        _draw_and_save(r, (save_dir / f"{stem}.mp4", src.fps), state, save_dir, save, show, output)
        timed["draw"] += time.perf_counter() - t0

    behind = _Behind(1 if overlap and not show else 0)
    start = time.perf_counter()
    interrupted = False
    if workers is None and threads is None:
        workers, threads = detect_parallelism(backend, src)
    stats["workers"], stats["threads"] = workers or 1, threads or torch.get_num_threads()
    with torch_threads(threads):
        try:
            for r in predict(backend, source, imgsz, conf, iou, max_det, classes, batch, stats, resolved=src,
                             rect=rect, prefetch=1 if overlap else 0, workers=workers or 1,
                             drop_frames=drop_frames):
                stem = Path(r.path).stem if src.kind != "stream" else "stream"
                if save or show:
                    behind.submit(draw, r, stem)
                t0 = time.perf_counter()
                if save_txt:
                    label = outputs[r.path][1] if r.frame is None else Path("labels") / f"{stem}_{r.frame}.txt"
                    (save_dir / label).parent.mkdir(parents=True, exist_ok=True)
                    write_text(save_dir / label, "\n".join(r.yolo_lines()) + ("\n" if len(r) else ""))
                if save_json:
                    records += [{"image": r.path, "frame": r.frame, "class": int(c), "name": r.names[int(c)],
                                 "score": round(float(s), 5), "box_xyxy": [round(v, 2) for v in b]}
                                for b, s, c in zip(r.boxes.tolist(), r.scores.tolist(), r.classes.tolist(),
                                                   strict=True)]
                timed["labels"] += time.perf_counter() - t0
                bar.update(1)
                bar.set_postfix(fps=f"{stats['frames'] / (time.perf_counter() - start):.1f}")
        except KeyboardInterrupt:
            interrupted = True
            log.warning("interrupted: keeping the %d frames done so far", stats.get("frames", 0))
        finally:
            try:
                behind.finish()  # every frame handed over is drawn and written before the file is closed
            finally:
                bar.close()
                if state["writer"] is not None:
                    state["writer"].release()  # a stop part-way keeps the frames so far, as a playable file
                    publish(*state["video"])
                if show:
                    cv2.destroyAllWindows()
    if save_json:
        write_text(save_dir / "predictions.json", json.dumps(records))
    if not stats.get("frames") and not interrupted:
        log.warning("%s: no %s could be read, so nothing was saved", source,
                    "image" if src.kind == "images" else "frame")
        with contextlib.suppress(OSError):  # only when nothing at all was written (an empty folder)
            save_dir.rmdir()
    n = max(stats.get("frames", 0), 1)
    stats["draw"] = timed["draw"] + timed["labels"]
    stats["wall"] = time.perf_counter() - start
    stats["interrupted"] = interrupted
    stats["ms_per_frame"] = {k: 1000 * stats[k] / n for k in ("read", "pre", "inference", "nms", "draw")}
    return stats
