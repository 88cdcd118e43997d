"""The architecture as a test: pyproject.toml's import-linter contracts (the layers, the engines as
siblings, no import circle), checked on every test run so that no commit can bring a circle back."""

from __future__ import annotations

import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from conftest import ROOT


@pytest.mark.skipif(find_spec("importlinter") is None, reason="needs import-linter: pip install -e '.[dev]'")
def test_the_imports_keep_the_contracts():
    lint = Path(sys.executable).parent / "lint-imports"  # (the console script beside this interpreter)
    r = subprocess.run(
        [str(lint), "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = r.stdout + r.stderr
    assert r.returncode == 0, report[report.find("Broken contracts") :] if "Broken contracts" in report else report
