"""The one place that reads configuration files: YAML -> typed dataclasses, unknown keys are errors.

Errors name the file and the line, and list the valid keys or names.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PACKAGE_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says where and why."""


def flag(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A dataclass field that is also a command-line flag: the CLI reads its type, default and help from here.
    ``argparse_kwargs`` may add ``choices``, ``nargs``, ``type`` (a parser such as ``int_at_least(1)``'s name),
    ``flag`` (the option's name when it is not the field's), ``group`` (a mutually exclusive group, ``required``
    when one of it must be given), ``off_flag`` and ``off_help`` (a None-by-default bool's "no" option),
    ``show_default``. A list default is copied for each instance."""
    metadata = {"help": help, **argparse_kwargs}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def check_imgsz(size: Any, what: str = "imgsz") -> int:
    """``size`` as an input side: a positive multiple of 32 (the largest stride), else ConfigError."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 32 or size % 32:
        raise ConfigError(f"{what} must be a positive multiple of 32, got {size}")
    return size


# ---------------------------------------------------------------------------------------------------------- YAML
@dataclass
class YamlDoc:
    """A parsed YAML mapping with the line of each key, so errors can point at it."""

    data: dict[str, Any]
    source: str  # file path, or "<dict>"
    lines: dict[tuple[str, ...], int] = field(default_factory=dict)

    def where(self, *keys: str) -> str:
        line = self.lines.get(tuple(keys))
        return f"{self.source}:{line}" if line else self.source


def _key_lines(node: yaml.Node, prefix: tuple[str, ...], out: dict[tuple[str, ...], int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = (*prefix, str(key.value))
            out[path] = key.start_mark.line + 1
            _key_lines(value, path, out)


class _NoAliasLoader(yaml.SafeLoader):
    """``safe_load`` without aliases: configs never need them, and nested ones expand exponentially (a
    700-byte file can take gigabytes)."""

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} is not allowed in a config "
                                              "(write the value out)", event.start_mark)
        return super().compose_node(parent, index)


def read_yaml(path: str | Path) -> YamlDoc:
    """Read a YAML mapping with ``safe_load`` semantics, aliases refused; a missing file, text that is not
    UTF-8 or a syntax error names the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as "
                          "UTF-8") from None
    loader = _NoAliasLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    lines: dict[tuple[str, ...], int] = {}
    _key_lines(node, (), lines)
    return YamlDoc(data, str(path), lines)


# ------------------------------------------------------------------------------------------------- built-in models
def default_names(nc: int) -> list[str]:
    """Class names of a model that has none from its data or checkpoint: the class indices."""
    return [str(i) for i in range(nc)]


def builtin_models_dir() -> Path:
    """``yolo_mobile/models`` inside a wheel; the repo's top-level ``models/`` in a source checkout."""
    for candidate in (PACKAGE_DIR / "models", PACKAGE_DIR.parent / "models"):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"built-in model YAMLs not found next to {PACKAGE_DIR}; is the package installed whole?")


def list_builtin_models() -> list[str]:
    return sorted(p.name for p in builtin_models_dir().glob("*.yaml"))


def find_model_yaml(cfg: str | Path) -> Path:
    """A path that exists wins; otherwise a bare name (with or without .yaml) is looked up among the built-ins."""
    path = Path(cfg)
    if path.is_file():
        return path
    if path.parent == Path("."):
        name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
        builtin = builtin_models_dir() / name
        if builtin.is_file():
            return builtin
    raise ConfigError(f"{cfg}: no such model YAML, and no built-in by that name; "
                      f"built-ins: {', '.join(list_builtin_models())}")


# ------------------------------------------------------------------------------------------------ model config
def _valid(check: Any, text: str) -> dict[str, Any]:
    """Field metadata: the range a value must be in, checked when the YAML is read."""
    return {"valid": (check, text)}


@dataclass
class NeckConfig:
    depth: float = field(default=0.33, metadata=_valid(lambda v: 0 < v < float("inf"), "a finite number > 0"))
    width: float = field(default=0.25, metadata=_valid(lambda v: 0 < v < float("inf"), "a finite number > 0"))
    act: str = "silu"
    sppf_kernel: int = field(default=5, metadata=_valid(lambda v: v > 0 and v % 2, "an odd integer >= 1"))
    # every 3x3 conv of the PAN and of the head depthwise 3x3 + pointwise 1x1 (YOLOX-Nano's depthwise=True)
    depthwise: bool = False
    sppf: bool = True  # false: P5 enters the PAN through a 1x1 conv, no spatial pyramid pooling


@dataclass
class HeadConfig:
    reg_max: int = field(default=16, metadata=_valid(lambda v: v >= 1, "an integer >= 1"))
    act: str = "silu"
    # the box and class branches' width; 0: YOLOv8's rule from the neck's P3 width and nc
    channels: int = field(default=0, metadata=_valid(lambda v: v >= 0, "an integer >= 0 (0: YOLOv8's widths)"))
    # one stack of 3x3 convs per level for both branches, which keep only their 1x1 predictions
    shared: bool = False
    # the head's 3x3 convs depthwise-separable or dense; unset: as neck.depthwise says
    depthwise: bool | None = field(default=None, metadata={"type": bool})


@dataclass
class ModelConfig:
    """A resolved model definition: what a checkpoint stores and ``build_model`` accepts back as a dict."""

    backbone: dict[str, Any]
    nc: int = 80
    neck: NeckConfig = field(default_factory=NeckConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    source: str = field(default="<dict>", compare=False)  # where it was read, for error messages
    backbone_at: str = field(default="<dict>", compare=False)  # file:line of the backbone key

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        del d["source"], d["backbone_at"]
        return d


MODEL_KEYS = ("nc", "backbone", "neck", "head")


def _check_keys(doc: YamlDoc, mapping: dict[str, Any], valid: list[str], *section: str) -> None:
    for key in mapping:
        if key not in valid:
            where = doc.where(*section, str(key))
            scope = f" in '{'.'.join(section)}'" if section else ""
            raise ConfigError(f"{where}: unknown key '{key}'{scope}; valid keys: {', '.join(valid)}")


def _section(doc: YamlDoc, cls: type, *section: str) -> Any:
    raw = doc.data.get(section[0]) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{doc.where(*section)}: '{section[0]}' must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(doc, raw, list(fields), *section)
    for key, value in raw.items():
        expected = fields[key].metadata.get("type", type(fields[key].default))
        ok = isinstance(value, expected) or (expected is float and isinstance(value, int))
        if value is None and fields[key].default is None:  # unset, as a checkpoint's config writes it
            continue
        if not ok or isinstance(value, bool) != (expected is bool):
            raise ConfigError(f"{doc.where(*section, key)}: '{section[0]}.{key}' must be a "
                              f"{expected.__name__}, got {value!r}")
        check, text = fields[key].metadata.get("valid", (None, ""))
        if check is not None and not check(value):
            raise ConfigError(f"{doc.where(*section, key)}: '{section[0]}.{key}' must be {text}, got {value!r}")
    return cls(**raw)


def _check_pretrained(doc: YamlDoc, backbone: dict[str, Any]) -> None:
    """``backbone.pretrained`` (a weights file) and ``backbone.strict`` (a bool). A relative path is taken from
    the working directory, or else from the YAML's folder; whether the file exists is checked when it loads."""
    if "strict" in backbone and not isinstance(backbone["strict"], bool):
        raise ConfigError(f"{doc.where('backbone', 'strict')}: 'backbone.strict' must be true or false, "
                          f"got {backbone['strict']!r}")
    path = backbone.get("pretrained")
    if path is None:
        if "strict" in backbone:
            raise ConfigError(f"{doc.where('backbone', 'strict')}: 'backbone.strict' only applies with "
                              "'backbone.pretrained: PATH'")
        backbone.pop("pretrained", None)
        return
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{doc.where('backbone', 'pretrained')}: 'backbone.pretrained' must be the path of a "
                          f"weights file (.safetensors, .pth, .pt), got {path!r}")
    candidate = Path(path).expanduser()
    if not candidate.is_absolute() and not candidate.exists() and doc.source != "<dict>":
        beside = Path(doc.source).parent / candidate
        if beside.exists():
            backbone["pretrained"] = str(beside.resolve())


def parse_model_config(doc: YamlDoc) -> ModelConfig:
    data = doc.data
    _check_keys(doc, data, list(MODEL_KEYS))
    if "backbone" not in data:
        raise ConfigError(f"{doc.source}: missing required key 'backbone' (e.g. backbone: {{name: mobilevit}})")
    backbone = data["backbone"]
    if not isinstance(backbone, dict) or not isinstance(backbone.get("name"), str):
        raise ConfigError(f"{doc.where('backbone')}: 'backbone' must be a mapping with a 'name' "
                          "(e.g. backbone: {name: mobilevit, variant: s})")
    backbone = dict(backbone)
    _check_pretrained(doc, backbone)
    nc = data.get("nc", 80)
    if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:
        raise ConfigError(f"{doc.where('nc')}: 'nc' must be a positive integer, got {nc!r}")
    return ModelConfig(backbone=backbone, nc=nc, neck=_section(doc, NeckConfig, "neck"),
                       head=_section(doc, HeadConfig, "head"), source=doc.source,
                       backbone_at=doc.where("backbone"))


def load_model_config(cfg: str | Path | dict[str, Any] | ModelConfig) -> ModelConfig:
    """Resolve a model definition given as a path, a built-in name, a dict, or an already parsed config."""
    if isinstance(cfg, ModelConfig):
        return cfg
    doc = YamlDoc(dict(cfg), "<dict>") if isinstance(cfg, dict) else read_yaml(find_model_yaml(cfg))
    return parse_model_config(doc)


# ------------------------------------------------------------------------------------------------- data config
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DATA_KEYS = ("path", "train", "val", "test", "names", "nc", "download",
             "train_images", "val_images", "test_images", "imgsz", "epochs")
# keys a data YAML may set to suggest training defaults for its set (flags and train() keywords override them)
DATA_DEFAULT_KEYS = ("imgsz", "epochs")


@dataclass
class Split:
    """One split: YOLO images (+ labels beside them), or a COCO instances JSON with its image folder."""

    images: list[Path]  # image files (YOLO), or [] for a COCO JSON split
    coco_json: Path | None = None
    image_dir: Path | None = None  # COCO JSON: where its file_names are


@dataclass
class DataConfig:
    """An ultralytics-style data YAML: ``path``, ``train``, ``val``, ``names`` (a list or {id: name})."""

    root: Path
    names: list[str]
    splits: dict[str, Any]  # split name -> raw value from the YAML (folder, list of folders, .txt or .json)
    source: str = "<dict>"
    doc: YamlDoc | None = field(default=None, repr=False)
    defaults: dict[str, int] = field(default_factory=dict)  # suggested imgsz / epochs for training on this set

    @property
    def nc(self) -> int:
        return len(self.names)

    def split(self, name: str) -> Split:
        """Resolve a split to its files; a missing folder or an empty split fails with the path and YAML line."""
        if name not in self.splits or self.splits[name] in (None, ""):
            raise ConfigError(f"{self.source}: no '{name}' split; it defines {', '.join(self.splits) or 'none'}")
        where = self.doc.where(name) if self.doc else self.source
        value = self.splits[name]
        entries = value if isinstance(value, list) else [value]
        paths = [self._resolve(str(e)) for e in entries]
        if len(paths) == 1 and paths[0].suffix == ".json":
            return self._coco_split(name, paths[0], where)
        images: list[Path] = []
        for p in paths:
            if p.is_dir():
                images += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            elif p.suffix == ".txt" and p.is_file():
                lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
                images += [self._resolve(ln) if not ln.startswith("./") else p.parent / ln for ln in lines]
            else:
                raise ConfigError(f"{where}: '{name}' path {p} does not exist (expected a folder of images, "
                                  "a .txt list of images, or a COCO .json)")
        if not images:
            raise ConfigError(f"{where}: '{name}' split has no images in {', '.join(map(str, paths))}")
        return Split(images=images)

    def _coco_split(self, name: str, json_path: Path, where: str) -> Split:
        if not json_path.is_file():
            raise ConfigError(f"{where}: '{name}' annotation file {json_path} does not exist")
        explicit = self.splits.get(f"{name}_images")
        stem = json_path.stem.removeprefix("instances_")
        candidates = [self._resolve(str(explicit))] if explicit else [
            self.root / stem, self.root / "images" / stem, json_path.parent.parent / stem]
        for c in candidates:
            if c.is_dir():
                return Split(images=[], coco_json=json_path, image_dir=c)
        raise ConfigError(f"{where}: images of {json_path.name} not found in {', '.join(map(str, candidates))}; "
                          f"set '{name}_images' to their folder")

    def _resolve(self, p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else self.root / path


def read_coco_json(path: Path) -> dict[str, Any]:
    """A COCO instances file (images, annotations, categories); a missing, non-UTF-8 or malformed one names the
    file (and line)."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such COCO annotation file")
    try:
        gt = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(gt, dict) or k not in gt]
    if missing:
        raise ConfigError(f"{path}: not a COCO instances file (no {', '.join(missing)})")
    return gt


def _names(doc: YamlDoc) -> list[str]:
    names = doc.data.get("names")
    if isinstance(names, dict):
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in names):
            raise ConfigError(f"{doc.where('names')}: 'names' ids must all be integers 0..{len(names) - 1}, got "
                              f"{list(names)}")
        keys = sorted(names)
        if keys != list(range(len(keys))):
            raise ConfigError(f"{doc.where('names')}: 'names' ids must be 0..{len(keys) - 1}, got {keys}")
        return [str(names[k]) for k in keys]
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    raise ConfigError(f"{doc.where('names') if 'names' in doc.data else doc.source}: 'names' must be a "
                      "non-empty list or {id: name} mapping")


def builtin_data_dir() -> Path | None:
    for candidate in (PACKAGE_DIR / "data", PACKAGE_DIR.parent / "data"):
        if candidate.is_dir():
            return candidate
    return None


def load_data_config(data: str | Path) -> DataConfig:
    """Read a data YAML; ``path`` is relative to the YAML file (ultralytics' convention)."""
    path = Path(data)
    if not path.is_file() and path.parent == Path(".") and (builtin := builtin_data_dir()):
        path = builtin / (path.name if path.suffix else f"{path.name}.yaml")
    if not path.is_file():
        raise ConfigError(f"{data}: no such data YAML")
    doc = read_yaml(path)
    _check_keys(doc, doc.data, list(DATA_KEYS))
    names = _names(doc)
    if "nc" in doc.data and doc.data["nc"] != len(names):
        raise ConfigError(f"{doc.where('nc')}: nc is {doc.data['nc']} but 'names' has {len(names)} entries")
    root = Path(str(doc.data.get("path") or "."))
    root = (root if root.is_absolute() else path.parent / root).resolve()
    splits = {k: doc.data[k] for k in ("train", "val", "test") if k in doc.data}
    splits |= {k: doc.data[k] for k in ("train_images", "val_images", "test_images") if k in doc.data}
    defaults = {}
    for key in DATA_DEFAULT_KEYS:
        if key in doc.data:
            value = doc.data[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (key == "imgsz" and value % 32):
                need = "a positive multiple of 32" if key == "imgsz" else "a positive integer"
                raise ConfigError(f"{doc.where(key)}: '{key}' must be {need}, got {value!r}")
            defaults[key] = value
    return DataConfig(root=root, names=names, splits=splits, source=str(path), doc=doc, defaults=defaults)
