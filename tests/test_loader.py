"""The training data loader: boxes on their objects after augmentation, strengths relative to the output,
multi-scale from the original pixels, image caches, the mosaic buffer, seeds, and the batch plot."""

import logging
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from yolo_mobile.cli import build_parser
from yolo_mobile.config import load_data_config
from yolo_mobile.datasets.augment import Tile, render
from yolo_mobile.datasets.detection import (
    AugmentConfig,
    DetectionDataset,
    collate_detection,
    load_split,
    seed_worker,
)
from yolo_mobile.datasets.letterbox import PAD_VALUE, letterbox
from yolo_mobile.datasets.plots import plot_batch
from yolo_mobile.datasets.synthetic import CLASSES, build_shapes, draw_sample

# one flat colour per class (RGB): a pixel's colour says which class of object it belongs to
PALETTE = np.array([[230, 40, 40], [40, 220, 40], [40, 40, 230], [230, 220, 40]], np.float32)
GEOMETRY_ONLY = AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, blur=0)  # mosaic, zoom, shift and flip


def write_set(root, images, names=CLASSES):
    """A YOLO dataset of (RGB image, (n, 5) class + xyxy pixel boxes) pairs; returns its data YAML."""
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    for k, (img, boxes) in enumerate(images):
        h, w = img.shape[:2]
        cv2.imwrite(str(root / "images" / "train" / f"{k:03d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        lines = [f"{int(c)} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
                 for c, x1, y1, x2, y2 in boxes]
        (root / "labels" / "train" / f"{k:03d}.txt").write_text("\n".join(lines) + "\n")
    (root / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/train\nnames: {list(names)}\n")
    return root / "data.yaml"


def coloured_shapes(n, size, seed=0):
    """Built-in shapes drawn on black, recoloured so each class has its PALETTE colour (anti-aliased edges keep
    their share of it)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img, boxes = draw_sample(rng, size, max_objects=4, background=np.zeros((size, size, 3), np.uint8))
        recoloured = np.zeros_like(img)
        for c, x1, y1, x2, y2 in boxes:  # shapes are more than 2 px apart: the box grown by 1 px is this one's
            ys, xs = slice(max(int(y1) - 1, 0), int(np.ceil(y2)) + 1), slice(max(int(x1) - 1, 0), int(np.ceil(x2)) + 1)
            part = img[ys, xs].astype(np.float32)
            share = part.sum(2, keepdims=True) / max(part.sum(2).max(), 1)
            recoloured[ys, xs] = np.maximum(recoloured[ys, xs], np.round(share * PALETTE[int(c)]).astype(np.uint8))
        out.append((recoloured, boxes))
    return out


def class_mask(image_hwc, c, faint=False):
    """Pixels of class c's colour; ``faint``: also its anti-aliased fringe (a share of that colour on black)."""
    p = image_hwc.astype(np.float32)
    if not faint:
        return np.abs(p - PALETTE[c]).max(2) < 50
    share = p @ PALETTE[c] / (PALETTE[c] @ PALETTE[c])
    return (share > 0.15) & (np.abs(p - share[..., None] * PALETTE[c]).max(2) < 20)


@pytest.fixture(scope="module")
def coloured(tmp_path_factory):
    return load_split(load_data_config(write_set(tmp_path_factory.mktemp("coloured"), coloured_shapes(12, 128))),
                      "train")


@pytest.mark.parametrize("mosaic", [True, False])
def test_boxes_stay_on_their_objects(coloured, mosaic):
    """After mosaic, zoom, shift and flip, a disc's box centre has the disc's colour, and a box not cut by an
    edge is tight: each edge touches its object's colour within 3 px, and 3 px past it the object has ended."""
    torch.manual_seed(0)
    ds = DetectionDataset(coloured, 128, augment=True, hyp=GEOMETRY_ONLY)
    ds.mosaic = mosaic
    centres, tight = 0, 0
    for k in range(30):
        h, w = [(128, 128), (96, 160), (192, 160)][k % 3]  # also sizes other than the base one
        image, boxes = ds[(k % len(coloured), h, w)]
        assert image.shape == (3, h, w) and image.dtype == torch.uint8
        img = image.permute(1, 2, 0).numpy()
        pad = (img == PAD_VALUE).all(2)
        for c, x1, y1, x2, y2 in boxes.tolist():
            c = int(c)
            mask, faint = class_mask(img, c), class_mask(img, c, faint=True)
            if c == 0:  # a disc: filled at its box's centre, also when the box was cut by an edge
                cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
                assert mask[max(cy - 1, 0): cy + 2, max(cx - 1, 0): cx + 2].any(), (k, c, x1, y1, x2, y2)
                centres += 1
            ya, yb, xa, xb = int(y1), int(np.ceil(y2)), int(x1), int(np.ceil(x2))
            ring = pad[max(ya - 2, 0): yb + 2, max(xa - 2, 0): xb + 2]
            if min(x1, y1) < 1 or x2 > w - 1 or y2 > h - 1 or ring.any():
                continue  # cut by the output or the mosaic canvas edge: only the visible part's box is known
            assert faint[ya:yb, xa: xa + 3].any() and faint[ya:yb, max(xb - 3, 0): xb].any(), (k, c, x1, x2)
            assert faint[ya: ya + 3, xa:xb].any() and faint[max(yb - 3, 0): yb, xa:xb].any(), (k, c, y1, y2)
            my, mx = (ya + yb) // 2, (xa + xb) // 2
            for y, x in ((my, xa - 4), (my, xb + 3), (ya - 4, mx), (yb + 3, mx)):
                assert not (0 <= y < h and 0 <= x < w and faint[y, x]), (k, c, x1, y1, x2, y2, y, x)
            tight += 1
    assert centres >= 10 and tight >= 30


def test_strengths_are_relative_to_the_output(tmp_path):
    """translate 0.1 moves an object by at most a tenth of the output (YOLOv8's meaning), and about that far at
    most; scale 0.5 zooms by 0.5 to 1.5."""
    img = np.zeros((128, 128, 3), np.uint8)
    img[48:80, 48:80] = 255
    samples = load_split(load_data_config(write_set(tmp_path, [(img, np.array([[0, 48, 48, 80, 80]]))])), "train")
    torch.manual_seed(0)
    ds = DetectionDataset(samples, 128, augment=True, hyp=AugmentConfig(mosaic=0, scale=0, translate=0.1, fliplr=0,
                                                                        hsv_h=0, hsv_s=0, hsv_v=0, blur=0))
    shifts = np.array([ds[(0, 128, 256)][1][0, 1:].numpy() - [112, 48, 144, 80] for _ in range(60)])
    assert np.abs(shifts[:, 0] - shifts[:, 2]).max() < 1.01 and np.abs(shifts[:, 1] - shifts[:, 3]).max() < 1.01
    assert np.abs(shifts[:, 0]).max() <= 0.1 * 256 + 1 and np.abs(shifts[:, 1]).max() <= 0.1 * 128 + 1
    assert np.abs(shifts[:, 0]).max() > 0.07 * 256 and np.abs(shifts[:, 1]).max() > 0.07 * 128
    ds = DetectionDataset(samples, 128, augment=True, hyp=AugmentConfig(mosaic=0, scale=0.5, translate=0, fliplr=0,
                                                                        hsv_h=0, hsv_s=0, hsv_v=0, blur=0))
    sizes = np.array([(lambda b: b[0, 3] - b[0, 1])(ds[(0, 128, 128)][1]).item() for _ in range(60)]) / 32
    assert sizes.min() >= 0.5 - 0.05 and sizes.max() <= 1.5 + 0.05 and sizes.max() - sizes.min() > 0.6


def test_mosaic_zoom_and_shift_act_about_the_canvas_centre():
    """On a 2h x 2w mosaic canvas the zoom is about the canvas centre, which the shift puts at a point of the
    h x w output: a tile whose corner is at the canvas centre starts there, at the zoomed size."""
    image = np.full((40, 40, 3), 200, np.uint8)
    tile = Tile(image, (40, 40), np.array([[2, 0, 0, 40, 40]], np.float32), x0=64, y0=64, scale=1.0)
    out, boxes = render([tile], (128, 128), (64, 64), zoom=0.5, shift=(64 * 0.6, 64 * 0.4))
    assert np.allclose(boxes, [[2, 38.4, 25.6, 58.4, 45.6]], atol=0.6)  # edges rounded to whole pixels
    x1, y1, x2, y2 = np.round(boxes[0, 1:]).astype(int)
    assert (out[y1:y2, x1:x2] == 200).all() and (out[:, :x1] == PAD_VALUE).all() and (out[y2:] == PAD_VALUE).all()


def test_multi_scale_sizes_come_from_the_original_pixels(tmp_path):
    """With max_size (the largest size the sampler can ask for) the stored image keeps the original pixels, and
    a large batch size is made from them: fine detail that a trip through imgsz would blur survives."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (200, 256, 3), dtype=np.uint8)  # detail at the pixel level
    samples = load_split(load_data_config(write_set(tmp_path, [(img, np.array([[1, 10, 20, 100, 120]]))])), "train")
    small = DetectionDataset(samples, 64, augment=False)
    large = DetectionDataset(samples, 64, augment=False, max_size=256)
    assert small.store.shapes == [(50, 64)] and large.store.shapes == [(200, 256)]
    image, boxes = large[(0, 256, 256)]
    expected, _ = letterbox(img, (256, 256))
    assert np.array_equal(image.permute(1, 2, 0).numpy(), expected)  # the original pixels, unchanged
    assert torch.allclose(boxes, torch.tensor([[1, 10, 48, 100, 148]], dtype=torch.float32), atol=0.01)
    blurred = small[(0, 256, 256)][0].permute(1, 2, 0).numpy().astype(float)
    assert np.abs(blurred - expected).mean() > 20  # what the old path (shrink to imgsz, enlarge) would give


def test_each_image_is_decoded_once_per_epoch_and_seeds_repeat(coloured):
    torch.manual_seed(5)
    a = DetectionDataset(coloured, 96, augment=True)
    first = [a[(i, 96, 96)] for i in range(len(coloured))]
    assert a.store.decoded == len(coloured)  # partners came from the buffer (or were read for it once)
    _ = [a[(i, 96, 96)] for i in range(len(coloured))]
    assert a.store.decoded == len(coloured)
    torch.manual_seed(5)
    b = DetectionDataset(coloured, 96, augment=True)
    again = [b[(i, 96, 96)] for i in range(len(coloured))]
    for (ia, ta), (ib, tb) in zip(first, again, strict=True):
        assert torch.equal(ia, ib) and torch.equal(ta, tb)
    torch.manual_seed(6)
    c = DetectionDataset(coloured, 96, augment=True)
    assert not torch.equal(torch.stack([x[0] for x in first]), torch.stack([c[(i, 96, 96)][0] for i in range(12)]))


def test_seeded_loaders_with_workers_give_identical_first_batches(coloured):
    def batches():
        ds = DetectionDataset(coloured, 64, augment=True, buffer_size=4)  # a small buffer, partners from it
        sampler = [[(i, 64, 64) for i in range(k, k + 4)] for k in (0, 4, 8)]
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=2, worker_init_fn=seed_worker,
                                             collate_fn=collate_detection, generator=torch.Generator().manual_seed(7))
        return list(loader)

    first, second = batches(), batches()
    assert len(first) == 3
    for (ia, ta), (ib, tb) in zip(first, second, strict=True):
        assert torch.equal(ia, ib) and torch.equal(ta, tb)


def test_ram_and_disk_caches_give_the_same_images(coloured, tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_MOBILE_CACHE", str(tmp_path / "cache"))
    outputs = {}
    for mode in (None, "ram", "disk"):
        torch.manual_seed(1)
        ds = DetectionDataset(coloured, 96, augment=True, cache=mode)
        outputs[mode] = [ds[(i, 96, 96)] for i in range(4)]
        assert ds.store.cache == mode and ds.store.decoded == (0 if mode else ds.store.decoded)
    assert len(list((tmp_path / "cache" / "images").glob("*.npy"))) == len(coloured)
    # the same stored pixels whatever the cache (partners differ: ram draws them from the whole set)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(outputs[None], outputs["disk"], strict=True))


def test_disk_cache_is_rebuilt_when_an_image_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_MOBILE_CACHE", str(tmp_path / "cache"))
    img = np.full((40, 60, 3), 50, np.uint8)
    samples = load_split(load_data_config(write_set(tmp_path / "set", [(img, np.zeros((0, 5)))])), "train")
    DetectionDataset(samples, 64, augment=False, cache="disk")
    files = list((tmp_path / "cache" / "images").glob("*.npy"))
    assert len(files) == 1
    path = samples[0].path
    cv2.imwrite(str(path), np.full((40, 60, 3), 200, np.uint8))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    ds = DetectionDataset(samples, 64, augment=False, cache="disk")
    now = list((tmp_path / "cache" / "images").glob("*.npy"))
    assert len(now) == 1 and now != files
    assert ds.store.get(0).min() == 200 and ds.store.decoded == 0


def test_ram_cache_that_does_not_fit_says_so(coloured, monkeypatch, caplog):
    import yolo_mobile.resources as resources

    monkeypatch.setattr(resources, "available_bytes", lambda device: 100_000)
    with caplog.at_level(logging.WARNING):
        ds = DetectionDataset(coloured, 128, augment=True, cache="ram")
    assert ds.store.cache is None and ds.store.ram is None
    assert "--cache ram" in caplog.text and "GiB" in caplog.text and "without an image cache" in caplog.text


def test_plot_batch_writes_a_grid_with_boxes(coloured, tmp_path):
    ds = DetectionDataset(coloured, 64, augment=True)
    images, targets = collate_detection([ds[(i, 64, 96)] for i in range(5)])
    path = plot_batch(images, targets, CLASSES, tmp_path / "train_batch0.jpg")
    grid = cv2.imread(str(path))
    assert grid.shape == (2 * 64, 3 * 96, 3)


def test_training_plots_batches_and_caches_at_the_largest_size(tmp_path):
    from yolo_mobile.engine.trainer import TrainConfig, Trainer

    args = build_parser().parse_args(["train", "--cache", "ram", "--plot-batches", "2"])
    assert args.cache == "ram" and args.plot_batches == 2
    data = build_shapes(tmp_path / "shapes", n_train=4, n_val=2, size=64)
    config = TrainConfig.from_kwargs(cfg="yolov5n.yaml", data=str(data), epochs=1, imgsz=64, batch=2, workers=0,
                                     close_mosaic=0, warmup_epochs=0, val=False, multi_scale=True, n_scales=3,
                                     cache="ram", plot_batches=2, project=str(tmp_path / "runs"), name="run")
    trainer = Trainer(config)
    save_dir, _ = trainer.run()
    assert trainer.dataset.store.cache == "ram" and trainer.dataset.store.max_size == 96
    batches = min(2, len(trainer.sampler))  # multi-scale: 4 images make 1 to 4 batches
    assert sorted(p.name for p in save_dir.glob("train_batch*.jpg")) == [f"train_batch{i}.jpg" for i in range(batches)]


def test_colour_jitter_keeps_hsv_meaning():
    """The fast path's gains are HSV's: S times the saturation gain and V times the value gain with the hue kept,
    and the hue turned by the drawn fraction of the circle on average; greys stay grey."""
    import colorsys

    from yolo_mobile.datasets.augment import hue_rotation, sv_gain

    rng = np.random.default_rng(0)
    rgb = rng.integers(40, 216, (500, 3)).astype(np.uint8)
    chw = np.ascontiguousarray(rgb.T.reshape(3, 1, -1))
    sv_gain(chw, 0.6, 0.8)
    before = np.array([colorsys.rgb_to_hsv(*(c / 255)) for c in rgb])
    after = np.array([colorsys.rgb_to_hsv(*(c / 255)) for c in chw.reshape(3, -1).T])
    coloured = before[:, 1] > 0.2
    assert np.allclose(after[coloured, 1], 0.6 * before[coloured, 1], atol=0.02)
    assert np.allclose(after[:, 2], 0.8 * before[:, 2], atol=0.005)
    assert np.abs(((after[coloured, 0] - before[coloured, 0] + 0.5) % 1) - 0.5).max() < 0.01
    turned = cv2.transform(rgb[None, :, ::-1], hue_rotation(0.015))[0, :, ::-1]  # BGR in, BGR out
    hues = np.array([colorsys.rgb_to_hsv(*(c / 255))[0] for c in turned])
    shift = ((hues - before[:, 0] + 0.5) % 1) - 0.5
    assert abs(shift[coloured].mean() - 0.015) < 0.002 and (shift[coloured] > 0).all()
    grey = np.full((1, 4, 3), 90, np.uint8)
    assert np.abs(cv2.transform(grey, hue_rotation(0.015)).astype(int) - 90).max() <= 1


def test_exact_hsv_and_rare_ops_run(coloured):
    torch.manual_seed(0)
    ds = DetectionDataset(coloured, 64, augment=True, hyp=AugmentConfig(hsv_exact=True, blur=1.0))
    image, boxes = ds[(0, 64, 96)]
    assert image.shape == (3, 64, 96) and len(boxes)
    img = image.permute(1, 2, 0).numpy().astype(int)
    assert np.abs(img - img[..., :1]).max() <= 2  # ToGray fired (blur=1.0): every channel equal


def test_albumentations_never_asks_pypi():
    # albumentations checks PyPI for a newer version when it is imported, unless NO_ALBUMENTATIONS_UPDATE is set
    code = """
import random, socket
import numpy as np
calls = []
def refuse(*args, **kwargs):
    calls.append(args[:1])
    raise OSError("network refused by the test")
socket.getaddrinfo = refuse
socket.socket.connect = refuse
from yolo_mobile.datasets.augment import RareOps
RareOps(p=1.0)(np.full((32, 32, 3), 90, np.uint8), random.Random(0))
print("network calls:", len(calls))
"""
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "network calls: 0" in out.stdout, out.stdout + out.stderr[-2000:]
