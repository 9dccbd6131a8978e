"""The house keeps its plan: the import graph read from the sources (every import, also inside functions).

* no import cycles among the modules of ``anomstats`` (a lazy import that dodges a cycle is still one);
* library modules of ``anomstats`` never import torch, ``anomstats_torch``, scikit-learn, matplotlib or the
  app layer ``anomstats.cli``;
* dask is named by ``anomstats._dask`` alone;
* the adapter ``anomstats_torch`` never imports the app layer, and nothing in it imports scikit-learn or
  matplotlib;
* ``import anomstats`` loads neither torch nor the app layer.

docs/architecture.rst describes the layers these rules enforce.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APP_LAYER = "anomstats.cli"
FORBIDDEN_IN_LIBRARY = ("torch", "anomstats_torch", "sklearn", "matplotlib", APP_LAYER)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute, wherever the import statement stands."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # ``from . import x`` / ``from .pkg import mod`` may name submodules.
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _sources(package: str) -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def _is_app_layer(module: str) -> bool:
    return module == APP_LAYER or module.startswith(APP_LAYER + ".") or module == "anomstats.__main__"


def _library_modules() -> dict[str, Path]:
    return {name: path for name, path in _sources("anomstats").items() if not _is_app_layer(name)}


def _internal_graph() -> dict[str, set[str]]:
    modules = _library_modules()
    return {
        name: {m for m in _imports(path) if m in modules and m != name and m != "anomstats"}
        for name, path in modules.items()
    }


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def _names(imports: set[str], top: str) -> set[str]:
    return {m for m in imports if m == top or m.startswith(top + ".")}


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_relative_imports_are_resolved(tmp_path):
    assert "anomstats._rules" in _imports(ROOT / "anomstats" / "moments.py")


def test_no_import_cycles_in_the_core():
    cycle = _find_cycle(_internal_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


@pytest.mark.parametrize("name", sorted(_library_modules()))
def test_library_modules_stay_below_the_adapter_and_the_app_layer(name):
    imports = _imports(_library_modules()[name])
    for top in FORBIDDEN_IN_LIBRARY:
        assert not _names(imports, top), f"{name} imports {sorted(_names(imports, top))}"


@pytest.mark.parametrize("name", sorted(_library_modules()))
def test_dask_is_named_by_its_dispatch_module_only(name):
    imports = _imports(_library_modules()[name])
    if name == "anomstats._dask":
        return
    assert not _names(imports, "dask") and not _names(imports, "distributed"), name


@pytest.mark.parametrize("name", sorted(_sources("anomstats_torch")))
def test_the_adapter_sits_below_the_app_layer(name):
    imports = _imports(_sources("anomstats_torch")[name])
    for top in (APP_LAYER, "sklearn", "matplotlib"):
        assert not _names(imports, top), f"{name} imports {sorted(_names(imports, top))}"


def test_importing_the_core_loads_neither_torch_nor_the_app_layer():
    code = (
        "import sys, anomstats\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'anomstats_torch', 'sklearn', "
        f"'matplotlib', 'dask') or m.startswith('{APP_LAYER}'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


#: The longest a library function's code may be (its docstring not counted): longer ones are split.
MAX_FUNCTION_LINES = 80


def _function_lengths(path: Path) -> list[tuple[str, int]]:
    lengths = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0]
            has_docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                first.value.value, str
            )
            start = first.end_lineno + 1 if has_docstring and len(node.body) > 1 else first.lineno
            lengths.append((node.name, node.end_lineno - start + 1))
    return lengths


def test_the_length_counter_skips_docstrings(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('def f():\n    """Doc.\n\n    More.\n    """\n    a = 1\n    return a\n')
    assert _function_lengths(path) == [("f", 2)]


@pytest.mark.parametrize("package", ["anomstats", "anomstats_torch"])
def test_library_functions_are_short(package):
    long = [
        f"{name}.{function} ({length} lines)"
        for name, path in _sources(package).items()
        for function, length in _function_lengths(path)
        if length > MAX_FUNCTION_LINES
    ]
    assert not long, long
