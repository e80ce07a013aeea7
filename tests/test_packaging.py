import zipfile
from pathlib import Path

import pytest

from yolo_mobile.config import list_builtin_models

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_model_yamls(tmp_path):
    """`--cfg mobilevit_s.yaml` must work from an installed wheel, not only from a checkout."""
    pytest.importorskip("hatchling")
    from hatchling.builders.wheel import WheelBuilder

    wheel = next(WheelBuilder(str(ROOT)).build(directory=str(tmp_path), versions=["standard"]))
    names = set(zipfile.ZipFile(wheel).namelist())
    for yaml_name in list_builtin_models():
        assert f"yolo_mobile/models/{yaml_name}" in names
    assert "yolo_mobile/backbones/mobilevit.py" in names
    assert not any(n.startswith(("tests/", "data/")) for n in names)
