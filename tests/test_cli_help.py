"""Every command's ``--help`` against a stored copy (tests/data/cli_help.json): flags, defaults and help texts
change only on purpose. After an intended change, rewrite the copy with ``python tests/test_cli_help.py`` and
review its diff."""

import io
import json
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from yolo_mobile.cli import main

STORED = Path(__file__).parent / "data" / "cli_help.json"
COMMANDS = ["", "models", "info", "val", "train", "detect", "export", "weights", "weights inspect", "benchmark"]


def help_text(command: str) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main([*command.split(), "--help"]) == 0
    # argparse wraps at the terminal's width: the stored copy is made at COLUMNS=100
    return out.getvalue()


@pytest.fixture(autouse=True)
def _columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_as_stored(command):
    stored = json.loads(STORED.read_text())
    assert help_text(command) == stored[command], f"--help of '{command}' changed; see this module's docstring"


if __name__ == "__main__":
    import os

    os.environ["COLUMNS"] = "100"
    STORED.write_text(json.dumps({c: help_text(c) for c in COMMANDS}, indent=1) + "\n")
    print(f"wrote {STORED}", file=sys.stderr)
