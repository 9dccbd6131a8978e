"""Cost growth: time against the work's size, to show that it grows linearly (issue 12).

- **KDE** ``anomstats.GaussianKDE`` ``pdf`` and ``logpdf``, float64, d = 8, at several (n, m) from 10⁶ to
  2.6·10⁸ pairs, square and elongated (n ≫ m and n ≪ m): time against ``n·m`` (the pairs: each needs one
  exponential and ``2d`` flops).
- **MVG fit**: the default ``anomstats.MultiVariateGaussian().fit`` of float32 embeddings with ``B = 2·C``
  observations (so that the ``syrk``'s ``P·B·C²`` and the factorisations' ``P·C³`` grow alike) at several
  (C, P): time against ``P·C³``.

Each point is the best of N after a warm-up. Next to every point the suite records its floor (measured in
the same run, :mod:`benchmarks._floor`; rows ``library = "floor"``) and ``x_floor``. The least-squares slope
of log time against log size is printed and stored (``fitted_slope`` over all points, ``fitted_slope_upper``
over the larger half, where fixed costs no longer dominate): 1 means linear growth. The report
(:mod:`benchmarks.report`) draws ``growth.png`` log-log with a slope-1 reference line and the fitted slopes
in the legend (rows carry ``slope_reference``).

Writes ``benchmarks/results/growth.json``.

Usage::

    python -m benchmarks.bench_growth [--quick]
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from anomstats import GaussianKDE, MultiVariateGaussian
from benchmarks import _floor
from benchmarks._common import best_time, make_embedding, print_header, write_rows
from benchmarks.report import loglog_slope

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "growth.json"
OURS, FLOOR = "anomstats", "floor"
KDE_D = 8
FULL = {
    "kde": [(1_000, 1_000), (2_000, 2_000), (4_000, 4_000), (8_000, 8_000), (16_000, 16_000),
            (64_000, 1_000), (1_000, 64_000)],
    "fit": [(32, 28, 28), (64, 28, 28), (100, 28, 28), (100, 56, 56), (150, 28, 28), (200, 16, 16)],
    "repeats": 3,
}
QUICK = {"kde": [(200, 200), (400, 400), (800, 800)], "fit": [(6, 4, 4), (8, 6, 6), (12, 6, 6)], "repeats": 1}


def _slopes(rows: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    pts = sorted((r["size"], r["seconds"]) for r in rows)
    upper = pts[len(pts) // 2:] if len(pts) >= 4 else pts  # the larger half, where fixed costs matter least
    return loglog_slope(*zip(*pts)), loglog_slope(*zip(*upper))


def kde_rows(cases: list[tuple[int, int]], repeats: int, rates: dict[str, Any]) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    rows = []
    for n, m in cases:
        data = rng.standard_normal((KDE_D, n))
        queries = rng.standard_normal((KDE_D, m)) * 1.2
        kde = GaussianKDE(data)
        floor = _floor.kde_floor(n, m, KDE_D, "float64", rates)
        for method in ("pdf", "logpdf"):
            wall, _, _ = best_time(lambda: getattr(kde, method)(queries), repeats, fill_seconds=0.5, max_runs=10)
            base = {"suite": f"KDE {method}, d={KDE_D}, float64", "case": f"n={n} m={m} d={KDE_D}", "size": n * m,
                    "size_label": "n·m (data points × queries)", "slope_reference": True}
            rows.append({**base, "library": OURS, "seconds": wall, "x_floor": _floor.x_floor(wall, floor)})
            rows.append({**base, "library": FLOOR, "seconds": floor["seconds"], "formula": floor["formula"]})
        print(f"  KDE n={n} m={m}: pdf {rows[-4]['seconds']:.4f} s, logpdf {rows[-2]['seconds']:.4f} s", flush=True)
    return rows


def fit_rows(cases: list[tuple[int, int, int]], repeats: int, rates: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for c, h, w in cases:
        b, p = 2 * c, h * w
        x = make_embedding((b, c, h, w), offset=3.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            wall, _, model = best_time(lambda: MultiVariateGaussian().fit(x), repeats, fill_seconds=0.5, max_runs=10)
        floor = _floor.fit_floor(b, c, p, "float32", rates, out_dtype=model.precision.dtype)
        del model
        base = {"suite": "MVG fit, float32, B = 2C", "case": f"B={b} C={c} P={p} ({h}x{w})", "size": p * c**3,
                "size_label": "P·C³", "slope_reference": True}
        rows.append({**base, "library": OURS, "seconds": wall, "x_floor": _floor.x_floor(wall, floor)})
        rows.append({**base, "library": FLOOR, "seconds": floor["seconds"], "formula": floor["formula"]})
        print(f"  fit C={c} P={p}: {wall:.4f} s", flush=True)
    return rows


def main(quick: bool = False) -> dict[str, Any]:
    """Run the suite, print the slopes, write ``benchmarks/results/growth.json``; return a summary."""
    sizes = QUICK if quick else FULL
    rates = _floor.measure(quick)
    print(_floor.describe(rates), flush=True)
    rows = kde_rows(sizes["kde"], sizes["repeats"], rates) + fit_rows(sizes["fit"], sizes["repeats"], rates)
    summary_rows = []
    print_header(f"{'series':34} {'points':>6} {'slope (all)':>11} {'slope (upper half)':>18} {'x floor range':>15}")
    for suite in dict.fromkeys(r["suite"] for r in rows):
        ours = [r for r in rows if r["suite"] == suite and r["library"] == OURS]
        slope, upper = _slopes(ours)
        for r in rows:
            if r["suite"] == suite:
                r["fitted_slope"], r["fitted_slope_upper"] = slope, upper
        xf = [r["x_floor"] for r in ours]
        print(f"{suite:34} {len(ours):6d} {slope:11.3f} {upper:18.3f} {min(xf):7.2f}-{max(xf):<7.2f}")
        summary_rows.append({"suite": "cost growth: fitted slopes", "case": suite, "library": OURS, "seconds": None,
                             "fitted_slope": slope, "fitted_slope_upper": upper, "points": len(ours),
                             "x_floor_min": min(xf), "x_floor_max": max(xf)})
    print("(slope of log time against log size; 1 = linear growth)")
    rows += summary_rows
    rows.append(_floor.floor_row(rates))
    write_rows(RESULTS_PATH, rows)
    return {"suite": "growth", "rows": rows, "slopes": {r["case"]: r["fitted_slope"] for r in summary_rows}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds (smoke test)")
    main(quick=parser.parse_args().quick)
