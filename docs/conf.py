"""Sphinx configuration for the anomstats documentation (``make docs``: built with -W, no warnings)."""

from __future__ import annotations

import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# The package from the working tree (also when it is not installed) and the local extension.
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(HERE, "_ext"))

import anomstats  # noqa: E402

project = "anomstats"
author = "the anomstats developers"
copyright = "the anomstats developers, Apache-2.0"
release = anomstats.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "numpydoc",
    "public_api",
]

exclude_patterns = ["_build"]
templates_path: list[str] = []
html_static_path: list[str] = []
html_theme = "alabaster"
html_title = f"anomstats {release}"

# Autodoc: members in source order; numpydoc renders the docstrings. Class member tables are
# written by the public-api directive itself (numpydoc's own tables need autosummary stubs).
autodoc_member_order = "bysource"
autodoc_typehints = "none"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
# A name written in a docstring that is not a documented object is plain text, not a broken link.
default_role = "literal"


# Shapes are written as in NumPy's documentation, e.g. "ndarray, shape (*batch, C, C)". Outside
# double-backtick literals reStructuredText reads that "*" as the start of emphasis and warns, so
# escape a "*" that opens a shape entry; literals are left exactly as written.
_SHAPE_STAR = re.compile(r"(?<![\\`])([(,]\s*)\*(?=\w)")


def _escape_shape_stars(app, what, name, obj, options, lines):  # noqa: ANN001 - Sphinx's event signature
    for i, line in enumerate(lines):
        parts = line.split("``")
        for j in range(0, len(parts), 2):  # even parts are outside ``literals``
            parts[j] = _SHAPE_STAR.sub(r"\1\\*", parts[j])
        lines[i] = "``".join(parts)


def setup(app):  # noqa: ANN001, ANN201
    app.connect("autodoc-process-docstring", _escape_shape_stars)
