"""Bandwidth selection by leave-one-out likelihood: ``anomstats.bandwidth`` vs statsmodels' ``cv_ml``.

Side by side in one process, float64, d = 4, at n = 500, 1000, 1500, 2000, 5000 (a fixed-seed mixture of
three Gaussians whose dimensions have scales from 0.3 to 10, so that the per-dimension bandwidths differ):

- ``anomstats cv_ml_bandwidths``: :func:`anomstats.bandwidth.cv_ml_bandwidths`, per-dimension kernel
  standard deviations maximising the leave-one-out (LOO) log-likelihood, ``H = diag(h**2)``;
- ``statsmodels KDEMultivariate cv_ml``: ``statsmodels.nonparametric.kernel_density.KDEMultivariate(data,
  var_type='cccc', bw='cv_ml')``, the same objective (its ``.bw`` are the same standard deviations),
  maximised by Nelder–Mead. It is slow (about 18 s at n = 1500 on the project's machine), so it gets one
  untimed warm-up at the smallest n and then one timed run per n. ``--quick`` skips it above n = 2000; the
  full run includes n = 5000 only when its time estimated from the largest n measured (scaled by n²) is
  under :data:`SM_BUDGET_SECONDS`, and otherwise records the row as skipped with the estimate;
- ``anomstats cv_ml_factor``: :func:`anomstats.bandwidth.cv_ml_factor`, the factor of scipy's model
  ``H = factor**2 * cov(data)`` (no peer), and ``anomstats GaussianKDE(bw_method='cv_ml')``, the
  estimator's construction with that rule;
- ``anomstats loo_log_likelihood``: one evaluation of the objective at the selected bandwidths, next to
  the machine's floor for it (below).

Per row: best-of-``repeats`` wall time after a warm-up (ours), the speed-up over statsmodels, the relative
difference of the bandwidths (``max |ours / statsmodels - 1|``) and both LOO log-likelihoods, both evaluated
by :func:`anomstats.bandwidth.loo_log_likelihood` (ours must not be lower: ``loo_not_worse``). For the
factor: its LOO log-likelihood against Scott's, and the largest gain found by moving the factor by ±0.1 %
(``perturbed_gain``; at a maximum it is not positive, up to rounding).

The floor. :func:`benchmarks._common.machine_floor` measures, in the same run, NumPy's ``exp`` (ns per
element, one thread, in-cache blocks), BLAS ``dgemm`` (GFLOP/s) and the memory copy bandwidth. One LOO
evaluation needs at least ``n**2`` exponentials, spread over the cores, and ``2 n**2 d`` flops of
distance products at the ``dgemm`` rate (the ``floor`` rows). One measured LOO evaluation is reported as a
multiple of it (``x_floor``). The optimisers return only the optimum; the suite counts their evaluations
(value and gradient) in a separate untimed run (``evaluations``, by wrapping the private objective of
:mod:`anomstats.bandwidth`; empty if that cannot be done) and reports the time per evaluation as a multiple
of the floor (``per_evaluation_x_floor``; a gradient evaluation also accumulates the coordinate moments, so
it costs more than a value). Also given: the total time as a multiple of one evaluation's floor
(``total_over_eval_floor``) and of one measured value-only evaluation (``loo_evaluations_equivalent``).

Writes ``benchmarks/results/bandwidth.json``; ``benchmarks.report`` plots seconds against n (log-log),
one panel per suite.

Usage::

    python -m benchmarks.bench_bandwidth [--quick]
"""

from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from anomstats import GaussianKDE, bandwidth
from anomstats._parallel import resolve_workers
from benchmarks import _common, _floor
from benchmarks._common import headline, print_header, write_rows

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bandwidth.json"

SUITE_BANDWIDTHS = "cv_ml per-dimension bandwidths, d=4"
SUITE_FACTOR = "cv_ml factor (scipy's model), d=4"
SUITE_EVAL = "one LOO evaluation, d=4"
SUITE_MACHINE = "machine floor"

OURS_BW = "anomstats cv_ml_bandwidths"
PEER_BW = "statsmodels KDEMultivariate cv_ml"
OURS_FACTOR = "anomstats cv_ml_factor"
OURS_KDE = "anomstats GaussianKDE(bw_method='cv_ml')"
OURS_EVAL = "anomstats loo_log_likelihood"
FLOOR_EVAL = "floor: n² exp / cores + 2n²d flops at dgemm rate"

D = 4
FULL_NS: tuple[int, ...] = (500, 1000, 1500, 2000, 5000)
QUICK_NS: tuple[int, ...] = (200, 400, 600)
#: In quick mode statsmodels is not run above this n (its time grows as n²; 18 s at n = 1500).
SM_QUICK_MAX_N = 2000
#: In the full run a statsmodels case above SM_QUICK_MAX_N is run only if its estimated time is below this.
SM_BUDGET_SECONDS = 600.0
#: Sizes of the machine-floor measurements (quick mode: smaller, the same quantities).
FULL_FLOOR: dict[str, int] = dict(_floor.FULL_SIZES)
QUICK_FLOOR: dict[str, int] = {"exp_repeats": 3, "gemm_n": 600, "copy_mib": 32}
#: Our LOO log-likelihood may fall below statsmodels' by this much (nats, mean over points) and still
#: count as "not worse": both are evaluated by the same function, whose result is a mean of ~n logs
#: each rounded to a few eps, so two equally good optima can differ by ~1e-14; 1e-9 leaves a wide margin
#: and still catches an optimum that is worse in any meaningful way.
LOO_TOLERANCE = 1e-9
#: Relative move of the factor for the local-maximum check.
PERTURBATION = 1e-3


def make_data(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    """A fixed-seed mixture of three Gaussians, shape ``(d, n)`` (scipy's layout).

    The dimensions have scales 1, 3, 0.3 and 10 (cycled for other ``d``), and the components differ
    in location and spread, so that the best per-dimension bandwidths are not one factor times the
    standard deviations and the LOO optimum is not the normal reference.

    Examples
    --------
    >>> x = make_data(50)
    >>> x.shape, bool(np.isfinite(x).all())
    ((4, 50), True)
    """
    rng = np.random.default_rng([seed, n, d])
    scales = np.resize(np.array([1.0, 3.0, 0.3, 10.0]), d)[:, None]
    means = np.zeros((d, 3))
    means[: min(2, d), 1] = 3.0  # the second component is shifted along the first two dimensions
    means[min(2, d - 1) :, 2] = -4.0  # the third along the last ones
    spreads = np.array([1.0, 0.5, 2.0])
    component = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    z = rng.standard_normal((d, n)) * spreads[component] + means[:, component]
    return z * scales


def eval_floor_seconds(n: int, d: int, floor: dict[str, Any]) -> tuple[float, float]:
    """The machine's floor for one LOO evaluation: (exponential part, distance-product part), seconds.

    ``n**2`` exponentials at the measured one-thread rate, divided over the cores, and ``2 n**2 d``
    flops (the cross products of the squared distances) at the measured ``dgemm`` rate: the KDE floor of
    :func:`benchmarks._floor.loo_floor`, where all the floors are defined.

    Examples
    --------
    >>> eval_floor_seconds(1000, 4, {"exp_ns": 1.0, "cores": 2, "dgemm_gflops": 8.0})
    (0.0005, 0.001)
    """
    floor_ = _floor.loo_floor(n, d, floor)
    return floor_["exp_seconds"], floor_["gemm_seconds"]


def best_time(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """Best wall and CPU time of at least ``repeats`` runs after a warm-up; fast ones get more runs."""
    return _common.best_time(fn, repeats, warm_up=True, fill_seconds=1.0, max_runs=15)


def statsmodels_cv_ml() -> Callable[[np.ndarray], np.ndarray] | None:
    """A function of ``(d, n)`` data returning statsmodels' ``cv_ml`` bandwidths, or None if not installed."""
    try:
        from statsmodels.nonparametric.kernel_density import KDEMultivariate
    except ImportError:  # pragma: no cover - optional peer (the `bench` and `test` extras install it)
        return None

    def fit(data: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            # statsmodels' pandas helpers warn about a future default of their own; not ours to act on.
            warnings.simplefilter("ignore", FutureWarning)
            model = KDEMultivariate(np.ascontiguousarray(data.T), var_type="c" * data.shape[0], bw="cv_ml")
        return np.asarray(model.bw, dtype=np.float64)

    return fit


def count_evaluations(fn: Callable[[], Any]) -> int | None:
    """How many times ``fn()`` evaluates the LOO objective; None if that cannot be observed.

    The public functions return only the optimum, so the count is read by wrapping the private objective
    class of :mod:`anomstats.bandwidth` for one untimed run. If that class is renamed, the count is
    reported as unavailable (and the suite falls back to time / one-evaluation floor) rather than failing.
    """
    objective = getattr(bandwidth, "_LeaveOneOut", None)
    call = getattr(objective, "__call__", None)
    if objective is None or call is None:
        return None
    count = 0

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal count
        count += 1
        return call(self, *args, **kwargs)

    objective.__call__ = counting
    try:
        fn()
    finally:
        objective.__call__ = call
    return count or None


def loo_at(data: np.ndarray, h: np.ndarray) -> float:
    """LOO log-likelihood with the kernel covariance ``diag(h**2)``."""
    return bandwidth.loo_log_likelihood(data, np.diag(np.asarray(h, dtype=np.float64) ** 2))


def run_n(
    n: int,
    *,
    repeats: int,
    floor: dict[str, Any],
    sm_fit: Callable[[np.ndarray], np.ndarray] | None,
    sm_plan: str,
    sm_estimate: float | None,
) -> tuple[list[dict[str, Any]], float | None]:
    """All rows for one n; returns them and statsmodels' measured seconds (None when not run).

    ``sm_plan`` is ``"run"`` or the reason statsmodels is skipped at this n.
    """
    data = make_data(n)
    case = f"n={n} d={D}"
    workers = resolve_workers(None)
    base = {"case": case, "size": n, "size_label": "n (data points)"}
    exp_part, gemm_part = eval_floor_seconds(n, D, floor)
    floor_s = exp_part + gemm_part
    rows: list[dict[str, Any]] = []

    # --- per-dimension bandwidths, ours and statsmodels' ---------------------------------------------
    t_bw, c_bw, h_ours = best_time(lambda: bandwidth.cv_ml_bandwidths(data), repeats)
    h_ours = np.asarray(h_ours, dtype=np.float64)
    loo_ours = loo_at(data, h_ours)
    t_eval, c_eval, _ = best_time(lambda: loo_at(data, h_ours), repeats)

    t_sm: float | None = None
    sm_row: dict[str, Any] = {"suite": SUITE_BANDWIDTHS, **base, "library": PEER_BW, "seconds": None}
    ours_row: dict[str, Any] = {"suite": SUITE_BANDWIDTHS, **base, "library": OURS_BW, "seconds": t_bw,
                                "cpu_seconds": c_bw}
    if sm_plan == "run" and sm_fit is not None:
        t_sm, c_sm, h_sm = _common.best_time(lambda: sm_fit(data), 1, warm_up=False)
        loo_sm = loo_at(data, h_sm)
        sm_row.update(seconds=t_sm, cpu_seconds=c_sm, ratio=1.0, loo=loo_sm, bandwidths=[float(v) for v in h_sm])
        ours_row.update(
            ratio=t_sm / t_bw,
            cpu_ratio=c_sm / c_bw,
            max_rel_diff=float(np.max(np.abs(h_ours / h_sm - 1.0))),
            loo=loo_ours,
            loo_statsmodels=loo_sm,
            loo_gain=loo_ours - loo_sm,
            loo_not_worse=bool(loo_ours >= loo_sm - LOO_TOLERANCE),
        )
    else:
        reason = "statsmodels is not installed" if sm_fit is None else sm_plan
        sm_row.update(skipped=reason)
        if sm_estimate is not None:
            sm_row.update(estimated_seconds=sm_estimate)
            ours_row.update(ratio_vs_estimate=sm_estimate / t_bw)
        ours_row.update(loo=loo_ours)
    evals = count_evaluations(lambda: bandwidth.cv_ml_bandwidths(data))
    ours_row.update(
        bandwidths=[float(v) for v in h_ours],
        evaluations=evals,
        per_evaluation_x_floor=None if evals is None else t_bw / evals / floor_s,
        loo_evaluations_equivalent=t_bw / t_eval,
        total_over_eval_floor=t_bw / floor_s,
        workers=workers,
    )
    rows += [ours_row, sm_row]

    # --- scipy's model: one factor --------------------------------------------------------------------
    t_f, c_f, factor = best_time(lambda: bandwidth.cv_ml_factor(data), repeats)
    factor = float(factor)
    cov = np.cov(data)
    scott = bandwidth.scotts_factor(n, D)
    loo_f = bandwidth.loo_log_likelihood(data, factor**2 * cov)
    loo_scott = bandwidth.loo_log_likelihood(data, scott**2 * cov)
    f_evals = count_evaluations(lambda: bandwidth.cv_ml_factor(data))
    perturbed = max(bandwidth.loo_log_likelihood(data, (factor * (1 + s * PERTURBATION)) ** 2 * cov) for s in (-1, 1))
    rows.append({
        "suite": SUITE_FACTOR, **base, "library": OURS_FACTOR, "seconds": t_f, "cpu_seconds": c_f,
        "factor": factor, "scott_factor": scott, "loo": loo_f, "loo_scott": loo_scott,
        "loo_gain_over_scott": loo_f - loo_scott, "perturbed_gain": perturbed - loo_f,
        "local_max": bool(perturbed - loo_f <= LOO_TOLERANCE),
        "evaluations": f_evals, "per_evaluation_x_floor": None if f_evals is None else t_f / f_evals / floor_s,
        "total_over_eval_floor": t_f / floor_s, "workers": workers,
    })
    t_kde, c_kde, kde = best_time(lambda: GaussianKDE(data, bw_method="cv_ml"), repeats)
    rows.append({
        "suite": SUITE_FACTOR, **base, "library": OURS_KDE, "seconds": t_kde, "cpu_seconds": c_kde,
        "factor": float(kde.factor), "factor_rel_diff": abs(float(kde.factor) / factor - 1.0),
        "total_over_eval_floor": t_kde / floor_s, "workers": workers,
    })

    # --- one evaluation against the floor -------------------------------------------------------------
    rows.append({
        "suite": SUITE_EVAL, **base, "library": OURS_EVAL, "seconds": t_eval, "cpu_seconds": c_eval,
        "x_floor": t_eval / floor_s, "workers": workers,
    })
    rows.append({
        "suite": SUITE_EVAL, **base, "library": FLOOR_EVAL, "seconds": floor_s,
        "exp_seconds": exp_part, "gemm_seconds": gemm_part,
    })
    return rows, t_sm


def statsmodels_plan(n: int, quick: bool, last: tuple[int, float] | None) -> tuple[str, float | None]:
    """Whether statsmodels runs at ``n``: ``("run", estimate)`` or ``(reason it is skipped, estimate)``.

    ``last`` is the largest n measured so far and its seconds; the estimate scales that time by n².

    Examples
    --------
    >>> statsmodels_plan(5000, False, (2000, 32.0))
    ('run', 200.0)
    >>> statsmodels_plan(5000, False, (2000, 100.0))[0]
    'estimated 625 s > 600 s budget'
    >>> statsmodels_plan(5000, True, (2000, 32.0))[0]
    'quick mode (n > 2000)'
    """
    estimate = None if last is None else last[1] * (n / last[0]) ** 2
    if n <= SM_QUICK_MAX_N:
        return "run", estimate
    if quick:
        return f"quick mode (n > {SM_QUICK_MAX_N})", estimate
    if estimate is not None and estimate > SM_BUDGET_SECONDS:
        return f"estimated {estimate:.0f} s > {SM_BUDGET_SECONDS:.0f} s budget", estimate
    return "run", estimate


def _fmt(v: Any, spec: str, width: int) -> str:
    return f"{'':>{width}}" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def print_tables(rows: list[dict[str, Any]], floor: dict[str, Any]) -> None:
    """Print the side-by-side tables: bandwidths against statsmodels, then the factor and the floor."""
    print(f"machine floor: exp {floor['exp_ns']:.2f} ns/element (one thread), dgemm {floor['dgemm_gflops']:.1f} "
          f"GFLOP/s, copy {floor['copy_gbps']:.1f} GB/s (read + write), {floor['cores']} core(s)")
    by = {(r["suite"], r["library"], r["size"]): r for r in rows if "size" in r}
    ns = sorted({r["size"] for r in rows if "size" in r})
    print()
    print_header(f"{'n':>6} {'ours s':>8} {'statsm. s':>9} {'x sm':>6} {'bw rel diff':>11} {'LOO ours':>11} "
                 f"{'LOO sm':>11} {'ours-sm':>9} {'evals':>5} {'eval x floor':>12}")
    for n in ns:
        o, s = by[(SUITE_BANDWIDTHS, OURS_BW, n)], by[(SUITE_BANDWIDTHS, PEER_BW, n)]
        if s["seconds"] is not None:
            sm_s = f"{s['seconds']:9.2f}"
        else:  # skipped: its estimated time (scaled by n² from the largest n measured), if any
            sm_s = f"{'~%.0f' % s['estimated_seconds'] if 'estimated_seconds' in s else 'skipped':>9}"
        ratio = o.get("ratio", o.get("ratio_vs_estimate"))
        print(f"{n:6d} {o['seconds']:8.3f} {sm_s} {_fmt(ratio, '6.1f', 6)} {_fmt(o.get('max_rel_diff'), '11.1e', 11)} "
              f"{o['loo']:11.6f} {_fmt(s.get('loo'), '11.6f', 11)} {_fmt(o.get('loo_gain'), '9.1e', 9)} "
              f"{_fmt(o['evaluations'], '5d', 5)} {_fmt(o['per_evaluation_x_floor'], '12.1f', 12)}")
    print("(x sm: speed-up, '~' = statsmodels' estimated time, not run; evals: objective evaluations (value and "
          "gradient); eval x floor: our time per evaluation / one evaluation's floor)")
    print()
    print_header(f"{'n':>6} {'factor s':>8} {'factor':>8} {'scott':>8} {'LOO gain':>9} {'evals':>5} {'KDE s':>8} "
                 f"{'1 LOO s':>9} {'floor s':>9} {'x floor':>7}")
    for n in ns:
        f, k = by[(SUITE_FACTOR, OURS_FACTOR, n)], by[(SUITE_FACTOR, OURS_KDE, n)]
        e, fl = by[(SUITE_EVAL, OURS_EVAL, n)], by[(SUITE_EVAL, FLOOR_EVAL, n)]
        print(f"{n:6d} {f['seconds']:8.3f} {f['factor']:8.4f} {f['scott_factor']:8.4f} {f['loo_gain_over_scott']:9.2e} "
              f"{_fmt(f['evaluations'], '5d', 5)} {k['seconds']:8.3f} {e['seconds']:9.2e} {fl['seconds']:9.2e} {e['x_floor']:7.1f}")
    print("(LOO gain: LOO log-likelihood at the cv_ml factor minus at Scott's; x floor: one evaluation / its floor)")


def main(quick: bool = False) -> dict[str, Any]:
    """Run the suite, print the tables, write ``benchmarks/results/bandwidth.json``; return a summary."""
    ns = QUICK_NS if quick else FULL_NS
    repeats = 2 if quick else 3
    floor = _floor.measure(sizes=QUICK_FLOOR if quick else FULL_FLOOR)
    rows: list[dict[str, Any]] = []
    sm_fit = statsmodels_cv_ml()
    if sm_fit is not None:
        # One untimed run: statsmodels' imports and first-call set-up are not part of its per-n time.
        sm_fit(make_data(min(ns[0], 500), seed=1))
    last: tuple[int, float] | None = None
    for n in ns:
        plan, estimate = statsmodels_plan(n, quick, last)
        n_rows, t_sm = run_n(n, repeats=repeats, floor=floor, sm_fit=sm_fit, sm_plan=plan, sm_estimate=estimate)
        rows += n_rows
        if t_sm is not None:
            last = (n, t_sm)
    # The headline row: one evaluation at the largest n against its floor, next to the selection's ratio.
    compared = [r for r in rows if r["library"] == OURS_BW and r.get("ratio")]
    if compared:
        best = compared[-1]
        evaluation = next(r for r in rows if r["library"] == OURS_EVAL and r["size"] == best["size"])
        evaluation.update(headline(f"bandwidth cv_ml: one LOO evaluation, {best['case']}",
                                   peers=f"cv_ml_bandwidths {best['ratio']:.0f}x statsmodels cv_ml", order=600))
    # Last, so that the summary table's columns start with the comparison's fields, not the floor's.
    rows.append(_floor.floor_row(floor))
    print(f"Bandwidth selection (LOO likelihood), float64, d={D} (ours best of {repeats}; statsmodels one run)")
    print_tables(rows, floor)
    write_rows(RESULTS_PATH, rows)
    compared = [r for r in rows if r["library"] == OURS_BW and "max_rel_diff" in r]
    factors = [r for r in rows if r["library"] == OURS_FACTOR]
    return {
        "suite": "bandwidth",
        "rows": rows,
        "all_targets_met": all(r["loo_not_worse"] for r in compared) and all(r["local_max"] for r in factors),
        "max_rel_diff": max((r["max_rel_diff"] for r in compared), default=float("nan")),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds (smoke test)")
    main(quick=parser.parse_args().quick)
