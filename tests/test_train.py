"""Training engine: data handling, augmentation, loss, one-epoch runs, resume, DDP, bad data."""

import csv
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_yolo_dataset

from yolo_mobile import build_model, load_model, train
from yolo_mobile.config import ConfigError, load_data_config
from yolo_mobile.datasets.detection import DetectionDataset, collate_detection, load_split
from yolo_mobile.datasets.synthetic import build_shapes, draw_sample
from yolo_mobile.engine.checkpoint import load_checkpoint
from yolo_mobile.engine.trainer import TrainConfig, Trainer
from yolo_mobile.loss import DetectionLoss

FAST = {"imgsz": 64, "batch": 8, "workers": 0, "close_mosaic": 0, "warmup_epochs": 0}


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return build_shapes(tmp_path_factory.mktemp("shapes") / "set", n_train=16, n_val=8, size=64)


def test_shapes_dataset_is_deterministic_with_exact_boxes(tmp_path):
    a, b = build_shapes(tmp_path / "a", 4, 2, 64, seed=7), build_shapes(tmp_path / "b", 4, 2, 64, seed=7)
    for name in ("train_00000", "train_00003"):
        assert (a.parent / "labels/train" / f"{name}.txt").read_text() == \
               (b.parent / "labels/train" / f"{name}.txt").read_text()
    # on a black background, each shape's drawn pixels span its box to within 2 px (anti-aliased fringe)
    img, boxes = draw_sample(np.random.default_rng(0), 128, background=np.zeros((128, 128, 3), np.uint8))
    assert len(boxes) >= 2
    drawn = img.max(2) > 0
    for c, x1, y1, x2, y2 in boxes:
        assert 0 <= c < 4
        window = np.zeros_like(drawn)  # shapes are more than 2 px apart: the box grown by 1 px holds only this one
        window[max(int(y1) - 1, 0): int(np.ceil(y2)) + 1, max(int(x1) - 1, 0): int(np.ceil(x2)) + 1] = True
        ys, xs = np.nonzero(drawn & window)
        assert abs(xs.min() - x1) <= 2 and abs(xs.max() + 1 - x2) <= 2
        assert abs(ys.min() - y1) <= 2 and abs(ys.max() + 1 - y2) <= 2


def test_augmented_batches_have_requested_size_and_boxes_inside(shapes):
    data = load_data_config(shapes)
    ds = DetectionDataset(load_split(data, "train"), 64, augment=True)
    for mosaic in (True, False):
        ds.mosaic = mosaic
        for h, w in [(64, 64), (96, 96), (32, 32)]:
            images, targets = collate_detection([ds[(i, h, w)] for i in range(4)])
            assert images.shape == (4, 3, h, w) and images.dtype == torch.uint8
            real = targets[targets[..., 0] >= 0]
            assert len(real) > 0
            assert (real[:, 1] >= 0).all() and (real[:, 3] <= w).all() and (real[:, 2] >= 0).all()
            assert (real[:, 4] <= h).all() and (real[:, 3] > real[:, 1]).all()


def test_loss_decreases_on_a_fixed_batch(shapes):
    torch.manual_seed(0)
    ds = DetectionDataset(load_split(load_data_config(shapes), "train"), 128, augment=False)
    images, targets = collate_detection([ds[(i, 128, 128)] for i in range(8)])
    model = build_model("yolov5n.yaml", nc=4).train()
    criterion = DetectionLoss(4, model.strides)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        loss, items = criterion(model(images.float() / 255), targets)
        assert items.shape == (3,) and torch.isfinite(items).all()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]  # (123.6 -> 75.2 when written)


def test_one_epoch_run_writes_everything(shapes, tmp_path):
    save_dir, final = train(cfg="yolov5n.yaml", data=str(shapes), epochs=1, project=str(tmp_path), name="run",
                            **FAST)
    assert save_dir == tmp_path / "run"
    for f in ("args.yaml", "results.csv", "results.png", "weights/last.pt", "weights/best.pt"):
        assert (save_dir / f).is_file(), f
    rows = read_csv(save_dir / "results.csv")
    assert len(rows) == 1 and float(rows[0]["train/box_loss"]) > 0 and "metrics/map" in rows[0]
    assert "metrics/map" in final
    ckpt = torch.load(save_dir / "weights/best.pt", weights_only=True)
    assert ckpt["names"] == ["circle", "square", "triangle", "star"] and ckpt["epoch"] == 0
    model = load_model(save_dir / "weights/best.pt")
    assert not model.training and model.names == ckpt["names"]
    assert torch.equal(model.state_dict()["head.cls.0.2.bias"], ckpt["ema"]["head.cls.0.2.bias"])  # EMA weights


def test_resume_continues_at_next_epoch_with_same_state(shapes, tmp_path):
    config = TrainConfig.from_kwargs(cfg="yolov5n.yaml", data=str(shapes), epochs=2, project=str(tmp_path),
                                     name="r", optimizer="SGD", **FAST)
    first = Trainer(config)
    first.before_train()
    first.before_epoch(0)
    first.train_one_epoch(0)
    first.after_epoch(0)  # as if stopped after epoch 1
    last = first.save_dir / "weights" / "last.pt"
    saved_opt = load_checkpoint(last)["optimizer"]

    resumed = Trainer(TrainConfig(workers=0), resume=last)
    resumed.before_train()
    assert resumed.start_epoch == 1 and resumed.save_dir == first.save_dir
    assert resumed.scheduler.last_epoch == 1
    state = resumed.optimizer.state_dict()
    for key, value in saved_opt["state"].items():
        assert torch.equal(state["state"][key]["momentum_buffer"], value["momentum_buffer"])
    resumed.before_epoch(1)
    resumed.train_one_epoch(1)
    resumed.after_epoch(1)
    rows = read_csv(first.save_dir / "results.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    with pytest.raises(ConfigError, match="already finished"):
        Trainer(TrainConfig(workers=0), resume=last).before_train()


def test_multi_scale_training_runs(shapes, tmp_path):
    config = TrainConfig.from_kwargs(cfg="yolov5n.yaml", data=str(shapes), epochs=1, project=str(tmp_path),
                                     multi_scale=True, min_scale=0.5, max_scale=1.5, n_scales=3, val=False, **FAST)
    trainer = Trainer(config)
    trainer.before_train()
    assert [s[0] for s in trainer.sampler.sizes] == [32, 64, 96]
    trainer.before_epoch(0)
    trainer.train_one_epoch(0)
    assert trainer.images_seen == 16


def test_non_finite_loss_never_reaches_the_weights(shapes, tmp_path, caplog):
    config = TrainConfig.from_kwargs(cfg="yolov5n.yaml", data=str(shapes), epochs=1, project=str(tmp_path),
                                     val=False, **FAST)
    trainer = Trainer(config)
    trainer.before_train()
    real = trainer.criterion

    def poisoned(maps, targets):
        loss, items = real(maps, targets)
        return loss * float("nan"), items

    trainer.criterion = poisoned
    before = {k: v.clone() for k, v in trainer.model.named_parameters()}
    ema_before = {k: v.clone() for k, v in trainer.ema.ema.state_dict().items()}
    trainer.before_epoch(0)
    with caplog.at_level(logging.WARNING):
        trainer.train_one_epoch(0)
    assert trainer.guard.skipped_steps >= 1 and "non-finite" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in trainer.model.named_parameters())
    assert all(torch.equal(ema_before[k], v) for k, v in trainer.ema.ema.state_dict().items())


def test_corrupt_image_and_bad_labels_are_skipped_and_counted(tmp_path, caplog):
    data = make_yolo_dataset(tmp_path, {"good1": "0 0.5 0.5 0.4 0.4\n", "good2": "1 0.3 0.3 0.2 0.2\n",
                                        "badcls": "0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.1 0.1\n",
                                        "badline": "0 0.5 0.5\n", "corrupt": "0 0.5 0.5 0.2 0.2\n"})
    (tmp_path / "images" / "val" / "corrupt.jpg").write_bytes(b"not a jpeg at all")
    with caplog.at_level(logging.WARNING):
        samples = load_split(load_data_config(data), "train")
    assert sorted(s.path.stem for s in samples) == ["good1", "good2"]
    assert "badcls.txt:2: class id 7" in caplog.text and "badline.txt:1: expected 5 values" in caplog.text
    assert "corrupt image" in caplog.text and "corrupt.jpg" in caplog.text
    save_dir, _ = train(cfg="yolov5n.yaml", data=str(data), epochs=1, project=str(tmp_path / "runs"),
                        val=False, **{**FAST, "batch": 2})
    assert (save_dir / "weights" / "last.pt").is_file()  # training went on


def test_label_cache_is_reused_and_invalidated(tmp_path):
    data = make_yolo_dataset(tmp_path, {"a": "0 0.5 0.5 0.4 0.4\n", "b": "1 0.5 0.5 0.2 0.2\n"})
    config = load_data_config(data)
    load_split(config, "train")
    cache = tmp_path / "labels" / "val.cache.json"
    assert cache.is_file()
    # reused: a second load reads the cache, not the files (a label changed behind the cache's back, keeping its
    # size and time, is not seen)
    label = tmp_path / "labels" / "val" / "a.txt"
    stat = label.stat()
    label.write_text("2 0.5 0.5 0.4 0.4\n")
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert [s.boxes[0, 0] for s in load_split(config, "train") if s.path.stem == "a"] == [0]
    (tmp_path / "labels" / "val" / "b.txt").write_text("1 0.5 0.5 0.2 0.2\n2 0.1 0.1 0.1 0.1\n")
    samples = load_split(config, "train")
    assert sum(len(s.boxes) for s in samples) == 3  # the changed label file was read again


def test_empty_or_missing_data_fails_at_once(tmp_path):
    (tmp_path / "images" / "val").mkdir(parents=True)
    (tmp_path / "d.yaml").write_text("path: .\ntrain: images/val\nval: images/val\nnames: [a]\n")
    with pytest.raises(ConfigError, match=r"d\.yaml:2: 'train' split has no images"):
        load_split(load_data_config(tmp_path / "d.yaml"), "train")
    (tmp_path / "e.yaml").write_text("path: .\ntrain: images/nope\nval: images/val\nnames: [a]\n")
    with pytest.raises(ConfigError, match=r"e.yaml:2: 'train' path .*images/nope does not exist"):
        train(cfg="yolov5n.yaml", data=str(tmp_path / "e.yaml"), epochs=1, project=str(tmp_path), **FAST)


def test_unknown_training_option_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown training option\(s\) epoks; valid: .*epochs"):
        train(cfg="yolov5n.yaml", epoks=3)


def test_ddp_two_processes_gloo(shapes, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "yolo_mobile", "train", "--cfg", "yolov5n.yaml", "--data", str(shapes), "--epochs", "1", "--batch", "8",
           "--imgsz", "64", "--workers", "0", "--device", "cpu", "--close-mosaic", "0",
           "--project", str(tmp_path), "--name", "ddp"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    args = (tmp_path / "ddp" / "args.yaml").read_text()
    assert "world_size: 2" in args
    rows = read_csv(tmp_path / "ddp" / "results.csv")
    assert len(rows) == 1
    assert not (tmp_path / "ddp2").exists()  # only rank 0 made a run folder


def test_coco_json_dataset_trains_and_validates(tmp_path):
    """A data YAML whose splits are COCO instances files: COCO's category ids map to class indices in order."""
    import json as _json

    import cv2

    (tmp_path / "val2017").mkdir()
    images, annotations = [], []
    for i in range(4):
        cv2.imwrite(str(tmp_path / "val2017" / f"{i}.jpg"), np.full((60, 80, 3), 40 * i, np.uint8))
        images.append({"id": 100 + i, "file_name": f"{i}.jpg", "width": 80, "height": 60})
        annotations.append({"id": i + 1, "image_id": 100 + i, "category_id": [3, 7][i % 2],
                            "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0})
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]}
    (tmp_path / "instances_val2017.json").write_text(_json.dumps(gt))
    data = tmp_path / "coco.yaml"
    data.write_text("path: .\ntrain: instances_val2017.json\nval: instances_val2017.json\nval_images: val2017\n"
                    "train_images: val2017\nnames: [three, seven]\n")
    samples = load_split(load_data_config(data), "train")
    assert len(samples) == 4 and {int(s.boxes[0, 0]) for s in samples} == {0, 1}  # 3 -> 0, 7 -> 1
    _save_dir, final = train(cfg="yolov5n.yaml", data=str(data), epochs=1, project=str(tmp_path / "runs"),
                            **{**FAST, "batch": 2})
    assert final["metrics/map"] >= 0  # validated against the COCO file through pycocotools
