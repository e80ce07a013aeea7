"""Prediction on images, folders, globs, videos, webcams and streams, with a PyTorch or ONNX Runtime model.

Sources are checked before any work starts; frames are read with OpenCV, letterboxed, batched, run, passed
through the shared NMS and mapped back to original pixels.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ..config import IMAGE_SUFFIXES
from ..datasets.labels import read_image
from ..datasets.letterbox import letterbox, unletterbox_boxes
from .postprocess import non_max_suppression

log = logging.getLogger(__name__)
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".wmv", ".mpeg", ".mpg")
STREAM_PREFIXES = ("rtsp://", "rtmp://", "http://", "https://")


class SourceError(FileNotFoundError):
    """A source that cannot be read; raised before any work starts."""


@dataclass
class Result:
    """Detections of one image or frame: xyxy boxes in original pixels, scores, 0-based classes."""

    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor
    names: list[str]
    path: str
    frame: int | None = None  # index within a video or stream
    orig_shape: tuple[int, int] = (0, 0)  # (height, width)
    image: np.ndarray | None = field(default=None, repr=False)  # RGB original

    def __len__(self) -> int:
        return len(self.scores)

    def plot(self) -> np.ndarray:
        """The original image (BGR, for OpenCV) with boxes and labels drawn."""
        canvas = cv2.cvtColor(self.image, cv2.COLOR_RGB2BGR)
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


def resolve_source(source: str | int | Path) -> Source:
    """Check a source and say what it is; a missing file, an empty folder or an unopenable video fails here."""
    text = str(source)
    if text.isdigit():  # webcam index
        return _open_capture(int(text), "stream", text)
    if text.lower().startswith(STREAM_PREFIXES):
        return _open_capture(text, "stream", text)
    path = Path(text).expanduser()
    if any(ch in text for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True))
        images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise SourceError(f"{text}: the pattern matches no images")
        return Source("images", images)
    if path.is_dir():
        images = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise SourceError(f"{path}: folder has no images ({', '.join(IMAGE_SUFFIXES)})")
        return Source("images", images)
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return _open_capture(str(path), "video", str(path))
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return Source("images", [path])
    raise SourceError(f"{path}: not an image ({', '.join(IMAGE_SUFFIXES)}) or video ({', '.join(VIDEO_SUFFIXES)})")


def _open_capture(target: str | int, kind: str, label: str) -> Source:
    cap = cv2.VideoCapture(target)
    ok = cap.isOpened()
    if ok:
        fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
        size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if kind == "video" else 0
    cap.release()
    if not ok:
        raise SourceError(f"{label}: OpenCV cannot open this {'video' if kind == 'video' else 'stream or camera'}")
    return Source(kind, [target], fps=fps if fps > 0 else 30.0, size=size, frames=max(frames, 0))


def read_frames(source: Source, stats: dict[str, int]) -> Iterator[tuple[np.ndarray, str, int | None]]:
    """(RGB frame, path or URL, frame index); unreadable images and frames are skipped and counted."""
    if source.kind == "images":
        for p in source.items:
            try:
                yield read_image(p), str(p), None
            except OSError as e:
                stats["skipped"] += 1
                log.warning("skipped: %s", e)
        return
    cap = cv2.VideoCapture(source.items[0])
    index, misses = 0, 0
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                # a video ends when reading fails at its end; a failure before the end is a bad frame
                if source.kind == "video" and index + misses < source.frames and misses < 30:
                    misses += 1
                    stats["skipped"] += 1
                    continue
                break
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), str(source.items[0]), index
            index += 1
    finally:
        cap.release()


# ----------------------------------------------------------------------------------------------------- models
class TorchBackend:
    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu", half: bool = False) -> None:
        self.device = torch.device(device)
        if half and self.device.type != "cuda":
            raise ValueError("--half needs a CUDA device")
        from ..detector import inference_copy

        self.model = inference_copy(model, self.device, half)
        self.dtype = torch.float16 if half else torch.float32
        self.names = list(getattr(model, "names", [str(i) for i in range(model.nc)]))
        self.batch, self.imgsz, self.nms_inside = None, None, False

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
        return self.model(x).float().cpu()


class OnnxBackend:
    """An exported model run by ONNX Runtime; names, size, batch and embedded NMS come from its metadata."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), providers=providers)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.names = json.loads(meta["names"]) if "names" in meta else None
        shape = self.session.get_inputs()[0].shape
        self.batch = shape[0] if isinstance(shape[0], int) else None
        self.imgsz = int(meta["imgsz"]) if "imgsz" in meta and meta.get("dynamic") != "true" else None
        self.nms_inside = meta.get("nms") == "true"
        self.input_name = self.session.get_inputs()[0].name
        self.dtype = np.float16 if "float16" in self.session.get_inputs()[0].type else np.float32
        if self.names is None:
            n = self.session.get_outputs()[0].shape[1]
            self.names = [str(i) for i in range(n - 4)] if isinstance(n, int) else []

    def __call__(self, x: torch.Tensor) -> Any:
        outputs = self.session.run(None, {self.input_name: x.numpy().astype(self.dtype)})
        if self.nms_inside:
            return torch.from_numpy(outputs[0]).float(), torch.from_numpy(outputs[1])
        return torch.from_numpy(outputs[0]).float()


def load_backend(weights: str | Path | None = None, cfg: str | None = None, device: torch.device | str = "cpu",
                 half: bool = False):
    """A ``.pt`` checkpoint or a model YAML (PyTorch) or an ``.onnx`` file (ONNX Runtime)."""
    if weights is not None and str(weights).endswith(".onnx"):
        if not Path(weights).is_file():
            raise SourceError(f"{weights}: no such ONNX file")
        return OnnxBackend(weights, device)
    if weights is not None:
        from .checkpoint import load_model

        return TorchBackend(load_model(weights), device, half)
    from ..detector import build_model

    return TorchBackend(build_model(cfg), device, half)


# -------------------------------------------------------------------------------------------------- predicting
def predict(backend, source: str | int | Path, imgsz: int = 640, conf: float = 0.25, iou: float = 0.7,
            max_det: int = 300, classes: list[int] | None = None, batch: int = 1,
            stats: dict[str, Any] | None = None, resolved: Source | None = None) -> Iterator[Result]:
    """Yield one Result per image or frame. ``stats`` (if given) collects counts and per-stage seconds."""
    stats = stats if stats is not None else {}
    stats.update({"frames": 0, "skipped": 0, "pre": 0.0, "inference": 0.0, "nms": 0.0})
    src = resolved or resolve_source(source)
    size = backend.imgsz or imgsz
    if size % 32:
        raise ValueError(f"imgsz must be a multiple of 32, got {size}")
    batch = backend.batch or batch
    pending: list[tuple[np.ndarray, str, int | None]] = []

    def run(items):
        t0 = time.perf_counter()
        boxed = [letterbox(img, (size, size)) for img, _, _ in items]
        x = torch.from_numpy(np.stack([b.transpose(2, 0, 1) for b, _ in boxed])).float() / 255
        if backend.batch and len(items) < backend.batch:  # a fixed-batch ONNX model: pad the last batch
            x = torch.cat([x, x[-1:].expand(backend.batch - len(items), -1, -1, -1)])
        t1 = time.perf_counter()
        out = backend(x)
        t2 = time.perf_counter()
        if backend.nms_inside:
            dets, counts = out
            results = []
            for k in range(len(items)):
                d = dets[k, : int(counts[k])]
                keep = d[:, 4] > conf
                if classes is not None:
                    keep &= torch.isin(d[:, 5].long(), torch.as_tensor(classes))
                d = d[keep]
                results.append({"boxes": d[:, :4], "scores": d[:, 4], "classes": d[:, 5].long()})
        else:
            results = non_max_suppression(out[: len(items)], conf=conf, iou=iou, max_det=max_det, classes=classes)
        t3 = time.perf_counter()
        stats["pre"] += t1 - t0
        stats["inference"] += t2 - t1
        stats["nms"] += t3 - t2
        for (img, path, frame), (_, info), r in zip(items, boxed, results, strict=True):
            stats["frames"] += 1
            yield Result(unletterbox_boxes(r["boxes"], info), r["scores"], r["classes"], backend.names, path,
                         frame, img.shape[:2], img)

    for item in read_frames(src, stats):
        pending.append(item)
        if len(pending) == batch:
            yield from run(pending)
            pending = []
    if pending:
        yield from run(pending)


def detect(backend, source: str | int | Path, save_dir: Path, imgsz: int = 640, conf: float = 0.25,
           iou: float = 0.7, max_det: int = 300, classes: list[int] | None = None, batch: int = 1,
           save: bool = True, save_txt: bool = False, save_json: bool = False, show: bool = False,
           progress: bool = True) -> dict[str, Any]:
    """Run ``predict`` and write annotated images or a video, labels and JSON under ``save_dir``.

    Ctrl-C stops cleanly: a video written so far is closed and stays playable.
    """
    from tqdm import tqdm

    src = resolve_source(source)  # fails before any output folder or model work
    if show and os.name == "posix" and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        log.warning("--show needs a display; none is set, so frames are only saved")
        show = False
    save_dir.mkdir(parents=True, exist_ok=True)
    stats: dict[str, Any] = {}
    writer, records, draw_s = None, [], 0.0
    total = len(src.items) if src.kind == "images" else (src.frames or None)
    bar = tqdm(total=total, unit="frame", desc="detect", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    interrupted = False
    try:
        for r in predict(backend, source, imgsz, conf, iou, max_det, classes, batch, stats, resolved=src):
            stem = Path(r.path).stem if src.kind != "stream" else "stream"
            name = stem if r.frame is None else f"{stem}_{r.frame}"
            t0 = time.perf_counter()
            if save or show:
                canvas = r.plot()
                if save and src.kind == "images":
                    cv2.imwrite(str(save_dir / Path(r.path).name), canvas)
                elif save:
                    if writer is None:
                        h, w = canvas.shape[:2]
                        out_path = save_dir / f"{stem}.mp4"
                        writer = cv2.VideoWriter(str(out_path), cv2.VideoWriter_fourcc(*"mp4v"), src.fps, (w, h))
                    writer.write(canvas)
                if show:
                    cv2.imshow("yolo-mobile", canvas)
                    cv2.waitKey(1)
            if save_txt:
                (save_dir / "labels").mkdir(exist_ok=True)
                (save_dir / "labels" / f"{name}.txt").write_text("\n".join(r.yolo_lines()) + ("\n" if len(r) else ""))
            if save_json:
                records += [{"image": r.path, "frame": r.frame, "class": int(c), "name": r.names[int(c)],
                             "score": round(float(s), 5), "box_xyxy": [round(v, 2) for v in b]}
                            for b, s, c in zip(r.boxes.tolist(), r.scores.tolist(), r.classes.tolist(), strict=True)]
            draw_s += time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(fps=f"{stats['frames'] / (time.perf_counter() - start):.1f}")
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: keeping the %d frames done so far", stats.get("frames", 0))
    finally:
        bar.close()
        if writer is not None:
            writer.release()
        if show:
            cv2.destroyAllWindows()
    if save_json:
        (save_dir / "predictions.json").write_text(json.dumps(records))
    n = max(stats.get("frames", 0), 1)
    stats["draw"] = draw_s
    stats["interrupted"] = interrupted
    stats["ms_per_frame"] = {k: 1000 * stats[k] / n for k in ("pre", "inference", "nms", "draw")}
    return stats
