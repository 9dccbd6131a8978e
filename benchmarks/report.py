"""Summarise ``benchmarks/results/*.json`` as a Markdown table and plots of time against problem size.

Each results file holds a list of row dicts with at least ``suite``, ``case``, ``library`` and
``seconds``; suites add their own keys (ratios, errors, memory). Rows with different extra keys
are fine: a table gets the union of the keys of its rows, in order of first appearance, and an
empty cell where a row lacks one.

Outputs (next to the inputs by default):

* ``summary.md``: one section per results file, one table per file;
* ``<name>.png``: for each results file, one panel per ``suite`` value, seconds against problem
  size on log-log axes, one line per library.

The problem size of a row is its ``size`` (or ``problem_size``/``n_elements``) field when it has
one, otherwise the product of the numbers written in its ``case`` (so ``"n=10000 m=10000 d=2"``
gives 2e8); when neither tells cases apart, the cases are placed side by side in order. A panel's
x axis is labelled by its rows' ``size_label`` when they all give the same one. Rows whose
``seconds`` is missing or null (a peer skipped at that size) are in the table but not in the plot.

Usage::

    python -m benchmarks.report [--results DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REQUIRED = ("suite", "case", "library", "seconds")
SIZE_KEYS = ("size", "problem_size", "n_elements")
SUMMARY_NAME = "summary.md"


def load_results(results_dir: Path) -> tuple[dict[str, list[dict]], list[str]]:
    """Read every ``*.json`` file in ``results_dir``.

    Returns
    -------
    rows_by_file : dict
        File stem to its list of rows (dicts); files with no usable rows are left out.
    problems : list of str
        One line per file or row that was skipped, with the reason.
    """
    out: dict[str, list[dict]] = {}
    problems: list[str] = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            problems.append(f"{path.name}: unreadable ({exc})")
            continue
        if isinstance(data, dict):  # tolerate {"rows": [...]} / {"results": [...]} wrappers
            data = data.get("rows", data.get("results"))
        if not isinstance(data, list):
            problems.append(f"{path.name}: expected a list of row objects")
            continue
        rows = []
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                problems.append(f"{path.name}: row {i} is not an object")
                continue
            missing = [k for k in REQUIRED if k not in row]
            if missing:
                problems.append(f"{path.name}: row {i} lacks {', '.join(missing)}")
                continue
            rows.append(row)
        if rows:
            out[path.stem] = rows
    return out, problems


def format_value(value: Any) -> str:
    """Render one table cell: compact numbers, escaped text.

    Examples
    --------
    >>> [format_value(v) for v in (0.0123456, 3.0e-14, 12345678.0, 7, True, None, "a|b")]
    ['0.01235', '3.00e-14', '1.23e+07', '7', 'yes', '', 'a\\\\|b']
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value == 0.0 or not math.isfinite(value):
            return str(value) if not math.isfinite(value) else "0"
        if 1e-3 <= abs(value) < 1e6:
            return f"{value:.4g}"
        return f"{value:.2e}"
    if isinstance(value, (list, tuple, dict)):
        value = json.dumps(value, separators=(",", ":"))
    return str(value).replace("|", "\\|").replace("\n", " ")


def columns(rows: Iterable[dict]) -> list[str]:
    """The required keys first, then every other key in order of first appearance."""
    cols = list(REQUIRED)
    for row in rows:
        for key in row:
            if key not in cols:
                cols.append(key)
    return cols


def markdown_table(rows: Sequence[dict]) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` (union of keys; blanks where a row lacks one)."""
    cols = columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_value(row.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _numbers_in(text: str) -> list[float]:
    # Integers, decimals and exponents such as 1e4, 5e4, 10^4 / 10**4 written in case names.
    text = re.sub(r"(\d+(?:\.\d+)?)\s*[·x*×]\s*10\s*(?:\^|\*\*)\s*(\d+)", lambda m: str(float(m.group(1)) * 10 ** int(m.group(2))), text)
    text = re.sub(r"10\s*(?:\^|\*\*)\s*(\d+)", lambda m: str(10 ** int(m.group(1))), text)
    return [float(t) for t in re.findall(r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?", text)]


def problem_size(row: dict) -> float | None:
    """The row's problem size (see the module documentation); ``None`` if it has none.

    Examples
    --------
    >>> problem_size({"case": "n=10000 m=10000 d=2"})
    200000000.0
    >>> problem_size({"case": "x", "size": 64})
    64.0
    >>> problem_size({"case": "nearly singular"}) is None
    True
    """
    for key in SIZE_KEYS:
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return float(v)
    nums = [n for n in _numbers_in(str(row.get("case", ""))) if n > 0]
    return float(math.prod(nums)) if nums else None


def _seconds(row: dict) -> float | None:
    v = row.get("seconds")
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
        return float(v)
    return None


def plot_file(name: str, rows: Sequence[dict], path: Path) -> bool:
    """Write ``path`` (PNG): seconds against problem size per library, one panel per suite.

    Returns False (writing nothing) when no row has a positive ``seconds``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    timed = [r for r in rows if _seconds(r) is not None]
    if not timed:
        return False
    suites: list[str] = []
    for r in timed:
        if str(r["suite"]) not in suites:
            suites.append(str(r["suite"]))
    ncols = min(3, len(suites))
    nrows = math.ceil(len(suites) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 4.0 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, suite in zip(axes, suites):
        srows = [r for r in timed if str(r["suite"]) == suite]
        cases: list[str] = []
        for r in srows:
            if str(r["case"]) not in cases:
                cases.append(str(r["case"]))
        sizes = {c: problem_size(next(r for r in srows if str(r["case"]) == c)) for c in cases}
        numeric = all(v is not None for v in sizes.values()) and len(set(sizes.values())) == len(cases) and len(cases) > 1
        libraries: list[str] = []
        for r in srows:
            if str(r["library"]) not in libraries:
                libraries.append(str(r["library"]))
        for lib in libraries:
            pts = {}
            for r in srows:
                if str(r["library"]) == lib:
                    x = sizes[str(r["case"])] if numeric else cases.index(str(r["case"]))
                    pts[x] = min(pts.get(x, math.inf), _seconds(r))  # best time if a case repeats
            xs = sorted(pts)
            ax.plot(xs, [pts[x] for x in xs], marker="o", label=lib)
        ax.set_yscale("log")
        if numeric:
            ax.set_xscale("log")
            from_field = all(any(isinstance(r.get(k), (int, float)) for k in SIZE_KEYS) for r in srows)
            labels = {r.get("size_label") for r in srows}
            if len(labels) == 1 and isinstance(next(iter(labels)), str):
                # The suite says what its size counts (e.g. "n (data points)"): more telling than a product.
                ax.set_xlabel(next(iter(labels)))
            else:
                ax.set_xlabel("problem size" + ("" if from_field else " (product of the numbers in the case)"))
        else:
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
            ax.set_xlabel("case")
        ax.set_ylabel("seconds (log)")
        ax.set_title(suite, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(suites) :]:
        ax.set_visible(False)
    fig.suptitle(f"{name}: time against problem size", fontsize=11)
    fig.savefig(path, dpi=90)
    return True


def _environment() -> str:
    parts = [f"Python {platform.python_version()}", f"{os.cpu_count()} CPU(s)", platform.machine() or "?"]
    from importlib.metadata import PackageNotFoundError, version

    # Installed versions from the package metadata: no need to import (slow) torch for this line.
    for dist in ("numpy", "scipy", "torch", "scikit-learn"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            continue
    return ", ".join(parts)


def build_report(results_dir: Path = RESULTS_DIR, out_dir: Path | None = None, *, plots: bool = True) -> list[Path]:
    """Write ``summary.md`` and the PNG plots for the results in ``results_dir``; return the paths."""
    results_dir = Path(results_dir)
    out_dir = results_dir if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_file, problems = load_results(results_dir)
    written: list[Path] = []
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = ["# Benchmark summary", "", f"Generated {stamp} on {_environment()}.", ""]
    if not by_file:
        md += ["No benchmark results found.", ""]
    for name, rows in by_file.items():
        md += [f"## {name}", "", markdown_table(rows), ""]
        if plots:
            png = out_dir / f"{name}.png"
            try:
                drew = plot_file(name, rows, png)
            except ImportError:
                drew = False
                problems.append(f"{name}: matplotlib is not installed; no plot")
            if drew:
                written.append(png)
                md += [f"![{name}: time against problem size]({png.name})", ""]
    if problems:
        md += ["## Skipped input", ""] + [f"- {format_value(p)}" for p in problems] + [""]
    summary = out_dir / SUMMARY_NAME
    summary.write_text("\n".join(md), encoding="utf-8")
    written.insert(0, summary)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of the *.json results")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the results folder)")
    args = parser.parse_args(argv)
    for path in build_report(args.results, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
