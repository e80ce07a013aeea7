import pytest

from yolo_mobile import build_model
from yolo_mobile.config import ConfigError, find_model_yaml, list_builtin_models, load_model_config

EXPECTED_MODELS = {"mobilevit_xxs.yaml", "mobilevit_xs.yaml", "mobilevit_s.yaml", "mobilenetv3_large.yaml",
                   "fastvit_t8.yaml", "fastvit_t12.yaml", "fastvit_sa12.yaml", "yolov5n.yaml", "yolov5s.yaml",
                   "emo_1m.yaml", "emo_2m.yaml", "emo_5m.yaml", "emo_6m.yaml", "mobile_former_96m.yaml",
                   "mobile_former_151m.yaml", "mobile_former_294m.yaml", "mobile_former_508m.yaml"}


def write(tmp_path, text, name="m.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_builtin_models_present():
    assert set(list_builtin_models()) >= EXPECTED_MODELS


def test_bare_name_finds_builtin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_model_yaml("mobilevit_s.yaml").name == "mobilevit_s.yaml"
    assert find_model_yaml("mobilevit_s").name == "mobilevit_s.yaml"
    # a file of that name in the working directory wins over the built-in
    write(tmp_path, "nc: 2\nbackbone: {name: cspdarknet, variant: n}\n", "mobilevit_s.yaml")
    assert load_model_config("mobilevit_s.yaml").backbone["name"] == "cspdarknet"


def test_missing_file_lists_builtins():
    with pytest.raises(ConfigError, match=r"nope.yaml: no such model YAML.*built-ins: .*yolov5n.yaml"):
        load_model_config("nope.yaml")


def test_unknown_top_level_key(tmp_path):
    path = write(tmp_path, "nc: 2\nbackbone: {name: cspdarknet}\nnekc: {}\n")
    with pytest.raises(ConfigError, match=rf"{path}:3: unknown key 'nekc'; valid keys: nc, backbone, neck, head"):
        load_model_config(path)


def test_unknown_section_key(tmp_path):
    path = write(tmp_path, "backbone:\n  name: cspdarknet\nneck:\n  depth: 0.33\n  widht: 0.25\n")
    with pytest.raises(ConfigError, match=rf"{path}:5: unknown key 'widht' in 'neck'; valid keys: depth, width, act"):
        load_model_config(path)


def test_wrong_type(tmp_path):
    path = write(tmp_path, "backbone: {name: cspdarknet}\nhead:\n  reg_max: sixteen\n")
    with pytest.raises(ConfigError, match=rf"{path}:3: 'head.reg_max' must be a int"):
        load_model_config(path)
    path = write(tmp_path, "nc: 0\nbackbone: {name: cspdarknet}\n")
    with pytest.raises(ConfigError, match=rf"{path}:1: 'nc' must be a positive integer"):
        load_model_config(path)


def test_unknown_backbone_names_line_and_valid_names(tmp_path):
    path = write(tmp_path, "nc: 2\nbackbone:\n  name: mobilevitt\n")
    with pytest.raises(ConfigError, match=rf"{path}:2: unknown backbone 'mobilevitt'; valid: .*mobilevit"):
        build_model(path)


def test_unknown_backbone_argument(tmp_path):
    path = write(tmp_path, "backbone: {name: mobilenetv3, variant: large, pretraind: x.pth}\n")
    with pytest.raises(ConfigError, match=rf"{path}:1: .*unknown argument\(s\) pretraind; valid: variant"):
        build_model(path)


def test_unknown_activation(tmp_path):
    path = write(tmp_path, "backbone: {name: cspdarknet}\nneck: {act: swish}\n")
    with pytest.raises(ConfigError, match=r"unknown activation 'swish'; valid: .*silu"):
        build_model(path)


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "nc: 2\nbackbone: {name: x\nneck: [\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: invalid YAML"):
        load_model_config(path)


def test_safe_load_only(tmp_path):
    path = write(tmp_path, "nc: !!python/object/apply:os.system ['echo pwned']\nbackbone: {name: cspdarknet}\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_model_config(path)


def test_light_neck_and_head_options_are_checked(tmp_path):
    path = write(tmp_path, "backbone: {name: cspdarknet}\nneck: {depthwise: true, sppf: false}\n"
                           "head: {channels: 48, shared: true}\n")
    config = load_model_config(path)
    assert (config.neck.depthwise, config.neck.sppf, config.head.channels, config.head.shared) == (True, False, 48,
                                                                                                   True)
    defaults = load_model_config("yolov5n.yaml")
    assert (defaults.neck.depthwise, defaults.neck.sppf, defaults.head.channels, defaults.head.shared) == (
        False, True, 0, False)


@pytest.mark.parametrize(("text", "message"), [
    ("head:\n  chanels: 48", "unknown key 'chanels' in 'head'; valid keys: reg_max, act, channels, shared, "
                            "depthwise"),
    ("neck:\n  depthwise: 1", "'neck.depthwise' must be a bool, got 1"),
    ("head:\n  depthwise: dense", "'head.depthwise' must be a bool, got 'dense'"),
    ("head:\n  channels: -8", "'head.channels' must be an integer >= 0"),
])
def test_light_options_refuse_bad_values_with_the_line(tmp_path, text, message):
    path = write(tmp_path, f"backbone: {{name: cspdarknet}}\n{text}\n")
    with pytest.raises(ConfigError, match=rf"{path}:3: {message}"):
        load_model_config(path)


def test_every_lite_model_has_the_light_neck_and_head():
    lite = [m for m in list_builtin_models() if m.endswith("_lite.yaml")]
    assert {"mobilenetv3_small_lite.yaml", "mobilenetv3_large_lite.yaml", "emo_1m_lite.yaml",
            "mobilevit_xxs_lite.yaml", "fastvit_t8_lite.yaml", "mobile_former_96m_lite.yaml"} <= set(lite)
    for name in lite:
        config = load_model_config(name)
        full = load_model_config(name.replace("_lite", ""))
        assert config.backbone == full.backbone and config.neck.width < full.neck.width
        # SiLU and SPPF as the full build: each was worth 0.03-0.07 mAP50-95 in the 10-epoch comparison
        assert config.neck.sppf and config.neck.act == config.head.act == "silu"
        assert config.head.shared and 0 < config.head.channels < 64
