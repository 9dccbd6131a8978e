"""Packaging facts: the core never imports torch or the command line; versions agree; typed marker ships."""

import ast
import subprocess
import sys
from pathlib import Path

import anomstats


def test_import_core_does_not_import_torch():
    code = "import sys, anomstats; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_import_core_does_not_load_the_command_line():
    code = "import sys, anomstats; print(sorted(m for m in sys.modules if m.startswith('anomstats.cli')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of the modules that the file at ``path`` (a module of ``package``) imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_no_library_module_imports_the_command_line():
    # The command line sits above the library: only anomstats/cli/ and the `python -m` shim use it.
    root = Path(anomstats.__file__).parent
    library_files = [p for p in root.rglob("*.py") if "cli" not in p.relative_to(root).parts[:-1] and p.name != "__main__.py"]
    assert library_files
    for path in library_files:
        package = ".".join(("anomstats", *path.relative_to(root).parts[:-1]))
        imported = _imported_modules(path, package)
        assert not any(n == "anomstats.cli" or n.startswith("anomstats.cli.") for n in imported), path.name


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
