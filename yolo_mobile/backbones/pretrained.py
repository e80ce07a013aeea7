"""ImageNet weights from local files into a backbone: read safely, map key names, load what matches, report.

Formats: ``.safetensors``, and ``.pth``/``.pt``/``.bin`` torch files read with ``weights_only=True`` (a file
that needs arbitrary pickled objects is refused, never executed). Wrappers are unwrapped (``state_dict``,
``model``, ``net``, ... and a ``module.`` prefix). Each backbone family maps its published key names to its own
in its own file: ``map_pretrained(tensors, style)``, with ``pretrained_style(keys)`` recognising its files.
Nothing is downloaded.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

MIN_MATCH = 0.9  # below this fraction of the backbone's tensors, a load is an error unless strict is off
WRAPPER_KEYS = ("state_dict", "model_state_dict", "ema", "model", "net", "module", "params")  # ema: ours, best.pt
STRIP_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel and torch.compile wrappers


class PretrainedError(ValueError):
    """A weights file that cannot be read safely, or that does not fit the backbone."""


@dataclass
class WeightsFile:
    """What a weights file holds once unwrapped: tensors by name and how they were found."""

    path: Path
    format: str
    tensors: dict[str, torch.Tensor]
    unwrapped: list[str] = field(default_factory=list)
    stripped: list[str] = field(default_factory=list)

    def describe(self) -> str:
        how = [self.format]
        how += [f"inside '{k}'" for k in self.unwrapped]
        how += [f"'{p}' prefix removed" for p in self.stripped]
        return ", ".join(how)


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and any(isinstance(v, torch.Tensor) for v in obj.values())


def _sniff(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(9)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "torch"  # a torch zip archive, or a legacy pickle
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"  # 8-byte header length, then the JSON header
    return "unknown"


def read_weights(path: str | Path) -> WeightsFile:
    """Tensors of a ``.safetensors`` or torch file, unwrapped. Raises PretrainedError naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PretrainedError(f"{path}: pretrained weights file not found")
    kind = "safetensors" if path.suffix == ".safetensors" else _sniff(path)
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise PretrainedError(f"{path}: not a readable safetensors file: {e}") from None
        fmt = "safetensors"
    elif kind == "torch" or path.suffix in (".pth", ".pt", ".bin", ".ckpt", ".tar"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle.UnpicklingError for code objects; other errors for damaged files
            if "Unsupported global" in str(e) or "Unsupported class" in str(e):
                raise PretrainedError(
                    f"{path}: holds pickled Python objects besides tensors, which are never executed here "
                    f"(torch.load weights_only=True refused it). Re-save its state_dict alone: "
                    f"torch.save(model.state_dict(), 'weights.pth')") from None
            # not torch's text: it advises turning weights_only off, which would run any code the file holds
            raise PretrainedError(f"{path}: not a readable torch weights file ({path.stat().st_size:,} bytes: "
                                  "truncated, corrupt or another format)") from None
        fmt = "torch (weights_only)"
    else:
        raise PretrainedError(f"{path}: unknown weights format; expected .safetensors or a torch .pth/.pt file")

    unwrapped: list[str] = []
    while isinstance(obj, dict) and not _is_tensor_dict(obj):
        inner = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        unwrapped.append(inner)
        obj = obj[inner]
    # a training checkpoint keeps its weights next to other entries ({'model': {...}, 'epoch': 3, ...})
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((k for k in WRAPPER_KEYS if _is_tensor_dict(obj.get(k))), None)
        if inner is not None:
            unwrapped.append(inner)
            obj = obj[inner]
    if not _is_tensor_dict(obj):
        found = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise PretrainedError(f"{path}: no tensors found (top-level entries: {found}); expected a state_dict, "
                              f"possibly inside one of {', '.join(WRAPPER_KEYS)}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    stripped = []
    for prefix in STRIP_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
            stripped.append(prefix)
    return WeightsFile(path, fmt, tensors, unwrapped, stripped)


def _countable(keys) -> list[str]:
    return [k for k in keys if not k.endswith("num_batches_tracked")]  # BN counters carry no learned weight


def guess_family(keys) -> tuple[str, str] | None:
    """``(backbone name, key style)`` of the first registered family whose ``pretrained_style`` claims these
    keys; None when none does."""
    from .base import BACKBONES

    keys = set(keys)
    if any(k.startswith("backbone.") for k in keys) and any(k.startswith("head.") for k in keys):
        return ("detector", "yolo-mobile checkpoint")
    for name in BACKBONES.list():
        recognise = getattr(BACKBONES.get(name), "pretrained_style", None)
        style = recognise(keys) if callable(recognise) else None
        if style:
            return (name, style)
    return None


@dataclass
class LoadReport:
    """What a load did: tensors loaded, and those skipped (missing, unexpected, shape mismatch)."""

    path: Path
    family: str
    style: str
    total: int
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]

    @property
    def fraction(self) -> float:
        return len(self.loaded) / max(self.total, 1)

    def summary(self, limit: int = 5) -> str:
        lines = [f"{self.path}: loaded {len(self.loaded)}/{self.total} tensors of the {self.family} backbone "
                 f"({100 * self.fraction:.1f}%, {self.style} key names)"]
        if self.mismatched:
            shown = "; ".join(f"{k} file {list(a)} vs model {list(b)}" for k, a, b in self.mismatched[:limit])
            more = f" (+{len(self.mismatched) - limit} more)" if len(self.mismatched) > limit else ""
            lines.append(f"  skipped, shape mismatch: {len(self.mismatched)}: {shown}{more}")
        if self.missing:
            lines.append(f"  skipped, missing from the file (left as initialised): {len(self.missing)}: "
                         f"{_grouped(self.missing, limit)}")
        if self.unexpected:
            lines.append(f"  skipped, in the file but not in the backbone: {len(self.unexpected)}: "
                         f"{_grouped(self.unexpected, limit)}")
        return "\n".join(lines)


def _grouped(keys: list[str], limit: int) -> str:
    """Keys summarised by their first two name parts: 'head.fc (2), final_conv.bn (4)'."""
    groups = Counter(".".join(k.split(".")[:2]) for k in keys)
    shown = ", ".join(f"{g} ({n})" for g, n in list(groups.items())[:limit])
    return shown + (f", ... ({len(groups) - limit} more groups)" if len(groups) > limit else "")


def match_weights(backbone: nn.Module, weights: WeightsFile, family: str = "",
                  guess: tuple[str, str] | None = None) -> tuple[LoadReport, dict]:
    """Map the file's keys to the backbone's and sort them into loaded / missing / unexpected / mismatched.
    Both the family's mapping and the names as they are (a backbone's own state_dict, a yolo-mobile
    checkpoint's ``backbone.*``) are tried; the one that matches more wins."""
    own = {k: v for k, v in backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    guess = guess or guess_family(weights.tensors)
    candidates: list[tuple[str, dict[str, torch.Tensor]]] = []
    mapper = getattr(backbone, "map_pretrained", None)  # declared on Backbone; a plain nn.Module may lack it
    style = guess[1] if guess and guess[0] == family else None
    mapped = mapper(dict(weights.tensors), style) if callable(mapper) else None
    if mapped is not None:  # first, so that it names the style when names as saved match equally well
        candidates.append((style or "mapped", mapped))
    candidates.append(("as saved", weights.tensors))
    if any(k.startswith("backbone.") for k in weights.tensors):
        candidates.append(("yolo-mobile checkpoint", {k.removeprefix("backbone."): v for k, v in
                                                      weights.tensors.items() if k.startswith("backbone.")}))

    def score(tensors: dict[str, torch.Tensor]) -> int:
        return sum(1 for k, v in tensors.items() if k in own and tuple(v.shape) == tuple(own[k].shape))

    style, mapped = max(candidates, key=lambda c: score(c[1]))
    loaded = [k for k in own if k in mapped and tuple(mapped[k].shape) == tuple(own[k].shape)]
    mismatched = [(k, tuple(mapped[k].shape), tuple(own[k].shape)) for k in own
                  if k in mapped and tuple(mapped[k].shape) != tuple(own[k].shape)]
    report = LoadReport(weights.path, family or type(backbone).__name__, style, len(own), loaded,
                        missing=[k for k in own if k not in mapped],
                        unexpected=_countable(k for k in mapped if k not in own), mismatched=mismatched)
    return report, {k: mapped[k] for k in loaded}


def load_pretrained(backbone: nn.Module, path: str | Path, strict: bool = True, family: str = "") -> LoadReport:
    """Load ImageNet weights from ``path`` into ``backbone`` and return what happened.

    A load that fills less than 90% of the backbone's tensors raises PretrainedError unless ``strict`` is
    False (then it loads what matches and warns); a load that fills nothing always raises, naming the family
    the file looks like."""
    weights = read_weights(path)
    guess = guess_family(weights.tensors)
    report, matched = match_weights(backbone, weights, family, guess)
    if not report.loaded or (strict and report.fraction < MIN_MATCH):
        looks = f"its keys look like a {guess[0]} checkpoint ({guess[1]} names)" if guess else \
            "its keys match no known backbone family"
        if guess and guess[0] != report.family:
            hint = f"; this backbone is {report.family}: pick the weights of that family"
        elif report.loaded:
            hint = ("; set `strict: false` under `backbone:` in the model YAML to load the matching tensors "
                    "anyway (a wrong variant also looks like this)")
        else:
            hint = ""
        raise PretrainedError(f"{report.summary()}\n{weights.path}: {looks}{hint}")
    with torch.no_grad():
        state = backbone.state_dict()
        for k, v in matched.items():
            state[k].copy_(v)  # casts a half-precision file to the backbone's dtype
    level = logging.WARNING if report.fraction < MIN_MATCH else logging.INFO
    log.log(level, "%s", report.summary())
    return report


def timm_feature_keys(tensors: dict[str, torch.Tensor], feature_net: nn.Module,
                      prefix: str = "") -> dict[str, torch.Tensor]:
    """timm classification names -> the names of its ``features_only`` wrapper, which flattens the first two
    levels of nested modules (``stages.0`` -> ``stages_0``). Names that no child matches are kept as they are."""
    children = {name for name, _ in feature_net.named_children()}
    out = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if len(parts) > 2 and f"{parts[0]}_{parts[1]}" in children:
            key = ".".join([f"{parts[0]}_{parts[1]}", *parts[2:]])
        out[prefix + key] = value
    return out


def inspect_weights(path: str | Path) -> dict[str, Any]:
    """What a weights file holds: format, tensors, values, dtypes, the family its keys look like and, for a
    known family, the variant whose backbone it fills best."""
    from .base import BACKBONES

    weights = read_weights(path)
    tensors = weights.tensors
    info: dict[str, Any] = {
        "path": weights.path, "size_mb": weights.path.stat().st_size / 2**20, "format": weights.describe(),
        "tensors": len(tensors), "values": sum(v.numel() for v in tensors.values()),
        "dtypes": dict(Counter(str(v.dtype).removeprefix("torch.") for v in tensors.values())),
        "prefixes": dict(Counter(k.split(".")[0] for k in tensors)),
        "family": None, "style": None, "variants": {},
    }
    guess = guess_family(tensors)
    if guess is None:
        return info
    info["family"], info["style"] = guess
    builder = BACKBONES.get(guess[0]) if guess[0] in BACKBONES else None
    for variant in getattr(builder, "variants", ()):
        backbone = builder(variant=variant)
        report, _ = match_weights(backbone, weights, guess[0], guess)
        info["variants"][variant] = report.fraction
    return info
