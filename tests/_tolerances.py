"""Error bounds behind the tests' floating-point tolerances: each bound has its home here.

A test that compares floating results takes its tolerance from one of these functions and says, next to
the assertion, which bound applies; no tolerance is a number one machine happened to print. The bounds are
first-order rounding-error bounds (Higham, *Accuracy and Stability of Numerical Algorithms*, chapters 3,
4, 8 and 10) in units of ``eps``, the machine epsilon of the dtype the computation runs in (2.2e-16 in
float64, 1.2e-7 in float32), with the problem's own numbers (the exponent of a density, the condition
number of a covariance, squared norms in whitened units) computed from the test's data.

Conventions
-----------
* A bound is for ONE computation against exact arithmetic. Comparing two computations (ours against scipy,
  the NumPy core, anomalib's algorithm, another chunking) allows both: the KDE model adds the two routes'
  bounds, the other ``*_rtol`` / ``*_atol`` here are doubled (``TWO_SIDES``).
* Sums of ``n`` terms are charged ``sqrt(n) * eps`` (relative to the sum of magnitudes), the standard
  estimate for independent roundings (Higham section 2.8); it also covers pairwise summation's worst case
  ``log2(n) * eps`` (NumPy's reductions, torch's cascade sums) for n >= 16. The rigorous worst case of
  plain recursive summation, ``(n - 1) * eps``, would be far too loose for float32 (it would hide an
  off-by-one normaliser at n = 2000).
* Bounds are per element (:func:`assert_close_each`): a far query may need 100x a near one's tolerance.
* A tolerance must still catch real defects: an off-by-one normaliser is a relative error 1/n, a wrong
  bandwidth factor moves the exponent q by 2 * q * (relative error), forgetting to centre the queries
  moves every exponent by O(1); every bound here stays far below those for the tests' problems.
  (Checked by planting such defects: n + 1 for n, a bandwidth off by 1e-4, uncentred queries, log det
  off by 1e-6 each fail several tests.) The bounds are not fitted to measurements; as a sanity check,
  over thousands of random draws of the hypothesis tests' problems the largest observed error is about
  0.1-0.3 of its bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Two computations are compared; each may be off by one bound.
TWO_SIDES = 2.0


def eps(dtype) -> float:
    """Machine epsilon of a NumPy or torch floating dtype."""
    if type(dtype).__module__ == "torch":
        import torch

        return float(torch.finfo(dtype).eps)
    return float(np.finfo(np.dtype(dtype)).eps)


def _tiny(dtype) -> float:
    """Smallest normal number of a NumPy or torch floating dtype."""
    if type(dtype).__module__ == "torch":
        import torch

        return float(torch.finfo(dtype).tiny)
    return float(np.finfo(np.dtype(dtype)).tiny)


def sum_error(n: int, dtype=np.float64) -> float:
    """Relative error (to the sum of magnitudes) of a sum of ``n`` terms: ``sqrt(n) * eps`` (see module notes)."""
    return math.sqrt(max(int(n), 1)) * eps(dtype)


# --------------------------------------------------------------------------- assertion with per-element bounds
def _as_numpy(value):
    if type(value).__module__.startswith("torch"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def assert_close_each(actual, expected, *, rtol=0.0, atol=0.0, equal_nan: bool = False) -> None:
    """``|actual - expected| <= atol + rtol * |expected|`` elementwise, with per-element ``rtol`` / ``atol``.

    What ``numpy.testing.assert_allclose`` / ``torch.testing.assert_close`` check, but each element gets its
    own bound (a far query may need 100x the tolerance of a near one; one scalar for all would let a defect
    through on the near ones). Shapes must match, and dtypes too when both sides are tensors (as
    ``torch.testing.assert_close`` demands).
    """
    if type(actual).__module__.startswith("torch") and type(expected).__module__.startswith("torch"):
        assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    a = _as_numpy(actual).astype(np.float64)
    e = _as_numpy(expected).astype(np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != {e.shape}"
    with np.errstate(invalid="ignore"):  # inf - inf, 0 * inf: decided by the exact / NaN tests below
        allowed = np.broadcast_to(np.asarray(atol, dtype=np.float64) + np.asarray(rtol, dtype=np.float64) * np.abs(e), e.shape)
        error = np.abs(a - e)
        both_nan = np.isnan(a) & np.isnan(e) if equal_nan else np.zeros(e.shape, dtype=bool)
        exact = a == e  # equal infinities too
        bad = ~(exact | both_nan | (error <= allowed))
    if bad.any():
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(allowed > 0, error / np.where(allowed > 0, allowed, 1.0), np.inf)
        worst = np.unravel_index(np.argmax(np.where(bad, ratio, -1.0)), e.shape)
        raise AssertionError(
            f"{int(bad.sum())} / {bad.size} elements outside their bound; worst at {tuple(int(i) for i in worst)}: "
            f"actual {a[worst]!r}, expected {e[worst]!r}, |difference| {error[worst]:.3e} > allowed "
            f"{allowed[worst]:.3e} (atol + rtol |expected|), {ratio[worst]:.3g}x the bound"
        )


# --------------------------------------------------------------------------- Gaussian kernel densities
def kde_exponent(log_density, log_norm) -> np.ndarray:
    """``q = 2 * (log norm - log p) >= 0`` for densities ``p = norm * sum_i w_i exp(-q_i / 2)`` (sum w = 1).

    ``q`` is an upper bound on the contribution-weighted mean of the whitened squared distances ``q_i``:
    with ``c_i = w_i exp(-q_i / 2) / Z`` and ``Z = p / norm``, ``sum_i c_i q_i / 2 = -log Z - KL(c || w)``.
    The relative error of ``p`` is the contribution-weighted mean of the terms' errors, so a per-term error
    that grows linearly in ``q_i`` is bounded by the same expression in ``q``.
    """
    return 2.0 * np.maximum(0.0, np.asarray(log_norm, dtype=np.float64) - np.asarray(log_density, dtype=np.float64))


@dataclass(frozen=True)
class Route:
    """How one computation of a KDE forms its squared distances, in which coordinates and dtype.

    ``squares``: ``"expanded"`` (``|y|^2 + |t|^2 - 2 y.t`` by a matrix product: the torch adapter, the core
    for d > 2), ``"direct"`` (differences ``y - t`` squared and summed: scipy, the core for d <= 2,
    anomalib's per-row loop) or ``"exact"`` (a long-double or hand-written float64 reference whose own
    error is negligible against the other side's). ``centre``: the point subtracted before whitening,
    ``"mean"`` (the data's weighted mean: the core, the adapter's own fit) or ``None`` (the origin: scipy,
    anomalib's queries) or an explicit point. ``dtype``: the working dtype; ``fit_dtype``: the dtype the
    bandwidth was fitted in (the adapter fits in float64 whatever it stores; anomalib in float32).
    """

    squares: str
    centre: object = "mean"
    dtype: object = np.float64
    fit_dtype: object = None


SCIPY = Route("direct", None)
#: The torch adapter's own float32 fit: a float64 fit in float32 buffers, the expanded square of centred queries.
ADAPTER32 = Route("expanded", "mean", np.float32, np.float64)
ANOMALIB32 = Route("direct", None, np.float32)
EXACT = Route("exact", None)


def adapter_route(d: int, dtype=np.float64) -> Route:
    """The torch adapter on its own fit (fitted in float64, centred at the data mean, buffers in ``dtype``).

    In float64 up to ``DIRECT_MAX_D`` dimensions it forms direct differences, as the core does; otherwise
    the expanded square.
    """
    from anomstats._rules import DIRECT_MAX_D

    direct = d <= DIRECT_MAX_D and np.dtype(dtype) == np.float64
    return Route("direct" if direct else "expanded", "mean", dtype, np.float64)


def adapter_loaded(d: int, dtype=np.float64) -> tuple:
    """The adapter working from loaded buffers only: ``f @ L`` uncentred (rounded like direct differences
    measured from the origin), then shifted by the stored centroid and squared as :func:`adapter_route`."""
    squares = adapter_route(d, dtype).squares
    return (Route(squares, "mean", dtype), Route("direct", None, dtype))


def core_route(d: int) -> Route:
    """The NumPy core: direct differences up to ``DIRECT_MAX_D`` dimensions, the expanded square above."""
    from anomstats._rules import DIRECT_MAX_D

    return Route("direct" if d <= DIRECT_MAX_D else "expanded", "mean")


def kde_route_error(route: Route, q, y2, log_density, *, d: int, n: int, cond: float) -> np.ndarray:
    """Relative error bound of ONE computation of KDE densities ``p = norm * sum_i w_i exp(-q_i / 2)``.

    With ``q`` from :func:`kde_exponent`, ``y`` the query in whitened units (coordinates in which the kernel
    covariance ``H`` is the identity) measured from the route's centre, ``kappa = cond(H)``, ``n`` kernels
    in ``d`` dimensions and ``eps`` of the route's dtype::

        |p_hat / p - 1| <= kappa * delta_H * (q + d) / 2      (1) bandwidth: fit and factorisation
                          + eps * S                           (2) rounding of each exponent
                          + eps * (sqrt(n) + 1)               (3) exp and the sum of the kernels
                          + eps * |log p|                     (4) exp(log p) routes, log_prob

    (1) The computation fits and factors its own ``H`` (covariance accumulation, Cholesky, a triangular
        solve or inverse) with a relative backward error ``|dH| <= delta_H |H|``: ``delta_H`` is
        :func:`covariance_backward_error` in the fit's dtype plus ``2 d eps`` for applying the factor in
        the working dtype (a float64 fit stored as float32 buffers). That moves every whitened squared
        distance by ``|dq_i| <= kappa delta_H q_i`` (the exponent by half of it) and
        ``log norm = -log det(2 pi H) / 2`` by at most ``d kappa delta_H / 2``. ``cond=0``: both
        computations use the same stored whitening (``bw_transform``, ``norm``), so this term is absent.
    (2) ``S`` is the rounding of ``q_i / 2``, averaged over the kernels' contributions (linear in ``q_i``,
        so bounded by the same expression in ``q``, and ``E sqrt(q_i) <= sqrt(q)``), using
        ``|t_i| <= |y| + sqrt(q_i)``:

        * expanded square: the (d + 2)-term product rounds ``q_i`` by ``(d + 2) eps (|y|^2 + |t_i|^2)``
          (the cancellation bound, ``|t_i|^2 <= 2 |y|^2 + 2 q_i``): ``S = (d + 2) (1.5 |y|^2 + q)``;
        * direct differences: whitened coordinates rounded by ``d eps`` of their size, then ``d`` squares
          summed: ``S = 2 d |y| sqrt(q) + (1.5 d + 1) q``.

        Centring (small ``|y|``) is what keeps the expanded square accurate far from the origin.
    (3) ``n`` positive terms, see :func:`sum_error`.
    (4) The log-sum-exp fallback for underflowing rows, the traced path and ``log_prob`` round ``log p``
        by ``eps |log p|``, a relative error of ``p``.
    """
    if route.squares == "exact":
        return np.zeros_like(np.asarray(q, dtype=np.float64))
    e = eps(route.dtype)
    fit_dtype = route.dtype if route.fit_dtype is None else route.fit_dtype
    delta_h = covariance_backward_error(n, d, fit_dtype) + 2 * d * e
    bandwidth = cond * delta_h * (q + d) / 2
    if route.squares == "expanded":
        squares = (d + 2) * (1.5 * y2 + q)
    elif route.squares == "direct":
        squares = 2 * d * np.sqrt(y2 * q) + (1.5 * d + 1) * q
    else:
        raise ValueError(f"unknown route {route.squares!r}")
    log_p = np.abs(np.asarray(log_density, dtype=np.float64))
    log_p = np.where(np.isfinite(log_p), log_p, 0.0)
    return bandwidth + e * (squares + math.sqrt(n) + 1 + log_p)


def whitened_sq_norm(points, bandwidth, centre=None) -> np.ndarray:
    """``|y|^2 = (x - centre)^T H^-1 (x - centre)`` for points (m, d), kernel covariance ``H`` (d, d).

    ``centre=None`` is the origin (scipy whitens uncentred data).
    """
    x = np.atleast_2d(np.asarray(points, dtype=np.float64))
    h = np.atleast_2d(np.asarray(bandwidth, dtype=np.float64))
    if centre is not None:
        x = x - np.asarray(centre, dtype=np.float64)
    return np.einsum("ij,ij->i", x, np.linalg.solve(h, x.T).T)


def bandwidth_from_whitening(bw_transform) -> np.ndarray:
    """Kernel covariance ``H = (L L^T)^-1`` of the adapter's / anomalib's ``bw_transform`` buffer ``L``."""
    w = np.asarray(bw_transform, dtype=np.float64)
    return np.linalg.inv(w @ w.T)


def kde_log_density_whitened(train_w, queries_w, log_norm, weights=None) -> np.ndarray:
    """Reference log-densities in float64 from whitened data and queries (direct differences, log-sum-exp).

    For tolerances only: gives the exponent ``q`` of :func:`kde_exponent` independently of the code under
    test (anomalib's float32 densities underflow to 0 where a bound still needs ``q``).
    """
    t = np.asarray(train_w, dtype=np.float64)
    y = np.asarray(queries_w, dtype=np.float64)
    w = np.full(len(t), 1.0 / len(t)) if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    expo = -0.5 * ((y[:, None, :] - t[None, :, :]) ** 2).sum(-1)
    top = expo.max(axis=1)
    return top + np.log(np.exp(expo - top[:, None]) @ w) + log_norm


def kde_log_density(train, queries, bandwidth, weights=None) -> np.ndarray:
    """Reference log-densities in float64 of a Gaussian KDE given in data coordinates (rows are points)."""
    h = np.atleast_2d(np.asarray(bandwidth, dtype=np.float64))
    chol = np.linalg.cholesky(h)
    whiten = lambda a: np.linalg.solve(chol, np.atleast_2d(np.asarray(a, dtype=np.float64)).T).T  # noqa: E731
    log_norm = -0.5 * np.linalg.slogdet(2 * np.pi * h)[1]
    return kde_log_density_whitened(whiten(train), whiten(queries), log_norm, weights)


def weighted_sum_rtol(n: int, dtype=np.float64) -> float:
    """Relative difference allowed between two sums of the same n non-negative values (other orders).

    :func:`sum_error` plus the rounding of the products with the weights, doubled. Used where both sides
    compute identical per-point values (the same scipy routine on the same inputs) and differ only in
    how they add them up.
    """
    return TWO_SIDES * (sum_error(n, dtype) + eps(dtype))


@dataclass(frozen=True)
class KDEErrorModel:
    """Tolerances for comparing two computations of the same KDE on the same queries.

    The allowed relative difference of densities is the sum of both routes' :func:`kde_route_error`; the
    allowed absolute difference of log-densities is the same number (``|d log p| = |dp / p|``).
    """

    d: int
    n: int
    cond: float
    log_norm: float
    routes: tuple
    query_sq_norms: tuple
    input_term: float = 0.0

    @classmethod
    def of(
        cls, train, queries, bandwidth, routes, *, shared_whitening: bool = False, weights=None, input_rounding=0.0
    ):
        """Problem numbers for ``train`` (n, d), ``queries`` (m, d), kernel covariance ``bandwidth`` (d, d).

        ``routes``: the two computations compared (:class:`Route`). ``shared_whitening``: both use the same
        stored whitening and normaliser, so bound (1) is absent.

        ``input_rounding``: when the two computations see data that differ by up to this much per
        coordinate (e.g. ``x`` against ``x + 1e3`` rounded), the fitted covariance ``C`` moves too:
        ``dC = (dX^T Xc + Xc^T dX) / (n - 1)`` gives ``|C^-1/2 dC C^-1/2| <= 2 sqrt(2 d) dx |C^-1|^1/2``
        (whitened data have unit covariance), which enters like bound (1) without ``kappa``. Its effect on
        the points themselves is the direct-difference term of a route measured from the origin of the
        offset problem.
        """
        x = np.atleast_2d(np.asarray(train, dtype=np.float64))
        h = np.atleast_2d(np.asarray(bandwidth, dtype=np.float64))
        n, d = x.shape
        y2 = []
        for route in routes:
            centre = route.centre
            if isinstance(centre, str):
                centre = np.average(x, axis=0, weights=weights)
            y2.append(whitened_sq_norm(queries, h, centre))
        log_norm = float(-0.5 * np.linalg.slogdet(2 * np.pi * h)[1])
        cond = 0.0 if shared_whitening else float(np.linalg.cond(h))
        input_term = 0.0
        if input_rounding:
            data_cov = np.atleast_2d(np.cov(x.T, aweights=weights))
            input_term = 2 * math.sqrt(2 * d) * float(input_rounding) * math.sqrt(1 / np.linalg.eigvalsh(data_cov)[0])
        return cls(d, n, cond, log_norm, tuple(routes), tuple(y2), input_term)

    def rtol_each(self, log_density) -> np.ndarray:
        """Per-query relative tolerance of densities, given reference log-densities."""
        q = kde_exponent(log_density, self.log_norm)
        routes = sum(
            kde_route_error(route, q, y2, log_density, d=self.d, n=self.n, cond=self.cond)
            for route, y2 in zip(self.routes, self.query_sq_norms)
        )
        return routes + self.input_term * (q + self.d) / 2

    def rtol(self, log_density) -> float:
        """Scalar relative tolerance of densities: the largest per-query bound."""
        return float(np.max(self.rtol_each(log_density), initial=0.0))

    def log_atol_each(self, log_density) -> np.ndarray:
        """Per-query absolute tolerance of log-densities: the density bound itself (first order)."""
        return self.rtol_each(log_density)

    def log_atol(self, log_density) -> float:
        """Scalar absolute tolerance of log-densities: the largest per-query bound."""
        return self.rtol(log_density)

    def atol(self) -> float:
        """Absolute tolerance of densities in the subnormal range, where rounding is absolute.

        Each route adds at most ``n + 1`` roundings of the subnormal spacing ``eps * tiny`` (n kernels that
        underflow partly, and the result), scaled by the normaliser when it multiplies a subnormal kernel
        sum (scipy: ``norm * sum_i w_i exp(-q_i / 2)``); above ``tiny / eps`` this is negligible.
        """
        scale = math.exp(max(0.0, self.log_norm))
        return float(
            sum((self.n + 1) * eps(r.dtype) * _tiny(r.dtype) * scale for r in self.routes if r.squares != "exact")
        )


# --------------------------------------------------------------------------- per-patch Gaussians (PaDiM)
def covariance_backward_error(n: int, c: int, dtype=np.float64) -> float:
    """``|dA| / |A|`` for ``A = Xc^T Xc / (n - 1) + ridge I`` (c x c, n observations) then factored.

    Centring rounds each difference relative to itself (exactly, by Sterbenz, for data near its mean); each
    entry is a sum of n products (:func:`sum_error`, plus one rounding for the product); the entrywise bound
    becomes a 2-norm one with a factor ``c``; Cholesky adds ``2 c eps |A|`` (Higham thm. 10.3 in norm form).
    """
    return c * (sum_error(n, dtype) + eps(dtype)) + 2 * c * eps(dtype)


def covariance_atol(observations, weights=None) -> np.ndarray:
    """Entrywise absolute difference allowed between two computed sample covariances (unbiased).

    ``observations`` (n, c), optional ``weights`` (numpy's ``aweights``). Each entry
    ``sum_k w_k a_k b_k / norm`` of the centred data is a sum of n products:
    ``(sqrt(n) + 3) eps (|Xc|^T W |Xc|)_ij / norm`` (the sum, the products, the division; the centring
    rounds each difference relative to itself). A mean off by ``delta`` (``mean_atol``'s one-sided
    ``(sqrt(n) + 1) eps max|x|``) cancels to first order, the centred data summing to zero, and leaves
    ``sum(w) delta_i delta_j / norm``: what remains of a covariance that is 0 (constant data). Doubled.
    """
    x = np.asarray(observations, dtype=np.float64)
    n = x.shape[0]
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    centred = np.abs(x - np.average(x, axis=0, weights=w))
    norm = max(w.sum() - (w**2).sum() / w.sum(), 1e-300)  # numpy.cov's normaliser, ddof = 1 (n - 1 unweighted)
    delta = (sum_error(n) + eps(np.float64)) * np.abs(x).max(axis=0)
    first = (sum_error(n) + 3 * eps(np.float64)) * (centred.T @ (w[:, None] * centred)) / norm
    return TWO_SIDES * (first + w.sum() * np.outer(delta, delta) / norm)


def cholesky_atol(covariance, n: int) -> float:
    """Entrywise absolute difference allowed between two Cholesky factors of computed covariances.

    Perturbation theory of the Cholesky factor (Sun 1991; Higham thm. 10.8): a relative backward error
    ``delta`` (:func:`covariance_backward_error`) of ``A`` moves ``R`` by ``|dR| <= kappa(A) delta |R|``
    (2-norms, first order, an entry bounded by the 2-norm). Doubled.
    """
    a = np.atleast_2d(np.asarray(covariance, dtype=np.float64))
    kappa = np.linalg.cond(a)
    return float(TWO_SIDES * kappa * covariance_backward_error(n, a.shape[0]) * math.sqrt(np.linalg.norm(a, 2)))


def log_det_atol(covariance, n: int) -> float:
    """Absolute difference allowed between two computed ``log det`` of a fitted covariance.

    ``|d log det A| = |tr(A^-1 dA)| <= d kappa(A) delta`` with ``delta`` from
    :func:`covariance_backward_error`, doubled.
    """
    a = np.atleast_2d(np.asarray(covariance, dtype=np.float64))
    return float(TWO_SIDES * a.shape[0] * np.linalg.cond(a) * covariance_backward_error(n, a.shape[0]))


def mean_atol(x_abs_max: float, n: int, dtype=np.float64) -> float:
    """Absolute difference allowed between two computed means of n values of magnitude <= ``x_abs_max``.

    A sum of n terms (:func:`sum_error`) and a division: ``(sqrt(n) + 1) eps max|x|`` each, doubled.
    """
    return TWO_SIDES * (sum_error(n, dtype) + eps(dtype)) * float(x_abs_max)


def precision_atol(covariance, n: int, dtype=np.float64) -> float:
    """Entrywise absolute difference allowed between two computed inverses of regularised covariances.

    ``covariance``: the regularised ``A`` (..., c, c) the inverses are of, fitted from n observations. A
    relative backward error ``delta`` (:func:`covariance_backward_error`) of ``A`` perturbs its inverse ``P``
    by ``|dP| <= kappa(A) delta |P|`` (2-norms, first order; an entry is bounded by the 2-norm). The
    largest over the stack, doubled.
    """
    a = np.asarray(covariance, dtype=np.float64)
    c = a.shape[-1]
    delta = covariance_backward_error(n, c, dtype)
    sv = np.linalg.svd(a.reshape(-1, c, c), compute_uv=False)
    kappa = sv[:, 0] / sv[:, -1]
    p_norm = 1.0 / sv[:, -1]
    return float(TWO_SIDES * np.max(kappa * delta * p_norm))


def mahalanobis_tolerances(
    covariance, n: int, mean_error: float = 0.0, dtype=np.float64, *, shared_fit: bool = False
) -> tuple[float, float]:
    """``(rtol, atol)`` between two computed Mahalanobis distances ``sqrt(d^T P d)`` (PaDiM's score).

    With ``delta`` the covariance backward error (:func:`covariance_backward_error`) and ``kappa = cond(A)``:
    the fit moves ``d^2`` by ``<= kappa delta d^2`` (absent with ``shared_fit``: both use the same stored
    mean and precision); evaluating ``d^T P d`` (products of c terms, sums) rounds by
    ``<= (c + 2) eps |d|^T |P| |d| <= (c + 2) c eps kappa d^2``; the square root halves relative errors. A
    mean off by ``mean_error`` per entry shifts ``d`` by at most ``sqrt(c |P|) mean_error``: an absolute
    term, which is what matters for queries near the mean. Doubled for the two sides.
    """
    a = np.asarray(covariance, dtype=np.float64)
    c = a.shape[-1]
    sv = np.linalg.svd(a.reshape(-1, c, c), compute_uv=False)
    kappa = float(np.max(sv[:, 0] / sv[:, -1]))
    p_norm = float(np.max(1.0 / sv[:, -1]))
    delta = 0.0 if shared_fit else covariance_backward_error(n, c, dtype)
    rtol = TWO_SIDES * 0.5 * kappa * (delta + (c + 2) * c * eps(dtype))
    atol = TWO_SIDES * math.sqrt(c * p_norm) * float(mean_error)
    return rtol, atol


def patch_covariances(embedding, ridge: float) -> np.ndarray:
    """Regularised per-patch covariances ``cov + ridge I`` (P, C, C) of an embedding (B, C, *spatial), float64.

    The exact-enough problem numbers (condition numbers, norms) for :func:`precision_atol` and
    :func:`mahalanobis_tolerances`.
    """
    x = np.asarray(embedding, dtype=np.float64)
    b, c = x.shape[:2]
    v = x.reshape(b, c, -1)
    centred = v - v.mean(axis=0)
    cov = np.einsum("bcp,bdp->pcd", centred, centred) / max(b - 1, 1)
    return cov + ridge * np.eye(c)


# --------------------------------------------------------------------------- Gaussian fits: perturbations, shrinkage
def cholesky_residual_atol(covariance, dtype=np.float64) -> np.ndarray:
    """Entrywise ``|R^T R - A|`` allowed for a computed Cholesky factor ``R`` of ``A`` (c x c), one side.

    Higham thm. 10.3: ``R^T R = A + dA`` with ``|dA| <= (c + 1) eps |R^T| |R|``, and
    ``(|R^T| |R|)_ij <= |r_i| |r_j| = sqrt(a_ii a_jj)`` (Cauchy-Schwarz on the columns of R).
    """
    a = np.atleast_2d(np.asarray(covariance, dtype=np.float64))
    d = np.sqrt(np.abs(np.diagonal(a, axis1=-2, axis2=-1)))
    return (a.shape[-1] + 1) * eps(dtype) * d[..., :, None] * d[..., None, :]


def inverse_perturbation_atol(a, da) -> float:
    """Entrywise change of ``A^-1`` allowed when ``A`` (c x c) moves by at most ``da`` per entry.

    First order: ``d(A^-1) = -A^-1 dA A^-1``, so ``|d(A^-1)|_ij <= ||A^-1||_2^2 ||dA||_2`` and
    ``||dA||_2 <= ||dA||_F``. With ``||dA|| = delta ||A||`` this is :func:`precision_atol`'s ``kappa delta |P|``.
    """
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    p_norm = 1.0 / np.linalg.svd(a, compute_uv=False)[-1]
    return float(p_norm**2 * np.linalg.norm(np.asarray(da, dtype=np.float64)))


def log_det_perturbation_atol(a, da) -> float:
    """Change of ``log det A`` allowed when ``A`` moves by at most ``da`` per entry.

    First order: ``d log det A = tr(A^-1 dA) <= ||A^-1||_F ||dA||_F``.
    """
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    return float(np.linalg.norm(np.linalg.inv(a)) * np.linalg.norm(np.asarray(da, dtype=np.float64)))


def cholesky_perturbation_atol(a, da) -> float:
    """Entrywise change of the Cholesky factor ``R`` of ``A`` allowed when ``A`` moves by ``da`` per entry.

    As :func:`cholesky_atol` (``|dR| <= kappa(A) |dA| / |A| |R|``, 2-norms) with ``|dA|_2 <= ||dA||_F``.
    """
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    sv = np.linalg.svd(a, compute_uv=False)
    return float(sv[0] / sv[-1] * np.linalg.norm(np.asarray(da, dtype=np.float64)) / sv[0] * math.sqrt(sv[0]))


def streamed_covariance_atol(observations, merges: int, dtype=np.float64) -> np.ndarray:
    """Entrywise extra difference of a covariance merged from ``merges + 1`` parts, against one pass.

    Each merge (Chan, Golub, LeVeque) adds ``(n_a n_b / n) D D^T`` to the centred sums, with ``D`` the
    difference of the parts' means. Each mean is off by up to ``(sqrt(n) + 1) eps max|x|`` (one side of
    :func:`mean_atol`), ``D`` by twice that (``e``), and ``|D_i| <= range_i`` of the data,
    ``n_a n_b / n <= n / 4``: per merge ``(n / 4) (e_i range_j + range_i e_j) / (n - 1)``. For data far from
    the origin (an offset of 100, a small spread) this first-order term exceeds :func:`covariance_atol`'s.
    ``dtype``: the accumulation's.
    """
    x = np.atleast_2d(np.asarray(observations, dtype=np.float64))
    n = x.shape[0]
    e = 2 * (sum_error(n, dtype) + eps(dtype)) * np.abs(x).max(axis=0)
    spread = x.max(axis=0) - x.min(axis=0)
    return int(merges) * (n / 4) * (np.outer(e, spread) + np.outer(spread, e)) / max(n - 1, 1)


def streamed_fourth_power_error(observations, merges: int = 0) -> float:
    """Absolute error of ``F = sum_n ||x_n - m||^4`` formed from the moments of ``(||x||^2, x)``, one side.

    The streaming Ledoit-Wolf fit (``anomstats.gaussian``, class notes "Streaming Ledoit-Wolf") computes
    ``F = n var(q) + n trace(S)^2`` with ``q = ||x - m||^2 = a - 2 m^T b + const``, ``a_k = r_k - mean(r)``,
    ``r_k = ||x_k||^2``, ``b_k = x_k - m``: ``n var(q) = sum a^2 - 4 m^T sum a b + 4 m^T (n S) m``. The
    terms are of size ``||m||^2 trace(S)``, the result of size ``trace(S)^2``: that cancellation is the
    class notes' relative loss ``eps ||m||^2 / trace(S)``. Precisely, with ``g_k = |a_k| + 2 |m|^T |b_k|``:

    * the sums of n products (and the merges' mean corrections, which are sums too) round by
      ``(sqrt(n) + c + 3) eps sum_k g_k^2`` (:func:`sum_error`, the c-term products ``m^T b``);
    * ``r_k`` itself is rounded by ``(c + 1) eps r_k`` before centring, which moves ``sum_k g_k^2`` by
      ``2 (c + 1) eps sum_k g_k r_k``;
    * ``n trace(S)^2`` by ``2 (sqrt(n) + 3) eps n trace(S)^2``;
    * each of ``merges`` merges adds ``(n_a n_b / n) D D^T`` of the parts' mean differences
      (:func:`streamed_covariance_atol` for the augmented vector ``(r, x)``), whose error enters
      ``n var(q)`` through the weights ``(1, -2 m)``: ``merges (n / 2) e_g range_g`` with ``e_g``,
      ``range_g`` the mean error and range of ``r - 2 m^T x``.
    """
    x = np.atleast_2d(np.asarray(observations, dtype=np.float64))
    n, c = x.shape
    m = x.mean(axis=0)
    b = x - m
    r = np.einsum("ij,ij->i", x, x)
    g = np.abs(r - r.mean()) + 2 * np.abs(b) @ np.abs(m)
    trace = np.einsum("ij,ij->", b, b) / n
    e = eps(np.float64)
    mean_err = 2 * (sum_error(n) + e) * (r.max() + 2 * np.abs(m) @ np.abs(x).max(axis=0))
    lin = r - 2 * x @ m
    return float(
        (sum_error(n) + (c + 3) * e) * np.sum(g**2)
        + 2 * (c + 1) * e * np.sum(g * r)
        + 2 * (sum_error(n) + 3 * e) * n * trace**2
        + int(merges) * (n / 2) * mean_err * (lin.max() - lin.min())
    )


def shrinkage_tolerances(observations, method: str, fourth_error: float = 0.0) -> tuple[float, np.ndarray]:
    """``(coef_atol, cov_atol)`` between two computed shrinkage coefficients of the same data (c features).

    ``coef_atol``: the coefficient ``s`` in [0, 1] (``anomstats._shrinkage``: Ledoit-Wolf
    ``s = min(beta, delta) / delta``, ``beta = (F / n - ||S||_F^2) / (c n)``, ``delta = ||S - mu I||_F^2 / c``;
    OAS ``s = min(num / den, 1)``, ``num = ||S||_F^2 / c^2 + mu^2``,
    ``den = (n + 1) (||S||_F^2 - c mu^2) / c^2``; ``S`` biased, ``mu = trace(S) / c``). The inputs are
    sums of positive terms rounded by ``e1 = (sqrt(n) + c + 3) eps`` of their size (``|S_ij| <= |Xc|^T|Xc| / n``
    entrywise, ``||S||_F^2`` by ``2 e1 ||S||_F^2``, ``F`` by ``e1 F``) plus ``fourth_error`` for a ``F``
    streamed from moments (:func:`streamed_fourth_power_error`); the differences ``beta`` and
    ``delta`` / ``den`` cancel, which is why their errors are divided by ``delta`` (distance of ``S`` from
    ``mu I``), not by ``||S||^2``: ``|ds| <= |d beta| / delta + s |d delta| / delta`` (Ledoit-Wolf),
    ``s (|d num| / num + |d den| / den)`` (OAS). Doubled (two sides; ``fourth_error``, one side's, with it).

    ``cov_atol`` (c x c): what ``ds`` does to the shrunk covariance ``(1 - s) S + s mu I``:
    ``ds |mu I - S|`` entrywise, plus rounding the shrinkage itself (``3 eps`` of its entries). The error
    of ``S`` itself is :func:`covariance_atol`'s (``(1 - s) <= 1``).
    """
    x = np.atleast_2d(np.asarray(observations, dtype=np.float64))
    n, c = x.shape
    xc = x - x.mean(axis=0)
    s_mat = xc.T @ xc / n
    abs_s = np.abs(xc).T @ np.abs(xc) / n
    mu = np.trace(s_mat) / c
    frob = float(np.sum(s_mat**2))
    e1 = sum_error(n) + (c + 3) * eps(np.float64)
    d_frob = 2 * e1 * float(np.sum(abs_s**2))
    d_trace = e1 * float(np.trace(abs_s))
    distance = np.sum((s_mat - mu * np.eye(c)) ** 2)  # c * delta
    if c == 1:
        coef, d_coef = 0.0, 0.0
    elif method == "ledoit-wolf":
        fourth = float(np.sum(np.einsum("ij,ij->i", xc, xc) ** 2))
        beta = (fourth / n - frob) / (c * n)
        delta = distance / c
        d_beta = (e1 * fourth / n + fourth_error / n + d_frob) / (c * n)
        d_delta = (d_frob + 6 * mu * d_trace) / c  # d(frob - 2 mu trace + c mu^2)
        coef = 0.0 if delta <= 0 else min(beta, delta) / delta
        d_coef = math.inf if delta <= 0 else (d_beta + max(coef, 0.0) * d_delta) / delta
    elif method == "oas":
        num = frob / c**2 + mu**2
        den = (n + 1) * distance / c**2
        d_num = d_frob / c**2 + 2 * mu * d_trace / c
        d_den = (n + 1) * (d_frob + 2 * mu * d_trace) / c**2
        coef = 1.0 if den <= 0 else min(num / den, 1.0)
        d_coef = math.inf if den <= 0 else coef * (d_num / num + d_den / den)
    else:
        raise ValueError(f"unknown shrinkage {method!r}")
    coef_atol = TWO_SIDES * d_coef
    shrunk = (1 - coef) * s_mat + coef * mu * np.eye(c)
    cov_atol = coef_atol * np.abs(mu * np.eye(c) - s_mat) + TWO_SIDES * 3 * eps(np.float64) * np.abs(shrunk)
    return float(min(coef_atol, 1.0)), cov_atol


# --- moments, batched covariance, dask, LAPACK
def spd_factor_atol(a, dtype=np.float64) -> tuple[float, float]:
    """``(cholesky_atol, inverse_atol)``: entrywise differences allowed between two computations of the
    Cholesky factor ``R`` and of the inverse ``P`` of the same given SPD matrix ``a`` (c x c) in ``dtype``.

    Cholesky has a backward error ``|dA| <= 2 c eps |A|`` (Higham thm. 10.3, norm form), which moves the
    factor by ``|dR| <= kappa(A) 2 c eps |R|`` (Sun 1991; ``|R|_2 = |A|_2^1/2``). The inverse from the
    factor (a triangular inverse and a product, ``potri``) adds ``c eps`` to the backward error:
    ``|dP| <= kappa(A) 3 c eps |P|`` (Higham ch. 14). An entry is bounded by the 2-norm. Doubled.
    """
    m = np.atleast_2d(np.asarray(a, dtype=np.float64))
    c = m.shape[0]
    sv = np.linalg.svd(m, compute_uv=False)
    kappa = sv[0] / sv[-1]
    e = eps(dtype)
    return (
        float(TWO_SIDES * kappa * 2 * c * e * math.sqrt(sv[0])),
        float(TWO_SIDES * kappa * 3 * c * e / sv[-1]),
    )


def recursive_inverse_atol(a, dtype=np.float64) -> tuple[float, float]:
    """:func:`spd_factor_atol` for :class:`anomstats._lapack._RecursiveInverse`, which multiplies by the explicit
    inverses of its diagonal blocks' factors instead of solving with them.

    Block methods that use explicit inverses of diagonal blocks have backward errors larger by the condition
    number of those blocks (Du Croz & Higham 1992, "Stability of methods for matrix inversion"; Higham ch. 13-14).
    A diagonal block's factor ``U11`` of ``A = UᵀU`` has ``kappa(U11) <= kappa(U) = kappa(A)^1/2``: both bounds
    times ``kappa(A)^1/2``. A worst case: measured errors (cond 1e6-1e12, n = 129-600) were 0.2-2.5 times the
    LAPACK route's, far inside either bound; the tests using it catch wrong flags, offsets and signs (errors
    of order one), not a modest loss of accuracy.
    """
    chol_atol, inv_atol = spd_factor_atol(a, dtype)
    sv = np.linalg.svd(np.atleast_2d(np.asarray(a, dtype=np.float64)), compute_uv=False)
    extra = math.sqrt(sv[0] / sv[-1])
    return chol_atol * extra, inv_atol * extra


def gram_atol(rows, alpha: float = 1.0, dtype=np.float64) -> np.ndarray:
    """Entrywise differences allowed between two computations of ``alpha * rows^T rows`` (rows (n, c)).

    Each entry is a sum of n products (:func:`sum_error`, one rounding for the product, one for alpha) of
    the sum of magnitudes ``|alpha| (|rows|^T |rows|)_ij``. Doubled.
    """
    r = np.abs(np.asarray(rows, dtype=np.float64))
    return TWO_SIDES * (sum_error(r.shape[0], dtype) + 2 * eps(dtype)) * abs(alpha) * (r.T @ r)


def streaming_covariance_atol(x, weights=None, dtype=np.float64, ddof=1, *, streamed=True) -> np.ndarray:
    """Entrywise differences allowed between two computed covariances of ``x`` (..., n, c), one of them
    possibly streamed (``RunningMoments`` updates and merges) in ``dtype``; real or complex data.

    The one-pass part is :func:`covariance_atol`'s ``(sqrt(n) + 3) eps (|Xc|^T W |Xc|)_ij / norm``. A stream
    combines partial results with ``C_a + C_b + (n_a n_b / n) (m_a - m_b)(m_a - m_b)^H``; the partial means
    carry the mean's rounding ``delta = (sqrt(n) + 1) eps max|x|`` (:func:`mean_atol`, one side), which does
    NOT cancel in the difference of means (of size ``s``, the data's RMS deviation): it leaves
    ``sum(w) (delta_i s_j + s_i delta_j + delta_i delta_j) / norm``. Relative to the covariance that is
    ``~ sqrt(n) eps |offset| / s`` for a stream that sums raw values. The library's streams accumulate
    around a shift taken from the data (issue 11, point 5), so for them the bound is evaluated on
    ``x - x[0]`` (exact far from the origin) and the offset term vanishes; the generic form is kept for
    peers and for comparisons with unshifted sums. ``norm`` is
    ``sum(w) - ddof sum(w^2) / sum(w)``; it is itself computed with cancellation, a relative error
    ``(sqrt(n) + 2) eps (sum(w) + |ddof| sum(w^2) / sum(w)) / norm`` of every entry (large near ``ddof``'s
    degenerate normalisation, n = 3 with ddof = 2). ``streamed=False``: both computations centre at a
    one-shot mean (``batched_cov``, ``numpy.cov``), whose error cancels to first order (as in
    :func:`covariance_atol`): only ``sum(w) delta_i delta_j / norm`` remains. Doubled.
    """
    v = np.asarray(x)
    v = v.astype(np.complex128 if np.iscomplexobj(v) else np.float64)
    n = v.shape[-2]
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    e = eps(dtype)
    mean = np.tensordot(v, w, axes=([-2], [0])) / w.sum()
    centred = np.abs(v - mean[..., None, :])
    norm = w.sum() - ddof * (w @ w) / w.sum()
    norm = norm if norm > 0 else 1e-300
    normaliser = (sum_error(n, dtype) + 2 * e) * (w.sum() + abs(ddof) * (w @ w) / w.sum()) / norm
    first = (sum_error(n, dtype) + 3 * e + normaliser) * np.einsum("...ni,n,...nj->...ij", centred, w, centred) / norm
    s = np.sqrt(np.einsum("...ni,n->...i", centred**2, w) / w.sum())
    delta = (sum_error(n, dtype) + e) * np.abs(v).max(axis=-2)
    outer = lambda a, b: a[..., :, None] * b[..., None, :]  # noqa: E731
    cross = outer(delta, s) + outer(s, delta) if streamed else 0.0
    offset = w.sum() * (cross + outer(delta, delta)) / norm
    return TWO_SIDES * (first + offset)


# --------------------------------------------------------------------------- low-rank per-patch Gaussians
def low_rank_backward_error(n: int, c: int, dtype=np.float64) -> float:
    """``|dA| / |A|`` for the low-rank fit ``A = V diag(λ) Vᵀ + ρ (I − V Vᵀ)`` (c features, n observations).

    Both packages take the basis from the eigenpairs of the k×k Gram ``XᵀX`` of the centred (c, n)
    observations ``X``, kept where the columns are orthonormal to 256 eps and otherwise re-orthonormalised by
    one Cholesky-QR pass (:func:`anomstats._low_rank.basis_of_factor`). The Gram and its eigensolver move the
    scatter by ``~k eps`` of its norm and a basis orthonormal to 256 eps moves it by 256 eps: the bound is
    ``max(2 max(c, n), 256) eps`` (the first term is a thin SVD's backward error, Golub & Van Loan section
    8.6, which covers the Gram route's ``k eps``), except for directions under the ``64 k eps`` variance
    floor (zeroed there), which the tests' data do not have.
    Added to :func:`covariance_backward_error` (the centring, and the sums and Cholesky of the dense route: a
    safe over-count). Storing the basis in float32 (orthonormal to ``~sqrt(c) eps``) is within the float32
    value of either term.
    """
    return covariance_backward_error(n, c, dtype) + max(2 * max(int(n), int(c)), 256) * eps(dtype)


def _spectra(covariance) -> np.ndarray:
    a = np.asarray(covariance, dtype=np.float64)
    c = a.shape[-1]
    return np.linalg.eigvalsh(a.reshape(-1, c, c))[:, ::-1]  # (P, c), decreasing


def low_rank_eigenvalue_atol(covariance, n: int, dtype=np.float64, extra_error: float = 0.0) -> np.ndarray:
    """Per-patch (P, 1) absolute difference allowed between two computed eigenvalue sets ``λ`` of ``A``.

    Weyl's theorem: ``|dλ_i| <= |dA|_2 <= δ |A|_2`` with ``δ`` the :func:`low_rank_backward_error` (plus
    ``extra_error``, a further relative backward error such as a stream's merges). Doubled.
    """
    c = np.asarray(covariance).shape[-1]
    norms = _spectra(covariance)[:, :1]
    return TWO_SIDES * (low_rank_backward_error(n, c, dtype) + extra_error) * norms


def low_rank_basis_atol(covariance, width: int, n: int, dtype=np.float64) -> np.ndarray:
    """Per-column (P, 1, width) difference allowed between two computed bases (columns' signs aligned).

    Davis-Kahan's sin θ theorem: the unit eigenvector of an isolated eigenvalue ``λ_i`` of ``A`` moves by at
    most ``sqrt(2) |dA|_2 / gap_i`` once its sign is chosen, with ``gap_i`` the distance from ``λ_i`` to the
    rest of the spectrum (the other ``λ_j`` and, when ``width < c``, the ridge of the complement) and
    ``|dA|_2 <= δ |A|_2`` (:func:`low_rank_backward_error`). Doubled.
    """
    spectra = _spectra(covariance)
    c = spectra.shape[1]
    gaps = np.empty((spectra.shape[0], width))
    for i in range(width):
        others = np.delete(spectra, i, axis=1)
        gaps[:, i] = np.abs(others - spectra[:, i : i + 1]).min(axis=1) if c > 1 else np.inf
    bound = TWO_SIDES * math.sqrt(2) * low_rank_backward_error(n, c, dtype) * spectra[:, :1] / gaps
    return bound[:, None, :]


def low_rank_mahalanobis_tolerances(
    covariance, n: int, mean_error: float = 0.0, dtype=np.float64, *, shared_fit: bool = False,
    extra_error: float = 0.0,
) -> tuple[float, float]:
    """``(rtol, atol)`` between two computed Mahalanobis distances when either side is a low-rank fit.

    :func:`mahalanobis_tolerances` (the fit term ``kappa δ d²``, the dense evaluation, the means) with the
    fit's backward error grown by the basis route's ``max(2 max(c, n), 256) eps`` (:func:`low_rank_backward_error`) and
    ``extra_error`` (a stream's merges, relative to ``|A|_2``), plus the low-rank evaluation
    (:func:`low_rank_evaluation_rtol`, with the width bounded by c). Doubled.
    """
    rtol, atol = mahalanobis_tolerances(covariance, n, mean_error, dtype, shared_fit=shared_fit)
    spectra = _spectra(covariance)
    c = spectra.shape[1]
    rtol += low_rank_evaluation_rtol(covariance, c, dtype)
    if not shared_fit:
        kappa = float(np.max(spectra[:, 0] / spectra[:, -1]))
        rtol += TWO_SIDES * 0.5 * kappa * (max(2 * max(int(n), c), 256) * eps(dtype) + extra_error)
    return rtol, atol


def low_rank_evaluation_rtol(covariance, width: int, dtype=np.float64) -> float:
    """Relative difference allowed between two evaluations of low-rank distances on the same buffers.

    ``d² = Σ c_i²/λ_i + |δ − V c|²/ρ`` with ``c = Vᵀ δ``: each ``c_i`` (a c-term inner product with a unit
    column) is off by ``c eps |δ|``, so the projection term by ``2 c sqrt(r) eps |δ| sqrt(d² / ρ)``
    (Cauchy-Schwarz, ``λ_i >= ρ``); the residual by ``(sqrt(r) c + r + 1) eps |δ|`` and its term by twice
    that times ``|δ| |res| / ρ`` plus the c-term sum's ``c eps``. With ``|δ|² <= λ_max d²`` and
    ``|res|² <= ρ d²`` every term is ``sqrt(kappa) d²`` times ``eps`` (``kappa = λ_max / ρ``):
    ``|d d²| <= ((4 sqrt(r) + 1)(c + 2) + 2 r) eps sqrt(kappa) d²``; the square root halves it; doubled for
    the two sides. Unlike the dense ``δᵀ P δ`` (:func:`mahalanobis_tolerances`, ``kappa`` itself) nothing
    here cancels against ``1/ρ``.
    """
    spectra = _spectra(covariance)
    c = spectra.shape[1]
    kappa = float(np.max(spectra[:, 0] / spectra[:, -1]))
    return TWO_SIDES * 0.5 * ((4 * math.sqrt(width) + 1) * (c + 2) + 2 * width) * eps(dtype) * math.sqrt(kappa)


# --------------------------------------------------------------------------- half precision: outputs and buffers
def rounding_bounds(dtype) -> tuple[float, float]:
    """``(rtol, atol)`` of ONE rounding to ``dtype`` (round to nearest even), a value in its finite range.

    ``rtol = eps / 2`` (the unit roundoff: 2**-11 for float16, 2**-8 for bfloat16) for normal numbers and
    ``atol = tiny * eps / 2`` (half the spacing of the subnormals: 2**-25 for float16, 5e-41 for bfloat16)
    below them. Values beyond the dtype's largest finite number round to inf: not covered (tests keep away).
    """
    e = eps(dtype)
    return e / 2.0, _tiny(dtype) * e / 2.0


def _rounding_of(values, dtype) -> np.ndarray:
    """Entrywise bound on the rounding of ``values`` to ``dtype`` (``None``: not rounded, 0)."""
    if dtype is None:
        return np.zeros_like(np.asarray(values, dtype=np.float64))
    u, eta = rounding_bounds(dtype)
    return u * np.abs(np.asarray(values, dtype=np.float64)) + eta


def cast_mahalanobis_atol(queries, mean, precision, *, mean_dtype=None, precision_dtype=None, work_dtype=np.float32):
    """Absolute bound (B, P) on ``|d' - d|``: PaDiM distances from buffers rounded to half precision vs exact buffers.

    ``queries`` (B, C, P), ``mean`` (C, P), ``precision`` (P, C, C): the unrounded (e.g. float32) buffers.
    ``d`` is computed in ``work_dtype`` from them, ``d'`` in ``work_dtype`` from ``mean`` rounded to
    ``mean_dtype`` and ``precision`` rounded to ``precision_dtype`` (``None``: that buffer is not rounded), each
    entry off by ``|dm| <= m = u |mean| + eta`` and ``|dP| <= u |P| + eta`` (:func:`rounding_bounds`). With
    ``a = |x - mean|`` entrywise, ``d'^2 - d^2 = -2 dm^T P delta + dm^T P dm + delta'^T dP delta'``, so
    (exactly, not first order)::

        |d'^2 - d^2| <= 2 m^T |P| a + m^T |P| m + (a + m)^T |dP| (a + m)              (buffers' rounding)
                        + (c + 2) eps_w (a^T |P| a + (a + m)^T (|P| + |dP|) (a + m))  (each side's evaluation)

    (the evaluation bound of :func:`mahalanobis_tolerances`, on each side, entrywise instead of through the
    condition number). The square root turns a bound ``E`` on the squares into
    ``|d' - d| <= min(sqrt(E), E / d_lo)`` with ``d_lo^2 = max(d^2 - E_eval, 0)`` the smallest square the
    exact-buffer side can have computed, plus one rounding of each square root, ``eps_w d`` per side. ``d`` is
    taken from a float64 evaluation (its own error, ``~1e-16`` relative, is far inside ``eps_w``).
    """
    x = np.asarray(queries, dtype=np.float64)
    mu = np.asarray(mean, dtype=np.float64)
    p = np.asarray(precision, dtype=np.float64)
    c = x.shape[1]
    delta = x - mu[None]  # (B, C, P)
    a = np.abs(delta)
    m = np.broadcast_to(_rounding_of(mu, mean_dtype), mu.shape)[None] if mean_dtype is not None else np.zeros_like(mu)[None]
    pabs = np.abs(p)
    dp = _rounding_of(p, precision_dtype) if precision_dtype is not None else np.zeros_like(p)
    quad = lambda u, mat, v: np.einsum("bcp,pcd,bdp->bp", u, mat, v)  # noqa: E731
    am = a + m
    buffers = 2 * quad(np.broadcast_to(m, a.shape), pabs, a) + quad(np.broadcast_to(m, a.shape), pabs, np.broadcast_to(m, a.shape))
    buffers = buffers + quad(am, dp, am)
    ew = eps(work_dtype)
    eval_exact = (c + 2) * ew * quad(a, pabs, a)
    eval_cast = (c + 2) * ew * quad(am, pabs + dp, am)
    total = buffers + eval_exact + eval_cast
    d2 = np.maximum(quad(delta, p, delta), 0.0)
    d = np.sqrt(d2)
    d_lo = np.sqrt(np.maximum(d2 - eval_exact, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        by_ratio = np.where(d_lo > 0, total / np.where(d_lo > 0, d_lo, 1.0), np.inf)
    return np.minimum(np.sqrt(total), by_ratio) + 2 * ew * (d + np.sqrt(total))


def cast_kde_log_atol(queries, centre, centred, bw_transform, norm, *, buffer_dtype, work_dtype=np.float32) -> np.ndarray:
    """Bound (M,) on ``|log p' - log p|``: the adapter's KDE with its buffers rounded to ``buffer_dtype`` vs exact.

    The module's own fit evaluates ``p = norm / n * sum_j exp(-|y - t_j|^2 / 2)`` with ``y = (f - centre) L``
    and ``t_j`` the centred whitened data (``centred``); ``module.half()`` rounds ``centre``, ``L``
    (``bw_transform``), every ``t_j`` and ``norm`` (:func:`rounding_bounds`: ``|dX| <= u |X| + eta``). Then
    (exactly, triangle inequality) ``|y' - y| <= g = |dc| (|L| + |dL|) + |f - c| |dL|`` coordinatewise, and
    each exponent moves by ``|de_j| <= b_j = |y - t_j| . (g + |dt_j|) + |g + |dt_j||^2 / 2``. The log of the
    sum moves by at most ``log sum_j w_j exp(b_j)``, ``w_j`` the exact kernels' shares of the sum (Jensen's
    bound is below it: rigorous, not first order), and ``log norm`` by ``-log(1 - u)``. Rounding in the
    computations themselves (both sides, in ``work_dtype``) is added by the caller from :func:`kde_route_error`.
    """
    f = np.atleast_2d(np.asarray(queries, dtype=np.float64))
    c = np.asarray(centre, dtype=np.float64)
    t = np.asarray(centred, dtype=np.float64)
    lw = np.asarray(bw_transform, dtype=np.float64)
    u, _ = rounding_bounds(buffer_dtype)
    dc, dl, dt = _rounding_of(c, buffer_dtype), _rounding_of(lw, buffer_dtype), _rounding_of(t, buffer_dtype)
    y = (f - c) @ lw
    g = dc @ (np.abs(lw) + dl) + np.abs(f - c) @ dl  # (M, D)
    diff = np.abs(y[:, None, :] - t[None, :, :])  # (M, N, D)
    shift = g[:, None, :] + dt[None, :, :]
    b = (diff * shift).sum(-1) + 0.5 * (shift * shift).sum(-1)  # (M, N)
    expo = -0.5 * ((y[:, None, :] - t[None, :, :]) ** 2).sum(-1)
    top = expo.max(axis=1, keepdims=True)
    weights = np.exp(expo - top)
    weights /= weights.sum(axis=1, keepdims=True)
    norm_term = -math.log1p(-u) if float(norm) != 0 else 0.0
    return np.log((weights * np.exp(b)).sum(axis=1)) + norm_term
