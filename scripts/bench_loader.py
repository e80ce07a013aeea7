"""Training data loading speed, ours against ultralytics, interleaved in one run: augmented images per second
delivered by the dataset (one process, then a DataLoader with worker processes).

    python scripts/bench_loader.py --data data/coco128.yaml --imgsz 320 640
    python scripts/bench_loader.py --data data/coco128.yaml --imgsz 640 --cache none --rounds 9 --workers 0

Ours: ``DetectionDataset(samples, imgsz, augment=True, cache=...)`` indexed ``(i, imgsz, imgsz)`` and batched by
``collate_detection``. Theirs: ultralytics' ``YOLODataset(augment=True, cache=..., batch_size=B)`` with its
default hyperparameters, batched by its ``collate_fn``. Both: the data YAML's train split, mosaic p=1, zoom
0.5, shift 0.1 of the output, HSV (0.015, 0.7, 0.4), flip 0.5, blur / median blur / grey / CLAHE p=0.01, no
mixup, copy-paste, rotation or shear; OpenCV single-threaded in every process (as ultralytics sets it).

Cache modes: ``none`` (images decoded as they come; both keep recently decoded images for mosaic partners and
reuse them: on a set of about 8 x batch images or fewer that is all of it after the first pass), ``ram``
(all decoded up front; not timed). ``none-cold`` builds both datasets afresh every round, so every image is
decoded once per pass: the first epoch, or any epoch on a large set.

A round is one pass over the split in a shuffled order (the same for both), in batches of ``--batch``. Round 0
warms up; the table gives the median img/s of the other rounds; the order of the two alternates by round.
"""

import os

os.environ.setdefault("YOLO_OFFLINE", "1")  # before anything imports ultralytics

import argparse
import datetime
import logging
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from yolo_mobile.config import load_data_config
from yolo_mobile.datasets.detection import (
    AugmentConfig,
    DetectionDataset,
    collate_detection,
    load_split,
    seed_worker,
)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


HYP = AugmentConfig()  # YOLOv8's defaults (HSV through a lookup table, as theirs); --hsv-fast: on the RGB planes


def build_ours(samples, imgsz: int, cache: str | None) -> DetectionDataset:
    return DetectionDataset(samples, imgsz, augment=True, hyp=HYP, cache=cache)


def build_theirs(image_dir: Path, names: list[str], imgsz: int, cache: str | None, batch: int):
    from ultralytics.cfg import get_cfg
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.utils import LOGGER

    LOGGER.setLevel(logging.ERROR)
    hyp = get_cfg(overrides={"mosaic": 1.0, "scale": 0.5, "translate": 0.1, "degrees": 0.0, "shear": 0.0,
                             "perspective": 0.0, "fliplr": 0.5, "flipud": 0.0, "hsv_h": 0.015, "hsv_s": 0.7,
                             "hsv_v": 0.4, "mixup": 0.0, "cutmix": 0.0, "copy_paste": 0.0})
    return YOLODataset(img_path=str(image_dir), imgsz=imgsz, cache=cache or False, augment=True, hyp=hyp,
                       batch_size=batch, data={"names": dict(enumerate(names)), "nc": len(names), "channels": 3},
                       task="detect")


def pass_ours(ds, order, size, batch):
    for k in range(0, len(order), batch):
        collate_detection([ds[(i, size, size)] for i in order[k: k + batch]])


def pass_theirs(ds, order, size, batch):
    for k in range(0, len(order), batch):
        ds.collate_fn([ds[i] for i in order[k: k + batch]])


def loader_ours(ds, size, batch, workers, seed):
    g = torch.Generator().manual_seed(seed)

    class Batches(torch.utils.data.Sampler):
        def __iter__(self):
            order = torch.randperm(len(ds), generator=g).tolist()
            return iter([[(i, size, size) for i in order[k: k + batch]] for k in range(0, len(order), batch)])

        def __len__(self):
            return -(-len(ds) // batch)

    return torch.utils.data.DataLoader(ds, batch_sampler=Batches(), num_workers=workers, collate_fn=collate_detection,
                                       worker_init_fn=seed_worker, persistent_workers=workers > 0,
                                       generator=torch.Generator().manual_seed(seed))


def loader_theirs(ds, batch, workers, seed):
    from ultralytics.data.build import seed_worker as their_seed_worker

    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                       collate_fn=ds.collate_fn, persistent_workers=workers > 0,
                                       worker_init_fn=their_seed_worker, generator=torch.Generator().manual_seed(seed))


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleave(run_ours, run_theirs, rounds: int, n: int, prepare=None) -> tuple[float, float]:
    """Median img/s of each over rounds 1..rounds (round 0 warms up), alternating which goes first;
    ``prepare(r)`` runs untimed before each round."""
    ours, theirs = [], []
    for r in range(rounds + 1):
        if prepare is not None:
            prepare(r)
        pair = [(ours, run_ours), (theirs, run_theirs)]
        for results, fn in (pair if r % 2 == 0 else pair[::-1]):
            seconds = timed(lambda fn=fn, r=r: fn(r))
            if r > 0:
                results.append(n / seconds)
    return statistics.median(ours), statistics.median(theirs)


def measure(ours, theirs, size, mode, workers, args, samples, image_dir, names) -> tuple[float, float]:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    n = len(samples)
    if workers:
        lo = loader_ours(ours, size, args.batch, workers, 0)
        lt = loader_theirs(theirs, args.batch, workers, 0)
        return interleave(lambda r: [None for _ in lo], lambda r: [None for _ in lt], args.rounds, n)

    def order(r):
        return np.random.default_rng(r).permutation(n).tolist()

    current = {"o": ours, "t": theirs}

    def prepare(r):  # none-cold: both afresh, nothing decoded yet
        current["o"] = current["t"] = None
        current["o"] = build_ours(samples, size, None)
        current["t"] = build_theirs(image_dir, names, size, None, args.batch)

    return interleave(lambda r: pass_ours(current["o"], order(r), size, args.batch),
                      lambda r: pass_theirs(current["t"], order(r), size, args.batch),
                      args.rounds, n, prepare if mode == "none-cold" else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/coco128.yaml", help="data YAML; its train split is read")
    p.add_argument("--imgsz", type=int, nargs="+", default=[320, 640])
    p.add_argument("--cache", nargs="+", default=["none", "none-cold", "ram"], choices=["none", "none-cold", "ram"])
    p.add_argument("--rounds", type=int, default=5, help="timed passes per measurement (after one warm-up)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--images", type=int, help="only the first N images of the split (a quick check)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                   help="0: one process calling the dataset; N: a DataLoader with N worker processes")
    p.add_argument("--hsv-fast", action="store_true",
                   help="ours with hsv_exact=False (gains on the RGB planes) instead of YOLOv8's HSV lookup table")
    args = p.parse_args()
    HYP.hsv_exact = not args.hsv_fast

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    cv2.setNumThreads(0)
    torch.set_num_threads(1)
    data = load_data_config(args.data)
    samples = load_split(data, "train")
    samples = samples[: args.images] if args.images else samples
    image_dir = Path(tempfile.mkdtemp()) / "images.txt"  # the same images for ultralytics, as a list file
    image_dir.write_text("".join(f"{s.path.resolve()}\n" for s in samples))
    n = len(samples)
    start = datetime.datetime.now(datetime.timezone.utc)
    import ultralytics

    print(f"# data loading: {args.data} train split, {n} images, batch {args.batch}, {args.rounds} timed rounds"
          f"{', ours with hsv_exact=False' if args.hsv_fast else ''}")
    print(f"# {cpu_name()}, {os.cpu_count()} CPUs; torch {torch.__version__}, ultralytics {ultralytics.__version__}, "
          f"OpenCV {cv2.__version__}; started {start:%Y-%m-%d %H:%M} UTC")
    rows = []
    for size in args.imgsz:
        for mode in args.cache:
            cache = "ram" if mode == "ram" else None
            t = time.perf_counter()
            ours = build_ours(samples, size, cache)
            t_ours = time.perf_counter() - t
            t = time.perf_counter()
            theirs = build_theirs(image_dir, data.names, size, cache, args.batch)
            t_theirs = time.perf_counter() - t
            for workers in args.workers:
                if mode == "none-cold" and workers:
                    continue  # fresh datasets each round: one process only
                ours_s, theirs_s = measure(ours, theirs, size, mode, workers, args, samples, image_dir, data.names)
                where = "1 process" if workers == 0 else f"DataLoader, {workers} workers"
                rows.append((size, mode, where, ours_s, theirs_s))
                print(f"# {size} {mode:9s} {where:24s} ours {ours_s:7.1f}  theirs {theirs_s:7.1f}  "
                      f"ratio {ours_s / theirs_s:.2f}  (build s: ours {t_ours:.1f}, theirs {t_theirs:.1f})",
                      flush=True)
            del ours, theirs
    end = datetime.datetime.now(datetime.timezone.utc)
    print("\n| imgsz | cache | where | ours img/s | ultralytics img/s | ratio |\n|---|---|---|---|---|---|")
    for size, mode, where, o, t in rows:
        print(f"| {size} | {mode} | {where} | {o:.1f} | {t:.1f} | {o / t:.2f} |")
    print(f"\n({cpu_name()}, {start:%Y-%m-%d %H:%M}-{end:%H:%M} UTC)")


if __name__ == "__main__":
    main()
