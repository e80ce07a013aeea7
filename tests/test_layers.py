"""The package's layers, read from the source: nothing imports upward, no import circle, no module imports another
module's private names, and the model, inference and export paths never load ultralytics."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "yolo_mobile"

# Lowest first. Modules of one layer may import each other; the models and the datasets stand beside each other
# and import neither way. A dotted entry places one module apart from its package (the longest entry that names a
# module wins): engine.checkpoint is a Detector on disk (base and models only), which the runtimes load.
LAYERS = {
    "base": ["version", "config", "registry", "resources", "files", "_ultralytics"],
    "models": ["layers", "backbones", "neck", "head", "detector", "loss", "engine.checkpoint"],
    "datasets": ["datasets"],
    "runtimes": ["runtimes"],  # run a model or an exported file: used by predict, val, benchmark and export
    "engine": ["engine"],
    "deploy": ["export", "benchmark"],
    "top": ["cli", "api", "__init__", "__main__"],
}
LEVEL = {"base": 0, "models": 1, "datasets": 1, "runtimes": 2, "engine": 3, "deploy": 4, "top": 5}
# (importing module, imported module, name): the only private names one module may import from another, each
# with its reason
PRIVATE_IMPORTS_ALLOWED: dict[tuple[str, str, str], str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def from_imports(path: Path) -> Iterator[tuple[str, str]]:
    """(module, name) of every ``from module import name`` in ``path``, relative imports resolved, at the top or
    inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield base, alias.name


def imports_of(path: Path) -> set[str]:
    """Every yolo_mobile module ``path`` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    for base, name in from_imports(path):  # `from . import x` names a module when x is one
        found.add(f"{base}.{name}" if is_module(f"{base}.{name}") else base)
    return {m for m in found if m == "yolo_mobile" or m.startswith("yolo_mobile.")}


def layer_of(name: str) -> str:
    rel = name.split(".", 1)[1] if "." in name else "__init__"
    entries = [(len(m), layer) for layer, members in LAYERS.items() for m in members
               if rel == m or rel.startswith(m + ".")]
    if not entries:
        raise AssertionError(f"{name} is in no layer: add it to LAYERS in {__file__}")
    return max(entries)[1]


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) - {module_name(p)} for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_walker_reads_relative_and_function_level_imports():
    graph = import_graph()
    assert "yolo_mobile.detector" in graph["yolo_mobile.engine.checkpoint"]  # `from ..detector import ...`
    assert "yolo_mobile.backbones.pretrained" in graph["yolo_mobile.detector"]  # inside build_model
    assert "yolo_mobile.engine.predictor" in graph["yolo_mobile.api"]


def test_layer_of_takes_the_longest_entry():
    assert layer_of("yolo_mobile.engine.checkpoint") == "models"
    assert layer_of("yolo_mobile.engine.predictor") == "engine"
    assert layer_of("yolo_mobile.runtimes.onnxrt") == "runtimes"


def test_nothing_imports_upward():
    upward = []
    for module, targets in import_graph().items():
        here = layer_of(module)
        for target in targets:
            there = layer_of(target)
            sideways = LEVEL[there] == LEVEL[here] and there != here
            if LEVEL[there] > LEVEL[here] or sideways:
                upward.append(f"{module} ({here}) imports {target} ({there})")
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, set())):
            if state.get(nxt) == 1:
                circles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not circles, "\n".join(circles)


def private_imports() -> set[tuple[str, str, str]]:
    """(importing module, imported module, name) for every ``from X import _y`` in the package and scripts/
    where ``_y`` is a private name of another of our modules (not a module such as ``_ultralytics``, not a dunder)."""
    found = set()
    for path in sorted([*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "scripts").glob("*.py")]):
        importer = module_name(path)
        for base, name in from_imports(path):
            ours = base == "yolo_mobile" or base.startswith("yolo_mobile.")
            private = name.startswith("_") and not name.startswith("__")
            if ours and private and base != importer and not is_module(f"{base}.{name}"):
                found.add((importer, base, name))
    return found


def test_no_module_imports_another_modules_private_names():
    found = private_imports()
    assert not found - set(PRIVATE_IMPORTS_ALLOWED), "\n".join(
        f"{a} imports {n} from {b}: make it public there, or list it with its reason in PRIVATE_IMPORTS_ALLOWED"
        for a, b, n in sorted(found - set(PRIVATE_IMPORTS_ALLOWED)))
    stale = set(PRIVATE_IMPORTS_ALLOWED) - found
    assert not stale, f"no longer imported, remove from PRIVATE_IMPORTS_ALLOWED: {sorted(stale)}"


SCRIPT = r"""
import json, sys
from pathlib import Path
import cv2, numpy as np, torch
from yolo_mobile import build_model, load_model
from yolo_mobile.export.onnx import export_onnx

out = Path(sys.argv[1])
model = build_model("yolov5n.yaml", nc=2, pretrained=False)
model.eval()(torch.rand(1, 3, 64, 64))
model.save(out / "m.pt")
model = load_model(out / "m.pt")
cv2.imwrite(str(out / "a.png"), np.full((48, 80, 3), 90, np.uint8))
list(model.predict(out / "a.png", imgsz=64))
export_onnx(model, out / "m.onnx", imgsz=64)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "ultralytics")))
"""


def test_build_eval_predict_and_export_never_import_ultralytics(tmp_path):
    pytest.importorskip("onnxruntime")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    assert (tmp_path / "m.onnx").is_file()


def test_no_class_in_the_package_holds_mutable_state():
    """A list, dict or set as a class attribute is shared by every instance and subclass (Backbone.strides was)."""
    import importlib
    import inspect

    shared = []
    for name in sorted(set(import_graph()) - {"yolo_mobile.__main__"}):  # __main__ runs the CLI
        module = importlib.import_module(name)
        for cls_name, cls in vars(module).items():
            if not inspect.isclass(cls) or cls.__module__ != name:
                continue
            for attr, value in vars(cls).items():
                if isinstance(value, (list, dict, set)) and not attr.startswith("__"):
                    shared.append(f"{name}.{cls_name}.{attr}")
    assert not shared, shared
