"""The models that stand for each backbone family in the phone-export tests: the smallest built-in model of every
registered backbone (ConViT-Tiny for vit: DeiT's plain attention blocks are among its own). Resolved when a test
asks, so that collecting the test modules builds nothing."""

from conftest import model_for_backbone

from yolo_mobile import list_backbones

FAMILIES = sorted(list_backbones())


def family_cfg(family: str) -> str | dict:
    return model_for_backbone(family)


def check_val_of_export(model, weights, data, tmp_path, capsys, imgsz: int) -> None:
    """``yolo-mobile val`` on an exported file gives what PyTorch's val gives on the same data: the same number
    of detections (within 1%: float32 rounding moves a few scores across the threshold) and mAP50-95 within
    0.002; a val that ignored the model's output (mAP 0, no detections) fails here."""
    import json

    from yolo_mobile.cli import main
    from yolo_mobile.engine.validate import validate

    reference = validate(model, data, imgsz=imgsz, workers=0, progress=False, save_dir=tmp_path / "torch",
                         save_json=True)
    assert main(["val", "--weights", str(weights), "--data", str(data), "--project", str(tmp_path),
                 "--workers", "0", "--save-json"]) == 0
    assert '"map":' in capsys.readouterr().out
    ours = json.loads((tmp_path / "exp" / "metrics.json").read_text())
    expected = len(json.loads((tmp_path / "torch" / "predictions.json").read_text()))
    found = len(json.loads((tmp_path / "exp" / "predictions.json").read_text()))
    assert expected > 0 and abs(found - expected) <= max(1, expected // 100), (found, expected)
    assert abs(ours["map"] - reference["map"]) < 2e-3 and abs(ours["map50"] - reference["map50"]) < 2e-3
