import dataclasses
import subprocess
import sys

import pytest

from yolo_mobile.cli import main


def test_models_lists_yamls_and_backbones(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "mobilevit_s.yaml" in out and "yolov5n.yaml" in out
    assert "fastvit" in out and "timm" in out


def test_model_table_shows_a_backbones_own_pyramid_apart():
    from yolo_mobile.benchmark import model_table

    header, _, deit, mobilenet = model_table(["deit_tiny.yaml", "mobilenetv3_small.yaml"], imgsz=64)
    assert header.startswith("| model | backbone params (M) | detector params (M) | GFLOPs @64 |")
    assert deit.startswith("| deit_tiny | 5.52 + 0.22 pyramid | ")  # timm's DeiT-Ti without its classifier
    assert mobilenet.startswith("| mobilenetv3_small | 0.44 | ") and "pyramid" not in mobilenet


def test_info_prints_summary(capsys):
    assert main(["info", "--cfg", "yolov5n.yaml", "--imgsz", "320"]) == 0
    out = capsys.readouterr().out
    assert "neck.sppf" in out and "SPPF" in out
    assert "2,654,800 parameters" in out and "GFLOPs at 320x320" in out


def test_bad_cfg_exits_2_with_message(capsys):
    assert main(["info", "--cfg", "no_such_model.yaml"]) == 2
    assert "no_such_model.yaml: no such model YAML" in capsys.readouterr().err


def test_import_is_light():
    """`import yolo_mobile` pulls in neither torch nor ultralytics (so it is fast and writes nothing)."""
    code = "import sys, yolo_mobile; print(sorted(m for m in ('torch', 'timm', 'ultralytics') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_console_script_entry():
    out = subprocess.run([sys.executable, "-m", "yolo_mobile.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("yolo-mobile ")


def test_train_flags_come_from_the_trainer_dataclass():
    """Every TrainConfig field with help text is a flag with the field's type, choices and default, and nothing
    else becomes a training option; parsing `models` does not import the trainer (torch)."""

    from yolo_mobile.cli import build_parser
    from yolo_mobile.engine.trainer import TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig) if "help" in f.metadata}
    parser = build_parser()
    args = parser.parse_args(["train", "--batch", "8", "--min-scale", "0.25", "--no-val", "--optimizer", "AdamW"])
    assert (args.batch, args.min_scale, args.val, args.optimizer) == (8, 0.25, False, "AdamW")
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    assert given == {"batch": 8, "min_scale": 0.25, "val": False, "optimizer": "AdamW"}  # the rest: dataclass's
    train = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(" train"))
    flags = {a.dest: a for a in train._actions if a.dest not in ("help", "resume", "verbose")}
    assert set(flags) == set(fields)
    assert "(default 16)" in flags["batch"].help and flags["batch"].type is int
    assert flags["optimizer"].choices == fields["optimizer"].metadata["choices"]
    assert flags["val"].option_strings == ["--no-val"] and flags["multi_scale"].option_strings == ["--multi-scale"]


def test_parsing_another_command_does_not_import_the_trainer():
    code = ("import sys; from yolo_mobile.cli import build_parser; build_parser().parse_args(['models']); "
            "print('yolo_mobile.engine.trainer' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"


def test_several_gpus_outside_torchrun_are_refused_with_the_command(capsys):
    assert main(["export", "--cfg", "yolov5n.yaml", "--device", "0,1"]) == 2
    err = capsys.readouterr().err
    assert "device '0,1' names 2 GPUs, but one process uses one" in err
    # only train runs on several GPUs (through torchrun): export is told to pick one, not how to train
    assert "export runs on one GPU: pick one, e.g. --device 0" in err and "torchrun" not in err
    assert err.count("\n") == 1


def test_ctrl_c_outside_training_exits_130_without_a_traceback(monkeypatch, capsys):
    import yolo_mobile.benchmark

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(yolo_mobile.benchmark, "model_table", interrupted)
    try:
        code = main(["models", "--table"])
    except KeyboardInterrupt:  # caught here: escaping, it would stop the whole pytest session
        pytest.fail("Ctrl-C escaped main() as a traceback")
    assert code == 130
    err = capsys.readouterr().err
    assert "yolo-mobile: models interrupted" in err and "Traceback" not in err
    with pytest.raises(KeyboardInterrupt):  # --verbose keeps the traceback
        main(["models", "--table", "--verbose"])


def _signature_defaults(fn) -> dict:
    import inspect

    return {k: v.default for k, v in inspect.signature(fn).parameters.items()
            if v.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("command", ["val", "detect", "export", "benchmark", "train"])
def test_every_command_defaults_to_what_its_python_api_does(command):
    """The CLI's parser is built from each command's config dataclass, and the functions a Python user calls
    default to the same values: a command with no optional flag runs as the API does."""
    from yolo_mobile.benchmark import BenchmarkConfig
    from yolo_mobile.cli import build_parser, options
    from yolo_mobile.engine import predictor, trainer, validate
    from yolo_mobile.export import int8, onnx, tflite
    from yolo_mobile.export.config import ExportConfig

    required = {"val": ["--cfg", "m.yaml"], "detect": ["--cfg", "m.yaml", "--source", "x.jpg"],
                "export": ["--cfg", "m.yaml"], "benchmark": [], "train": []}[command]
    args = build_parser().parse_args([command, *required])
    if command == "train":
        from yolo_mobile.cli import given_flags

        assert trainer.TrainConfig.from_kwargs(**given_flags(args, trainer.TrainConfig)) == \
            trainer.TrainConfig.from_kwargs()
        api = _signature_defaults(trainer.train)
        assert (api["cfg"], api["data"]) == (trainer.TrainConfig.cfg, trainer.TrainConfig.data)
        return
    klass = {"val": validate.ValConfig, "detect": predictor.DetectConfig, "export": ExportConfig,
             "benchmark": BenchmarkConfig}[command]
    config = options(args, klass)
    assert config == klass(**{"val": {"cfg": "m.yaml"}, "detect": {"cfg": "m.yaml", "source": "x.jpg"},
                              "export": {"cfg": "m.yaml"}, "benchmark": {}}[command])
    functions = {"val": [(validate.validate, {"backend": "eval_backend"})],
                 "detect": [(predictor.detect, {}), (predictor.predict, {})],
                 "export": [(onnx.export_onnx, {}), (int8.export_int8, {"method": "calib_method"}),
                            (tflite.export_tflite, {})],
                 "benchmark": []}[command]
    compared = 0
    for fn, renamed in functions:
        for name, default in _signature_defaults(fn).items():
            field = renamed.get(name, name)
            # the functions take a resolved device (val's and detect's '' means: GPU 0 if present)
            resolved = ("imgsz", "output", "data") + (("device",) if command in ("val", "detect") else ())
            if hasattr(config, field) and name not in resolved:
                value = getattr(config, field)
                assert (list(default) if isinstance(default, tuple) else default) == value, (fn.__name__, name)
                compared += 1
    assert compared >= {"val": 6, "detect": 10, "export": 12, "benchmark": 0}[command]
