"""YOLO label files and image files: reading them, and saying exactly what is wrong with a bad one."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ..files import write_bytes

log = logging.getLogger(__name__)
# a coordinate this far outside [0, 1] is a rounding error of the tool that wrote it (1.0000001), clipped to [0, 1]
ROUNDING = 1e-4


class LabelError(ValueError):
    """A label file that cannot be used; the message names the file and line."""


def label_path(image: Path) -> Path:
    """YOLO's convention: the last 'images' folder in the path becomes 'labels', the suffix becomes .txt."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def read_yolo_labels(path: Path, nc: int) -> np.ndarray:
    """Rows of (class, cx, cy, w, h), normalised. A missing file means no objects.

    Raises LabelError naming the file and line for a malformed line, a class id outside 0..nc-1,
    or coordinates outside [0, 1] (beyond ``ROUNDING``, which is clipped). A line repeated exactly is read once,
    with one warning for the file.
    """
    if not path.is_file():
        return np.zeros((0, 5), np.float32)
    rows = []
    # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first class id
    for n, line in enumerate(path.read_text(encoding="utf-8-sig", errors="replace").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5:
            raise LabelError(f"{path}:{n}: expected 5 values 'class cx cy w h', got {len(fields)}: {line.strip()!r}")
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise LabelError(f"{path}:{n}: not a number in {line.strip()!r}") from None
        if not all(np.isfinite(values)):  # nan, inf and overflowing literals such as 1e400
            raise LabelError(f"{path}:{n}: not a finite number in {line.strip()!r}")
        cls = values[0]
        if cls != int(cls) or not 0 <= cls < nc:
            raise LabelError(f"{path}:{n}: class id {fields[0]} outside 0..{nc - 1} (the data YAML has {nc} names)")
        if min(values[1:]) < -ROUNDING or max(values[1:]) > 1 + ROUNDING or values[3] <= 0 or values[4] <= 0:
            raise LabelError(f"{path}:{n}: box {fields[1:]} is not normalised xywh inside [0, 1]")
        rows.append([cls, *(min(max(v, 0.0), 1.0) for v in values[1:])])
    unique = list(dict.fromkeys(map(tuple, rows)))
    if len(unique) < len(rows):
        log.warning("%s: %d duplicated line(s) dropped (each object counts once)", path, len(rows) - len(unique))
    return np.array(unique, np.float32).reshape(-1, 5)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, as stored (no EXIF rotation: labels refer to stored pixels)."""
    try:
        with Image.open(path) as im:
            return im.size
    except OSError:
        raise
    except Exception as e:  # ultralytics, once imported, patches Image.open to ask for pi-heif on any failure
        raise OSError(f"cannot identify image file {str(path)!r} ({type(e).__name__})") from None


def decode_image(path: Path, flags: int = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) -> np.ndarray:
    """BGR uint8 image decoded from the file's bytes. Python opens the file, so any name works: OpenCV's own
    ``imread`` crashes on a name that is not valid UTF-8. Raises OSError naming the file when it cannot."""
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as e:
        raise OSError(f"{path}: cannot read image ({e.strerror or e})") from None
    bgr = cv2.imdecode(data, flags) if data.size else None
    if bgr is None:
        raise OSError(f"{path}: cannot read image ({'empty file' if not data.size else 'corrupt or not an image'})")
    return bgr


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 HxWx3, as stored (no EXIF rotation, to match image_size and the labels)."""
    return cv2.cvtColor(decode_image(path), cv2.COLOR_BGR2RGB)


def write_image(path: Path, bgr: np.ndarray, params: Sequence[int] = ()) -> None:
    """Encode by the suffix and write through Python, so any file name works (see ``decode_image``)."""
    ok, data = cv2.imencode(Path(path).suffix or ".jpg", bgr, list(params))
    if not ok:
        raise OSError(f"{path}: OpenCV cannot encode an image of this type")
    write_bytes(path, data.tobytes())


def yolo_to_xyxy(labels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Normalised cx, cy, w, h -> pixel x1, y1, x2, y2 (the one box format inside the code)."""
    cx, cy, w, h = (labels[:, i] for i in range(1, 5))
    return np.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], 1)
