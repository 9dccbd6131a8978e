"""The application layer: the ``anomstats`` command line (``validate``, ``demo``).

It sits above both libraries: it uses :mod:`anomstats` and, when torch is installed,
:mod:`anomstats_torch` (plus scikit-learn and matplotlib for the demo), while no library module
imports it and ``import anomstats`` never loads it. ``python -m anomstats`` and the ``anomstats``
console script both run :func:`main`.

Examples
--------
>>> from anomstats.cli import main
>>> main(["validate", "--quick", "--only", "no such check"])
2
"""

from .commands import build_parser, main

__all__ = ["build_parser", "main"]
