"""The first hour with the tool: memory probe, defaults from the data and the machine, Ctrl-C, best.pt, and
checkpoints that carry their training size and data."""

import logging

import onnx
import pytest
import torch

from yolo_mobile import cli
from yolo_mobile.config import ConfigError, load_data_config
from yolo_mobile.datasets.synthetic import EPOCHS, build_shapes
from yolo_mobile.engine import memory
from yolo_mobile.engine.checkpoint import load_checkpoint
from yolo_mobile.engine.memory import StepMemory, largest_batch
from yolo_mobile.engine.trainer import TrainConfig, Trainer, TrainingInterrupted, fitness

FAST = {"batch": 8, "workers": 0, "close_mosaic": 0, "warmup_epochs": 0}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return build_shapes(tmp_path_factory.mktemp("shapes") / "set", n_train=16, n_val=8, size=64)


# ------------------------------------------------------------------------------------------------ memory probe
def test_largest_batch_follows_the_memory_model():
    m = StepMemory(fixed=1000, per_image=100, size=(64, 64))
    assert m.at(4, 64, 64) == 1400 and m.at(1, 128, 128) == 1400  # 4x the pixels of one image at 64
    one_size = lambda base: [(64, 64, base)]  # noqa: E731
    assert largest_batch(m, 1400, one_size, limit=100) == 4
    assert largest_batch(m, 1399, one_size, limit=100) == 3
    assert largest_batch(m, 1099, one_size, limit=100) == 0  # not even one image
    assert largest_batch(m, 10**9, one_size, limit=16) == 16  # capped
    # multi-scale: every size must fit; the largest one never gets fewer than one image (4x the pixels at 64)
    sizes = lambda base: [(32, 32, base * 4), (64, 64, base), (128, 128, max(1, base // 4))]  # noqa: E731
    assert largest_batch(m, 1300, sizes, limit=100) == 0
    assert largest_batch(m, 1400, sizes, limit=100) == 4


def test_probe_measures_a_real_step_and_leaves_the_model_as_it_was(shapes, tmp_path):
    trainer = Trainer(TrainConfig.from_kwargs(cfg="yolov5n.yaml", data=str(shapes), epochs=1, imgsz=64,
                                              project=str(tmp_path), val=False, **FAST))
    trainer.before_train()
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    probe = memory.ProbeStep(trainer.model, trainer.criterion, trainer.device)
    step = memory.measure_step(lambda b: probe(b, 64, 64), trainer.device, (64, 64), (1, 3))
    assert step is not None and step.per_image > 0  # three images need more than one
    assert all(torch.equal(state[k], v) for k, v in trainer.model.state_dict().items())  # BN stats restored
    assert all(p.grad is None for p in trainer.model.parameters())


def _fake_memory(monkeypatch, fixed: int, per_image: int, available: int) -> None:
    monkeypatch.setattr(memory, "measure_step", lambda step, device, size: StepMemory(fixed, per_image, size))
    monkeypatch.setattr(memory, "available_bytes", lambda device: available)


def test_a_batch_that_does_not_fit_is_lowered_with_a_warning(shapes, tmp_path, monkeypatch, caplog):
    gib = 2**30
    # 1 GiB fixed + 1 GiB per image, 10 GiB available: 80% less the optimizer state leaves room for 6 images
    _fake_memory(monkeypatch, gib, gib, 10 * gib)
    trainer = Trainer(TrainConfig.from_kwargs(cfg="yolov5n.yaml", data=str(shapes), epochs=1, imgsz=64,
                                              project=str(tmp_path), val=False, **{**FAST, "batch": 16}))
    with caplog.at_level(logging.WARNING):
        trainer.before_train()
    assert trainer.per_rank_batch == 6 and trainer.config.batch == 6 and trainer.sampler.base_batch == 6
    assert "batch 16 needs about 17.0 GiB" in caplog.text and "training with batch 6 instead" in caplog.text
    assert "batch: 6" in (trainer.save_dir / "args.yaml").read_text()


def test_batch_minus_one_picks_the_largest_that_fits(shapes, tmp_path, monkeypatch):
    gib = 2**30
    _fake_memory(monkeypatch, gib, gib // 4, 5 * gib)  # 4 GiB usable less the optimizer: 11 images
    monkeypatch.setattr(memory, "MIN_STEPS_PER_EPOCH", 1)  # 16 images: memory decides alone
    trainer = Trainer(TrainConfig.from_kwargs(cfg="yolov5n.yaml", data=str(shapes), epochs=1, imgsz=64,
                                              project=str(tmp_path), val=False, **{**FAST, "batch": -1}))
    trainer.before_train()
    assert trainer.per_rank_batch == 11


def test_batch_minus_one_leaves_an_epoch_its_steps(shapes, tmp_path, monkeypatch, caplog):
    gib = 2**30
    _fake_memory(monkeypatch, gib, gib // 64, 20 * gib)  # memory would take the whole 16-image set
    trainer = Trainer(TrainConfig.from_kwargs(cfg="yolov5n.yaml", data=str(shapes), epochs=1, imgsz=64,
                                              project=str(tmp_path), val=False, **{**FAST, "batch": -1}))
    with caplog.at_level(logging.INFO):
        trainer.before_train()
    assert trainer.per_rank_batch == 2  # 16 images, 8 steps an epoch
    assert "at most 2, so that an epoch of 16 images has 8 steps" in caplog.text


def test_a_run_that_cannot_fit_one_image_stops_before_making_a_folder(shapes, tmp_path, monkeypatch):
    gib = 2**30
    _fake_memory(monkeypatch, 4 * gib, 2 * gib, 5 * gib)
    trainer = Trainer(TrainConfig.from_kwargs(cfg="yolov5n.yaml", data=str(shapes), epochs=1, imgsz=64,
                                              project=str(tmp_path / "runs"), val=False, **FAST))
    with pytest.raises(ConfigError, match=r"one image at 64x64 needs about 6\.0 GiB .* lower --imgsz"):
        trainer.run()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# --------------------------------------------------------------------------------------------------- defaults
def test_defaults_come_from_the_data_and_the_machine(shapes, monkeypatch):
    data = load_data_config(shapes)
    assert data.defaults == {"imgsz": 64, "epochs": EPOCHS}  # the built-in set suggests its own size
    resolved = TrainConfig().resolved(data.defaults)
    assert (resolved.imgsz, resolved.epochs) == (64, EPOCHS)
    assert TrainConfig(imgsz=128, epochs=3).resolved(data.defaults).imgsz == 128  # flags win
    assert (TrainConfig().resolved({}).imgsz, TrainConfig().resolved({}).epochs) == (640, 100)
    monkeypatch.setattr(memory, "usable_cpus", lambda: 2)
    assert TrainConfig().resolved({}).workers == 1  # one core stays with the model
    monkeypatch.setattr(memory, "usable_cpus", lambda: 1)
    assert TrainConfig().resolved({}).workers == 0
    monkeypatch.setattr(memory, "usable_cpus", lambda: 64)
    assert TrainConfig().resolved({}).workers == 8 and TrainConfig(workers=0).resolved({}).workers == 0
    assert memory.default_workers(world_size=4) == 8 and memory.default_workers(world_size=16) == 3


def test_built_in_set_suggests_320(tmp_path):
    yaml_text = build_shapes(tmp_path / "s", n_train=2, n_val=1).read_text()
    assert "imgsz: 320" in yaml_text and f"epochs: {EPOCHS}" in yaml_text


def test_bad_data_defaults_name_the_line(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "d.yaml").write_text("path: .\ntrain: images\nval: images\nnames: [a]\nimgsz: 100\n")
    with pytest.raises(ConfigError, match=r"d\.yaml:5: 'imgsz' must be a positive multiple of 32, got 100"):
        load_data_config(tmp_path / "d.yaml")


# ---------------------------------------------------------------------------------------------------- fitness
def test_fitness_weights_map_and_falls_back_to_the_loss():
    assert fitness({"map50": 0.5, "map": 0.3}, 9.0) == pytest.approx(0.1 * 0.5 + 0.9 * 0.3)
    assert fitness({"map50": 0.0, "map": 0.0}, 9.0) == -9.0 < fitness({"map50": 0.0, "map": 0.0}, 8.0)
    assert fitness({}, 7.0) == -7.0  # no validation
    assert fitness({"map50": 0.01, "map": 0.0}, 100.0) > fitness({}, 0.1)  # any mAP beats any loss


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_best_pt_follows_the_loss_while_map_is_zero(shapes, tmp_path, monkeypatch):
    trainer = Trainer(TrainConfig.from_kwargs(cfg="yolov5n.yaml", data=str(shapes), epochs=3, imgsz=64,
                                              project=str(tmp_path), val=False, **FAST))
    trainer.before_train()
    losses = iter([[3.0, 3.0, 3.0], [2.0, 2.0, 2.0], [2.0, 2.0, 2.0]])  # epoch 3 ties epoch 2

    def fake_epoch(epoch):
        trainer.epoch_loss, trainer.epoch_time, trainer.images_seen = next(losses), 1.0, 1
        trainer.guard.skipped_steps = 0

    monkeypatch.setattr(trainer, "train_one_epoch", fake_epoch)
    for epoch in range(3):
        trainer.before_epoch(epoch)
        trainer.train_one_epoch(epoch)
        trainer.after_epoch(epoch)
    best = load_checkpoint(trainer.save_dir / "weights" / "best.pt")
    assert best["epoch"] == 2 and best["best_fitness"] == -6.0


# ----------------------------------------------------------------------------------------------------- Ctrl-C
def _interrupt_at(trainer, epoch_to_stop: int, monkeypatch):
    real = trainer.train_one_epoch

    def train_one_epoch(epoch):
        if epoch == epoch_to_stop:
            trainer.batch_index = 2
            raise KeyboardInterrupt
        real(epoch)

    monkeypatch.setattr(trainer, "train_one_epoch", train_one_epoch)


def test_ctrl_c_before_the_first_checkpoint_removes_the_run(shapes, tmp_path, monkeypatch):
    trainer = Trainer(TrainConfig.from_kwargs(cfg="yolov5n.yaml", data=str(shapes), epochs=2, imgsz=64,
                                              project=str(tmp_path), name="c", val=False, **FAST))
    real_before = trainer.before_train

    def before_train():
        real_before()
        _interrupt_at(trainer, 0, monkeypatch)

    monkeypatch.setattr(trainer, "before_train", before_train)
    with pytest.raises(TrainingInterrupted, match="stopped at epoch 1 batch 3, before the first checkpoint"):
        trainer.run()
    assert not (tmp_path / "c").exists()


def test_ctrl_c_later_keeps_last_pt_and_says_how_to_resume(shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Trainer, "train_one_epoch", _stop_in_second_epoch(Trainer.train_one_epoch))
    code = cli.main(["train", "--cfg", "yolov5n.yaml", "--data", str(shapes), "--epochs", "3", "--imgsz", "64",
                     "--batch", "8", "--workers", "0", "--close-mosaic", "0", "--no-val", "--project",
                     str(tmp_path), "--name", "k"])
    err = capsys.readouterr().err.strip().splitlines()
    last = tmp_path / "k" / "weights" / "last.pt"
    assert code == 130
    assert err[-1] == f"yolo-mobile: stopped at epoch 2 batch 3; resume with: yolo-mobile train --resume {last}"
    assert "Traceback" not in "\n".join(err)
    assert load_checkpoint(last)["epoch"] == 0  # the last completed epoch


def _stop_in_second_epoch(real):
    def train_one_epoch(self, epoch):
        if epoch == 1:
            self.batch_index = 2
            raise KeyboardInterrupt
        real(self, epoch)

    return train_one_epoch


# ---------------------------------------------------------------------------------- checkpoints carry defaults
def test_checkpoint_carries_size_and_data_for_val_and_export(shapes, tmp_path, capsys):
    code = cli.main(["train", "--cfg", "yolov5n.yaml", "--data", str(shapes), "--epochs", "1", "--imgsz", "96",
                     "--batch", "8", "--workers", "0", "--close-mosaic", "0", "--no-val", "--project",
                     str(tmp_path), "--name", "t"])
    assert code == 0
    weights = tmp_path / "t" / "weights" / "last.pt"
    ckpt = load_checkpoint(weights)
    assert ckpt["imgsz"] == 96 and ckpt["data"] == str(shapes.resolve())

    capsys.readouterr()
    assert cli.main(["val", "--weights", str(weights), "--workers", "0", "--project", str(tmp_path / "val")]) == 0
    out = capsys.readouterr().out
    assert f"per image at 96 on {shapes.resolve()}" in out  # no --data, no --imgsz: the checkpoint's
    assert cli.main(["val", "--weights", str(weights), "--imgsz", "64", "--workers", "0", "--project",
                     str(tmp_path / "val")]) == 0
    assert "per image at 64" in capsys.readouterr().out  # flags win

    images = sorted((shapes.parent / "images" / "val").glob("*.png"))
    assert cli.main(["detect", "--weights", str(weights), "--source", str(images[0]), "--project",
                     str(tmp_path / "det")]) == 0
    assert "(imgsz 96;" in capsys.readouterr().out  # detect too runs at the checkpoint's size

    out_onnx = tmp_path / "m.onnx"
    assert cli.main(["export", "--weights", str(weights), "--output", str(out_onnx)]) == 0
    dims = [d.dim_value for d in onnx.load(str(out_onnx)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 96, 96]


def test_val_of_an_untrained_model_still_needs_data(capsys):
    assert cli.main(["val", "--cfg", "yolov5n.yaml"]) == 2
    assert "val needs --data" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["0", "-32", "48"])
def test_bad_imgsz_is_refused(size, capsys):
    assert cli.main(["val", "--cfg", "yolov5n.yaml", "--data", "shapes", "--imgsz", size]) == 2
    assert "--imgsz must be a positive multiple of 32" in capsys.readouterr().err


def test_run_progress_counts_the_whole_run(shapes, tmp_path):
    trainer = Trainer(TrainConfig.from_kwargs(cfg="yolov5n.yaml", data=str(shapes), epochs=4, imgsz=64,
                                              project=str(tmp_path), val=False, **FAST))
    trainer.before_train()
    trainer.images_seen = 8  # half of epoch 1 in 10 s: 56 images left at 1.25 s each
    trainer.t0 -= 10
    text = trainer._run_progress(10.0, 0)
    elapsed, left = text.split("<")
    assert elapsed == "00:10" and left == "01:10"


@pytest.mark.parametrize("workers", ["0", "1"])
def test_sigterm_stops_like_ctrl_c_and_leaves_no_empty_folder(shapes, tmp_path, workers):
    """SIGTERM to the process, or (with a worker) to its whole group, as timeout and schedulers send it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    # at 320 on one thread an epoch of 8 steps takes seconds, so the signal lands inside epoch 1 (at 64 an idle CPU
    # finished it inside the sleep below and saved a checkpoint); on the CPU, as a GPU would be faster still
    cmd = [sys.executable, "-m", "yolo_mobile", "train", "--cfg", "yolov5n.yaml", "--data", str(shapes), "--epochs",
           "50", "--imgsz", "320", "--batch", "2", "--workers", workers, "--no-val", "--project", str(tmp_path),
           "--name", "s", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    deadline = time.time() + 120
    while not (tmp_path / "s" / "args.yaml").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (tmp_path / "s" / "args.yaml").is_file(), proc.communicate()[1][-2000:]
    time.sleep(0.5)  # into the first epoch, workers started
    if workers == "0":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "before the first checkpoint: nothing was saved" in err.strip().splitlines()[-1], err[-2000:]
    assert "Traceback" not in err
    assert not (tmp_path / "s").exists()
