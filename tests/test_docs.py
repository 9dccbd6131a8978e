"""The documentation: it builds without warnings, and the examples in its pages run."""

from __future__ import annotations

import doctest
import re
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import anomstats

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("*.rst"))


def _missing_components(page: Path) -> list[str]:
    """Optional libraries the page's examples use that are not installed here."""
    text = page.read_text(encoding="utf-8")
    missing = []
    # Optional libraries the examples import (torch, dask, ...): skip the page where one is absent.
    for mod in sorted(set(re.findall(r"^>>> (?:import|from) ([A-Za-z_]\w*)", text, flags=re.M))):
        if importlib.util.find_spec(mod) is None:
            missing.append(mod)
    if "anomstats_torch" in text and ">>> from anomstats_torch import" in text:
        if importlib.util.find_spec("torch") is None:
            missing.append("torch")
    return missing


def test_every_page_is_in_the_table_of_contents():
    index = (DOCS / "index.rst").read_text(encoding="utf-8")
    for page in PAGES:
        if page.stem != "index":
            assert f"   {page.stem}\n" in index, f"{page.name} is not in index.rst's toctree"


@pytest.mark.parametrize("page", [p for p in PAGES if ">>>" in p.read_text(encoding="utf-8")], ids=lambda p: p.name)
def test_page_examples_run(page):
    missing = _missing_components(page)
    if missing:
        pytest.skip(f"{page.name} needs optional libraries that are not installed: {', '.join(missing)}")
    result = doctest.testfile(
        str(page),
        module_relative=False,
        optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS,
        verbose=False,
    )
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} example(s) of {page.name} failed (see the output above)"


def test_sphinx_build_has_no_warnings(tmp_path):
    pytest.importorskip("sphinx", reason="sphinx is not installed (pip install 'anomstats[docs]')")
    pytest.importorskip("numpydoc", reason="numpydoc is not installed (pip install 'anomstats[docs]')")
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(tmp_path / "html")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    html = (tmp_path / "html" / "api.html").read_text(encoding="utf-8")
    for name in anomstats.__all__:
        if name != "__version__":
            assert f"anomstats.{name}" in html, f"{name} is missing from the API reference"


def test_every_test_named_on_the_guarantees_page_exists():
    # The page lists each promise with the test that holds it: a renamed or deleted test must not leave a
    # promise pointing at nothing.
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    page = (root / "docs" / "guarantees.rst").read_text(encoding="utf-8")
    named = set(re.findall(r"``(tests/[\w/]+\.py)::(\w+)``", page))
    assert len(named) > 50
    for path, name in sorted(named):
        source = (root / path).read_text(encoding="utf-8")
        assert re.search(rf"^def {name}\(", source, re.M), f"{path}::{name} is named in docs/guarantees.rst"
