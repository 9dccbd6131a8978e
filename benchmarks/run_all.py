"""Run every benchmark suite, then write the summary table and plots (what ``make bench`` runs).

Every module ``benchmarks/bench_*.py`` is a suite: it exposes ``main(quick: bool = False)``, prints
its own side-by-side table and writes ``benchmarks/results/<name>.json``. Each suite runs in its own
Python process, so that one suite's threads, caches and traced memory cannot disturb the next, and a
crash or a timeout is reported without stopping the others. :mod:`benchmarks.report` then writes
``benchmarks/results/summary.md`` (headline table first) and one PNG per suite, and after a full run of
every suite, all of them successful, rewrites the README's benchmark table (between its ``bench-table``
markers) from the results.

Usage::

    python -m benchmarks.run_all [--quick] [--only NAME ...] [--timeout SECONDS] [--no-report] [--no-readme]

The exit status is 1 when any suite failed (the report is still written for the others).

``--quick`` is a smoke run: the suites write their small-size results where they always do, so the
full results already in ``benchmarks/results`` are saved first and put back afterwards; the quick
results, their summary and plots go to ``benchmarks/results/quick/``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


@dataclass
class SuiteRun:
    """Outcome of one suite: its name, whether it succeeded, how long it took and why it failed."""

    name: str
    ok: bool
    seconds: float
    error: str = ""


def discover(bench_dir: Path = BENCH_DIR) -> list[str]:
    """Module names (``bench_cov``, ...) of the suites present, sorted."""
    return sorted(p.stem for p in bench_dir.glob("bench_*.py"))


def run_suite(name: str, *, quick: bool, timeout: float | None, package: str = "benchmarks") -> SuiteRun:
    """Run ``<package>.<name>.main(quick=...)`` in a fresh interpreter; never raises."""
    code = (
        "import importlib, sys\n"
        f"mod = importlib.import_module({package + '.' + name!r})\n"
        "if not hasattr(mod, 'main'):\n"
        f"    sys.exit('benchmarks suite {name} has no main(quick=False) function')\n"
        f"mod.main(quick={bool(quick)!r})\n"
    )
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return SuiteRun(name, False, time.perf_counter() - start, f"timed out after {timeout:g} s")
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return SuiteRun(name, False, seconds, f"exited with status {proc.returncode} (see its output above)")
    return SuiteRun(name, True, seconds)


def _snapshot(results_dir: Path) -> dict[Path, bytes]:
    """The bytes of every results file now present, to be restored after a quick run."""
    return {p: p.read_bytes() for p in results_dir.glob("*.json")}


def _move_quick_results(results_dir: Path, saved: dict[Path, bytes], quick_dir: Path) -> None:
    """Move the files a quick run wrote into ``quick_dir`` and put the saved full results back."""
    quick_dir.mkdir(parents=True, exist_ok=True)
    for path in results_dir.glob("*.json"):
        if saved.get(path) != path.read_bytes():
            (quick_dir / path.name).write_bytes(path.read_bytes())
            if path in saved:
                path.write_bytes(saved[path])
            else:
                path.unlink()


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test of every suite")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these suites (e.g. bench_kde or kde)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per suite (default 1800)")
    parser.add_argument("--no-report", action="store_true", help="do not write summary.md and the plots")
    parser.add_argument("--no-readme", action="store_true",
                        help="do not rewrite the README's benchmark table (it is rewritten only after a full run "
                             "of every suite)")
    args = parser.parse_args(argv)

    names = discover()
    if args.only:
        wanted = {n if n.startswith("bench_") else f"bench_{n}" for n in args.only}
        unknown = sorted(wanted - set(names))
        if unknown:
            parser.error(f"unknown suite(s) {', '.join(unknown)}; present: {', '.join(names) or 'none'}")
        names = [n for n in names if n in wanted]
    if not names:
        print(f"no benchmark suite (bench_*.py) found in {BENCH_DIR}", file=sys.stderr)
        return 1

    runs = []
    saved = _snapshot(RESULTS_DIR) if args.quick else None
    try:
        for name in names:
            print(f"\n=== {name}{' (quick)' if args.quick else ''} ===", flush=True)
            runs.append(run_suite(name, quick=args.quick, timeout=args.timeout))
    finally:
        if saved is not None:
            _move_quick_results(RESULTS_DIR, saved, RESULTS_DIR / "quick")

    print("\n=== suites ===")
    for r in runs:
        print(f"{r.name:24s} {'ok' if r.ok else 'FAILED':7s} {r.seconds:8.1f} s  {r.error}")

    if not args.no_report:
        from benchmarks import report

        # The README shows one full, successful run of every suite: not a quick run, nor a partial one (--only).
        readme = None if args.quick or args.only or args.no_readme or not all(r.ok for r in runs) else report.README
        if readme is None and not (args.quick or args.only or args.no_readme):
            print("README's benchmark table left alone: a suite failed")
        written = report.build_report(RESULTS_DIR / "quick" if args.quick else RESULTS_DIR, readme=readme)
        for path in written:
            print(f"wrote {path}")
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
