"""``anomstats validate``: check the core against NumPy/SciPy and the torch adapter against the core.

A built-in battery of generated datasets (random, offset far from the origin, nearly singular,
weighted, high-dimensional, float32) is run through every public component and compared with its
reference. Each comparison gives one row: what was compared, on which case, the maximum absolute
and relative error, the tolerance, and PASS / FAIL / SKIP. A component that is missing or raises
(for example ``NotImplementedError``) gives a FAIL row with the reason instead of stopping the run.

How errors are measured: ``max_abs_error`` is ``max |actual - expected|``; ``max_rel_error``
depends on the quantity:

* ``"elementwise"`` (densities, log-densities, distances): ``max |a - e| / |e|`` over elements; an
  element whose reference is exactly 0 counts as infinitely wrong unless it is 0 too.
* ``"normwise"`` (covariance and precision matrices, means): ``max |a - e| / max |e|``, because an
  entry near zero, such as an off-diagonal covariance, carries only the rounding of the large ones.

Non-finite values must match exactly (same positions, same infinities); shapes must be equal.
The tolerances are the accuracy contracts of the components (see the numerical notes in the docs).

Examples
--------
>>> rows = run_validation(quick=True, only="cov vs numpy", progress=False)
>>> sorted({r.status for r in rows})
['PASS']
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence, TextIO

import numpy as np
import scipy
import scipy.linalg
import scipy.stats

import anomstats

from . import _optional
from .progress import ProgressBar

__all__ = ["Comparison", "Check", "Row", "compare", "build_battery", "run_validation", "format_table"]


@dataclass
class Comparison:
    """One quantity computed two ways: by the component under test and by its reference."""

    quantity: str
    actual: object
    expected: object
    tolerance: float
    metric: str = "elementwise"


@dataclass
class Check:
    """A named job that computes one or more :class:`Comparison` objects for one case.

    ``run`` may raise; the runner turns that into a FAIL row carrying the reason.
    ``skip_reason`` set means the check is reported as SKIP without running. ``reference`` names
    what the quantities are compared with; it is appended to each row's ``what``.
    """

    what: str
    case: str
    run: Callable[[], list[Comparison]]
    skip_reason: str | None = None
    reference: str = ""


@dataclass
class Row:
    """One line of the validation table (also one JSON object in ``--json`` output)."""

    what: str
    case: str
    max_abs_error: float | None
    max_rel_error: float | None
    tolerance: float | None
    status: str
    reason: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """Return the row as a JSON-serialisable dict (non-finite errors become strings)."""
        out = asdict(self)
        for key in ("max_abs_error", "max_rel_error"):
            v = out[key]
            if v is not None and not np.isfinite(v):
                out[key] = str(v)
        return out


def compare(actual: object, expected: object, tolerance: float, metric: str = "elementwise") -> tuple[float, float, str]:
    """Measure how far ``actual`` is from ``expected``.

    Parameters
    ----------
    actual, expected : array_like
        Results to compare (converted to float64 NumPy arrays; torch tensors are accepted).
    tolerance : float
        Largest relative error that passes.
    metric : {"elementwise", "normwise"}
        How the relative error is normalised (see the module documentation).

    Returns
    -------
    max_abs_error, max_rel_error : float
        ``inf`` when shapes or non-finite values disagree.
    reason : str
        Empty when the comparison passes, otherwise why it failed.

    Examples
    --------
    >>> a, r, why = compare([1.0, 2.0], [1.0, 2.0 + 2e-15], 1e-12)
    >>> print(f"{r:.0e}", why == "")
    1e-15 True
    >>> compare([1.0], [1.0, 2.0], 1e-12)[2]
    'shape (1,) differs from the expected (2,)'
    """
    if metric not in ("elementwise", "normwise"):
        raise ValueError(f"metric must be 'elementwise' or 'normwise', got {metric!r}")
    a = _as_float64(actual)
    e = _as_float64(expected)
    if a.shape != e.shape:
        return float("inf"), float("inf"), f"shape {a.shape} differs from the expected {e.shape}"
    fin_a, fin_e = np.isfinite(a), np.isfinite(e)
    same_nonfinite = (~fin_a & ~fin_e) & ((a == e) | (np.isnan(a) & np.isnan(e)))
    bad = (fin_a != fin_e) | (~fin_a & ~fin_e & ~same_nonfinite)
    if np.any(bad):
        i = np.unravel_index(int(np.argmax(bad)), a.shape) if a.ndim else ()
        return (
            float("inf"),
            float("inf"),
            f"non-finite mismatch at index {tuple(int(k) for k in i)}: got {a[i]!r}, expected {e[i]!r}",
        )
    both = fin_a & fin_e
    if not np.any(both):
        return 0.0, 0.0, ""
    diff = np.abs(a[both] - e[both])
    ref = np.abs(e[both])
    max_abs = float(diff.max())
    if metric == "normwise":
        scale = float(ref.max())
        max_rel = 0.0 if max_abs == 0.0 else (max_abs / scale if scale > 0 else float("inf"))
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(diff == 0.0, 0.0, diff / ref)
        max_rel = float(rel.max())
    reason = "" if max_rel <= tolerance else f"relative error {max_rel:.2e} above tolerance {tolerance:.2g}"
    return max_abs, max_rel, reason


def _as_float64(x: object) -> np.ndarray:
    # torch tensors (possibly on a GPU or requiring grad) are brought to host NumPy without importing torch.
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# The battery of generated datasets
# --------------------------------------------------------------------------------------------------


@dataclass
class _Sizes:
    """Problem sizes; ``quick`` shrinks them so that a full battery runs in a couple of seconds."""

    n: int  # observations for cov / KDE data points
    m: int  # KDE query points
    d_high: int  # dimension of the high-dimensional case
    n_high: int
    batch: int  # observations of the per-patch (batched) cases
    spatial: tuple[int, int] = field(default=(4, 4))


def _sizes(quick: bool) -> _Sizes:
    if quick:
        return _Sizes(n=200, m=50, d_high=40, n_high=200, batch=30, spatial=(3, 3))
    return _Sizes(n=2000, m=500, d_high=100, n_high=1500, batch=120, spatial=(6, 6))


def _data(case: str, d: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Variables in rows, observations in columns, as numpy.cov and scipy's KDE take them."""
    mix = rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)  # correlated, well conditioned
    x = mix @ rng.standard_normal((d, n))
    weights = None
    if case == "offset":
        x = x + 1e3
    elif case == "nearly singular":
        # The last variable repeats the first up to a small perturbation: condition number ~1e8.
        x[-1] = x[0] + 1e-4 * rng.standard_normal(n)
    elif case == "weighted":
        weights = rng.uniform(0.1, 2.0, n)
    elif case == "float32":
        x = x.astype(np.float32)
    return x, weights


def _embedding(case: str, n: int, c: int, spatial: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """An embedding laid out as PaDiM holds it: (N, C, *spatial)."""
    x = rng.standard_normal((n, c, *spatial))
    x = x + 0.5 * x[:, :1]  # correlate the channels
    if case == "offset":
        x = x + 100.0
    elif case == "nearly singular":
        x[:, -1] = x[:, 0] + 1e-6 * rng.standard_normal((n, *spatial))
    elif case == "float32":
        x = x.astype(np.float32)
    return x


def _queries_near(x: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """``m`` query points (d, m) near the data: data points moved by half a standard deviation.

    The move follows the data's covariance (through its Cholesky factor), so the queries are
    typical points of the distribution in every direction; far-away queries are a separate
    matter (the log-density's finiteness), not an accuracy comparison.
    """
    x64 = x.astype(np.float64)
    chol = np.linalg.cholesky(np.cov(x64))
    pts = x64[:, rng.integers(0, x.shape[1], m)] + 0.5 * chol @ rng.standard_normal((x.shape[0], m))
    return pts.astype(x.dtype)


def _exp_condition(log_values: np.ndarray) -> float:
    """How much ``exp`` magnifies relative errors: ``max(1, max |log p|)``.

    A density ``p = exp(L)`` whose exponent carries a relative error ``e`` has a relative error of
    about ``|L| e``; densities are therefore held to the log-density's tolerance times this factor.
    """
    finite = np.abs(np.asarray(log_values, dtype=np.float64))
    finite = finite[np.isfinite(finite)]
    return float(max(1.0, finite.max())) if finite.size else 1.0


# ---- the core against NumPy, SciPy and scikit-learn ------------------------------------------------

_COV_CASES = ("random", "offset", "nearly singular", "weighted", "high-dimensional", "float32")
_BATCHED_CASES = ("random", "offset", "weighted", "high-dimensional", "float32")
_MVG_CASES = ("random", "offset", "nearly singular", "high-dimensional", "float32")


def _cov_check(sizes: _Sizes, seed: int, case: str) -> Callable[[], list[Comparison]]:
    """``cov`` and ``corrcoef`` against numpy's, with and without ``bias``."""

    def run() -> list[Comparison]:
        rng = np.random.default_rng(seed)
        d, n = (sizes.d_high, sizes.n_high) if case == "high-dimensional" else (5, sizes.n)
        x, w = _data(case, d, n, rng)
        weight_kwargs = {}
        if w is not None:
            weight_kwargs = {"aweights": w, "fweights": rng.integers(1, 4, n)}
        out = [Comparison("cov", anomstats.cov(x, **weight_kwargs), np.cov(x, **weight_kwargs), 1e-12, "normwise")]
        out.append(
            Comparison(
                "cov(bias=True)",
                anomstats.cov(x, bias=True, **weight_kwargs),
                np.cov(x, bias=True, **weight_kwargs),
                1e-12,
                "normwise",
            )
        )
        if w is None:
            out.append(Comparison("corrcoef", anomstats.corrcoef(x), np.corrcoef(x), 1e-12, "normwise"))
        return out

    return run


def _batched_check(sizes: _Sizes, seed: int, case: str) -> Callable[[], list[Comparison]]:
    """``batched_cov`` and ``RunningMoments`` against a per-patch loop of ``numpy.cov``."""

    def run() -> list[Comparison]:
        rng = np.random.default_rng(seed)
        c = 32 if case == "high-dimensional" else 6
        n = max(sizes.batch, 2 * c)
        emb = _embedding(case, n, c, sizes.spatial, rng)
        w = rng.uniform(0.1, 2.0, n) if case == "weighted" else None
        patches = emb.reshape(n, c, -1)
        ref = np.stack([np.cov(patches[:, :, p], rowvar=False, aweights=w) for p in range(patches.shape[2])])
        ref = ref.reshape(*sizes.spatial, c, c)
        got = anomstats.batched_cov(emb, obs_axis=0, var_axis=1, aweights=w)
        out = [Comparison("batched_cov", got, ref, 1e-10, "normwise")]
        if w is None:
            # Two streams fed in uneven parts, then merged: must equal the one-shot estimate.
            cut1, cut2 = n // 3, n // 3 + n // 4
            a = anomstats.RunningMoments(obs_axis=0, var_axis=1)
            a.update(emb[:cut1])
            a.update(emb[cut1:cut2])
            b = anomstats.RunningMoments(obs_axis=0, var_axis=1)
            b.update(emb[cut2:])
            a.merge(b)
            mean_ref = np.moveaxis(emb.astype(np.float64).mean(axis=0), 0, -1)
            out.append(Comparison("RunningMoments.mean", a.mean, mean_ref, 1e-10, "normwise"))
            out.append(Comparison("RunningMoments.covariance", a.covariance(), ref, 1e-10, "normwise"))
        return out

    return run


def _kde_tolerance(case: str, dim: int) -> float:
    """The log-density tolerance of the KDE against scipy on ``case`` in ``dim`` dimensions."""
    if case == "float32":
        return 1e-5  # float32 data: agreement to float32 precision is the contract
    if case == "nearly singular":
        return 1e-6  # errors scale with cond(covariance) ~1e8 for both implementations
    return 1e-11 if dim > 16 else 1e-12


def _kde_check(sizes: _Sizes, seed: int, case: str, bw_method: object = None, d: int = 3) -> Callable[[], list[Comparison]]:
    """``GaussianKDE.pdf`` and ``logpdf`` against ``scipy.stats.gaussian_kde``."""

    def run() -> list[Comparison]:
        rng = np.random.default_rng(seed)
        if case == "high-dimensional":
            dim, n, m = sizes.d_high, sizes.n_high, sizes.m // 2
        else:
            dim, n, m = d, sizes.n, sizes.m
        x, w = _data(case, dim, n, rng)
        pts = _queries_near(x, m, rng)
        ours = anomstats.GaussianKDE(x, bw_method=bw_method, weights=w)
        if case == "offset":
            # scipy whitens coordinates of size 1e3 and loses ~1e-11 of the density doing so
            # (measured against an extended-precision evaluation); a KDE is translation
            # invariant and x - 1e3 is exact here, so scipy on the translated problem is the
            # accurate reference.
            ref = scipy.stats.gaussian_kde(x - 1e3, bw_method=bw_method, weights=w)
            ref_pts = pts - 1e3
        else:
            ref = scipy.stats.gaussian_kde(x, bw_method=bw_method, weights=w)
            ref_pts = pts
        tol = _kde_tolerance(case, dim)
        ref_log = ref.logpdf(ref_pts)
        return [
            Comparison("GaussianKDE.pdf", ours.pdf(pts), ref.pdf(ref_pts), tol * _exp_condition(ref_log)),
            Comparison("GaussianKDE.logpdf", ours.logpdf(pts), ref_log, tol),
        ]

    return run


def _kde_checks(sizes: _Sizes, seed: int) -> list[Check]:
    what = "GaussianKDE vs scipy"
    checks = [Check(what, case, _kde_check(sizes, seed, case), reference="scipy") for case in _COV_CASES]
    checks.append(Check(what, "random, d=16", _kde_check(sizes, seed, "random", d=16), reference="scipy"))
    checks.append(
        Check(what, "random, bw_method='silverman'", _kde_check(sizes, seed, "random", "silverman"), reference="scipy")
    )
    checks.append(Check(what, "random, bw_method=0.3", _kde_check(sizes, seed, "random", 0.3), reference="scipy"))
    return checks


def _mvg_check(sizes: _Sizes, seed: int, case: str) -> Callable[[], list[Comparison]]:
    """``MultiVariateGaussian`` against ``numpy.cov`` + ridge + inverse per patch (and scipy's logpdf)."""

    def run() -> list[Comparison]:
        from anomstats.gaussian import DEFAULT_RIDGE

        rng = np.random.default_rng(seed)
        c = 32 if case == "high-dimensional" else 6
        n = max(sizes.batch, 2 * c)
        emb = _embedding(case, n, c, sizes.spatial, rng)
        test = _embedding(case, 5, c, sizes.spatial, np.random.default_rng(seed + 1))
        model = anomstats.MultiVariateGaussian(store_covariance=True).fit(emb)
        p_count = int(np.prod(sizes.spatial))
        patches = emb.astype(np.float64).reshape(n, c, p_count)
        tpatches = test.astype(np.float64).reshape(5, c, p_count)
        mean = patches.mean(axis=0)
        covs = np.stack([np.cov(patches[:, :, p], rowvar=False) + DEFAULT_RIDGE * np.eye(c) for p in range(p_count)])
        precs = np.stack([scipy.linalg.inv(s) for s in covs])
        d2 = np.empty((5, p_count))
        logp = np.empty((5, p_count))
        for p in range(p_count):
            delta = tpatches[:, :, p] - mean[:, p]
            d2[:, p] = np.einsum("mi,ij,mj->m", delta, precs[p], delta)
            logp[:, p] = scipy.stats.multivariate_normal(mean[:, p], covs[p]).logpdf(tpatches[:, :, p])
        tol = 1e-5 if case == "float32" else 1e-9
        return [
            Comparison("MultiVariateGaussian.mean", model.mean, mean, tol, "normwise"),
            Comparison("MultiVariateGaussian.covariance", model.covariance, covs, tol, "normwise"),
            Comparison("MultiVariateGaussian.precision", model.precision, precs, tol, "normwise"),
            Comparison(
                "MultiVariateGaussian.mahalanobis",
                model.mahalanobis(test),
                np.sqrt(np.clip(d2, 0, None)).reshape(5, *sizes.spatial),
                tol,
            ),
            Comparison("MultiVariateGaussian.logpdf", model.logpdf(test), logp.reshape(5, *sizes.spatial), tol),
        ]

    return run


def _shrinkage_check(sizes: _Sizes, seed: int, case: str, method: str) -> Callable[[], list[Comparison]]:
    """The shrinkage estimators against scikit-learn's ``LedoitWolf`` / ``OAS``, patch by patch."""

    def run() -> list[Comparison]:
        from sklearn.covariance import OAS, LedoitWolf

        rng = np.random.default_rng(seed)
        c = 32 if case == "high-dimensional" else 6
        n = sizes.batch
        emb = _embedding(case, n, c, sizes.spatial, rng)
        # ridge=0: exactly the shrinkage estimator, as scikit-learn computes it.
        model = anomstats.MultiVariateGaussian(ridge=0.0, shrinkage=method, store_covariance=True).fit(emb)
        patches = emb.reshape(n, c, -1)
        estimator = LedoitWolf if method == "ledoit-wolf" else OAS
        ref = np.stack([estimator().fit(patches[:, :, p]).covariance_ for p in range(patches.shape[2])])
        return [Comparison(f"MultiVariateGaussian(shrinkage={method!r}).covariance", model.covariance, ref, 1e-10, "normwise")]

    return run


def _shrinkage_checks(sizes: _Sizes, seed: int) -> list[Check]:
    no_sklearn = None if _optional.is_installed("sklearn") else "scikit-learn is not installed"
    return [
        Check(
            f"MultiVariateGaussian(shrinkage={method!r}) vs scikit-learn",
            case,
            _shrinkage_check(sizes, seed, case, method),
            skip_reason=no_sklearn,
            reference="scikit-learn",
        )
        for method in ("ledoit-wolf", "oas")
        for case in ("random", "high-dimensional")
    ]


def _core_checks(sizes: _Sizes, seed: int) -> list[Check]:
    checks = [Check("cov vs numpy", case, _cov_check(sizes, seed, case), reference="numpy") for case in _COV_CASES]
    checks += [
        Check(
            "batched_cov/RunningMoments vs numpy.cov loop", case, _batched_check(sizes, seed, case), reference="numpy.cov loop"
        )
        for case in _BATCHED_CASES
    ]
    checks += _kde_checks(sizes, seed)
    checks += [
        Check("MultiVariateGaussian vs numpy/scipy", case, _mvg_check(sizes, seed, case), reference="numpy/scipy")
        for case in _MVG_CASES
    ]
    checks += _shrinkage_checks(sizes, seed)
    return checks


# --------------------------------------------------------------------------------------------------
# The torch adapter against the core
# --------------------------------------------------------------------------------------------------

_TORCH_KDE = "anomstats_torch.GaussianKDE vs core"
_TORCH_MVG = "anomstats_torch.MultiVariateGaussian vs core"
_TORCH_KDE_CASES = ("random", "offset", "high-dimensional", "float32")
_TORCH_MVG_CASES = ("random", "offset", "high-dimensional", "float32")


def _torch_kde_check(sizes: _Sizes, seed: int, device: str, case: str) -> Callable[[], list[Comparison]]:
    """``anomstats_torch.GaussianKDE`` (forward, log_prob) against the core's ``GaussianKDE``."""

    def run() -> list[Comparison]:
        import torch

        import anomstats_torch

        rng = np.random.default_rng(seed)
        d, n, m = (sizes.d_high // 2, sizes.n_high, sizes.m // 2) if case == "high-dimensional" else (16, sizes.n, sizes.m)
        x, _ = _data("offset" if case == "offset" else "random", d, n, rng)
        pts = _queries_near(x, m, rng)
        dtype = torch.float32 if case == "float32" else torch.float64
        module = anomstats_torch.GaussianKDE().to(device=device, dtype=dtype)
        # The adapter takes anomalib's layout: rows are observations.
        module.fit(torch.as_tensor(np.ascontiguousarray(x.T), dtype=dtype, device=device))
        feats = torch.as_tensor(np.ascontiguousarray(pts.T), dtype=dtype, device=device)
        # The core gets exactly the values the module saw (rounded to float32 in that case).
        data_seen = x.astype(np.float32).astype(np.float64) if case == "float32" else x
        ref = anomstats.GaussianKDE(data_seen)
        ref_log = ref.logpdf(feats.double().cpu().numpy().T)
        tol = 1e-5 if case == "float32" else 1e-12
        with torch.no_grad():
            dens = module(feats)
            logd = module.log_prob(feats)
        return [
            Comparison("torch GaussianKDE.forward", dens, np.exp(ref_log), tol * _exp_condition(ref_log)),
            Comparison("torch GaussianKDE.log_prob", logd, ref_log, tol),
        ]

    return run


def _torch_mvg_tolerances(case: str, core_covariance: np.ndarray) -> tuple[float, float, float]:
    """Tolerances of the mean, the inverse covariance and the distances of the torch Gaussian."""
    if case == "float32":
        # An inverse magnifies the float32 rounding of the covariance by its condition
        # number; so do the distances computed from it.
        kappa = float(np.max(np.linalg.cond(np.asarray(core_covariance, dtype=np.float64))))
        tol_inv = max(1e-5, 10 * float(np.finfo(np.float32).eps) * kappa)
        return 1e-5, tol_inv, tol_inv
    # A squared distance is a sum of terms of both signs: allow for its cancellation.
    return 1e-12, 1e-12, 1e-10


def _torch_mvg_check(sizes: _Sizes, seed: int, device: str, case: str) -> Callable[[], list[Comparison]]:
    """``anomstats_torch.MultiVariateGaussian`` (fit, mahalanobis) against the core's."""

    def run() -> list[Comparison]:
        import torch

        import anomstats_torch

        rng = np.random.default_rng(seed)
        c = 32 if case == "high-dimensional" else 8
        n = max(sizes.batch, 2 * c)
        data_case = "offset" if case == "offset" else "random"
        emb = _embedding(data_case, n, c, sizes.spatial, rng)
        test = _embedding(data_case, 4, c, sizes.spatial, np.random.default_rng(seed + 1))
        dtype = torch.float32 if case == "float32" else torch.float64
        module = anomstats_torch.MultiVariateGaussian().to(device=device, dtype=dtype)
        with torch.no_grad():
            mean, inv_cov = module.fit(torch.as_tensor(emb, dtype=dtype, device=device))
            dist = module.mahalanobis(torch.as_tensor(test, dtype=dtype, device=device))
        core = anomstats.MultiVariateGaussian(store_covariance=True).fit(emb.astype(np.float32) if case == "float32" else emb)
        core_test = test.astype(np.float32).astype(np.float64) if case == "float32" else test
        tol_mean, tol_inv, tol_dist = _torch_mvg_tolerances(case, core.covariance)
        return [
            Comparison("torch MultiVariateGaussian.mean", mean, core.mean, tol_mean, "normwise"),
            Comparison("torch MultiVariateGaussian.inv_covariance", inv_cov, core.precision, tol_inv, "normwise"),
            Comparison("torch MultiVariateGaussian.mahalanobis", dist, core.mahalanobis(core_test), tol_dist),
        ]

    return run


def _torch_checks(sizes: _Sizes, seed: int, device: str = "cpu") -> list[Check]:
    if not _optional.is_installed("torch"):
        reason = f"{_optional.TORCH_MISSING} (pip install 'anomstats[torch]')"
        return [Check(_TORCH_KDE, c, _never, reason) for c in _TORCH_KDE_CASES] + [
            Check(_TORCH_MVG, c, _never, reason) for c in _TORCH_MVG_CASES
        ]
    return [Check(_TORCH_KDE, c, _torch_kde_check(sizes, seed, device, c), reference="core") for c in _TORCH_KDE_CASES] + [
        Check(_TORCH_MVG, c, _torch_mvg_check(sizes, seed, device, c), reference="core") for c in _TORCH_MVG_CASES
    ]


def _never() -> list[Comparison]:  # pragma: no cover - only referenced by skipped checks
    raise AssertionError("a skipped check was run")


def build_battery(
    *, quick: bool = False, seed: int = 0, include_torch: bool = True, torch_device: str = "cpu"
) -> list[Check]:
    """Return every check of the battery, core first, then the torch adapter.

    Parameters
    ----------
    quick : bool
        Use small problem sizes (a couple of seconds in all).
    seed : int
        Seed of the generated datasets.
    include_torch : bool
        Add the torch adapter's checks (reported as SKIP when torch is not installed).
    torch_device : str
        Device the torch adapter's checks run on (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).

    Examples
    --------
    >>> checks = build_battery(quick=True, include_torch=False)
    >>> sorted({c.case for c in checks if c.what == "cov vs numpy"})
    ['float32', 'high-dimensional', 'nearly singular', 'offset', 'random', 'weighted']
    """
    sizes = _sizes(quick)
    checks = _core_checks(sizes, seed)
    if include_torch:
        checks += _torch_checks(sizes, seed, torch_device)
    return checks


def _where(exc: BaseException) -> str:
    """``raised in module.function`` for the innermost frame of ``exc``'s traceback."""
    tb = exc.__traceback__
    if tb is None:
        return "raised outside a traceback"
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    name = getattr(code, "co_qualname", code.co_name)  # co_qualname: Python >= 3.11
    return f"raised in {tb.tb_frame.f_globals.get('__name__', '?')}.{name}"


def _run_check(check: Check) -> list[Row]:
    if check.skip_reason is not None:
        return [Row(check.what, check.case, None, None, None, "SKIP", check.skip_reason)]
    start = time.perf_counter()
    try:
        comparisons = check.run()
    except NotImplementedError as exc:
        detail = f": {exc}" if str(exc) else ""
        reason = f"not implemented{detail} ({_where(exc)})"
        return [Row(check.what, check.case, None, None, None, "FAIL", reason, time.perf_counter() - start)]
    except Exception as exc:  # noqa: BLE001 - every failure must become a row, never a crash
        reason = f"{type(exc).__name__}: {exc} ({_where(exc)})"
        return [Row(check.what, check.case, None, None, None, "FAIL", reason, time.perf_counter() - start)]
    seconds = time.perf_counter() - start
    rows = []
    for comp in comparisons:
        label = f"{comp.quantity} vs {check.reference}" if check.reference else comp.quantity
        try:
            abs_err, rel_err, reason = compare(comp.actual, comp.expected, comp.tolerance, comp.metric)
        except Exception as exc:  # noqa: BLE001 - e.g. an output that is not array-like
            rows.append(Row(label, check.case, None, None, comp.tolerance, "FAIL", f"{type(exc).__name__}: {exc}", seconds))
            continue
        status = "PASS" if not reason else "FAIL"
        rows.append(Row(label, check.case, abs_err, rel_err, comp.tolerance, status, reason, seconds))
    return rows


def run_validation(
    *,
    quick: bool = False,
    seed: int = 0,
    only: str | None = None,
    include_torch: bool = True,
    torch_device: str = "cpu",
    progress: bool | None = None,
    stream: TextIO | None = None,
    checks: Iterable[Check] | None = None,
) -> list[Row]:
    """Run the battery and return its rows.

    Parameters
    ----------
    quick, seed, include_torch, torch_device
        See :func:`build_battery`.
    only : str, optional
        Keep only the checks whose ``what`` or ``case`` contains this text (case-insensitive).
    progress : bool, optional
        Draw a progress bar on ``stream`` (standard error); by default only on a terminal.
    stream : file-like, optional
        Where the progress bar goes.
    checks : iterable of Check, optional
        Run these instead of the built-in battery.

    Returns
    -------
    list of Row
    """
    todo = list(build_battery(quick=quick, seed=seed, include_torch=include_torch, torch_device=torch_device) if checks is None else checks)
    if only:
        key = only.lower()
        todo = [c for c in todo if key in c.what.lower() or key in c.case.lower()]
    bar = ProgressBar(len(todo), stream=stream, enabled=progress)
    rows: list[Row] = []
    try:
        for check in todo:
            label = f"{check.what} / {check.case}"
            bar.describe(label)
            rows.extend(_run_check(check))
            bar.advance(label)
    finally:
        bar.close()
    return rows


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: Sequence[Row]) -> str:
    """Render rows as a fixed-width text table followed by a one-line summary.

    Examples
    --------
    >>> print(format_table([Row("cov", "random", 0.0, 0.0, 1e-12, "PASS")]))  # doctest: +NORMALIZE_WHITESPACE
    what  case    max abs err  max rel err  tolerance  status
    cov   random  0.00e+00     0.00e+00     1e-12      PASS
    1 passed, 0 failed, 0 skipped
    """
    header = ("what", "case", "max abs err", "max rel err", "tolerance", "status")
    body = [
        (
            r.what,
            r.case,
            _fmt(r.max_abs_error, ".2e"),
            _fmt(r.max_rel_error, ".2e"),
            _fmt(r.tolerance, ".2g"),
            r.status + (f"  {r.reason}" if r.reason else ""),
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = []
    for cells in [header, *body]:
        # The last column holds free text (the reason): no padding after it.
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells[:-1], widths[:-1])) + "  " + cells[-1])
    counts = {s: sum(r.status == s for r in rows) for s in ("PASS", "FAIL", "SKIP")}
    lines.append(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    return "\n".join(lines)


def versions() -> dict[str, str | None]:
    """Versions of the libraries involved, for the JSON report."""
    out: dict[str, str | None] = {"anomstats": anomstats.__version__, "numpy": np.__version__, "scipy": scipy.__version__}
    out["torch"] = None
    if _optional.is_installed("torch"):
        import torch

        out["torch"] = torch.__version__
    return out


def write_json(rows: Sequence[Row], path: str, settings: dict | None = None) -> None:
    """Write the rows, the overall verdict, the run's settings and the library versions as JSON."""
    payload = {
        "passed": not any(r.status == "FAIL" for r in rows),
        "settings": dict(settings or {}),
        "versions": versions(),
        "rows": [r.to_dict() for r in rows],
    }
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2)
        fh.write("\n")
