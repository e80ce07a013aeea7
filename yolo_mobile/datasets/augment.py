"""Training augmentation, made for speed: mosaic and random affine as one resize per tile straight into the
output, HSV gains on the colour planes (or, ``hsv_exact``, through OpenCV's HSV and a lookup table), the rare
blur / grey / CLAHE through albumentations only when they fire.

Geometry. A mosaic places four images around a random centre of a 2h x 2w canvas, each fitted into an h x w
quadrant; the random affine then zooms about the canvas centre by ``s`` and puts that centre at
``(w (0.5 + tx), h (0.5 + ty))`` of the h x w output, ``tx, ty`` in ``[-translate, translate]``: every strength is
relative to the output, as in YOLOv8. Without mosaic the canvas is the letterboxed h x w image. With no
rotation or shear each tile lands on an axis-aligned rectangle of the output, so each tile is one
``cv2.resize`` of the stored image's visible part into that rectangle: no canvas is built and no pixel is
warped twice. Rectangle edges are rounded to whole pixels, so a tile's realised scale can differ from the
drawn one by under a pixel over its extent; the boxes use the realised mapping, so they stay exact.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from .letterbox import PAD_VALUE

MIN_VISIBLE = 0.25  # a box cut by the output or canvas edge is kept when this share of its area remains
_X = np.arange(256, dtype=np.float32)


@dataclass
class Tile:
    """One image on the canvas: ``image`` at its stored size, the original (h, w) its ``boxes`` (class + xyxy
    original pixels) refer to, its top-left corner on the canvas and its scale from original pixels."""

    image: np.ndarray
    orig: tuple[int, int]
    boxes: np.ndarray
    x0: float
    y0: float
    scale: float


def mosaic_tiles(images: Sequence[tuple[np.ndarray, tuple[int, int], np.ndarray]], h: int, w: int,
                 rng: random.Random) -> list[Tile]:
    """Four images around a random centre of a 2h x 2w canvas: top-left (the sample's own), top-right,
    bottom-left, bottom-right; each fitted into an h x w quadrant keeping its ratio."""
    cx, cy = rng.uniform(0.5 * w, 1.5 * w), rng.uniform(0.5 * h, 1.5 * h)
    tiles = []
    for k, (image, (oh, ow), boxes) in enumerate(images):
        r = min(h / oh, w / ow)
        tw, th = ow * r, oh * r
        tiles.append(Tile(image, (oh, ow), boxes, cx - tw if k in (0, 2) else cx, cy - th if k in (0, 1) else cy, r))
    return tiles


def letterbox_tile(image: np.ndarray, orig: tuple[int, int], boxes: np.ndarray, h: int, w: int) -> Tile:
    """One image fitted into an h x w canvas, centred."""
    oh, ow = orig
    r = min(h / oh, w / ow)
    return Tile(image, orig, boxes, (w - ow * r) / 2, (h - oh * r) / 2, r)


def _edges(a: float, b: float, limit: int, zoom: float, shift: float, centre: float) -> tuple[int, int]:
    """Output pixel edges of the canvas interval [a, b] under x -> zoom (x - centre) + shift, clipped."""
    lo = round(min(max(zoom * (a - centre) + shift, 0.0), limit))
    hi = round(min(max(zoom * (b - centre) + shift, 0.0), limit))
    return lo, hi


def render(tiles: Sequence[Tile], canvas: tuple[int, int], out_hw: tuple[int, int], zoom: float,
           shift: tuple[float, float], out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``tiles`` (placed on a canvas of (h, w) ``canvas``) through the zoom about the canvas centre and the
    shift of that centre to ``shift`` = (x, y) in an ``out_hw`` output. Returns the HWC image (grey where no
    tile lands; into ``out`` when given, an (h, w, 3) uint8 scratch array) and the (n, 5) class + xyxy boxes of
    the objects that stay visible enough."""
    h, w = out_hw
    ch, cw = canvas
    if out is None:
        out = np.empty((h, w, 3), np.uint8)
    out.fill(PAD_VALUE)
    params, groups = [], []
    for t in tiles:
        oh, ow = t.orig
        sh, sw = t.image.shape[:2]
        xa, xb = max(t.x0, 0.0), min(t.x0 + ow * t.scale, cw)  # the tile's part inside the canvas
        ya, yb = max(t.y0, 0.0), min(t.y0 + oh * t.scale, ch)
        if xb <= xa or yb <= ya:
            continue
        dx0, dx1 = _edges(xa, xb, w, zoom, shift[0], cw / 2)
        dy0, dy1 = _edges(ya, yb, h, zoom, shift[1], ch / 2)
        if dx1 <= dx0 or dy1 <= dy0:
            continue
        # the stored pixels that land there: output edge -> canvas -> original -> stored pixels, rounded
        fx, fy = sw / ow / t.scale, sh / oh / t.scale
        sx0 = min(max(round(((dx0 - shift[0]) / zoom + cw / 2 - t.x0) * fx), 0), sw - 1)
        sx1 = min(max(round(((dx1 - shift[0]) / zoom + cw / 2 - t.x0) * fx), sx0 + 1), sw)
        sy0 = min(max(round(((dy0 - shift[1]) / zoom + ch / 2 - t.y0) * fy), 0), sh - 1)
        sy1 = min(max(round(((dy1 - shift[1]) / zoom + ch / 2 - t.y0) * fy), sy0 + 1), sh)
        crop = t.image[sy0:sy1, sx0:sx1]
        f = int(min(sx1 - sx0, sy1 - sy0, (sx1 - sx0) / (dx1 - dx0), (sy1 - sy0) / (dy1 - dy0)))
        if f >= 2:  # shrinking more than 2x: average f x f blocks first (fast), so thin detail does not alias
            sx1, sy1 = sx0 + (sx1 - sx0) // f * f, sy0 + (sy1 - sy0) // f * f
            crop = cv2.resize(t.image[sy0:sy1, sx0:sx1], ((sx1 - sx0) // f, (sy1 - sy0) // f),
                              interpolation=cv2.INTER_AREA)
        kx, ky = (dx1 - dx0) / (sx1 - sx0), (dy1 - dy0) / (sy1 - sy0)  # realised output px per stored px
        cv2.resize(crop, (dx1 - dx0, dy1 - dy0), dst=out[dy0:dy1, dx0:dx1], interpolation=cv2.INTER_LINEAR)
        if len(t.boxes):
            # original px -> stored px (sw / ow) -> output px, by the realised mapping of this rectangle
            ax, ay = kx * sw / ow, ky * sh / oh
            params.append((ax, dx0 - sx0 * kx, ay, dy0 - sy0 * ky, dx0, dy0, dx1, dy1))
            groups.append(t.boxes)
    if not groups:
        return out, np.zeros((0, 5), np.float32)
    boxes = np.concatenate(groups)
    p = np.repeat(np.asarray(params, np.float32), [len(g) for g in groups], axis=0)
    x = boxes[:, 1::2] * p[:, 0:1] + p[:, 1:2]
    y = boxes[:, 2::2] * p[:, 2:3] + p[:, 3:4]
    area = (x[:, 1] - x[:, 0]) * (y[:, 1] - y[:, 0])
    x = np.clip(x, p[:, 4:5], p[:, 6:7])
    y = np.clip(y, p[:, 5:6], p[:, 7:8])
    bw, bh = x[:, 1] - x[:, 0], y[:, 1] - y[:, 0]
    keep = (bw > 1) & (bh > 1) & (bw * bh >= 4) & (bw * bh >= MIN_VISIBLE * area)
    result = np.stack([boxes[:, 0], x[:, 0], y[:, 0], x[:, 1], y[:, 1]], 1)[keep]
    return out, result.astype(np.float32, copy=False)


def hsv(image: np.ndarray, rng: random.Random, hgain: float, sgain: float, vgain: float) -> None:
    """HSV jitter as YOLOv8 does it, in place on a BGR uint8 image: a hue shift (a fraction of the hue circle)
    and saturation / value gains applied through one 3-channel lookup table in OpenCV's 8-bit HSV (hue
    0..179). Exact, and about 4x slower than :func:`hue_rotation` + :func:`sv_gain`."""
    dh, ds, dv = rng.uniform(-1, 1) * hgain, rng.uniform(-1, 1) * sgain, rng.uniform(-1, 1) * vgain
    lut = np.empty((1, 256, 3), np.uint8)
    lut[0, :, 0] = np.mod(_X + dh * 180, 180)
    lut[0, :, 1] = np.clip(_X * (1 + ds), 0, 255)
    lut[0, :, 2] = np.clip(_X * (1 + dv), 0, 255)
    lut[0, 0, 1] = 0  # a pixel without saturation stays grey
    im = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    cv2.LUT(im, lut, dst=im)
    cv2.cvtColor(im, cv2.COLOR_HSV2BGR, dst=image)


def hue_rotation(fraction: float) -> np.ndarray:
    """3x3 matrix (BGR -> BGR) turning colours about the grey axis by ``fraction`` of the hue circle, red
    towards green for a positive one; greys stay as they are. For the small shifts of training (YOLOv8:
    at most 0.015 of the circle, 5.4 degrees) it moves hue as HSV's hue shift does."""
    t = 2 * np.pi * fraction
    k = np.full(3, 1 / np.sqrt(3))
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rgb = np.cos(t) * np.eye(3) + np.sin(t) * cross + (1 - np.cos(t)) * np.outer(k, k)
    return rgb[::-1, ::-1].astype(np.float32)  # the same map on B, G, R


def sv_gain(chw: np.ndarray, saturation: float, value: float, scratch: np.ndarray | None = None) -> None:
    """HSV saturation and value gains on the colour planes of ``chw`` (3, H, W) uint8, in place: with
    V = max(R, G, B) each channel becomes ``value * (V - saturation * (V - c))``, which multiplies HSV's S by
    ``saturation`` and V by ``value`` and keeps the hue; a channel that leaves 0..255 is clipped (HSV would
    clip S or V instead: these differ only for pixels pushed past full saturation or brightness)."""
    peak = scratch if scratch is not None else np.empty(chw.shape[1:], np.uint8)
    cv2.max(chw[0], chw[1], dst=peak)
    cv2.max(peak, chw[2], dst=peak)
    for plane in chw:
        cv2.addWeighted(peak, value * (1 - saturation), plane, value * saturation, 0, dst=plane)


class RareOps:
    """Blur, median blur, grey and CLAHE, each with probability ``p``: albumentations' own transforms, called
    only when they fire (about 4% of images at p = 0.01) and seeded from the dataset's generator."""

    def __init__(self, p: float) -> None:
        self.p = p
        self._ops: list[Callable] | None = None

    def __call__(self, image: np.ndarray, rng: random.Random) -> np.ndarray:
        fired = [k for k in range(4) if rng.random() < self.p]  # four draws always: a stable random stream
        seeds = [rng.getrandbits(31) for _ in fired]
        if not fired:
            return image
        if self._ops is None:
            # albumentations asks PyPI for a newer version at import unless told not to: nothing goes online
            os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
            import albumentations as A

            self._ops = [A.Blur(blur_limit=(3, 7), p=1.0), A.MedianBlur(blur_limit=(3, 7), p=1.0),
                         A.ToGray(p=1.0), A.CLAHE(p=1.0)]
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        for k, seed in zip(fired, seeds, strict=True):
            op = self._ops[k]
            op.set_random_seed(seed)
            rgb = op(image=rgb)["image"]
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


def to_chw_rgb(image: np.ndarray, flip: bool = False) -> np.ndarray:
    """HWC BGR -> contiguous CHW RGB (one de-interleaving copy), mirrored left-right when ``flip``."""
    if flip:
        image = cv2.flip(image, 1)
    h, w = image.shape[:2]
    chw = np.empty((3, h, w), np.uint8)
    cv2.split(image, [chw[2], chw[1], chw[0]])
    return chw
