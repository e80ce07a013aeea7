"""train --freeze N|backbone: the backbone's weights and BatchNorm statistics held for N epochs (or the whole run),
stored in the checkpoint and honoured on resume."""

import logging

import pytest
import torch
from safetensors.torch import save_file

from yolo_mobile import build_model
from yolo_mobile.cli import main
from yolo_mobile.config import ConfigError
from yolo_mobile.datasets.synthetic import build_shapes
from yolo_mobile.engine.checkpoint import load_checkpoint
from yolo_mobile.engine.trainer import TrainConfig, Trainer

FAST = {"imgsz": 64, "batch": 8, "workers": 0, "close_mosaic": 0, "warmup_epochs": 0, "val": False}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return build_shapes(tmp_path_factory.mktemp("shapes") / "set", n_train=16, n_val=8, size=64)


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    """A backbone weights file, as --pretrained takes it: the backbone of a differently seeded yolov5n."""
    torch.manual_seed(123)
    backbone = build_model("yolov5n.yaml", nc=4).backbone
    for m in backbone.modules():  # statistics no fresh BatchNorm has, so a held one is told from a reset one
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(path))
    return path, {k: v.clone() for k, v in backbone.state_dict().items()}


def backbone_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}


def run_epoch(trainer: Trainer, epoch: int) -> None:
    trainer.before_epoch(epoch)
    trainer.train_one_epoch(epoch)
    trainer.after_epoch(epoch)


def assert_same(state, expected):
    assert state.keys() == expected.keys()
    changed = [k for k in state if not torch.equal(state[k], expected[k])]
    assert not changed, f"{len(changed)} backbone tensor(s) moved, e.g. {changed[:3]}"


def test_frozen_backbone_held_bit_for_bit_through_resume_then_trained(shapes, backbone_file, tmp_path, caplog):
    path, loaded = backbone_file
    config = TrainConfig.from_kwargs(cfg="yolov5n.yaml", data=str(shapes), epochs=3, freeze=2, pretrained=str(path),
                                     project=str(tmp_path), name="f", optimizer="SGD", weight_decay=0.05, **FAST)
    first = Trainer(config)
    with caplog.at_level(logging.INFO, logger="yolo_mobile.engine.trainer"):
        first.before_train()
    assert "backbone frozen" in caplog.text and "end of epoch 2" in caplog.text
    assert_same(backbone_state(first.model), loaded)  # the file was loaded
    head_before = first.model.head.state_dict()["cls.0.2.bias"].clone()
    # the optimizer holds the backbone's weights (skipped while they have no gradient), so unfreezing trains them
    in_optimizer = {id(p) for g in first.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_optimizer for p in first.model.backbone.parameters())
    run_epoch(first, 0)  # then stopped, as if interrupted after epoch 1
    assert not first.model.backbone.training and first.model.head.training
    assert all(not p.requires_grad for p in first.model.backbone.parameters())
    assert first.optimizer_steps > 0
    assert not torch.equal(first.model.head.state_dict()["cls.0.2.bias"], head_before)  # the rest trained
    assert_same(backbone_state(first.model), loaded)  # weights, BatchNorm statistics: no step, no decay
    assert_same(backbone_state(first.ema.ema), loaded)
    last = first.save_dir / "weights" / "last.pt"
    ckpt = load_checkpoint(last)
    assert ckpt["train_args"]["freeze"] == 2
    assert_same({k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}, loaded)

    with pytest.raises(ConfigError, match="freeze cannot change"):
        Trainer(resume=last, changes={"freeze": "0"})
    caplog.clear()
    resumed = Trainer(resume=last, changes={"workers": 0})
    with caplog.at_level(logging.INFO, logger="yolo_mobile.engine.trainer"):
        resumed.before_train()
        assert resumed.start_epoch == 1 and resumed.backbone_frozen
        run_epoch(resumed, 1)  # epoch 2 of a --freeze 2 run: still frozen
        assert_same(backbone_state(resumed.model), loaded)
        assert_same(backbone_state(resumed.ema.ema), loaded)
        assert "unfrozen" not in caplog.text
        run_epoch(resumed, 2)
    assert "epoch 3: backbone unfrozen" in caplog.text
    assert resumed.model.backbone.training
    state = backbone_state(resumed.model)
    moved = [k for k in state if not torch.equal(state[k], loaded[k])]
    assert any(k.endswith("running_mean") for k in moved)  # statistics updated again
    weights = [k for k, p in resumed.model.backbone.named_parameters()]
    assert len([k for k in moved if k in weights]) == len(weights)  # every backbone weight stepped
    ema = backbone_state(resumed.ema.ema)
    assert any(not torch.equal(ema[k], loaded[k]) for k in weights)


def test_freeze_backbone_holds_the_whole_run(shapes, backbone_file, tmp_path):
    path, loaded = backbone_file
    config = TrainConfig.from_kwargs(cfg="yolov5n.yaml", data=str(shapes), epochs=2, freeze="backbone",
                                     pretrained=str(path), project=str(tmp_path), name="b", optimizer="AdamW",
                                     **FAST)
    trainer = Trainer(config)
    trainer.before_train()
    for epoch in range(2):
        run_epoch(trainer, epoch)
        assert trainer.backbone_frozen and not trainer.model.backbone.training
    assert_same(backbone_state(trainer.model), loaded)
    assert_same(backbone_state(trainer.ema.ema), loaded)
    assert load_checkpoint(trainer.save_dir / "weights" / "best.pt")["train_args"]["freeze"] == "backbone"


def test_freeze_values():
    assert TrainConfig().frozen_epochs() == 0
    assert TrainConfig(freeze="0").frozen_epochs() == 0
    assert TrainConfig(freeze="3").frozen_epochs() == 3
    assert TrainConfig(freeze=3).frozen_epochs() == 3
    assert TrainConfig(freeze="backbone").frozen_epochs() == float("inf")
    for bad in (-1, "-1", "foo", "1.5", True):
        with pytest.raises(ConfigError, match=r"freeze must be a number of epochs .* or 'backbone'"):
            TrainConfig.from_kwargs(freeze=bad)


@pytest.mark.parametrize("value", ["-1", "foo"])
def test_bad_freeze_flag_is_one_clear_line(value, capsys):
    assert main(["train", "--cfg", "yolov5n.yaml", "--freeze", value]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"yolo-mobile: error: freeze must be a number of epochs (0 or more) or 'backbone', got '{value}'"


def test_freeze_flag_in_help(capsys):
    assert main(["train", "--help"]) == 0
    assert "--freeze N|backbone" in capsys.readouterr().out
