"""How well each trainer learns: ours and ultralytics', from scratch, on the same data, scored by one evaluator.

    python scripts/compare_learning.py                      # the issue's setting: 10 epochs at 320, batch 16
    python scripts/compare_learning.py --n-train 200 --epochs 5 --pairs yolov5n.yaml:yolov5nu.yaml
    python scripts/compare_learning.py --data data/coco128_trainval.yaml --epochs 100 --cache ram --workers 0 \
        --pairs yolov5n.yaml:yolov5nu.yaml                 # real photos: about an hour on 2 cores

Without ``--data`` the set is a seeded variant of the built-in shapes set (``--seed``, not the default 0, so nobody
tuned on it); with ``--data`` both train on that YAML's train split and are scored on its val split.
Both trainers get the same recipe: SGD, lr0 0.01, batch 16, nominal batch 64, 3 warm-up epochs, mosaic closed for
the last ``--close-mosaic`` epochs (ours: ``min(10, epochs // 4)``; ultralytics' default 10 would close it for a
whole 10-epoch run, so it is set to the same value), YOLOv8's augmentation defaults, no validation during
training, CPU. Each final ``last.pt`` (EMA weights) is evaluated on the val split by
``yolo_mobile.engine.validate.validate`` at the training size, conf 0.001, NMS IoU 0.7: the same letterbox,
NMS and pycocotools for all. Ultralytics' model is wrapped to give the same ``(B, 4 + nc, N)`` output.
"""

import os

os.environ.setdefault("YOLO_OFFLINE", "1")  # before anything imports ultralytics

import argparse
import contextlib
import io
import logging
import tempfile
import time
from pathlib import Path

import torch
import yaml

from yolo_mobile.benchmark import UltralyticsDetector, cpu_name
from yolo_mobile.config import load_data_config
from yolo_mobile.datasets.synthetic import build_shapes
from yolo_mobile.engine.checkpoint import load_model
from yolo_mobile.engine.memory import default_workers
from yolo_mobile.engine.trainer import train
from yolo_mobile.engine.validate import validate


def train_ours(cfg: str, data: Path, args, workdir: Path) -> tuple[torch.nn.Module, float]:
    t0 = time.time()
    save_dir, _ = train(cfg=cfg, data=str(data), epochs=args.epochs, imgsz=args.imgsz, batch=args.batch,
                        optimizer="SGD", lr0=0.01, close_mosaic=args.close_mosaic, val=False, seed=args.train_seed,
                        workers=args.workers, cache=args.cache, project=str(workdir), name=f"ours_{Path(cfg).stem}",
                        plot_batches=0)
    return load_model(save_dir / "weights" / "last.pt"), time.time() - t0


def ultralytics_data(data: Path, workdir: Path) -> Path:
    """The set as ultralytics reads it: absolute paths (it resolves a relative ``path`` against its own datasets
    folder) through a folder of links in ``workdir``, so its ``labels/<split>.cache`` lands there, not beside a
    shared data set."""
    cfg = load_data_config(data)
    mirror = workdir / f"{data.stem}-ultralytics"
    for split in ("train", "val"):
        images = (cfg.root / cfg.splits[split]).resolve()
        labels = Path("/labels/".join(str(images).rsplit("/images/", 1)))  # ultralytics' img2label_paths rule
        for kind, target in (("images", images), ("labels", labels)):
            link = mirror / kind / split
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(target, target_is_directory=True)
    their_data = mirror.with_suffix(".yaml")
    their_data.write_text(yaml.safe_dump({"path": str(mirror), "train": "images/train", "val": "images/val",
                                          "names": dict(enumerate(cfg.names))}))
    return their_data


def train_theirs(yaml_name: str, data: Path, nc: int, args, workdir: Path) -> tuple[torch.nn.Module, float]:
    from ultralytics import YOLO
    from ultralytics.utils import LOGGER

    LOGGER.setLevel(logging.WARNING)
    # ultralytics resolves a relative `path` against its own datasets folder: give it the set's absolute path
    their_data = ultralytics_data(data, workdir)
    t0 = time.time()
    yolo = YOLO(yaml_name)
    threads = torch.get_num_threads()  # ultralytics sets torch to cores - 1 threads for CPU training
    with contextlib.redirect_stdout(io.StringIO()):
        yolo.train(data=str(their_data), epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, optimizer="SGD",
                   lr0=0.01, close_mosaic=args.close_mosaic, val=False, plots=False, seed=args.train_seed, device="cpu",
                   workers=args.workers, cache=args.cache or False, project=str(workdir),
                   name=f"theirs_{Path(yaml_name).stem}",
                   exist_ok=True, pretrained=False, amp=False, verbose=False)
    seconds = time.time() - t0
    torch.set_num_threads(threads)  # and leaves it so: the next run of ours would get 1 thread on 2 cores
    # their last.pt holds the EMA, like ours; wrapped so the evaluator sees (B, 4 + nc, N)
    wrapped = UltralyticsDetector(yaml_name, nc=nc)
    wrapped.model = YOLO(str(Path(yolo.trainer.save_dir) / "weights" / "last.pt")).model.float()
    return wrapped, seconds


def score(model: torch.nn.Module, data: Path, imgsz: int) -> dict[str, float]:
    metrics = validate(model.float().eval(), data, imgsz=imgsz, batch=32, device="cpu", progress=False)
    return {"map": float(metrics["map"]), "map50": float(metrics["map50"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="+", default=["yolov5n.yaml:yolov5nu.yaml", "mobilenetv3_large.yaml:yolov8n.yaml"],
                   help="ours:theirs, compared row by row")
    p.add_argument("--trainers", nargs="+", choices=("ours", "ultralytics"), default=["ours", "ultralytics"],
                   help="which side of each pair to train (one side: to rerun it after a change to it)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--close-mosaic", type=int, help="default: min(10, epochs // 4), for both")
    p.add_argument("--n-train", type=int, default=800, help="images in the generated train split (built-in: 800)")
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--seed", type=int, default=7, help="seed of the generated set (the built-in set uses 0)")
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--data", help="a data YAML to train on (its train split) and score on (its val split) instead of "
                   "the generated set, e.g. data/coco128_trainval.yaml")
    p.add_argument("--cache", choices=("ram", "disk"), help="decoded-image cache, the same for both trainers")
    p.add_argument("--workdir", help="where runs go (default: a temporary folder)")
    args = p.parse_args()
    if args.close_mosaic is None:
        args.close_mosaic = min(10, args.epochs // 4)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="compare_learning_"))
    if args.data:
        data = Path(args.data).resolve()
        what = f"{data.name}"
    else:
        data = build_shapes(workdir / f"shapes-seed{args.seed}", n_train=args.n_train, n_val=args.n_val,
                            size=args.imgsz, seed=args.seed)
        what = f"shapes set seed {args.seed} ({args.n_train} train / {args.n_val} val images at {args.imgsz})"
    nc = len(load_data_config(data).names)
    rows = []
    for pair in args.pairs:
        ours_cfg, theirs_yaml = pair.split(":")
        for who, name in (("ours", ours_cfg), ("ultralytics", theirs_yaml)):
            if who not in args.trainers:
                continue
            model, seconds = train_ours(name, data, args, workdir) if who == "ours" else \
                train_theirs(name, data, nc, args, workdir)
            m = score(model, data, args.imgsz)
            rows.append((who, name, m, seconds))
            print(f"{who:12s} {name:24s} mAP50-95 {m['map']:.4f}  mAP50 {m['map50']:.4f}  {seconds / 60:.1f} min",
                  flush=True)

    print(f"\n`python scripts/compare_learning.py {' '.join(os.sys.argv[1:])}`  ")
    print(f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}; {what}, {args.imgsz} px, {args.epochs} "
          f"epochs, batch {args.batch}, SGD lr0 0.01, close_mosaic {args.close_mosaic}, {args.workers} workers, "
          f"cache {args.cache}; one evaluator\n")
    print("| trainer | model | mAP50-95 | mAP50 | train minutes |")
    print("|---|---|---:|---:|---:|")
    for who, name, m, seconds in rows:
        print(f"| {who} | {name} | {m['map']:.4f} | {m['map50']:.4f} | {seconds / 60:.1f} |")


if __name__ == "__main__":
    main()
