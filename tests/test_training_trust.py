"""Training that does what it says: the schedule, warm-up under multi-scale, the non-finite guard, and resume."""

import csv
import math
import os

import pytest
import torch

from yolo_mobile import cli
from yolo_mobile.config import ConfigError
from yolo_mobile.datasets.synthetic import build_shapes
from yolo_mobile.engine.checkpoint import load_checkpoint
from yolo_mobile.engine.step_guard import LossWatch, nonfinite_tensors
from yolo_mobile.engine.trainer import TrainConfig, Trainer, TrainingDiverged, _lr_lambda

FAST = {"imgsz": 64, "batch": 4, "workers": 0, "close_mosaic": 0, "val": False, "plot_batches": 0}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return build_shapes(tmp_path_factory.mktemp("trust") / "set", n_train=16, n_val=4, size=64)


def trainer_for(shapes, tmp_path, **kw) -> Trainer:
    options = {"cfg": "yolov5n.yaml", "data": str(shapes), "project": str(tmp_path), **FAST, "warmup_epochs": 0,
               **kw}
    trainer = Trainer(TrainConfig.from_kwargs(**options))
    trainer.before_train()
    return trainer


def state_copy(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


# ----------------------------------------------------------------------------------------- numbers checked
@pytest.mark.parametrize("option, value", [("lr0", math.nan), ("lr0", math.inf), ("lr0", 0.0), ("lr0", -0.01),
                                           ("lrf", math.nan), ("momentum", 1.5), ("weight_decay", -1.0),
                                           ("warmup_epochs", math.nan), ("ema_decay", 1.0), ("clip_grad", 0.0),
                                           ("box", math.inf), ("max_skipped_steps", 0), ("hsv_s", math.nan)])
def test_non_finite_or_out_of_range_numbers_are_refused_by_name(option, value):
    with pytest.raises(ConfigError, match=option):
        TrainConfig.from_kwargs(**{option: value})


def test_cli_refuses_lr0_nan_before_any_run_folder(shapes, tmp_path, capsys):
    code = cli.main(["train", "--cfg", "yolov5n.yaml", "--data", str(shapes), "--lr0", "nan", "--project",
                     str(tmp_path)])
    assert code == 2
    assert "lr0 must be a finite number" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- schedule
def test_lr_schedules_end_where_they_say():
    for schedule in ("linear", "cosine"):
        lf = _lr_lambda(schedule, 10, 0.01)
        assert lf(0) == pytest.approx(1.0) and lf(10) == pytest.approx(0.01)
    assert _lr_lambda("cosine", 10, 0.01)(5) == pytest.approx(0.505)
    assert _lr_lambda("linear", 10, 0.01)(5) == pytest.approx(0.505)


@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
def test_warmup_lr_momentum_and_bias_at_chosen_points(shapes, tmp_path, optimizer):
    trainer = trainer_for(shapes, tmp_path, optimizer=optimizer, epochs=4, warmup_epochs=1.0)
    c, lr0 = trainer.config, trainer.lr0
    for progress in (0.0, 0.25, 1.0):
        trainer._warmup(progress, epoch=0)
        weights, _norms, biases = trainer.optimizer.param_groups
        assert weights["lr"] == pytest.approx(progress * lr0)
        if optimizer == "SGD":  # biases come down from warmup_bias_lr; momentum rises
            assert biases["lr"] == pytest.approx(c.warmup_bias_lr + progress * (lr0 - c.warmup_bias_lr))
            assert weights["momentum"] == pytest.approx(0.8 + progress * (0.937 - 0.8))
        else:  # AdamW: biases warm up like the rest, never above lr0
            assert biases["lr"] == pytest.approx(progress * lr0)
    trainer._warmup(2.0, epoch=1)  # past the end: clamped to the scheduled lr of that epoch
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr0 * trainer.lf(1))


def test_warmup_length_is_fixed_in_images_at_least_100_batches(shapes, tmp_path):
    trainer = trainer_for(shapes, tmp_path, epochs=2, warmup_epochs=3.0)
    assert trainer.warmup_images == max(3 * 16, 100 * 4)
    assert trainer_for(shapes, tmp_path, epochs=2, warmup_epochs=0).warmup_images == 0


def test_warmup_progress_under_multi_scale_only_moves_forward_across_epochs(shapes, tmp_path, monkeypatch):
    trainer = trainer_for(shapes, tmp_path, epochs=3, multi_scale=True, min_scale=0.5, max_scale=1.5,
                          n_scales=3, warmup_epochs=1.0)
    trainer.warmup_images = 40  # end warm-up inside epoch 3 of 16 images each
    seen: list[tuple[int, float]] = []
    real = trainer._warmup
    monkeypatch.setattr(trainer, "_warmup", lambda p, epoch: (seen.append((epoch, p)), real(p, epoch)))
    batches = []
    for epoch in range(3):
        trainer.before_epoch(epoch)
        batches.append(len(trainer.sampler))
        trainer.train_one_epoch(epoch)
    assert len(set(batches)) > 1 or batches[0] != 16 // 4  # the variable batch changes the count of batches
    progress = [p for _, p in seen]
    assert progress == sorted(progress) and len(set(progress)) == len(progress)  # strictly forward
    assert progress[-1] >= 1.0 and all(p < 1.0 for p in progress[:-1])  # ends exactly once, at 40 images
    assert trainer.images_done == 3 * 16
    assert seen[-1][0] == 2  # the warm-up's last batch is in epoch 3


def test_gradients_accumulate_to_nbs(shapes, tmp_path):
    trainer = trainer_for(shapes, tmp_path, epochs=1, nbs=8)  # batch 4: a step every 2 batches
    trainer.before_epoch(0)
    trainer.train_one_epoch(0)
    assert trainer.optimizer_steps == 16 // 8
    trainer = trainer_for(shapes, tmp_path, epochs=1, nbs=12)  # 3 batches, then the epoch's last batch steps
    trainer.before_epoch(0)
    trainer.train_one_epoch(0)
    assert trainer.optimizer_steps == 2


def test_close_mosaic_switches_at_the_right_epoch(shapes, tmp_path):
    trainer = trainer_for(shapes, tmp_path, epochs=5, close_mosaic=2)
    mosaic = []
    for epoch in range(5):
        trainer.before_epoch(epoch)
        mosaic.append(trainer.dataset.mosaic)
    assert mosaic == [True, True, True, False, False]


def test_default_close_mosaic_is_a_quarter_of_short_runs(shapes, tmp_path):
    config = TrainConfig.from_kwargs(data=str(shapes), epochs=12, **{**FAST, "close_mosaic": None})
    assert config.resolved({}).close_mosaic == 3
    assert TrainConfig.from_kwargs(epochs=100).resolved({}).close_mosaic == 10


# ------------------------------------------------------------------------------------- non-finite guard
def test_skipped_steps_leave_every_tensor_and_stop_after_n_in_a_row(shapes, tmp_path, monkeypatch, caplog):
    trainer = trainer_for(shapes, tmp_path, epochs=1, nbs=4, max_skipped_steps=3)
    before = state_copy(trainer)
    real = trainer.criterion

    def nan_loss(maps, targets):  # a batch whose loss is NaN, after the forward updated BatchNorm's statistics
        loss, items = real(maps, targets)
        return loss * math.nan, items

    monkeypatch.setattr(trainer, "criterion", nan_loss)
    trainer.before_epoch(0)
    with pytest.raises(TrainingDiverged, match="3 optimizer steps in a row had a non-finite loss"):
        trainer.train_one_epoch(0)
    after = trainer.model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert changed == []  # weights and buffers (running stats, num_batches_tracked) as they were
    assert trainer.guard.skipped_steps == 3
    assert "step skipped, weights and buffers unchanged" in caplog.text


def test_a_huge_lr_stops_with_a_clear_message_and_writes_no_checkpoint(shapes, tmp_path):
    """lr0 1e30: the first step blows the weights up, every later forward is non-finite."""
    from yolo_mobile.engine.trainer import train

    with pytest.raises(TrainingDiverged, match=r"3 optimizer steps in a row .* lower --lr0 \(now 1e\+30\)"):
        train(cfg="yolov5n.yaml", data=str(shapes), epochs=2, lr0=1e30, nbs=4, max_skipped_steps=3,
              project=str(tmp_path), name="huge", warmup_epochs=0, **FAST)
    assert not list(tmp_path.rglob("*.pt")) and not (tmp_path / "huge").exists()


def test_nonfinite_model_is_never_written(shapes, tmp_path):
    trainer = trainer_for(shapes, tmp_path, epochs=1)
    with torch.no_grad():
        next(trainer.model.parameters())[0] = math.inf
    with pytest.raises(TrainingDiverged, match="not finite"):
        trainer._save("last.pt", 0, {})
    assert not (trainer.save_dir / "weights" / "last.pt").exists()
    assert nonfinite_tensors({"a": torch.ones(2), "b": {"c": torch.tensor([1.0, math.nan])}}) == ["b.c"]


def test_loss_watch_warns_on_a_jump_of_orders_of_magnitude():
    watch = LossWatch()
    assert all(watch.update(2.0 + 0.1 * (i % 3)) is None for i in range(20))
    assert watch.update(50.0) is None  # 25x: a bad batch, not a blow-up
    level = watch.update(5e4)
    assert level is not None and 1.5 < level < 5


def test_amp_overflow_is_routine_and_counted_apart(shapes, tmp_path):
    """The AMP path on a CPU: float16 autocast with a gradient scaler that starts far too high."""
    trainer = trainer_for(shapes, tmp_path, epochs=1, nbs=4)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60, enabled=True)
    trainer.before_epoch(0)
    trainer.train_one_epoch(0)
    assert trainer.guard.amp_overflows >= 1 and trainer.guard.skipped_steps == 0
    assert trainer.scaler.get_scale() < 2.0**60  # the scaler lowered its scale as routine
    trainer.after_epoch(0)
    with open(trainer.save_dir / "results.csv") as f:
        row = next(csv.DictReader(f))
    assert int(row["amp_overflows"]) == trainer.guard.amp_overflows and row["skipped_steps"] == "0"


# ---------------------------------------------------------------------------------------------- resume
def one_epoch_run(shapes, tmp_path, cfg, epochs=2, **kw) -> Trainer:
    trainer = trainer_for(shapes, tmp_path, cfg=cfg, epochs=epochs, name="run", warmup_epochs=1.0, **kw)
    trainer.before_epoch(0)
    trainer.train_one_epoch(0)
    trainer.after_epoch(0)
    return trainer


def test_resume_rebuilds_the_stored_network_not_the_edited_yaml(shapes, tmp_path):
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text("nc: 4\nbackbone: {name: cspdarknet, variant: n}\nneck: {depth: 0.33, width: 0.25}\n")
    first = one_epoch_run(shapes, tmp_path, str(yaml_file))
    last = first.save_dir / "weights" / "last.pt"
    yaml_file.write_text(yaml_file.read_text().replace("variant: n", "variant: s"))  # edited afterwards
    resumed = Trainer(resume=last, changes={})
    resumed.before_train()
    saved = load_checkpoint(last)["model"]
    assert {k: v.shape for k, v in resumed.model.state_dict().items()} == {k: v.shape for k, v in saved.items()}


def test_resume_restores_warmup_counters_and_honours_workers_and_epochs(shapes, tmp_path):
    first = one_epoch_run(shapes, tmp_path, "yolov5n.yaml", workers=0)
    last = first.save_dir / "weights" / "last.pt"
    resumed = Trainer(resume=last, changes={"workers": 0, "epochs": 3})
    resumed.before_train()
    assert resumed.config.workers == 0 and resumed.config.epochs == 3
    assert resumed.images_done == first.images_done == 16
    assert resumed.warmup_images == first.warmup_images and resumed.optimizer_steps == first.optimizer_steps


def test_resume_refuses_other_flags_with_the_list_of_what_can_change(shapes, tmp_path, capsys):
    first = one_epoch_run(shapes, tmp_path, "yolov5n.yaml")
    last = first.save_dir / "weights" / "last.pt"
    code = cli.main(["train", "--resume", str(last), "--lr0", "0.1", "--batch", "8"])
    err = capsys.readouterr().err
    assert code == 2 and "batch, lr0 cannot change (only epochs, device, workers may be given)" in err


def test_resume_from_another_folder_finds_relative_data(shapes, tmp_path, monkeypatch):
    monkeypatch.chdir(shapes.parent.parent)
    relative = os.path.relpath(shapes)
    trainer = trainer_for(shapes, tmp_path, data=relative, epochs=2, name="rel")
    assert trainer.config.data == str(shapes.resolve())
    trainer.before_epoch(0)
    trainer.train_one_epoch(0)
    trainer.after_epoch(0)
    last = trainer.save_dir / "weights" / "last.pt"
    assert load_checkpoint(last)["train_args"]["data"] == str(shapes.resolve())
    monkeypatch.chdir(tmp_path)
    resumed = Trainer(resume=last, changes={})
    resumed.before_train()
    assert resumed.data_yaml == shapes.resolve()


def test_results_log_the_lr_the_epoch_trained_with(shapes, tmp_path):
    trainer = one_epoch_run(shapes, tmp_path, "yolov5n.yaml")  # warm-up of 400 images, still on after 16
    with open(trainer.save_dir / "results.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["lr/pg0"]) == pytest.approx(16 / 400 * trainer.lr0)  # not the next epoch's scheduled lr
