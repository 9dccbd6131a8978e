"""Summarise ``benchmarks/results/*.json`` as a Markdown table and plots of time against problem size.

Each results file holds a list of row dicts with at least ``suite``, ``case``, ``library`` and
``seconds``; suites add their own keys (ratios, errors, memory). Rows with different extra keys
are fine: a table gets the union of the keys of its rows, in order of first appearance, and an
empty cell where a row lacks one.

Outputs (next to the inputs by default):

* ``summary.md``: first the headline table (the rows a suite marked with ``headline``: issue 12's
  workloads, each with its time, first call in a fresh process, multiple of the machine's floor, peer
  ratios, targets and whether they are met) and the machine the suites ran on (from their ``machine
  floor`` rows: CPU model, cores, BLAS), then one section per results file, one table per file;
* ``<name>.png``: for each results file, one panel per ``suite`` value, seconds against problem
  size on log-log axes, one line per library. A panel whose rows carry ``slope_reference`` (the cost-growth
  suite) also gets a dashed slope-1 line (linear growth) and each library's fitted log-log slope in its
  legend;
* with ``readme=PATH`` (what ``make bench`` does after a full run): the README's benchmark section, between
  the markers ``<!-- bench-table:begin -->`` and ``<!-- bench-table:end -->``, is replaced by the headline
  table and the machine line (nothing else in the README changes; without the markers or without headline
  rows the README is left alone and the summary says why).

The problem size of a row is its ``size`` (or ``problem_size``/``n_elements``) field when it has
one, otherwise the product of the numbers written in its ``case`` (so ``"n=10000 m=10000 d=2"``
gives 2e8); when neither tells cases apart, the cases are placed side by side in order. A panel's
x axis is labelled by its rows' ``size_label`` when they all give the same one. Rows whose
``seconds`` is missing or null (a peer skipped at that size) are in the table but not in the plot.

Usage::

    python -m benchmarks.report [--results DIR] [--out DIR] [--readme README.md]
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
README = Path(__file__).resolve().parent.parent / "README.md"
REQUIRED = ("suite", "case", "library", "seconds")
SIZE_KEYS = ("size", "problem_size", "n_elements")
SUMMARY_NAME = "summary.md"
#: Bookkeeping fields left out of the per-file tables (the headline table and machine line show them).
HIDDEN = ("target_checks", "headline_order", "machine", "slope_reference")
README_BEGIN, README_END = "<!-- bench-table:begin -->", "<!-- bench-table:end -->"
FLOOR_SUITE = "machine floor"


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
    """The required keys first, then every other key in order of first appearance (bookkeeping keys,
    :data:`HIDDEN`, left out)."""
    cols = list(REQUIRED)
    for row in rows:
        for key in row:
            if key not in cols and key not in HIDDEN:
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
        growth = numeric and all(r.get("slope_reference") for r in srows)
        anchor = None
        for lib in libraries:
            pts = {}
            for r in srows:
                if str(r["library"]) == lib:
                    x = sizes[str(r["case"])] if numeric else cases.index(str(r["case"]))
                    pts[x] = min(pts.get(x, math.inf), _seconds(r))  # best time if a case repeats
            xs = sorted(pts)
            label = lib
            if growth:
                slope = loglog_slope(xs, [pts[x] for x in xs])
                label = lib if slope is None else f"{lib} (slope {slope:.2f})"
                anchor = anchor or (xs[-1], pts[xs[-1]], xs[0])
            ax.plot(xs, [pts[x] for x in xs], marker="o", label=label)
        if anchor is not None:
            # Slope 1 through the first library's largest point: linear growth, for the eye to compare.
            x1, y1, x0 = anchor
            ax.plot([x0, x1], [y1 * x0 / x1, y1], linestyle="--", color="grey", label="slope 1 (linear)")
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


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of ``log y`` against ``log x`` (None with fewer than 2 distinct positive x).

    Examples
    --------
    >>> round(loglog_slope([1, 10, 100], [3, 30, 300]), 6)
    1.0
    >>> loglog_slope([5], [1]) is None
    True
    """
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def _seconds_text(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return ""
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"


def _times_text(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return ""
    return f"{value:.2g}x" if value < 10 else f"{value:.0f}x"


def headline_rows(by_file: dict[str, list[dict]]) -> list[dict]:
    """The rows a suite marked with ``headline``, ordered by ``headline_order`` (then file, then position)."""
    found = []
    for name, rows in by_file.items():
        for i, row in enumerate(rows):
            if row.get("headline"):
                found.append((row.get("headline_order", 0), name, i, row))
    return [row for *_, row in sorted(found, key=lambda t: (t[0], t[1], t[2]))]


def headline_table(rows: Sequence[dict]) -> str:
    """The headline table (Markdown): workload, ours, first call, x floor, peers, targets, met.

    Examples
    --------
    >>> print(headline_table([{"headline": "KDE pdf", "seconds": 0.095, "x_floor": 3.06, "peers": "5.8x scipy",
    ...                        "targets": "<= 2x floor: 3.1x no", "met": False}]))
    | workload | ours | first call | × floor | peer ratios | issue targets | met |
    |---|---|---|---|---|---|---|
    | KDE pdf | 95 ms |  | 3.1x | 5.8x scipy | <= 2x floor: 3.1x no | no |
    """
    lines = ["| workload | ours | first call | × floor | peer ratios | issue targets | met |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ours = r.get("headline_value") or _seconds_text(r.get("seconds"))
        met = r.get("met") if r.get("targets") else None  # a row's own (non-issue) targets are not shown here
        cells = [r["headline"], ours, _seconds_text(r.get("first_call_seconds")), _times_text(r.get("x_floor")),
                 r.get("peers", ""), r.get("targets", ""), "" if met is None else ("yes" if met else "no")]
        lines.append("| " + " | ".join(format_value(str(c)) for c in cells) + " |")
    return "\n".join(lines)


def machine_lines(by_file: dict[str, list[dict]]) -> list[str]:
    """What the suites ran on (their ``machine floor`` rows): one line per CPU, its BLAS libraries and versions.

    Suites that loaded different BLAS libraries (numpy's and scipy's OpenBLAS, or only one of them) on the
    same CPU give one line listing each library once.

    Examples
    --------
    >>> row = {"suite": "machine floor", "machine": {"cpu_model": "AMD EPYC", "cores": 2,
    ...        "blas": "openblas 0.3.31 (SkylakeX, 2 threads)", "numpy": "2.4.0"}}
    >>> other = {"suite": "machine floor", "machine": {"cpu_model": "AMD EPYC", "cores": 2,
    ...          "blas": "openblas 0.3.30 (SkylakeX, 2 threads); openblas 0.3.31 (SkylakeX, 2 threads)"}}
    >>> machine_lines({"kde": [row], "cov": [other]})
    ['AMD EPYC, 2 cores, BLAS openblas 0.3.31 (SkylakeX, 2 threads); openblas 0.3.30 (SkylakeX, 2 threads); numpy 2.4.0']
    """
    found: dict[tuple[str, str], tuple[list[str], dict[str, str]]] = {}
    for rows in by_file.values():
        for r in rows:
            m = r.get("machine")
            if r.get("suite") != FLOOR_SUITE or not isinstance(m, dict):
                continue
            blas, versions = found.setdefault((str(m.get("cpu_model", "unknown CPU")), str(m.get("cores", "?"))), ([], {}))
            for library in str(m.get("blas") or "unknown").split("; "):
                if library not in blas:
                    blas.append(library)
            for key in ("numpy", "scipy", "torch"):
                if m.get(key):
                    versions.setdefault(key, str(m[key]))
    machines = []
    for (cpu, cores), (blas, versions) in found.items():
        line = f"{cpu}, {cores} cores, BLAS {'; '.join(blas)}"
        if versions:
            line += "; " + ", ".join(f"{key} {value}" for key, value in versions.items())
        machines.append(line)
    return machines


def rates_table(by_file: dict[str, list[dict]]) -> str | None:
    """The floor rates each suite measured (Markdown), or None when no suite recorded them.

    Examples
    --------
    >>> row = {"suite": "machine floor", "exp_ns": 0.55, "exp32_ns": 0.33, "dgemm_gflops": 117.0,
    ...        "sgemm_gflops": 220.0, "copy_gbps": 31.0, "machine": {"load_average": [0.1, 0.2, 0.3]}}
    >>> print(rates_table({"kde": [row]}))
    | suite | exp float64 / float32, ns (one thread) | dgemm / sgemm, GFLOP/s | copy, GB/s | load average |
    |---|---|---|---|---|
    | kde | 0.55 / 0.33 | 117 / 220 | 31 | 0.1 |
    """
    lines = ["| suite | exp float64 / float32, ns (one thread) | dgemm / sgemm, GFLOP/s | copy, GB/s | load average |",
             "|---|---|---|---|---|"]
    for name, rows in by_file.items():
        for r in rows:
            if r.get("suite") != FLOOR_SUITE:
                continue
            if not all(isinstance(r.get(k), (int, float)) for k in ("exp_ns", "exp32_ns", "dgemm_gflops", "copy_gbps")):
                continue
            load = (r.get("machine") or {}).get("load_average") or [None]
            lines.append(f"| {name} | {r['exp_ns']:.2f} / {r['exp32_ns']:.2f} | {r['dgemm_gflops']:.0f} / "
                         f"{r.get('sgemm_gflops', float('nan')):.0f} | {r['copy_gbps']:.0f} | "
                         f"{'' if load[0] is None else format(load[0], 'g')} |")
    return "\n".join(lines) if len(lines) > 2 else None


def readme_block(by_file: dict[str, list[dict]], stamp: str) -> str | None:
    """The README's benchmark section (between the markers), or None when there are no headline rows."""
    rows = headline_rows(by_file)
    if not rows:
        return None
    machines = machine_lines(by_file)
    lines = [
        f"Latest `make bench` ({stamp}), each workload side by side with its peers in one process, every timing",
        "the best of N after a warm-up (plus the first call in a fresh process where users feel it; the PaDiM-550",
        "streamed fits, tens of seconds and gigabytes each, are one run in a fresh process), next to the",
        "machine's floor measured in the same run (exponentials at the one-thread `exp` rate spread over the cores,",
        "matrix products at the measured dgemm/sgemm rate, fits' bytes at the memory bandwidth:",
        "[`benchmarks/_floor.py`](benchmarks/_floor.py)). Full tables in",
        "[`benchmarks/results/summary.md`](benchmarks/results/summary.md).",
        "",
        "Ran on: " + ("; ".join(machines) if machines else "(no machine recorded)") + ".",
        "",
        headline_table(rows),
        "",
    ]
    rates = rates_table(by_file)
    if rates:
        lines += ["The floor rates each suite measured (a load average near the core count means a busy machine):",
                  "", rates, ""]
    if "growth" in by_file:
        lines += ["![Cost growth: time against n·m (KDE) and P·C³ (fit), log-log, slope-1 reference]"
                  "(benchmarks/results/growth.png)", ""]
    if "kde" in by_file:
        lines += ["![GaussianKDE against scipy and scikit-learn: time against problem size]"
                  "(benchmarks/results/kde.png)", ""]
    return "\n".join(lines)


def update_readme(readme: Path, block: str) -> bool:
    """Replace the text between the README's markers with ``block``; False (README untouched) without them."""
    text = Path(readme).read_text(encoding="utf-8")
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        return False
    new = text[: begin + len(README_BEGIN)] + "\n" + block.rstrip("\n") + "\n" + text[end:]
    if new != text:
        Path(readme).write_text(new, encoding="utf-8")
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


def build_report(results_dir: Path = RESULTS_DIR, out_dir: Path | None = None, *, plots: bool = True,
                 readme: Path | None = None) -> list[Path]:
    """Write ``summary.md`` and the PNG plots for the results in ``results_dir``; return the paths.

    With ``readme``, also rewrite that README's benchmark section (between the markers) from the headline
    rows; it is then among the returned paths when it was rewritten.
    """
    results_dir = Path(results_dir)
    out_dir = results_dir if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_file, problems = load_results(results_dir)
    written: list[Path] = []
    # When the results were written (the newest file), not when this report is: it may be rewritten later.
    times = [path.stat().st_mtime for path in results_dir.glob("*.json")]
    when = _dt.datetime.fromtimestamp(max(times), _dt.timezone.utc) if times else _dt.datetime.now(_dt.timezone.utc)
    stamp = when.strftime("%Y-%m-%d %H:%M UTC")
    md = ["# Benchmark summary", "", f"Generated {stamp} on {_environment()}.", ""]
    if not by_file:
        md += ["No benchmark results found.", ""]
    headlines = headline_rows(by_file)
    if headlines:
        md += ["## Headline figures (issue 12)", ""]
        machines = machine_lines(by_file)
        if machines:
            md += ["Ran on: " + "; ".join(machines) + ".", ""]
        md += [headline_table(headlines), ""]
        rates = rates_table(by_file)
        if rates:
            md += ["Floor rates measured by each suite:", "", rates, ""]
    if readme is not None:
        block = readme_block(by_file, stamp)
        if block is None:
            problems.append(f"{Path(readme).name} left alone: no headline rows in the results")
        elif not update_readme(Path(readme), block):
            problems.append(f"{Path(readme).name} left alone: no {README_BEGIN} ... {README_END} markers")
        else:
            written.append(Path(readme))
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
    parser.add_argument("--readme", type=Path, default=None,
                        help="also rewrite this README's benchmark section (between the bench-table markers)")
    args = parser.parse_args(argv)
    for path in build_report(args.results, args.out, readme=args.readme):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
