"""The training loop, read top to bottom: before_train, then per epoch before_epoch, train_one_epoch,
after_epoch; then after_train. Config is one plain dataclass; nothing global is changed.

DDP comes from PyTorch's own launcher: ``torchrun --nproc_per_node N -m yolo_mobile train ...``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import logging
import math
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import _ultralytics
from ..config import ConfigError, DataConfig, ModelConfig, check_imgsz, flag, load_data_config, load_model_config
from ..datasets.detection import AugmentConfig, DetectionDataset, collate_detection, load_split, seed_worker
from ..datasets.plots import plot_batch
from ..datasets.sampler import MultiScaleBatchSampler
from ..datasets.synthetic import resolve_data
from ..detector import Detector, build_model, pretrained_weights
from ..files import check_writable, claim_run_dir, write_text, write_with
from ..loss import DetectionLoss
from ..resources import GiB, resident_bytes
from .checkpoint import load_checkpoint, load_weights, save_checkpoint
from .device import select_device
from .evaluator import COCOEvaluator
from .memory import BatchFit, ProbeStep, default_workers, fit_batch, optimizer_state_bytes
from .step_guard import StepGuard, TrainingDiverged, nonfinite_tensors
from .validate import validate

log = logging.getLogger(__name__)



@dataclass
class TrainConfig:
    """Everything a run is made of; saved as ``args.yaml`` and in every checkpoint."""

    cfg: str = flag("mobilenetv3_large.yaml", "model YAML or built-in name, e.g. mobilevit_s.yaml (the command "
                    "line asks for it, or --resume)", show_default=False)
    pretrained: str | None = flag(None, "backbone ImageNet weights (.safetensors, .pth, .pt); replaces the YAML's "
                                        "backbone.pretrained (see weights/README.md)")
    data: str = flag("shapes", "data YAML, or shapes: the built-in synthetic set")
    epochs: int | None = flag(None, "default: the data YAML's suggestion (the built-in set: 10), else 100")
    batch: int = flag(16, "total batch over all processes; -1: the largest that fits in memory, found by a probe "
                          "step")
    imgsz: int | None = flag(None, "base training and validation size (default: the data YAML's suggestion, the "
                                   "built-in set's own 320; else 640)")
    device: str = flag("", "cpu, 0, or 0,1 (with torchrun); default: GPU 0 if present")
    workers: int | None = flag(None, "data loader processes per rank (default: usable CPUs less one, at most 8)")
    project: str = flag("runs/train", "runs go to PROJECT/NAME")
    name: str = flag("exp", "run name, numbered when it exists")
    seed: int = flag(0, "seed of the model's initialisation, the sampler and the augmentations")
    # multi-scale variable batch
    multi_scale: bool = flag(False, "variable-batch multi-scale sampler (fewer images per batch at larger sizes)")
    min_scale: float = flag(0.5, "smallest multi-scale size, as a multiple of imgsz")
    max_scale: float = flag(1.5, "largest multi-scale size, as a multiple of imgsz")
    n_scales: int = flag(5, "number of multi-scale sizes")
    # optimisation
    optimizer: str = flag("SGD", "SGD (momentum, nesterov) or AdamW", choices=("SGD", "AdamW"))
    lr0: float | None = flag(None, "initial lr (default 0.01 SGD, 0.002 AdamW)")
    lrf: float = 0.01  # final lr = lr0 * lrf
    schedule: str = flag("linear", "decay after warm-up", choices=("linear", "cosine"))
    momentum: float = 0.937
    weight_decay: float = 5e-4
    warmup_epochs: float = 3.0
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1  # SGD only: biases start at this lr and come down to lr0 during warm-up
    nbs: int = 64  # nominal batch: gradients accumulate until this many images
    clip_grad: float = 10.0
    max_skipped_steps: int = 20  # stop after this many optimizer steps in a row with a non-finite loss/gradient
    amp: bool = True  # on CUDA only
    ema_decay: float = 0.9999
    freeze: str | int | None = flag(None, "hold the backbone (weights and BatchNorm statistics) for the first N "
                                          "epochs, or for the whole run with 'backbone'; 0: none (see "
                                          "docs/fine-tuning.md)", metavar="N|backbone")
    # loss gains
    box: float = 7.5
    cls: float = 0.5
    dfl: float = 1.5
    # augmentation
    close_mosaic: int | None = flag(None, "last epochs without mosaic (default 10, at most a quarter of the epochs)")
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    cache: str | None = flag(None, "keep training images decoded at the largest size training asks for: in "
                                   "memory, or as .npy files (default: decode, keep a buffer)", choices=("ram", "disk"))
    plot_batches: int = flag(3, "draw the first N training batches with their boxes to train_batch<i>.jpg in the "
                                "run folder; 0: none")
    # validation
    val: bool = flag(True, "per-epoch validation")
    val_batch: int | None = None  # default: 2 x batch

    @classmethod
    def from_kwargs(klass, **kwargs: Any) -> TrainConfig:  # not `cls`: that is the class-loss gain field
        """Build from keyword arguments; augmentation keys may be given flat. Unknown keys list the valid ones."""
        aug_keys = {f.name for f in dataclasses.fields(AugmentConfig)}
        valid = {f.name for f in dataclasses.fields(klass)}
        unknown = sorted(set(kwargs) - valid - aug_keys)
        if unknown:
            raise ConfigError(f"unknown training option(s) {', '.join(unknown)}; valid: "
                              f"{', '.join(sorted(valid | aug_keys))}")
        aug = kwargs.pop("augment", None)
        augment = aug if isinstance(aug, AugmentConfig) else AugmentConfig(**(aug or {}))
        for k in aug_keys & set(kwargs):
            setattr(augment, k, kwargs.pop(k))
        config = klass(**kwargs, augment=augment)
        config.check()
        return config

    def check(self) -> None:
        self._check_numbers()
        if self.imgsz is not None:
            check_imgsz(self.imgsz)
        if self.optimizer not in ("SGD", "AdamW"):
            raise ConfigError(f"unknown optimizer '{self.optimizer}'; valid: SGD, AdamW")
        if self.schedule not in ("linear", "cosine"):
            raise ConfigError(f"unknown schedule '{self.schedule}'; valid: linear, cosine")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch < 1 and self.batch != -1:
            raise ConfigError(f"batch must be at least 1, or -1 for the largest that fits; got {self.batch}")
        if self.cache not in (None, "ram", "disk"):
            raise ConfigError(f"unknown cache '{self.cache}'; valid: ram, disk (or none)")
        if self.plot_batches < 0:
            raise ConfigError(f"plot_batches must be 0 or more, got {self.plot_batches}")
        if self.close_mosaic is not None and self.close_mosaic < 0:
            raise ConfigError(f"close_mosaic must be 0 or more, got {self.close_mosaic}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"workers must be 0 or more, got {self.workers}")
        self.frozen_epochs()  # raises on a bad --freeze

    def frozen_epochs(self) -> float:
        """Epochs the backbone is held for: 0 (none), N, or infinity for ``freeze: backbone``."""
        value = self.freeze
        if value is None:
            return 0
        if isinstance(value, str) and value.strip().lower() == "backbone":
            return math.inf
        text = str(value).strip()
        if isinstance(value, bool) or not text.isdigit():
            raise ConfigError(f"freeze must be a number of epochs (0 or more) or 'backbone', got {value!r}")
        return int(text)

    def _check_numbers(self) -> None:
        """Every number must be finite and in its range before anything runs: a NaN learning rate would train
        to NaN weights and still exit 0."""
        ranges = {  # option: (low, high, low included)
            "lr0": (0, math.inf, False), "lrf": (0, math.inf, False), "momentum": (0, 1, False),
            "weight_decay": (0, math.inf, True), "warmup_epochs": (0, math.inf, True),
            "warmup_momentum": (0, 1, True), "warmup_bias_lr": (0, math.inf, True), "clip_grad": (0, math.inf, False),
            "ema_decay": (0, 1, False), "box": (0, math.inf, True), "cls": (0, math.inf, True),
            "dfl": (0, math.inf, True), "min_scale": (0, math.inf, False), "max_scale": (0, math.inf, False),
        }
        for name, (low, high, low_ok) in ranges.items():
            value = getattr(self, name)
            if value is None:
                continue
            try:
                x = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{name} must be a number, got {value!r}") from None
            if not math.isfinite(x) or x < low or (x == low and not low_ok) or x >= high:
                bracket = "[" if low_ok else "("
                raise ConfigError(f"{name} must be a finite number in {bracket}{low}, {high}), got {value}")
        for name in ("nbs", "max_skipped_steps", "n_scales"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.min_scale > self.max_scale:
            raise ConfigError(f"min_scale {self.min_scale} is above max_scale {self.max_scale}")
        for f in dataclasses.fields(self.augment):
            value = getattr(self.augment, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")

    def resolved(self, data_defaults: dict[str, int], world_size: int = 1) -> TrainConfig:
        """Fill the options left to the data and the machine: imgsz and epochs from the data YAML's
        suggestions (else 640 and 100), workers from the CPUs this process may use."""
        epochs = self.epochs or data_defaults.get("epochs", 100)
        return dataclasses.replace(
            self, imgsz=self.imgsz or data_defaults.get("imgsz", 640), epochs=epochs,
            close_mosaic=min(10, epochs // 4) if self.close_mosaic is None else self.close_mosaic,
            workers=default_workers(world_size) if self.workers is None else self.workers)


def _lr_lambda(schedule: str, epochs: int, lrf: float):
    if schedule == "cosine":
        return lambda e: ((1 - math.cos(e * math.pi / epochs)) / 2) * (lrf - 1) + 1
    return lambda e: max(1 - e / epochs, 0) * (1.0 - lrf) + lrf


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weights with decay; norm weights and all biases without (decay on them only hurts)."""
    decay, no_decay, biases = [], [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if name == "bias":
                biases.append(p)
            elif isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) or p.ndim <= 1:
                no_decay.append(p)
            else:
                decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0},
            {"params": biases, "weight_decay": 0.0}]




def fitness(metrics: dict[str, Any], loss: float) -> float:
    """What best.pt keeps the best of: 0.1 mAP50 + 0.9 mAP50-95; while both are 0 (or there is no validation),
    minus the training loss, so an untrained-looking later epoch still beats an equally bad earlier one."""
    score = 0.1 * float(metrics.get("map50", 0.0)) + 0.9 * float(metrics.get("map", 0.0))
    return score if score > 0 else -float(loss)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says where it stopped and how to resume."""


# what a resumed run may change; everything else is the run's own, as its checkpoint stored it
RESUMABLE = ("epochs", "device", "workers")


def resume_config(saved: dict[str, Any], changes: dict[str, Any], source: str | Path) -> TrainConfig:
    """The stored configuration of a run, with the few options a resume may change."""
    refused = sorted(k for k, v in changes.items() if k not in RESUMABLE and v is not None)
    if refused:
        raise ConfigError(f"{source}: --resume continues the run as it was configured; "
                          f"{', '.join(refused)} cannot change (only {', '.join(RESUMABLE)} may be given)")
    kept = {k: v for k, v in changes.items() if v is not None and v != ""}
    return TrainConfig.from_kwargs(**{**saved, **kept})


class Trainer:
    def __init__(self, config: TrainConfig | None = None, resume: str | Path | None = None,
                 changes: dict[str, Any] | None = None) -> None:
        """``resume``: a last.pt to continue; ``changes`` the options given with it (only epochs, device and
        workers may differ from the stored run; without ``changes`` they come from ``config``)."""
        self.resume_from = Path(resume) if resume else None
        self.checkpoint = load_checkpoint(self.resume_from) if self.resume_from else None
        if self.checkpoint is not None:
            saved = dict(self.checkpoint.get("train_args") or {})
            if not saved:
                raise ConfigError(f"{resume}: holds no training state (train_args); it cannot be resumed")
            if changes is None:
                changes = {k: getattr(config, k) for k in RESUMABLE} if config is not None else {}
            config = resume_config(saved, changes, resume)
            if int(self.checkpoint["epoch"]) + 1 >= config.epochs:  # said before any data is read
                raise ConfigError(f"{resume}: training already finished ({config.epochs} epochs); give --epochs "
                                  "with a larger number to train on")
        if config is None:
            raise ConfigError("Trainer needs a TrainConfig or a checkpoint to resume")
        self.config = config
        self.resume_dir = self._resume_dir() if self.checkpoint is not None else None
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.main = self.rank == 0
        self.save_dir: Path | None = None
        self.epoch, self.batch_index = 0, 0

    # ------------------------------------------------------------------------------------------------ run
    def run(self) -> tuple[Path, dict[str, Any]]:
        try:
            self.before_train()
            for epoch in range(self.start_epoch, self.config.epochs):
                self.epoch = epoch
                self.before_epoch(epoch)
                self.train_one_epoch(epoch)
                self.after_epoch(epoch)
            return self.after_train()
        except KeyboardInterrupt:
            self._close_loader()
            raise TrainingInterrupted(self._interrupted()) from None
        except RuntimeError as e:
            # the OOM killer or a signal sent to one worker can end a DataLoader worker: training cannot go on,
            # so stop as for Ctrl-C, keeping what is saved
            if "DataLoader worker" in str(e) and ("killed by signal" in str(e) or "exited unexpectedly" in str(e)):
                self._close_loader()
                raise TrainingInterrupted(self._interrupted(f" ({str(e).strip()})")) from None
            self._remove_unsaved_run()
            raise
        except BaseException:
            self._remove_unsaved_run()
            raise
        finally:
            if self.world_size > 1 and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()

    def _close_loader(self) -> None:
        """Shut the persistent workers down now, so a dead worker is not reported again when the loader is
        garbage-collected after our message."""
        iterator = getattr(getattr(self, "loader", None), "_iterator", None)
        if iterator is None:
            return
        self.loader._iterator = None
        with contextlib.suppress(RuntimeError):  # a worker that already died: nothing left to shut down
            iterator._shutdown_workers()

    def _interrupted(self, why: str = "") -> str:
        """Keep the last completed epoch's last.pt; a run with no checkpoint yet leaves no folder behind."""
        where = f"stopped at epoch {self.epoch + 1} batch {self.batch_index + 1}{why}"
        last = self.save_dir / "weights" / "last.pt" if self.save_dir is not None else None
        if last is not None and last.is_file():
            return f"{where}; resume with: yolo-mobile train --resume {last}"
        self._remove_unsaved_run()
        return f"{where}, before the first checkpoint: nothing was saved"

    def _remove_unsaved_run(self) -> None:
        """A run folder this run made goes when it holds no checkpoint (a stop before epoch 1 ended, or an
        error)."""
        if self.main and self.save_dir is not None and self.save_dir != self.resume_dir and self.save_dir.is_dir() \
                and not any((self.save_dir / "weights").glob("*.pt")):
            shutil.rmtree(self.save_dir, ignore_errors=True)

    def _resume_dir(self) -> Path | None:
        """The run folder a resumed checkpoint belongs to: ``<run>/weights/<file>.pt`` with ``<run>/args.yaml``.
        None for a checkpoint anywhere else (a download, a copy): its grandparent is nobody's run, and the
        resumed run gets a new folder instead. Refuses a ``best.pt`` behind its run's ``last.pt``: resuming it
        would overwrite the later epochs."""
        path = self.resume_from.resolve()
        run = path.parent.parent
        if path.parent.name != "weights" or not (run / "args.yaml").is_file():
            return None
        last = path.parent / "last.pt"
        if path != last and last.is_file():
            last_epoch = load_checkpoint(last).get("epoch")
            if last_epoch is not None and int(last_epoch) > int(self.checkpoint["epoch"]):
                raise ConfigError(
                    f"{self.resume_from}: epoch {int(self.checkpoint['epoch']) + 1} of a run whose last.pt is at epoch "
                    f"{int(last_epoch) + 1}; resuming it would overwrite last.pt with a rewound run. Resume {last}, "
                    f"or copy {path.name} out of {path.parent} to start a new run folder from it")
        return run

    def _check_outputs(self) -> None:
        """A run folder that cannot be written is said before any data is read or memory probed."""
        c = self.config
        check_writable(self.resume_dir if self.resume_dir is not None else Path(c.project))

    # ------------------------------------------------------------------------------------------ before_train
    def before_train(self) -> None:
        """Everything before epoch 1, in the order of its side effects: an unwritable run folder is said before
        any data is read; the data is scanned before the memory probe; the run folder is claimed only after the
        probe, so a run that cannot fit leaves no folder."""
        if self.main:
            self._check_outputs()
        self._setup_device()
        self._seed(self.config.seed + self.rank)
        model_config, weights = self._model_definition()
        data = self._load_data()
        self._build_model(model_config, data, weights)
        self._fit_batch()
        self._build_optimizer()
        self._start_state()
        self._build_loader()
        self.guard = StepGuard(self.model_unwrapped, self.device, self.config.max_skipped_steps, self.lr0, self.main)
        if self.main:
            self._open_run_folder()
        self.t0 = time.time()
        self.run_train_seconds, self.run_train_images, self.val_seconds = 0.0, 0, None

    def _setup_device(self) -> None:
        """This process's device; under torchrun, the process group too."""
        c = self.config
        if self.world_size > 1:
            cuda = c.device not in ("cpu",) and torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(self.local_rank)
            torch.distributed.init_process_group("nccl" if cuda else "gloo")
            self.device = torch.device(f"cuda:{self.local_rank}" if cuda else "cpu")
        else:
            self.device = select_device(c.device)
        self.cuda = self.device.type == "cuda"

    def _model_definition(self) -> tuple[ModelConfig, str | None]:
        """The network to build and its backbone weights, checked before any data is read."""
        c = self.config
        # a resumed run takes every weight from its checkpoint; a new one checks its backbone weights first
        # a resumed run rebuilds the network it trained, from the resolved definition in its checkpoint: an
        # edited YAML must not change it silently
        model_config = load_model_config(self.checkpoint["config"] if self.checkpoint else c.cfg)
        weights = pretrained_weights(model_config, False if self.checkpoint else (c.pretrained or True))
        if weights is None and self.checkpoint is None and c.frozen_epochs() and self.main:
            log.warning("--freeze %s with no pretrained backbone weights (--pretrained FILE, or the YAML's "
                        "backbone.pretrained): the backbone is held at its random initialisation", c.freeze)
        return model_config, weights

    def _load_data(self) -> DataConfig:
        """Resolve the data YAML, fill the options left to the data (imgsz, epochs, close_mosaic, workers), scan
        the training split and set up validation."""
        self.data_yaml = resolve_data(self.config.data).resolve() if self.main else None
        if self.world_size > 1:  # rank 0 builds the synthetic set once; the others wait for its path
            shared = [str(self.data_yaml) if self.data_yaml else None]
            torch.distributed.broadcast_object_list(shared, src=0)
            self.data_yaml = Path(shared[0])
        data = load_data_config(self.data_yaml)
        # stored absolute, so a resume from another folder finds the same data
        self.config = dataclasses.replace(self.config.resolved(data.defaults, self.world_size),
                                          data=str(self.data_yaml))
        self.names = data.names
        self.train_samples = load_split(data, "train")
        self.evaluator = self._make_evaluator()
        return data

    def _make_evaluator(self) -> COCOEvaluator | None:
        # validation runs on rank 0 alone, so its evaluator must not wait for the other ranks
        if not (self.config.val and self.main):
            return None
        evaluator = COCOEvaluator.from_yolo(self.data_yaml, "val", distributed=False)
        try:
            evaluator.check_ground_truth()
        except ConfigError as e:  # training itself does not need it: go on, and say loudly why no mAP
            log.warning("%s; training goes on without validation (--no-val says so)", e)
            return None
        return evaluator

    def _build_model(self, model_config: ModelConfig, data: DataConfig, weights: str | None) -> None:
        """The model on its device, its EMA (rank 0), the gradient scaler and the loss."""
        c = self.config
        model = build_model(model_config, nc=data.nc, pretrained=weights is not None)
        model.names = list(data.names)
        self.model: Detector = model.to(self.device)
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = _ultralytics.model_ema(self.model, decay=c.ema_decay) if self.main else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=c.amp and self.cuda)
        self.criterion = DetectionLoss(data.nc, self.model.strides, self.model.head.reg_max, c.box, c.cls, c.dfl)

    def _fit_batch(self) -> None:
        """The memory probe: the per-process batch that fits becomes the run's batch (see memory.fit_batch)."""
        c = self.config
        run = BatchFit(batch=c.batch, images=len(self.train_samples), workers=c.workers,
                       reserved=optimizer_state_bytes(self.model, c.optimizer), world_size=self.world_size,
                       multi_scale=c.multi_scale, main=self.main)
        step = ProbeStep(self.model, self.criterion, self.device, amp=self.scaler.is_enabled())
        self.per_rank_batch = fit_batch(step, self.device, run, self._sampler_sizes)
        self.config = dataclasses.replace(c, batch=self.per_rank_batch * self.world_size)

    def _scales(self) -> tuple[float, float, int]:
        c = self.config
        return (c.min_scale, c.max_scale, c.n_scales) if c.multi_scale else (1.0, 1.0, 1)

    def _sampler_sizes(self, base: int) -> list[tuple[int, int, int]]:
        """The (h, w, batch) of every size a sampler of base batch ``base`` makes."""
        return MultiScaleBatchSampler(len(self.train_samples), self.config.imgsz, base, *self._scales(), rank=0,
                                      world_size=1).sizes

    def _build_optimizer(self) -> None:
        c = self.config
        self.lr0 = lr0 = c.lr0 if c.lr0 is not None else (0.01 if c.optimizer == "SGD" else 0.002)
        accumulate = max(round(c.nbs / c.batch), 1)
        weight_decay = c.weight_decay * c.batch * accumulate / c.nbs  # decay per image seen stays constant
        groups = param_groups(self.model, weight_decay)
        if c.optimizer == "SGD":
            self.optimizer = torch.optim.SGD(groups, lr=lr0, momentum=c.momentum, nesterov=True)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=lr0, betas=(c.momentum, 0.999))
        for g in self.optimizer.param_groups:
            g["initial_lr"] = lr0
        self.lf = _lr_lambda(c.schedule, c.epochs, c.lrf)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lf)

    def _start_state(self) -> None:
        """Where the run starts (epoch 1, or the checkpoint's state), the backbone held or not, then DDP."""
        c = self.config
        self.start_epoch, self.best_fitness, self.history = 0, -math.inf, []
        # warm-up is counted in images from the start of the run and fixed here: under --multi-scale the number
        # of batches changes every epoch, images do not (YOLOv8's rule: warmup_epochs, at least 100 batches)
        self.warmup_images = max(round(c.warmup_epochs * len(self.train_samples)), 100 * c.batch) \
            if c.warmup_epochs > 0 else 0
        self.images_done, self.optimizer_steps = 0, 0
        if self.checkpoint is not None:
            self._load_state(self.checkpoint)
        self.backbone_frozen = False
        self._freeze_backbone(self.start_epoch)  # before DDP wraps the model: it reduces what needs a gradient
        if self.world_size > 1:
            self.model = self._ddp()

    def _ddp(self) -> nn.parallel.DistributedDataParallel:
        return nn.parallel.DistributedDataParallel(self.model_unwrapped,
                                                   device_ids=[self.local_rank] if self.cuda else None)

    def _build_loader(self) -> None:
        c = self.config
        self.sampler = MultiScaleBatchSampler(len(self.train_samples), c.imgsz, self.per_rank_batch, *self._scales(),
                                              seed=c.seed, rank=self.rank, world_size=self.world_size)
        self.dataset = DetectionDataset(self.train_samples, c.imgsz, augment=True, hyp=c.augment, cache=c.cache,
                                        max_size=max(max(h, w) for h, w, _ in self.sampler.sizes))
        self.loader = self._make_loader()

    def _open_run_folder(self) -> None:
        """Claim the run folder (a resumed run keeps its own) and write the resolved configuration to it."""
        c = self.config
        self.save_dir = self.resume_dir or claim_run_dir(c.project, c.name)
        if self.checkpoint is not None and self.resume_dir is None:
            log.warning("%s is not in the weights/ folder of a run (no args.yaml beside that folder): the resumed "
                        "run continues in a new run folder, %s", self.resume_from, self.save_dir)
        (self.save_dir / "weights").mkdir(parents=True, exist_ok=True)
        resolved = {**dataclasses.asdict(c), "data": str(self.data_yaml), "lr0": self.lr0,
                    "model": self.model_unwrapped.config.to_dict(), "world_size": self.world_size}
        write_text(self.save_dir / "args.yaml", yaml.safe_dump(resolved, sort_keys=False))
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("training %s (%.2fM params) on %s: %d images, %d epochs, batch %d, sizes %s, %d workers, "
                 "device %s", c.cfg, n_params / 1e6, self.data_yaml, len(self.train_samples), c.epochs, c.batch,
                 [s[:3] for s in self.sampler.sizes], c.workers, self.device)

    def _make_loader(self) -> DataLoader:
        c = self.config
        return DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=c.workers,
                          collate_fn=collate_detection, pin_memory=self.cuda, persistent_workers=c.workers > 0,
                          worker_init_fn=seed_worker if c.workers > 0 else None,
                          generator=torch.Generator().manual_seed(c.seed + self.rank))

    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    @property
    def model_unwrapped(self) -> Detector:
        return self.model.module if isinstance(self.model, nn.parallel.DistributedDataParallel) else self.model

    def _load_state(self, ckpt: dict[str, Any]) -> None:
        target = f"its stored config with the data's {len(self.names)} classes"
        load_weights(self.model, ckpt["model"], self.resume_from, ckpt, target)
        if self.ema is not None and ckpt.get("ema"):
            load_weights(self.ema.ema, ckpt["ema"], self.resume_from, ckpt, target)
            self.ema.updates = int(ckpt.get("ema_updates", 0))
        if ckpt.get("optimizer"):
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler"):
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.images_done = int(ckpt.get("images_done", 0))
        self.optimizer_steps = int(ckpt.get("optimizer_steps", 0))
        self.warmup_images = int(ckpt.get("warmup_images", self.warmup_images))
        self.best_fitness = float(ckpt.get("best_fitness", -math.inf))
        self.history = list(ckpt.get("history") or [])
        if self.main:
            log.info("resuming %s at epoch %d", self.resume_from, self.start_epoch + 1)

    # ------------------------------------------------------------------------------------------ each epoch
    def before_epoch(self, epoch: int) -> None:
        c = self.config
        # mosaic is switched off for the last `close_mosaic` epochs: the one place it changes
        if self.dataset.mosaic and epoch >= c.epochs - c.close_mosaic:
            if self.main:
                log.info("closing mosaic for the last %d epochs", c.epochs - epoch)
            self.dataset.mosaic = False
            self.loader = self._make_loader()  # persistent workers hold a copy of the dataset
        self.sampler.set_epoch(epoch)
        self._freeze_backbone(epoch)
        self.model.train()
        if self.backbone_frozen:  # held BatchNorm statistics (and no dropout) in a frozen backbone
            self.model_unwrapped.backbone.eval()

    def _freeze_backbone(self, epoch: int) -> None:
        """--freeze: while ``epoch`` is below it, the backbone's weights take no gradient, so the optimizer (whose
        groups hold every weight, built before this) skips them: no step, no weight decay, no momentum; the EMA
        copy of the backbone is held equal to them. Under DDP the wrapper is rebuilt when this changes, as it
        fixes at construction which weights it reduces."""
        frozen = epoch < self.config.frozen_epochs()
        if frozen == self.backbone_frozen:
            return
        self.backbone_frozen = frozen
        for p in self.model_unwrapped.backbone.parameters():
            p.requires_grad_(not frozen)
        if self.main:
            if not frozen:
                log.info("epoch %d: backbone unfrozen (--freeze %s); its weights and BatchNorm statistics train from "
                         "here on", epoch + 1, self.config.freeze)
            elif math.isinf(self.config.frozen_epochs()):
                log.info("backbone frozen for the whole run (--freeze backbone): weights and BatchNorm statistics held")
            else:
                log.info("backbone frozen (weights and BatchNorm statistics held) until the end of epoch %d "
                         "(--freeze %s)", self.config.frozen_epochs(), self.config.freeze)
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            self.model = self._ddp()

    def _hold_ema_backbone(self) -> None:
        """The EMA's backbone equal to the frozen one, bit for bit (an average of equal numbers may round)."""
        held = self.model_unwrapped.backbone.state_dict()
        with torch.no_grad():
            for k, v in self.ema.ema.backbone.state_dict().items():
                if v.is_floating_point():
                    v.copy_(held[k])

    def train_one_epoch(self, epoch: int) -> None:
        c = self.config
        nb = len(self.sampler)
        mean_loss = torch.zeros(3, device=self.device)
        self.guard.new_epoch()
        images_since_step, self.images_seen = 0, 0
        start = time.time()
        bar = tqdm(self.loader, total=nb, desc=f"epoch {epoch + 1}/{c.epochs}", disable=not self.main,
                   unit="batch", leave=True, dynamic_ncols=True)
        self.optimizer.zero_grad(set_to_none=True)
        # on a GPU the loss is read every 10 batches (each read waits for the GPU); on a CPU every batch
        every = 10 if self.cuda else 1
        for i, (images, targets) in enumerate(bar):
            self.batch_index = i
            if self.main and epoch == 0 and i < c.plot_batches:
                plot_batch(images, targets, self.names, self.save_dir / f"train_batch{i}.jpg")
            if images_since_step == 0:  # the first batch of an optimizer step: keep the buffers as they are
                self.guard.begin()
            items = self._train_one_iter(images, targets, epoch)
            mean_loss = (mean_loss * i + items) / (i + 1)
            h, w = images.shape[-2:]
            images_since_step += self.sampler.batch_size_of(h, w) * self.world_size
            self.images_seen += len(images) * self.world_size
            if images_since_step >= c.nbs or i == nb - 1:
                self._optimizer_step(epoch, i)
                images_since_step = 0
            if self.main and (i % every == 0 or i == nb - 1):
                self._show_progress(bar, mean_loss, (h, w), time.time() - start, epoch)
        bar.close()
        self.epoch_loss = mean_loss.tolist()
        self.epoch_time = time.time() - start
        self.run_train_seconds += self.epoch_time
        self.run_train_images += self.images_seen

    def _train_one_iter(self, images: torch.Tensor, targets: torch.Tensor, epoch: int) -> torch.Tensor:
        """Warm-up, forward, loss and backward of one batch (the optimizer steps apart); returns the loss items."""
        self.images_done += len(images) * self.world_size
        if self.images_done - len(images) * self.world_size < self.warmup_images:
            self._warmup(self.images_done / self.warmup_images, epoch)
        x = images.to(self.device, non_blocking=True)
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        x = x.float() / 255
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.scaler.is_enabled()):
            maps = self.model(x)
        loss, items = self.criterion([m.float() for m in maps], targets.to(self.device, non_blocking=True))
        if self.world_size > 1:
            loss = loss * self.world_size  # DDP averages gradients over ranks; keep the per-image scale
        self.scaler.scale(loss).backward()
        self.guard.add(loss)
        return items

    def _show_progress(self, bar: tqdm, mean_loss: torch.Tensor, size: tuple[int, int], epoch_seconds: float,
                       epoch: int) -> None:
        box, cls, dfl = mean_loss.tolist()
        mem = f"{(torch.cuda.memory_reserved(self.device) if self.cuda else resident_bytes()) / GiB:.1f}G"
        bar.set_postfix(box=f"{box:.3f}", cls=f"{cls:.3f}", dfl=f"{dfl:.3f}", size=f"{size[0]}x{size[1]}",
                        lr=f"{self.optimizer.param_groups[0]['lr']:.2e}", mem=mem,
                        run=self._run_progress(epoch_seconds, epoch), refresh=False)

    def _run_progress(self, epoch_seconds: float, epoch: int) -> str:
        """'elapsed<remaining' for the whole run: training at the pace seen so far, plus validation at the
        duration of the last one (before the first, a third of training's time per image: forward only)."""
        c = self.config
        done = self.run_train_images + self.images_seen
        per_image = (self.run_train_seconds + epoch_seconds) / max(done, 1)
        total = len(self.train_samples) * (c.epochs - self.start_epoch)
        val_each = self.val_seconds if self.val_seconds is not None else (
            per_image / 3 * len(self.evaluator.image_ids) if self.evaluator is not None else 0.0)
        left = per_image * max(total - done, 0) + val_each * (c.epochs - epoch)
        return f"{_clock(time.time() - self.t0)}<{_clock(left)}"

    def _warmup(self, progress: float, epoch: int) -> None:
        """Linear warm-up by the fraction of warm-up images seen after this batch (the first step already moves
        the weights): every group rises from 0 to its scheduled lr, except that with SGD the biases come down
        from warmup_bias_lr (an SGD habit: with AdamW's smaller lr0 it would start them at 50x lr0); SGD's
        momentum rises from warmup_momentum."""
        c = self.config
        progress = min(progress, 1.0)
        for j, g in enumerate(self.optimizer.param_groups):
            start = c.warmup_bias_lr if j == 2 and c.optimizer == "SGD" else 0.0
            g["lr"] = start + progress * (g["initial_lr"] * self.lf(epoch) - start)
            if c.optimizer == "SGD":
                g["momentum"] = c.warmup_momentum + progress * (c.momentum - c.warmup_momentum)

    def _optimizer_step(self, epoch: int, i: int) -> None:
        """Clip, then step only if the loss, the gradients and the buffers are all finite (the guard reads all
        with one host sync); otherwise the guard puts the buffers back, so a skipped step leaves every tensor
        unchanged."""
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = nn.utils.clip_grad_norm_(params, self.config.clip_grad)
        if self.guard.check(norm, self.scaler, epoch, i):
            self.scaler.step(self.optimizer)
            self.optimizer_steps += 1
            if self.ema is not None:
                self.ema.update(model=self.model_unwrapped)
                if self.backbone_frozen:
                    self._hold_ema_backbone()
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def after_epoch(self, epoch: int) -> None:
        epoch_lrs = [g["lr"] for g in self.optimizer.param_groups]  # what this epoch trained with, for results.csv
        with warnings.catch_warnings():  # an epoch whose steps were all skipped is reported in results.csv instead
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            self.scheduler.step()
        if self.main:
            metrics = self._validate()
            row = self._results_row(epoch, epoch_lrs, metrics)
            self._save_epoch(epoch, row, metrics)
            self._write_results()
            if metrics:
                log.info("epoch %d: mAP50-95 %.4f mAP50 %.4f, %.1f img/s", epoch + 1, metrics["map"],
                         metrics["map50"], row["images_per_s"])
        if self.world_size > 1:
            torch.distributed.barrier()

    def _validate(self) -> dict[str, Any]:
        """The EMA model's metrics on the val split; none without validation."""
        if self.evaluator is None:
            return {}
        c = self.config
        t0 = time.time()
        metrics = validate(self.ema.ema, self.data_yaml, imgsz=c.imgsz, batch=c.val_batch or 2 * c.batch,
                           device=self.device, workers=c.workers, evaluator=self.evaluator, progress=True)
        self.val_seconds = time.time() - t0
        return metrics

    def _results_row(self, epoch: int, lrs: list[float], metrics: dict[str, Any]) -> dict[str, Any]:
        """The epoch's row of results.csv."""
        return {"epoch": epoch + 1, "time_s": round(self.epoch_time, 1),
                "images_per_s": round(self.images_seen / max(self.epoch_time, 1e-9), 1),
                "train/box_loss": self.epoch_loss[0], "train/cls_loss": self.epoch_loss[1],
                "train/dfl_loss": self.epoch_loss[2],
                **{f"lr/pg{j}": lr for j, lr in enumerate(lrs)},
                **{f"metrics/{k}": metrics.get(k, float("nan")) for k in ("map50", "map", "map75")},
                "fitness": fitness(metrics, sum(self.epoch_loss)), "skipped_steps": self.guard.skipped_steps,
                "amp_overflows": self.guard.amp_overflows}

    def _save_epoch(self, epoch: int, row: dict[str, Any], metrics: dict[str, Any]) -> None:
        """best.pt when the epoch's fitness is the best so far, then last.pt; the checkpoints carry the history,
        this row included."""
        self.history.append(row)
        best = self.best_fitness
        try:
            if row["fitness"] >= self.best_fitness:  # ties go to the later, longer-trained epoch
                self.best_fitness = row["fitness"]
                self._save("best.pt", epoch, metrics)
            self._save("last.pt", epoch, metrics)
        except BaseException:  # results.csv lists only epochs whose checkpoint is safely written
            self.history.pop()
            self.best_fitness = best
            raise

    def _save(self, name: str, epoch: int, metrics: dict[str, Any]) -> None:
        """Write a checkpoint, only when every tensor in it is finite."""
        bad = nonfinite_tensors({"model": self.model_unwrapped.state_dict(), "ema": self.ema.ema.state_dict(),
                                 "optimizer": self.optimizer.state_dict()["state"]})
        if bad:
            raise TrainingDiverged(f"epoch {epoch + 1}: {len(bad)} tensor(s) are not finite ({', '.join(bad[:3])}"
                                   f"{', ...' if len(bad) > 3 else ''}); {name} not written; lower --lr0 (now "
                                   f"{self.lr0:g})")
        scalar = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        save_checkpoint(self.save_dir / "weights" / name, self.model_unwrapped, ema=self.ema.ema,
                        optimizer=self.optimizer, epoch=epoch, metrics=scalar,
                        extra={"train_args": dataclasses.asdict(self.config), "scheduler": self.scheduler.state_dict(),
                               "scaler": self.scaler.state_dict(), "ema_updates": int(self.ema.updates),
                               "best_fitness": float(self.best_fitness), "history": self.history,
                               "imgsz": int(self.config.imgsz), "data": str(self.data_yaml),
                               "images_done": self.images_done, "optimizer_steps": self.optimizer_steps,
                               "warmup_images": self.warmup_images})

    def _write_results(self) -> None:
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=list(self.history[-1]), extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows(self.history)
        write_text(self.save_dir / "results.csv", table.getvalue())
        plot_results(self.history, self.save_dir / "results.png")

    # ----------------------------------------------------------------------------------------- after_train
    def after_train(self) -> tuple[Path | None, dict[str, Any]]:
        if not self.main:
            return None, {}
        hours = (time.time() - self.t0) / 3600
        final = dict(self.history[-1]) if self.history else {}
        final["best_fitness"] = self.best_fitness
        print(f"\n{self.config.epochs - self.start_epoch} epochs in {hours:.3f} h; "
              f"best mAP50-95 {max((r['metrics/map'] for r in self.history), default=float('nan')):.4f}; "
              f"weights in {self.save_dir / 'weights'}")
        unreadable = int(self.dataset.unreadable.sum())
        if unreadable:
            print(f"{unreadable} training image(s) became unreadable during the run and were skipped (warned once "
                  "each above)")
        return self.save_dir, final


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


def plot_results(history: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure  # not pyplot: no global backend or figure state is touched

    keys = ["train/box_loss", "train/cls_loss", "train/dfl_loss", "metrics/map50", "metrics/map", "lr/pg0"]
    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(12, 6), tight_layout=True)
    axes = fig.subplots(2, 3)
    for ax, key in zip(axes.flat, keys, strict=True):
        ax.plot(epochs, [r[key] for r in history], marker="o", markersize=3)
        ax.set_title(key)
        ax.set_xlabel("epoch")
    write_with(path, lambda f: fig.savefig(f, format="png", dpi=100))


def train(cfg: str = "mobilenetv3_large.yaml", data: str | None = "shapes", resume: str | Path | None = None,
          **hyp: Any) -> tuple[Path | None, dict[str, Any]]:
    """Train as ``yolo-mobile train`` does; returns the run folder and the last epoch's metrics."""
    if resume:  # the run's own configuration; only epochs, device and workers may be given
        return Trainer(resume=resume, changes=hyp).run()
    config = TrainConfig.from_kwargs(cfg=cfg, data=str(data) if data is not None else "shapes", **hyp)
    return Trainer(config).run()
