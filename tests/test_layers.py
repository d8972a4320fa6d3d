"""The code's shape is checked like its behaviour: the import layers (setup.cfg [importlinter]: entry points >
API > use cases > adapters > settings > the pure core) and the types (setup.cfg [mypy], strict on core/)."""

from __future__ import annotations

import subprocess
import sys

from tests.stack import ROOT


def test_imports_point_down_the_layers_and_the_core_is_pure() -> None:
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "lint-imports"), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in done.stdout


def test_mypy_finds_no_error() -> None:
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-5000:]
