"""Packaging facts: the core never imports torch; versions agree; typed marker ships."""

import subprocess
import sys
from pathlib import Path

import anomstats


def test_import_core_does_not_import_torch():
    code = "import sys, anomstats; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_version_is_exposed_by_both_packages():
    import pytest

    torch_pkg = pytest.importorskip("anomstats_torch")
    assert isinstance(anomstats.__version__, str) and anomstats.__version__.count(".") >= 2
    assert torch_pkg.__version__ == anomstats.__version__


def test_py_typed_marker_ships():
    assert (Path(anomstats.__file__).parent / "py.typed").is_file()
