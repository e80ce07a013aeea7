"""Where training images come from: decoded once at the largest size training can ask for, then served from an
in-memory cache (``ram``), ``.npy`` files (``disk``) or a buffer of recently decoded images (no cache).

Images are kept BGR uint8 (as OpenCV decodes them); the dataset turns them to RGB in its last copy. The stored
size of an image is its original size, shrunk (never enlarged) so that its long side is at most ``max_size``:
every size the multi-scale sampler asks for is then made from the original pixels, or from no fewer pixels
than the largest size needs. A JPEG larger than twice that is decoded at 1/2, 1/4 or 1/8 scale by the
decoder itself (its DCT scaling), which is several times faster than decoding it whole and shrinking it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from multiprocessing.pool import ThreadPool
from pathlib import Path

import cv2
import numpy as np

from .. import resources
from ..config import ConfigError
from ..files import write_with
from .labels import decode_image
from .letterbox import fit_shape

log = logging.getLogger(__name__)
CACHE_MODES = (None, "ram", "disk")
DISK_VERSION = 1
JPEG = {".jpg", ".jpeg", ".jpe"}
BUFFER_BYTES = 256 * 2**20  # the buffer of recent images holds at most this much (and at least 8 images)
_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


def stored_shape(height: int, width: int, max_size: int) -> tuple[int, int]:
    """(h, w) an original of (height, width) is kept at: shrunk to a long side of ``max_size``, never enlarged."""
    return fit_shape((height, width), (max_size, max_size), enlarge=False)


def decode(path: Path, shape: tuple[int, int], orig: tuple[int, int]) -> np.ndarray:
    """BGR uint8 image of exactly ``shape`` = (h, w) from the file whose stored size is ``orig`` = (h, w);
    no EXIF rotation (labels refer to the stored pixels). Raises OSError for an unreadable file."""
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    if path.suffix.lower() in JPEG:
        for factor, reduced in _REDUCED:  # the decoder's own downscaling, when enough pixels remain
            if math.ceil(orig[0] / factor) >= shape[0] and math.ceil(orig[1] / factor) >= shape[1]:
                flags = reduced | cv2.IMREAD_IGNORE_ORIENTATION
                break
    image = decode_image(path, flags)
    if image.shape[:2] != shape:  # linear down to half the size (fast), pixel areas below that (no aliasing)
        halved = image.shape[0] >= 2 * shape[0] or image.shape[1] >= 2 * shape[1]
        image = cv2.resize(image, (shape[1], shape[0]), interpolation=cv2.INTER_AREA if halved else cv2.INTER_LINEAR)
    return image


def _threads() -> int:
    return min(8, resources.usable_cpus())


class ImageStore:
    """``store.get(i)``: image ``i`` at its stored size, BGR uint8 (H, W, 3); treat it as read-only.

    ``cache``: None (decode; the last ``buffer_size`` images, at most 256 MiB, stay in a buffer, so an image
    is decoded at most once per epoch and mosaic partners come from the buffer), ``"ram"`` (all images
    decoded up front into one array, if it fits in half the free memory) or ``"disk"`` (one ``.npy`` per image
    under ``disk_dir``, written once and rewritten when the image file changes).
    """

    def __init__(self, paths: Sequence[Path], orig_shapes: Sequence[tuple[int, int]], max_size: int,
                 cache: str | None = None, buffer_size: int = 128, disk_dir: Path | None = None) -> None:
        if cache not in CACHE_MODES:
            raise ConfigError(f"unknown image cache '{cache}'; valid: ram, disk (or none)")
        self.paths = [Path(p) for p in paths]
        self.orig = [tuple(s) for s in orig_shapes]
        self.max_size = max_size
        self.shapes = [stored_shape(h, w, max_size) for h, w in self.orig]
        self.buffer_size = max(1, buffer_size)
        self.buffer: OrderedDict[int, np.ndarray] = OrderedDict()
        self._buffered = 0  # bytes in the buffer
        self.ram: np.ndarray | None = None
        self.disk_files: list[Path] | None = None
        self.decoded = 0  # images decoded by this process (tests and benchmarks read it)
        self.cache = cache
        if cache == "ram" and not self._fill_ram():
            self.cache = None
        elif cache == "disk":
            self._fill_disk(disk_dir)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def nbytes(self) -> int:
        """Bytes all images take at their stored size."""
        return sum(h * w * 3 for h, w in self.shapes)

    # --------------------------------------------------------------------------------------------- reading
    def _decode(self, i: int) -> np.ndarray:
        self.decoded += 1
        return decode(self.paths[i], self.shapes[i], self.orig[i])

    def get(self, i: int) -> np.ndarray:
        if self.ram is not None and self._ram_ok[i]:
            o = self._offsets[i]
            h, w = self.shapes[i]
            return self.ram[o: o + h * w * 3].reshape(h, w, 3)
        image = self.buffer.get(i)
        if image is not None:
            return image
        image = self._load_disk(i) if self.disk_files is not None else self._decode(i)
        self.buffer[i] = image
        self._buffered += image.nbytes
        while len(self.buffer) > self.buffer_size or (self._buffered > BUFFER_BYTES and len(self.buffer) > 8):
            self._buffered -= self.buffer.popitem(last=False)[1].nbytes
        return image

    def clear_buffer(self) -> None:
        self.buffer.clear()
        self._buffered = 0

    def random_index(self, rng, minimum: int = 8) -> int:
        """A mosaic partner: any image when all are in memory, else one of the buffered images (a random one
        while the buffer holds fewer than ``minimum``, so the first mosaics are not of one image)."""
        if self.ram is not None or len(self.buffer) < min(minimum, len(self.paths)):
            return rng.randrange(len(self.paths))
        keys = list(self.buffer)
        return keys[rng.randrange(len(keys))]

    # ------------------------------------------------------------------------------------------------- ram
    def _fill_ram(self) -> bool:
        import torch

        need = self.nbytes
        free = resources.available_bytes(torch.device("cpu"))
        if free is not None and need > free / 2:
            log.warning("--cache ram: %d images at up to %d px need %.2f GiB, more than half the %.2f GiB of "
                        "free memory; training without an image cache (--cache disk keeps them as .npy files)",
                        len(self), self.max_size, need / resources.GiB, free / resources.GiB)
            return False
        log.info("caching %d images in RAM at up to %d px: %.2f GiB", len(self), self.max_size, need / resources.GiB)
        sizes = [h * w * 3 for h, w in self.shapes]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.ram = np.empty(int(self._offsets[-1]), np.uint8)
        self._ram_ok = np.zeros(len(self), bool)

        def fill(i: int) -> None:
            try:
                image = decode(self.paths[i], self.shapes[i], self.orig[i])
            except OSError as e:
                log.warning("not cached: %s", e)
                return
            o = self._offsets[i]
            self.ram[o: o + sizes[i]] = image.reshape(-1)
            self._ram_ok[i] = True

        with ThreadPool(_threads()) as pool:  # cv2.imdecode releases the GIL
            pool.map(fill, range(len(self)))
        return True

    # ------------------------------------------------------------------------------------------------ disk
    def _disk_name(self, i: int) -> tuple[str, str]:
        path = self.paths[i].resolve()
        st = path.stat()
        stem = hashlib.sha1(os.fsencode(path)).hexdigest()[:16]
        h, w = self.shapes[i]
        version = hashlib.sha1(f"v{DISK_VERSION}:{st.st_size}:{st.st_mtime_ns}:{h}x{w}".encode()).hexdigest()[:12]
        return stem, f"{stem}_{version}.npy"

    def _fill_disk(self, disk_dir: Path | None) -> None:
        from .synthetic import cache_dir

        folder = Path(disk_dir) if disk_dir is not None else cache_dir() / "images"
        folder.mkdir(parents=True, exist_ok=True)
        self.disk_files = [folder / "missing.npy"] * len(self)
        todo = []
        for i in range(len(self)):
            try:
                stem, name = self._disk_name(i)
            except OSError:
                continue  # unreadable now: reading it during training says so and skips it
            self.disk_files[i] = folder / name
            if not self.disk_files[i].is_file():
                todo.append((i, stem))
        if todo:
            log.info("caching %d images as .npy in %s at up to %d px", len(todo), folder, self.max_size)

        def write(job: tuple[int, str]) -> None:
            i, stem = job
            try:
                image = decode(self.paths[i], self.shapes[i], self.orig[i])
            except OSError as e:
                log.warning("not cached: %s", e)
                return
            target = self.disk_files[i]
            for old in folder.glob(f"{stem}_*.npy"):  # an earlier version of this image
                if old != target:
                    old.unlink(missing_ok=True)
            write_with(target, lambda f: np.save(f, image, allow_pickle=False))

        with ThreadPool(_threads()) as pool:
            pool.map(write, todo)

    def _load_disk(self, i: int) -> np.ndarray:
        try:
            image = np.load(self.disk_files[i], allow_pickle=False)
            if image.shape == (*self.shapes[i], 3) and image.dtype == np.uint8:
                return image
        except (OSError, ValueError):
            pass
        return self._decode(i)  # missing or damaged cache file: read the image itself
