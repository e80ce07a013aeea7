"""Pretrained backbone weights from local files: every family, every accepted format and wrapping, loaded through
the YAML, gives the reference model's features; wrong files fail with a message that says why."""

import re

import pytest
import timm
import torch
from conftest import model_for_backbone, randomize_bn
from safetensors.torch import save_file
from torchvision.models import mobilenet_v3_large, mobilenet_v3_small

from yolo_mobile import build_model, list_backbones, load_model
from yolo_mobile.backbones import BACKBONES, build_backbone, mobile_former
from yolo_mobile.backbones.emo import _run_stages, emo_classifier
from yolo_mobile.backbones.mobile_former import mobile_former_classifier
from yolo_mobile.backbones.pretrained import guess_family, read_weights
from yolo_mobile.cli import main
from yolo_mobile.config import ConfigError
from yolo_mobile.engine.trainer import TrainConfig, Trainer

TOLERANCE = 1e-5


def _mobilenetv3_features(ref, x):
    outs = []
    for i, block in enumerate(ref.features):
        x = block(x)
        if i in (6, 12, 16):
            outs.append(x)
    return outs


def _reference(family: str):
    """(random reference model with non-trivial BN statistics, its features at strides 8/16/32)."""
    if family == "mobilevit":
        ref = timm.create_model("mobilevit_xxs", pretrained=False)
        features = lambda x: ref.forward_intermediates(x, indices=[2, 3, 4], intermediates_only=True,  # noqa: E731
                                                       exclude_final_conv=True)
    elif family == "fastvit":
        ref = timm.create_model("fastvit_t8", pretrained=False)
        features = lambda x: ref.forward_intermediates(x, indices=(1, 2, 3), intermediates_only=True)  # noqa: E731
    elif family == "mobilenetv3":
        ref = mobilenet_v3_large(weights=None)
        features = lambda x: _mobilenetv3_features(ref, x)  # noqa: E731
    elif family == "mobile_former":
        ref = mobile_former_classifier("96m")
        taps = build_backbone("mobile_former", variant="96m").taps

        def features(x):  # the classifier's blocks up to the backbone's last tap
            x, tokens = mobile_former._start(ref, x)
            outs = []
            for i, block in enumerate(ref.features[: taps[-1] + 1]):
                x, tokens = block(x, tokens)
                if i in taps:
                    outs.append(x)
            return outs
    else:
        ref = emo_classifier("1m")
        features = lambda x: _run_stages(ref, x)[2:]  # noqa: E731
    randomize_bn(ref)
    return ref.eval(), features


BACKBONE = {
    "mobilevit": "{name: mobilevit, variant: xxs",
    "fastvit": "{name: fastvit, variant: t8",
    "mobilenetv3": "{name: mobilenetv3, variant: large, reduced_tail: false",
    "emo": "{name: emo, variant: 1m",
    "mobile_former": "{name: mobile_former, variant: 96m",
}
# tests/test_vit.py checks vit's parameter names and maps against timm's DeiT/ConViT (no timm file through the YAML)
CHECKED_IN_OWN_FILE = {"vit"}
# (file name, wrapper key or None, prefix): every accepted format and wrapping
FORMATS = [("w.safetensors", None, ""), ("w.pth", None, ""), ("w.pth", "state_dict", ""),
           ("w.pt", "model", "module."), ("w.pth", "net", "")]


def _save(sd: dict, path, wrapper: str | None, prefix: str):
    sd = {prefix + k: v.detach().clone().contiguous() for k, v in sd.items()}
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({wrapper: sd, "epoch": 300} if wrapper else sd, path)
    return path


def _yaml(tmp_path, family: str, weights, extra: str = ""):
    path = tmp_path / f"{family}.yaml"
    path.write_text(f"nc: 3\nbackbone: {BACKBONE[family]}, pretrained: {weights}{extra}}}\n")
    return path


def _max_diff(a, b) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize("family", list(BACKBONE))
def test_each_family_and_format_gives_the_reference_features(family, tmp_path):
    ref, features = _reference(family)
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        expected = features(x)
    for i, (name, wrapper, prefix) in enumerate(FORMATS):
        weights = _save(ref.state_dict(), tmp_path / f"{i}_{name}", wrapper, prefix)
        model = build_model(_yaml(tmp_path, family, weights))
        report = model.pretrained_report
        assert report.fraction == 1.0 and not report.missing and not report.mismatched, report.summary()
        with torch.no_grad():
            got = model.eval().backbone(x)
        assert _max_diff(got, expected) < TOLERANCE, (family, name, wrapper)
        # the untrained detector would differ: the load really changed the weights
        with torch.no_grad():
            assert _max_diff(build_model(_yaml(tmp_path, family, weights), pretrained=False).eval().backbone(x),
                             expected) > 1e-3


def test_every_family_that_maps_imagenet_names_has_a_reference_above():
    """A family that recognises its published weights (``pretrained_style``) is checked against its reference
    classifier in the test above: a new one fails here until it gets one."""
    mapped = {n for n in list_backbones() if callable(getattr(BACKBONES.get(n), "pretrained_style", None))}
    assert mapped == set(BACKBONE) | CHECKED_IN_OWN_FILE


@pytest.mark.parametrize("backbone", list_backbones())
def test_every_backbone_reloads_its_own_weights(backbone, tmp_path):
    cfg = model_for_backbone(backbone)
    source = build_model(cfg, nc=3, pretrained=False).backbone
    randomize_bn(source)
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        expected = source.eval()(x)
    for i, (name, wrapper, prefix) in enumerate([FORMATS[0], FORMATS[3]]):
        weights = _save(source.state_dict(), tmp_path / f"{i}_{name}", wrapper, prefix)
        model = build_model(cfg, nc=3, pretrained=weights)
        assert model.pretrained_report.fraction == 1.0, model.pretrained_report.summary()
        with torch.no_grad():
            assert _max_diff(model.eval().backbone(x), expected) < TOLERANCE, (backbone, name)


def test_official_ml_fastvit_names_convert(tmp_path):
    """apple/ml-fastvit key names (patch_embed, network.N, rbr_conv, ...) go through timm's converter."""
    ref, features = _reference("fastvit")

    def official(key: str) -> str:  # timm -> original names, the inverse of timm's checkpoint_filter_fn for T8
        m = re.match(r"stages\.(\d+)\.(downsample|blocks)\.(.*)", key)
        if m:
            stage, part, rest = int(m.group(1)), m.group(2), m.group(3)
            key = f"network.{2 * stage - 1}.{rest}" if part == "downsample" else f"network.{2 * stage}.{rest}"
        for timm_name, original in [("stem", "patch_embed"), ("conv_kxk", "rbr_conv"), ("conv_scale", "rbr_scale"),
                                    ("identity", "rbr_skip"), ("large_conv", "lkb_origin"), ("mlp", "convffn"),
                                    ("final_conv", "conv_exp"), ("layer_scale.gamma", "layer_scale"),
                                    ("head.fc.", "head.")]:
            key = key.replace(timm_name, original)
        return key

    sd = {official(k): v for k, v in ref.state_dict().items()}
    assert any(k.startswith("network.6.") for k in sd) and "patch_embed.0.rbr_conv.0.conv.weight" in sd
    weights = _save(sd, tmp_path / "fastvit_t8.pth.tar", "state_dict", "")
    assert guess_family(read_weights(weights).tensors) == ("fastvit", "ml-fastvit")
    model = build_model(_yaml(tmp_path, "fastvit", weights))
    assert model.pretrained_report.fraction == 1.0
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert _max_diff(model.eval().backbone(x), features(x)) < TOLERANCE


def test_mobilenetv3_reduced_tail_loads_what_matches_with_strict_false(tmp_path):
    ref, features = _reference("mobilenetv3")
    weights = _save(ref.state_dict(), tmp_path / "mobilenet_v3_large.pth", None, "")
    yaml = tmp_path / "mnv3.yaml"
    yaml.write_text(f"nc: 3\nbackbone: {{name: mobilenetv3, pretrained: {weights}}}\n")
    with pytest.raises(ConfigError, match=r"mnv3.yaml:2: .*loaded \d+/\d+ tensors .*%, torchvision"
                                          r"(.|\n)*shape mismatch: \d+(.|\n)*strict: false") as strict_error:
        build_model(yaml)
    yaml.write_text(f"nc: 3\nbackbone: {{name: mobilenetv3, pretrained: {weights}, strict: false}}\n")
    model = build_model(yaml)
    report = model.pretrained_report
    total = sum(not k.endswith("num_batches_tracked") for k in model.backbone.state_dict())  # as the report counts
    # every tensor of the backbone is found: those of the reduced tail with another shape, the rest loaded
    assert not report.missing and len(report.loaded) + len(report.mismatched) == total
    assert report.mismatched and all(name.startswith(("features.13.", "features.14.", "features.15.", "features.16."))
                                     for name, *_ in report.mismatched)
    assert report.fraction == len(report.loaded) / total < 0.9  # under the strict threshold, hence the error
    assert f"loaded {len(report.loaded)}/{total} tensors" in str(strict_error.value)
    assert f"shape mismatch: {len(report.mismatched)}" in str(strict_error.value)
    assert "classifier.0.weight" in report.unexpected and "classifier.0 (2)" in report.summary()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        got, expected = model.eval().backbone(x), features(x)
    assert _max_diff(got[:2], expected[:2]) < TOLERANCE  # the reduced tail (stride 32) stays as initialised


def test_mobilenetv3_small_file_loads_full_tail_and_names_the_reduced_tail_mismatch(tmp_path):
    ref = mobilenet_v3_small(weights=None)
    randomize_bn(ref)
    weights = _save(ref.eval().state_dict(), tmp_path / "mobilenet_v3_small.pth", None, "")
    yaml = tmp_path / "small.yaml"
    small = "{name: mobilenetv3, variant: small"
    yaml.write_text(f"nc: 3\nbackbone: {small}, reduced_tail: false, pretrained: {weights}}}\n")
    model = build_model(yaml)
    assert model.pretrained_report.fraction == 1.0 and model.pretrained_report.style == "torchvision"
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        got, expected = model.eval().backbone(x), ref.features[:13](x)
    assert (got[2] - expected).abs().max() < TOLERANCE  # the final 1x1 expansion, 576 channels
    yaml.write_text(f"nc: 3\nbackbone: {small}, pretrained: {weights}}}\n")  # the reduced tail, by default
    with pytest.raises(ConfigError, match=r"small.yaml:2: .*loaded 158/206 tensors .*76\.7%, torchvision(.|\n)*"
                                          r"shape mismatch: 48: features\.9\.block\.3\.0\.weight "
                                          r"file \[96, 288, 1, 1\] vs model \[48, 288, 1, 1\]"):
        build_model(yaml)


@pytest.mark.parametrize("name", ["deit_tiny_distilled_patch16_224", "convit_tiny"])
def test_timm_vit_file_loads_all_but_the_pyramid(name, tmp_path):
    ref = timm.create_model(name, pretrained=False).eval()
    weights = _save(ref.state_dict(), tmp_path / f"{name}.safetensors", None, "")
    assert guess_family(read_weights(weights).tensors) == ("vit", "timm ConViT" if "convit" in name else "timm ViT")
    yaml = tmp_path / "vit.yaml"
    yaml.write_text(f"nc: 3\nbackbone: {{name: vit, model: {name}, pretrained: {weights}}}\n")
    model = build_model(yaml)
    report = model.pretrained_report
    # every tensor of the ViT loads; the pyramid is new (2 convolutions, 2 BatchNorms), the classifier unused
    assert len(report.missing) == 10 and all(k.startswith("pyramid.") for k in report.missing)
    assert not report.mismatched and all(k.startswith("model.head") for k in report.unexpected)
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        expected = ref.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
        assert _max_diff(model.eval().backbone(x)[1:2], [expected]) < 1e-4


def test_wrong_family_fails_and_says_so(tmp_path):
    ref, _ = _reference("fastvit")
    weights = _save(ref.state_dict(), tmp_path / "fastvit_t8.safetensors", None, "")
    with pytest.raises(ConfigError, match=r"look like a fastvit checkpoint \(timm names\); this backbone is "
                                          r"mobilevit"):
        build_model(_yaml(tmp_path, "mobilevit", weights))
    with pytest.raises(ConfigError, match="look like a fastvit checkpoint"):  # strict off does not load nothing
        build_model(_yaml(tmp_path, "emo", weights, ", strict: false"))


def test_wrong_variant_fails_unless_strict_false(tmp_path):
    weights = _save(timm.create_model("mobilevit_xs").state_dict(), tmp_path / "xs.safetensors", None, "")
    with pytest.raises(ConfigError, match=r"looks? like a mobilevit checkpoint(.|\n)*strict: false"):
        build_model(_yaml(tmp_path, "mobilevit", weights))  # the YAML says xxs


class _Payload:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickled_object_is_not_executed(tmp_path):
    marker = tmp_path / "executed"
    payload = _Payload()
    payload.marker = str(marker)
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": emo_classifier("1m").state_dict(), "hook": payload}, path)
    with pytest.raises(ConfigError, match=r"evil\.pth: holds pickled Python objects besides tensors"):
        build_model(_yaml(tmp_path, "emo", path))
    assert not marker.exists()


def test_bad_files_and_yaml_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"emo.yaml:2: pretrained weights file .*missing.pth not found"):
        build_model(_yaml(tmp_path, "emo", tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ConfigError, match=r"junk\.pth: not a readable torch weights file"):
        build_model(_yaml(tmp_path, "emo", tmp_path / "junk.pth"))
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "empty.pt")
    with pytest.raises(ConfigError, match=r"empty.pt: no tensors found \(top-level entries: \['epoch', 'note'\]"):
        build_model(_yaml(tmp_path, "emo", tmp_path / "empty.pt"))
    yaml = tmp_path / "s.yaml"
    yaml.write_text("backbone:\n  name: emo\n  pretrained: w.pth\n  strict: maybe\n")
    with pytest.raises(ConfigError, match=r"s.yaml:4: 'backbone.strict' must be true or false"):
        build_model(yaml)
    yaml.write_text("backbone:\n  name: emo\n  strict: false\n")
    with pytest.raises(ConfigError, match=r"s.yaml:3: 'backbone.strict' only applies with"):
        build_model(yaml)


def test_relative_path_is_found_beside_the_yaml(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    _save(emo_classifier("1m").state_dict(), tmp_path / "cfg" / "emo.pth", "net", "")
    yaml = tmp_path / "cfg" / "m.yaml"
    yaml.write_text("backbone: {name: emo, pretrained: emo.pth}\n")
    monkeypatch.chdir(tmp_path)
    assert build_model(yaml).pretrained_report.fraction == 1.0


def test_checkpoint_does_not_need_the_weights_file_again(tmp_path):
    weights = _save(emo_classifier("1m").state_dict(), tmp_path / "emo.pth", None, "")
    model = build_model(_yaml(tmp_path, "emo", weights))
    model.save(tmp_path / "det.pt")
    weights.unlink()
    loaded = load_model(tmp_path / "det.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                     model.state_dict().values(), strict=True))
    # a yolo-mobile checkpoint is itself a source of backbone weights (its backbone.* entries)
    again = build_model(_yaml(tmp_path, "emo", tmp_path / "det.pt"))
    assert again.pretrained_report.style == "yolo-mobile checkpoint" and again.pretrained_report.fraction == 1.0


def test_train_pretrained_flag(tmp_path):
    ref = emo_classifier("1m")
    randomize_bn(ref)
    weights = _save(ref.state_dict(), tmp_path / "emo_1m.pth", None, "")
    from yolo_mobile.datasets.synthetic import build_shapes

    data = build_shapes(tmp_path / "shapes", n_train=4, n_val=2, size=64)
    config = TrainConfig.from_kwargs(cfg="emo_1m.yaml", pretrained=str(weights), data=str(data), epochs=1,
                                     imgsz=64, batch=2, workers=0, project=str(tmp_path), val=False)
    trainer = Trainer(config)
    trainer.before_train()
    backbone = trainer.model_unwrapped.backbone.state_dict()
    assert torch.equal(backbone["stage3.1.qk.conv.weight"], ref.state_dict()["stage3.1.qk.conv.weight"])
    # a missing file fails before the data is looked at (the data path here does not exist either)
    missing = TrainConfig.from_kwargs(cfg="emo_1m.yaml", pretrained=str(tmp_path / "nope.pth"),
                                      data=str(tmp_path / "no_data.yaml"), workers=0)
    with pytest.raises(ConfigError, match=r"nope\.pth not found"):
        Trainer(missing).before_train()


def test_weights_inspect_cli(tmp_path, capsys):
    weights = _save(timm.create_model("mobilevit_xxs").state_dict(), tmp_path / "m.safetensors", None, "")
    assert main(["weights", "inspect", str(weights)]) == 0
    out = capsys.readouterr().out
    assert "format:   safetensors" in out and "family:   mobilevit (timm key names)" in out
    assert re.search(r"variants: xxs 100\.0%, ", out)
    assert f"YAML:     backbone: {{name: mobilevit, variant: xxs, pretrained: {weights}}}" in out
    tv = _save(mobilenet_v3_large(weights=None).state_dict(), tmp_path / "tv.pth", "state_dict", "module.")
    assert main(["weights", "inspect", str(tv)]) == 0
    out = capsys.readouterr().out
    assert "inside 'state_dict', 'module.' prefix removed" in out and "mobilenetv3 (torchvision" in out
    large = float(re.search(r"large (\d+\.\d)%", out).group(1))
    assert 50 < large < 90 and "strict: false}" in out  # the reduced tail differs: below the strict threshold
    torch.save({"a.weight": torch.zeros(2)}, tmp_path / "other.pt")
    assert main(["weights", "inspect", str(tmp_path / "other.pt")]) == 0
    assert "not recognised" in capsys.readouterr().out
    assert main(["weights", "inspect", str(tmp_path / "absent.pth")]) == 2
    assert "absent.pth: pretrained weights file not found" in capsys.readouterr().err


def test_backbone_declares_the_optional_hooks_and_their_defaults_offer_nothing(tmp_path):
    """``variants``, ``pretrained_style`` and ``map_pretrained`` are declared on Backbone (pretrained.py used to
    find them by getattr alone); a family without them loads a file by its names as saved."""
    from yolo_mobile.backbones.base import Backbone
    from yolo_mobile.backbones.pretrained import WeightsFile, match_weights

    class Plain(Backbone):
        def __init__(self):
            super().__init__()
            self.channels = [4, 4, 4]
            self.conv = torch.nn.Conv2d(3, 4, 1)

    for hook in ("pretrained_style", "map_pretrained", "reparameterize"):
        assert getattr(Backbone, hook).__doc__, hook
    plain = Plain()
    assert plain.variants == () and plain.pretrained_style({"conv.weight"}) is None
    assert plain.map_pretrained({"conv.weight": torch.zeros(4, 3, 1, 1)}, None) is None
    weights = WeightsFile(tmp_path / "w.pt", "torch", {k: v.clone() for k, v in plain.state_dict().items()})
    (tmp_path / "w.pt").write_bytes(b"x")
    report, _ = match_weights(plain, weights, "plain")
    assert report.style == "as saved" and report.fraction == 1.0
    overriding = [name for name in BACKBONES.list() if isinstance(BACKBONES.get(name), type)
                  and BACKBONES.get(name).map_pretrained is not Backbone.map_pretrained]
    assert "emo" in overriding and "mobilevit" in overriding  # the families' own mappings still win
