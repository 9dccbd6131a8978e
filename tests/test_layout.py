"""Packaging facts: `python -m anomstats` runs the command line; versions agree; typed marker ships.

The import rules (the core never imports torch or the command line) are tests/test_architecture.py's.
"""

import subprocess
import sys
from pathlib import Path

import anomstats


def test_python_dash_m_runs_the_command_line():
    out = subprocess.run([sys.executable, "-m", "anomstats", "--help"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("usage: anomstats") and "{validate,demo}" in out.stdout


def test_version_is_exposed_by_both_packages():
    import pytest

    torch_pkg = pytest.importorskip("anomstats_torch")
    assert isinstance(anomstats.__version__, str) and anomstats.__version__.count(".") >= 2
    assert torch_pkg.__version__ == anomstats.__version__


def test_py_typed_marker_ships():
    assert (Path(anomstats.__file__).parent / "py.typed").is_file()
