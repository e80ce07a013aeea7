import subprocess
import sys

from yolo_mobile.cli import main


def test_models_lists_yamls_and_backbones(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "mobilevit_s.yaml" in out and "yolov5n.yaml" in out
    assert "fastvit" in out and "timm" in out


def test_model_table_shows_a_backbones_own_pyramid_apart():
    from yolo_mobile.cli import model_table

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
