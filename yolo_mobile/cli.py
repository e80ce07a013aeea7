"""Command line: ``yolo-mobile <command>``. Each command parses its flags and calls the package; no logic lives here."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import ConfigError
from .registry import RegistryError


class _Parser(argparse.ArgumentParser):
    """argparse with our one-line errors: ``yolo-mobile: error: detect: argument --conf: ...``."""

    def error(self, message: str) -> None:
        command = self.prog.removeprefix("yolo-mobile").strip()
        self.exit(2, f"yolo-mobile: error: {command + ': ' if command else ''}{message} (see {self.prog} --help)\n")


def int_at_least(low: int):
    """argparse ``type``: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def fraction(text: str) -> float:
    """argparse ``type``: a number in [0, 1] (a score or IoU threshold)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def cmd_models(args: argparse.Namespace) -> int:
    from .backbones import BACKBONES
    from .benchmark import model_table
    from .config import builtin_models_dir, check_imgsz, list_builtin_models, read_yaml

    check_imgsz(args.imgsz, "--imgsz")
    print(f"Built-in model YAMLs ({builtin_models_dir()}):")
    for name in list_builtin_models():
        backbone = read_yaml(builtin_models_dir() / name).data.get("backbone", {})
        desc = " ".join(f"{k}={v}" for k, v in backbone.items())
        print(f"  {name:<24} {desc}")
    print("Registered backbones:")
    for name in BACKBONES.list():
        builder = BACKBONES.get(name)
        print(f"  {name:<24} {builder.__module__}.{builder.__qualname__}")
    if args.table:
        print()
        print("\n".join(model_table(list_builtin_models(), args.imgsz, args.compare_ultralytics)))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .config import check_imgsz
    from .detector import build_model, layer_table

    check_imgsz(args.imgsz, "--imgsz")
    model = build_model(args.cfg, nc=args.nc, pretrained=False)
    print(f"{'layer':<32} {'type':<26} {'params':>12}  output (C x H x W) at {args.imgsz}")
    for name, kind, params, shape in layer_table(model, args.imgsz):
        indent = "  " * name.count(".")
        print(f"{indent + name:<32} {kind:<26} {params:>12,}  {shape}")
    info = model.info(args.imgsz)
    print(f"\n{args.cfg}: {info['params']:,} parameters (backbone {info['backbone_params']:,}), "
          f"{info['gflops']:.2f} GFLOPs at {args.imgsz}x{args.imgsz}, nc={model.nc}")
    return 0


def load_model_arg(args, nc: int | None = None, names: list[str] | None = None,
                   trained=None):
    """The model of ``--weights`` (a checkpoint, or ``trained`` when already loaded) or ``--cfg`` (untrained,
    with ``nc`` classes)."""
    if args.weights:
        from .engine.checkpoint import load_model

        model = trained if trained is not None else load_model(args.weights)
        if nc is not None and model.nc != nc:
            raise ConfigError(f"{args.weights}: model has {model.nc} classes but the data has {nc}")
        return model
    from .detector import build_model

    model = build_model(args.cfg, nc=nc)
    if names:
        model.names = list(names)
    return model


def cmd_val(args) -> int:
    import json

    from .config import load_data_config
    from .datasets.synthetic import resolve_data
    from .engine.device import select_device
    from .engine.evaluator import COCOEvaluator
    from .engine.validate import format_table, validate
    from .files import check_writable, run_dir

    # everything the run needs is checked before any model is built or image read
    trained = _trained_model(args)
    if args.data is None:
        if trained is None or not trained.train_data:
            raise ConfigError("val needs --data (a data YAML, or shapes)" + (
                f": {args.weights} does not record its training data" if trained is not None else ""))
        args.data = trained.train_data
    args.imgsz = _imgsz(args, trained)
    args.data = str(resolve_data(args.data))
    data = load_data_config(args.data)
    check_writable(args.project)
    evaluator = COCOEvaluator.from_yolo(args.data, args.split, backend=args.eval_backend)
    evaluator.check_ground_truth()
    device = select_device(args.device, "val")
    if _exported(args.weights):
        model = _exported_for_val(args, data.nc, device)
    else:
        model = load_model_arg(args, nc=data.nc, names=data.names, trained=trained).to(device)
    with run_dir(args.project, args.name) as save_dir:
        results = validate(model, args.data, split=args.split, imgsz=args.imgsz, batch=args.batch, conf=args.conf,
                           iou=args.iou, max_det=args.max_det, device=device, backend=args.eval_backend,
                           workers=args.workers, save_dir=save_dir, save_json=args.save_json, evaluator=evaluator)
    print(format_table(results))
    keys = ("map", "map50", "map75", "map_small", "map_medium", "map_large")
    print(json.dumps({k: round(results[k], 4) for k in keys}))
    ms = results["ms_per_image"]
    print(f"Speed: {ms['inference']:.1f} ms inference, {ms['nms']:.1f} ms NMS per image at {args.imgsz} "
          f"on {args.data}")
    if results["skipped_images"]:
        print(f"Skipped {results['skipped_images']} unreadable image(s)")
    print(f"Results saved to {save_dir}")
    return 0


def _exported(weights: str | None) -> bool:
    """An exported model (ONNX, TFLite, ncnn) rather than a checkpoint."""
    from .runtimes import exported_format

    return exported_format(weights) is not None


def _exported_for_val(args, nc: int, device):
    """An exported model (ONNX float or INT8, TFLite, ncnn) in its runtime; a fixed-size one sets ``args.imgsz``."""
    from .runtimes import load_runtime

    backend = load_runtime(args.weights, device=device)
    if backend.nms_inside:
        raise ConfigError(f"{args.weights}: NMS is inside the graph; val needs the raw output (export without --nms)")
    if len(backend.names) != nc:
        raise ConfigError(f"{args.weights}: model has {len(backend.names)} classes but the data has {nc}")
    args.imgsz = backend.imgsz or args.imgsz
    return backend


def _trained_model(args):
    """The model of a ``--weights`` checkpoint (its training size and data included), else None."""
    if not getattr(args, "weights", None) or _exported(args.weights):
        return None
    from .engine.checkpoint import load_model

    return load_model(args.weights)


def _imgsz(args, trained) -> int:
    """--imgsz, else the size the checkpoint was trained at, else 640."""
    if args.imgsz is not None:
        return args.imgsz
    return int(getattr(trained, "train_imgsz", None) or 640)


def cmd_train(args: argparse.Namespace) -> int:
    import logging
    import signal

    from .config import check_imgsz
    from .engine.trainer import TrainConfig, Trainer, TrainingInterrupted

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.resume and not args.cfg:
        raise ConfigError("train needs --cfg (a model YAML or built-in name) or --resume")
    if args.imgsz is not None:
        check_imgsz(args.imgsz, "--imgsz")
    given = given_flags(args, TrainConfig)
    # with --resume the run's stored configuration holds; Trainer refuses flags other than epochs/device/workers
    config = None if args.resume else TrainConfig.from_kwargs(**given)
    def stop_on_sigterm(signum, frame):  # kill or a job scheduler: stop as Ctrl-C does, keeping what is saved
        # a subclass, not KeyboardInterrupt itself: CPython marks a bare one raised inside exec'd code as unhandled
        # and ends the process with SIGINT after main() returned
        raise TrainingInterrupted("SIGTERM")

    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        save_dir, _ = Trainer(config, resume=args.resume, changes=given if args.resume else None).run()
    except TrainingInterrupted as stop:
        print(f"\nyolo-mobile: {stop}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if save_dir is not None:
        print(f"Results saved to {save_dir}")
    return 0


def cmd_detect(args) -> int:
    import logging

    from .engine.device import select_device
    from .engine.predictor import check_classes, detect, resolve_source
    from .files import check_writable, run_dir
    from .runtimes import load_runtime

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    resolve_source(args.source)  # a missing or unreadable source fails before the model is built
    check_writable(args.project)
    device = select_device(args.device, "detect")
    backend = load_runtime(args.weights, args.cfg, device, args.half)
    check_classes(args.classes, backend.names)
    imgsz = _imgsz(args, backend)  # a TorchRuntime of a checkpoint knows its training size
    with run_dir(args.project, args.name) as save_dir:
        stats = detect(backend, args.source, save_dir, imgsz=imgsz, conf=args.conf, iou=args.iou,
                       max_det=args.max_det, classes=args.classes, batch=args.batch, save_txt=args.save_txt,
                       save_json=args.save_json, show=args.show, drop_frames=args.drop_frames)
    if not stats["frames"] and not stats["interrupted"]:  # every image or frame unreadable: nothing was done
        raise ConfigError(f"{args.source}: no image or frame could be read ({stats['skipped']} unreadable); "
                          "nothing was saved")
    ms = stats["ms_per_frame"]
    print(f"{stats['frames']} frames; per frame: {ms['pre']:.1f} ms pre-process, {ms['inference']:.1f} ms "
          f"inference, {ms['nms']:.1f} ms NMS, {ms['draw']:.1f} ms drawing and saving")
    if stats["skipped"]:
        print(f"Skipped {stats['skipped']} unreadable image(s) or frame(s)")
    if stats.get("drop_frames"):
        print(f"{stats['read_frames']} frames read, {stats['frames']} processed, {stats['dropped']} dropped (the "
              "newest frame is processed, stale ones dropped; --keep-frames processes every frame)")
    if stats["frames"]:  # frames are processed in overlapping threads: the wall clock is the honest rate
        h, w = stats["shape"]
        print(f"{stats['frames'] / max(stats['wall'], 1e-9):.1f} frames/s over {stats['wall']:.1f} s wall at "
              f"{h}x{w} (imgsz {imgsz}; {stats['workers']} frame worker(s), {stats['threads']} torch thread(s) "
              "each)")
    if save_dir.exists():  # detect removes it when no image or frame could be read
        print(f"Results saved to {save_dir}")
    return 130 if stats["interrupted"] else 0


def cmd_export(args) -> int:
    from .export.onnx import export_onnx

    if args.format != "onnx":
        return _export_phone(args)
    if args.weights:
        model = _trained_model(args)
        output = args.output or Path(args.weights).with_suffix(".onnx")
    else:
        from .detector import build_model

        model = build_model(args.cfg)
        output = args.output or Path(Path(args.cfg).stem + ".onnx")
    if args.int8:
        return _export_int8(args, model, output)
    report = export_onnx(model, output, imgsz=_imgsz(args, model), batch=args.batch, dynamic=args.dynamic,
                         opset=args.opset, simplify=args.simplify, half=args.half, nms=args.nms,
                         max_det=args.max_det, device=args.device)
    print(report.summary())
    return 0


def _export_phone(args) -> int:
    """--format tflite (float32, --half, --int8) or ncnn (float32, --half): checked in LiteRT or ncnn."""
    model = _trained_model(args) if args.weights else None
    stem = Path(args.weights).with_suffix("") if args.weights else Path(Path(args.cfg).stem)
    data = None
    if args.int8:
        data, model = _calibration_data(args, model)
    elif model is None:
        from .detector import build_model

        model = build_model(args.cfg)
    imgsz = _imgsz(args, model)
    if args.format == "ncnn":
        from .export.ncnn import export_ncnn

        output = Path(args.output) if args.output else stem.with_name(stem.name + "_ncnn")
        print(export_ncnn(model, output, imgsz=imgsz, half=args.half).summary())
        return 0
    from .export.tflite import export_tflite

    suffix = "_int8.tflite" if args.int8 else ".tflite"
    output = Path(args.output) if args.output else stem.with_name(stem.name + suffix)
    report = export_tflite(model, output, imgsz=imgsz, half=args.half, int8=args.int8, data=data,
                           calib_images=args.calib_images)
    print(report.summary())
    return 0


def _calibration_data(args, model) -> tuple[Path, Any]:
    """--int8's data YAML (--data, else the checkpoint's training data) and the model with its classes."""
    from .config import load_data_config
    from .datasets.synthetic import resolve_data

    data = args.data or getattr(model, "train_data", None)
    if not data:
        raise ConfigError("--int8 needs --data (a data YAML, or shapes): its train split calibrates")
    data = resolve_data(data)
    classes = load_data_config(data)
    model = load_model_arg(args, nc=classes.nc, names=classes.names, trained=model)  # --cfg: the data's classes
    return data, model


def _export_int8(args, model, output: Path) -> int:
    from .export.int8 import export_int8

    data, model = _calibration_data(args, model)
    output = Path(args.output) if args.output else output.with_name(output.stem + "_int8.onnx")
    imgsz = _imgsz(args, model)
    report = export_int8(model, output, data, imgsz=imgsz, calib_images=args.calib_images,
                         method=args.calib_method, keep_float=args.keep_float, opset=args.opset)
    print(report.summary())
    return 0


def cmd_benchmark(config, args: argparse.Namespace) -> int:
    """``config`` a BenchmarkConfig (its check passed: bad YAMLs, sizes, devices and files fail before the first
    model is built); ``args.out`` the results file."""
    from .benchmark import format_markdown, run_benchmark, save_results
    from .files import check_writable, claim_run_dir

    check_writable(Path(args.out).parent if args.out else "runs/benchmark")
    rows = run_benchmark(config)
    out = Path(args.out) if args.out else claim_run_dir("runs/benchmark") / "results.md"
    files = save_results(rows, out, config)
    print(format_markdown(rows))
    print("Wrote " + ", ".join(str(p) for p in files.values()))
    return 0


def cmd_weights_inspect(args: argparse.Namespace) -> int:
    from .backbones.pretrained import inspect_weights

    info = inspect_weights(args.path)
    print(f"file:     {info['path']} ({info['size_mb']:.1f} MB)")
    print(f"format:   {info['format']}")
    dtypes = ", ".join(f"{k} ({v})" for k, v in info["dtypes"].items())
    print(f"tensors:  {info['tensors']:,} holding {info['values']:,} values; dtypes {dtypes}")
    prefixes = ", ".join(f"{k} ({v})" for k, v in list(info["prefixes"].items())[:10])
    print(f"top-level names: {prefixes}" + (" ..." if len(info["prefixes"]) > 10 else ""))
    if info["family"] is None:
        print("family:   not recognised (the timm backbone loads any timm checkpoint of the same model)")
        return 0
    print(f"family:   {info['family']} ({info['style']} key names)")
    if info["variants"]:
        ranked = sorted(info["variants"].items(), key=lambda kv: -kv[1])
        print("variants: " + ", ".join(f"{v} {100 * f:.1f}%" for v, f in ranked) + " of the backbone's tensors")
        best, fraction = ranked[0]
        strict = "" if fraction >= 0.9 else ", strict: false"
        print(f"YAML:     backbone: {{name: {info['family']}, variant: {best}, pretrained: {args.path}{strict}}}")
    return 0


class CommandParser(_Parser):
    """A sub-command's parser; ``add_flags`` (called on its first parse) adds flags whose source is slow to
    import, so ``train``'s flags, read from the trainer's dataclass, do not make every other command wait."""

    def __init__(self, *args: Any, add_flags: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_flags = add_flags

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        if self.add_flags is not None:
            add_flags, self.add_flags = self.add_flags, None
            add_flags(self)
        return super().parse_known_args(args, namespace)


# flag types named in the configs' field metadata (the configs import no argparse)
ARG_TYPES = {"positive": int_at_least(1), "non_negative": int_at_least(0), "fraction": fraction}
# command -> (module, config class): each command's flags are its class's fields, read on first use
COMMAND_CONFIGS = {
    "train": ("yolo_mobile.engine.trainer", "TrainConfig"),
    "val": ("yolo_mobile.engine.validate", "ValConfig"),
    "detect": ("yolo_mobile.engine.predictor", "DetectConfig"),
    "export": ("yolo_mobile.export.config", "ExportConfig"),
    "benchmark": ("yolo_mobile.benchmark", "BenchmarkConfig"),
}


def config_class(command: str) -> type:
    import importlib

    module, name = COMMAND_CONFIGS[command]
    return getattr(importlib.import_module(module), name)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def add_dataclass_flags(p: argparse.ArgumentParser, klass: type) -> None:
    """One flag per field of ``klass`` with a ``help`` in its metadata (see ``config.flag``): type, choices,
    nargs and default read from the field. Flags default to None, so only those given override the dataclass; a
    bool field that is True by default becomes ``--no-<name>``, one that is None by default a pair of flags."""
    hints = typing.get_type_hints(klass)
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in dataclasses.fields(klass):
        meta = f.metadata
        if "help" not in meta:
            continue
        kind = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])
        item = typing.get_args(kind)[0] if typing.get_origin(kind) is list else None
        option = meta.get("flag", "--" + f.name.replace("_", "-"))
        default = _default(f)
        target = p
        if "group" in meta:
            if meta["group"] not in groups:
                groups[meta["group"]] = p.add_mutually_exclusive_group(required=meta.get("required", False))
            target = groups[meta["group"]]
        if kind is bool and "off_flag" in meta:
            pair = p.add_mutually_exclusive_group()
            pair.add_argument(option, dest=f.name, action="store_true", default=None, help=meta["help"])
            pair.add_argument(meta["off_flag"], dest=f.name, action="store_false", help=meta["off_help"])
        elif kind is bool:
            off = default is True
            target.add_argument(f"--no-{option[2:]}" if off else option, dest=f.name, default=None,
                                action="store_false" if off else "store_true",
                                help=f"skip: {meta['help']}" if off else meta["help"])
        else:
            shown = default not in (None, "", []) and meta.get("show_default", True)
            renamed = option[2:].replace("-", "_") != f.name and "choices" not in meta
            metavar = meta.get("metavar") or (option[2:].replace("-", "_").upper() if renamed else None)
            extra = {"required": True} if meta.get("required") and target is p else {}
            target.add_argument(option, dest=f.name, type=ARG_TYPES.get(meta.get("type")) or item or kind,
                                nargs=meta.get("nargs"), choices=meta.get("choices"), metavar=metavar,
                                help=meta["help"] + (f" (default {_shown(default)})" if shown else ""), **extra)


def given_flags(args: argparse.Namespace, klass: type) -> dict[str, Any]:
    """The fields of ``klass`` whose flags were given (the others are None in ``args``)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(klass)
            if "help" in f.metadata and getattr(args, f.name, None) is not None}


def options(args: argparse.Namespace, klass: type) -> Any:
    """The command's config: the dataclass's defaults, with the flags that were given."""
    return klass(**given_flags(args, klass))


def add_command_flags(command: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        add_dataclass_flags(p, config_class(command))
        if command == "train":
            p.add_argument("--resume", help="runs/train/<name>/weights/last.pt: continue at the next epoch")
        if command == "benchmark":
            p._mutually_exclusive_groups[0].add_argument("--all", action="store_true",
                                                         help="every built-in model (the default)")
            p.add_argument("--out", help="results .md (CSV and PNG written beside it); default "
                                         "runs/benchmark/expN/")

    return add


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = _Parser(prog="yolo-mobile", description="YOLO detection with mobile backbones")
    parser.add_argument("--version", action="version", version=f"yolo-mobile {__version__}")
    parser.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command", parser_class=CommandParser)

    p = sub.add_parser("models", help="list built-in model YAMLs and registered backbones")
    p.add_argument("--table", action="store_true", help="also print params and GFLOPs of every built-in model")
    p.add_argument("--imgsz", type=int, default=640, help="input size for --table")
    p.add_argument("--compare-ultralytics", action="store_true",
                   help="add ultralytics' YOLOv5nu, YOLOv8n and YOLO11n, built from their YAMLs (no download)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("info", help="layer summary, parameters and GFLOPs of a model")
    p.add_argument("--cfg", required=True, help="model YAML path or built-in name (e.g. mobilevit_s.yaml)")
    p.add_argument("--imgsz", type=int, default=640, help="square input size for shapes and GFLOPs")
    p.add_argument("--nc", type=int, default=None, help="override the YAML's number of classes")
    p.set_defaults(func=cmd_info)

    commands = {
        "val": ("COCO mAP of a model on a dataset split", cmd_val),
        "train": ("train a detector (DDP: torchrun --nproc_per_node N -m yolo_mobile train ...)", cmd_train),
        "detect": ("detect objects in images, folders, globs, videos, webcams or streams", cmd_detect),
        "export": ("export to ONNX, TFLite or ncnn and check it against PyTorch in its runtime", cmd_export),
    }
    for name, (text, func) in commands.items():
        sub.add_parser(name, help=text, add_flags=add_command_flags(name)).set_defaults(func=func)

    p = sub.add_parser("weights", help="pretrained backbone weights files")
    weights = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = weights.add_parser("inspect", help="format, tensors, and which backbone family and variant a file fits")
    q.add_argument("path", help="a .safetensors, .pth or .pt file")
    q.set_defaults(func=cmd_weights_inspect)

    p = sub.add_parser("benchmark", help="params, GFLOPs, latency, throughput, memory and training speed, "
                                         "side by side (with ultralytics' models on request)",
                       add_flags=add_command_flags("benchmark"))
    p.set_defaults(func=cmd_benchmark)
    _add_verbose(sub)
    return parser


def _add_verbose(sub: argparse._SubParsersAction) -> None:
    """``--verbose`` after the command too (SUPPRESS: absent, it leaves the top-level value as it is)."""
    for command in sub.choices.values():
        command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an error")
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                _add_verbose(action)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a bad flag (one line already printed), --help or --version: a code, not an exit
        return int(e.code or 0)
    try:
        if args.command in COMMAND_CONFIGS and args.command != "train":  # train reads its flags itself (--resume)
            config = options(args, config_class(args.command))
            config.check()  # every rule between flags, before any work
            return args.func(config, args) if args.command == "benchmark" else args.func(config)
        return args.func(args)
    except (ConfigError, RegistryError, FileNotFoundError, ValueError, ImportError) as e:
        if args.verbose:
            raise
        print(f"yolo-mobile: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only or protected folder...: the path and the cause in one line
        if args.verbose:
            raise
        from .files import describe_os_error

        print(f"yolo-mobile: error: {args.command}: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C in val, export, benchmark...: the shell's code for it, not a traceback
        if args.verbose:
            raise
        print(f"\nyolo-mobile: {args.command} interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
