import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from yolo_mobile.backbones import BACKBONES, build_backbone, list_backbones, register_backbone
from yolo_mobile.backbones.base import Backbone
from yolo_mobile.registry import Registry, RegistryError


def test_builtins_registered():
    assert {"mobilevit", "mobilenetv3", "fastvit", "cspdarknet", "timm"} <= set(list_backbones())


def test_unknown_name_lists_valid_ones():
    with pytest.raises(RegistryError, match=r"unknown backbone 'nope'; valid: .*mobilevit"):
        build_backbone("nope")


def test_unknown_argument_lists_valid_ones():
    with pytest.raises(RegistryError, match=r"unknown argument\(s\) depth; valid: variant, drop_path_rate"):
        build_backbone("mobilevit", depth=3)


def test_unknown_variant_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown mobilevit variant 'm'; valid: xxs, xs, s"):
        build_backbone("mobilevit", variant="m")


def test_duplicate_registration_fails():
    reg = Registry("thing")
    reg.register("a", lambda: 1)
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("a", lambda: 2)


def test_contract_is_checked_on_build():
    class WrongStrides(Backbone):
        def __init__(self):
            super().__init__()
            self.channels, self.strides = [8, 8, 8], [8, 32, 32]

    register_backbone("_wrong_strides", WrongStrides)
    try:
        with pytest.raises(ValueError, match=r"_wrong_strides.*strides \[8, 32, 32\] do not rise by x1 or x2"):
            build_backbone("_wrong_strides")
    finally:
        BACKBONES._builders.pop("_wrong_strides")


PLUGIN = textwrap.dedent(
    """
    import torch
    from torch import nn

    class TinyBackbone(nn.Module):
        def __init__(self, width: int = 8):
            super().__init__()
            self.channels, self.strides = [width, 2 * width, 4 * width], [8, 16, 32]
            self.p3 = nn.Conv2d(3, width, 8, 8)
            self.p4 = nn.Conv2d(width, 2 * width, 2, 2)
            self.p5 = nn.Conv2d(2 * width, 4 * width, 2, 2)

        def forward(self, x):
            p3 = self.p3(x)
            p4 = self.p4(p3)
            return [p3, p4, self.p5(p4)]
    """
)


def install_plugin(root: Path, monkeypatch, package: str, entry_point: str, source: str | None = PLUGIN) -> None:
    """An installed distribution ``package`` (its module ``source``, when given) declaring ``entry_point``."""
    module = package.replace("-", "_")
    if source is not None:
        (root / f"{module}.py").write_text(source)
    dist = root / f"{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[yolo_mobile.backbones]\n{entry_point}\n")
    monkeypatch.syspath_prepend(str(root))


def test_third_party_backbone_through_entry_point(tmp_path, monkeypatch):
    """A package that declares `yolo_mobile.backbones` entry points is found without importing it by hand."""
    install_plugin(tmp_path, monkeypatch, "tiny-plugin", "tiny = tiny_plugin:TinyBackbone")
    BACKBONES.load_entry_points()
    try:
        assert "tiny" in list_backbones()
        from yolo_mobile import build_model

        model = build_model({"nc": 3, "backbone": {"name": "tiny", "width": 16}}).eval()
        out = model(torch.rand(1, 3, 64, 96))
        assert out.shape == (1, 4 + 3, 8 * 12 + 4 * 6 + 2 * 3)
    finally:
        BACKBONES._builders.pop("tiny", None)
        sys.modules.pop("tiny_plugin", None)


def test_broken_plugin_is_reported_not_fatal(tmp_path, monkeypatch, caplog):
    install_plugin(tmp_path, monkeypatch, "broken-plugin", "broken = no_such_module_xyz:Thing", source=None)
    BACKBONES.load_entry_points()
    assert "broken" not in list_backbones()
    assert "no_such_module_xyz" in caplog.text


def test_plugin_under_a_builtin_name_is_an_error_naming_both(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, "clash-plugin", "mobilevit = clash_plugin:TinyBackbone")
    try:
        expected = (r"backbone plugin 'mobilevit' \(clash_plugin:TinyBackbone of package clash-plugin\) takes the "
                    r"name of yolo_mobile\.backbones\.mobilevit\.")
        with pytest.raises(RegistryError, match=expected):
            BACKBONES.load_entry_points()
        with pytest.raises(RegistryError, match="takes the name of"):  # not only once: every look-up says so
            list_backbones()
        assert BACKBONES._builders["mobilevit"].__module__ == "yolo_mobile.backbones.mobilevit"
    finally:
        monkeypatch.undo()
        BACKBONES.load_entry_points()
        sys.modules.pop("clash_plugin", None)


NEW_FAMILY = textwrap.dedent(
    """
    from torch import nn

    from ..layers import ConvBNAct
    from .base import Backbone, register_backbone


    @register_backbone("strided")
    class Strided(Backbone):
        def __init__(self, width: int = 8) -> None:
            super().__init__()
            self.stem = nn.Sequential(ConvBNAct(3, width, 3, 2), ConvBNAct(width, width, 3, 2))
            self.p3 = ConvBNAct(width, width, 3, 2)
            self.p4 = ConvBNAct(width, 2 * width, 3, 2)
            self.p5 = ConvBNAct(2 * width, 4 * width, 3, 2)
            self.channels = [width, 2 * width, 4 * width]

        def forward(self, x):
            p3 = self.p3(self.stem(x))
            p4 = self.p4(p3)
            return [p3, p4, self.p5(p4)]
    """
)

CHECK_NEW_FAMILY = """
import torch
from yolo_mobile import build_model, list_backbones
from yolo_mobile.config import list_builtin_models

assert "strided" in list_backbones(), list_backbones()
assert "strided_s.yaml" in list_builtin_models()
model = build_model("strided_s.yaml").eval()
assert model.backbone.channels == [16, 32, 64] and model.nc == 4
print(tuple(model(torch.rand(1, 3, 64, 96)).shape))
"""


def test_a_new_builtin_backbone_is_one_file_plus_one_yaml(tmp_path):
    """A copy of the package with one new file in backbones/ and one YAML in models/, nothing else edited."""
    import shutil
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(repo / "yolo_mobile", tmp_path / "yolo_mobile", ignore=ignore)
    shutil.copytree(repo / "models", tmp_path / "models", ignore=ignore)
    (tmp_path / "yolo_mobile" / "backbones" / "strided.py").write_text(NEW_FAMILY)
    (tmp_path / "models" / "strided_s.yaml").write_text(
        "nc: 4\nbackbone: {name: strided, width: 16}\nneck: {depth: 0.33, width: 0.25}\n")
    done = subprocess.run([sys.executable, "-c", CHECK_NEW_FAMILY], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str((1, 4 + 4, 8 * 12 + 4 * 6 + 2 * 3))
