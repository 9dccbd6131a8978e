"""Fault injection for the torch adapter's KDE (issue 11: points 1, 2, 3, 6, 9, 10, 13).

The adapter keeps every promise the core KDE makes (``tests/test_faults_kde.py``), with the core's exception
types and messages: degenerate data refused in every draw, normalisation that cannot overflow, NaN queries
refused and far queries scored 0 / -inf, finite gradients, argument checks, checkpoints checked before they
load, and a ``cov`` that follows ``numpy.cov``.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.linalg import LinAlgError

torch = pytest.importorskip("torch")

import anomstats  # noqa: E402
from anomstats_torch import DynamicBufferModule, GaussianKDE  # noqa: E402
from tests._tolerances import (  # noqa: E402
    ADAPTER32,
    TWO_SIDES,
    KDEErrorModel,
    adapter_loaded,
    adapter_route,
    assert_close_each,
    bandwidth_from_whitening,
    core_route,
    covariance_atol,
)
from tests.test_faults_kde import FEATURE, KINDS, SUBSPACE, degenerate_data, full_rank_data  # noqa: E402

DTYPES = st.sampled_from([np.float64, np.float32])


def _fit(x: np.ndarray) -> GaussianKDE:
    return GaussianKDE(torch.from_numpy(np.ascontiguousarray(x)))


# --------------------------------------------------------------------------- point 1: degenerate data
@given(seed=st.integers(0, 2**20), d=st.integers(2, 6), dtype=DTYPES, kind=KINDS)
def test_data_in_a_subspace_is_refused_with_the_cores_exception_and_message(seed, d, dtype, kind):
    x, involved = degenerate_data(seed, d, dtype, kind)
    tensor = torch.from_numpy(x)
    before = tensor.clone()
    kde = GaussianKDE()
    with pytest.raises(LinAlgError, match=SUBSPACE) as ours:
        kde.fit(tensor)
    with pytest.raises(LinAlgError) as core:
        anomstats.GaussianKDE(x.T)
    feature, of = map(int, FEATURE.search(str(ours.value)).groups())
    assert of == d and feature in involved
    # The same rank test on covariances of the same numbers (rounded differently: torch's and NumPy's sums):
    # the same verdict and the same named feature, the first that is a combination of those before it
    # (check_data_covariance picks it by index, not by a pivot order that rounding decides): the full message.
    assert str(ours.value) == str(core.value)
    assert torch.equal(tensor, before)
    assert kde.dataset.numel() == 0 and kde.bw_transform.numel() == 0  # a refused fit changes nothing


@given(
    seed=st.integers(0, 2**20),
    d=st.integers(2, 6),
    case=st.sampled_from([(np.float64, 1e-5), (np.float64, 1.0), (np.float32, 1e-3), (np.float32, 1.0)]),
)
def test_full_rank_data_is_never_refused(seed, d, case):
    # The margins of tests/test_faults_kde.py::test_full_rank_data_is_never_refused_however_ill_conditioned.
    dtype, residual = case
    x = full_rank_data(seed, d, dtype, residual)
    kde = _fit(x)
    assert torch.isfinite(kde.log_prob(torch.from_numpy(x[:3]))).all()


@pytest.mark.parametrize("n, d", [(1, 1), (2, 2), (3, 3), (5, 5), (1, 2), (2, 3), (4, 6)])
def test_few_points_get_the_cores_exception_and_message(n, d):
    # One rule (anomstats._validation.check_kde_data_shape, scipy's condition): d > n is a ValueError; n == d
    # points span at most d - 1 dimensions, so the rank test refuses them (LinAlgError), naming the same
    # feature; a single number is too few (the core's ValueError).
    x = np.random.default_rng(n * 10 + d).normal(size=(n, d))
    with pytest.raises(ValueError) as core:
        anomstats.GaussianKDE(x.T)
    with pytest.raises(ValueError) as ours:
        _fit(x)
    assert type(ours.value) is type(core.value)
    assert isinstance(ours.value, LinAlgError) == (n == d > 1)
    assert str(ours.value) == str(core.value)


def test_collinear_float32_data_of_the_issue_is_refused_in_every_draw():
    # The issue's case: the adapter accepted a feature that is a combination of others in most draws.
    for seed in range(20):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(200, 3)).astype(np.float32)
        x = np.column_stack([x, x[:, 0] * np.float32(0.7) + x[:, 1] * np.float32(1.3)])
        with pytest.raises(LinAlgError, match=SUBSPACE):
            _fit(x)


# --------------------------------------------------------------------------- point 2: normalisation
def test_tightly_clustered_float32_data_give_finite_log_densities():
    # The issue's case: std 1e-3 in D = 16, float32. The normaliser (~1e41) is beyond float32's range: the
    # anomalib-compatible `norm` buffer holds inf, the densities come from the log-normaliser.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g) * 1e-3
    kde = GaussianKDE(x)
    assert torch.isinf(kde.norm) and set(kde.state_dict()) == {"bw_transform", "dataset", "norm"}
    core = anomstats.GaussianKDE(x.double().numpy().T)
    near = x[:4] + 2e-4
    # Queries 1-3 standard deviations off a training point in every coordinate: log-densities from about 80
    # down to about -60, densities float32 can hold (exp(88.7) is its max, exp(-87.3) its smallest normal).
    steps = torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0]).repeat_interleave(4)[:, None] * 1e-3
    candidates = x[:4].repeat(5, 1) + steps
    log_candidates = core.logpdf(candidates.double().numpy().T)
    far = candidates[torch.from_numpy((log_candidates > -80) & (log_candidates < 80))]
    assert len(far) >= 4
    queries = torch.cat([near, far])
    want_log = core.logpdf(queries.double().numpy().T)
    assert (want_log[:4] > 89).all()  # exp(89) > float32's max 3.4e38
    # kde_route_error: the float64 fit stored in float32 and applied in float32 (expanded square), against
    # the core in float64 on the same float32 data.
    bound = KDEErrorModel.of(x.double().numpy(), queries.double().numpy(), core.covariance, (ADAPTER32, core_route(16)))
    got_log = kde.log_prob(queries)
    assert torch.isfinite(got_log).all()
    assert_close_each(got_log.double(), want_log, atol=bound.log_atol_each(want_log))
    densities = kde(queries)
    # forward overflows only where the true density exceeds float32's range (the near queries) ...
    assert torch.isinf(densities[:4]).all()
    # ... and is right elsewhere (same bound, relative to the density).
    assert_close_each(densities[4:].double(), np.exp(want_log[4:]), rtol=bound.rtol_each(want_log)[4:])
    # A checkpoint keeps anomalib's keys and the loaded module scores the same (shared whitening: only the
    # loaded route's own rounding, adapter_loaded).
    loaded = GaussianKDE()
    loaded.load_state_dict(kde.state_dict())
    h = bandwidth_from_whitening(kde.bw_transform.double())
    shared = KDEErrorModel.of(x.double().numpy(), queries.double().numpy(), h,
                              (adapter_route(16, np.float32), *adapter_loaded(16, np.float32)), shared_whitening=True)
    assert_close_each(loaded.log_prob(queries).double(), got_log.double(), atol=shared.log_atol_each(want_log))


def test_spread_data_in_many_dimensions_give_finite_log_densities():
    # The other side of the range: a normaliser below float32's smallest normal (norm = 0 in the buffer).
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 48, generator=g) * 1e3
    kde = GaussianKDE(x)
    assert kde.norm == 0
    queries = x[:3]
    core = anomstats.GaussianKDE(x.double().numpy().T)
    want_log = core.logpdf(queries.double().numpy().T)
    bound = KDEErrorModel.of(x.double().numpy(), queries.double().numpy(), core.covariance, (ADAPTER32, core_route(48)))
    assert_close_each(kde.log_prob(queries).double(), want_log, atol=bound.log_atol_each(want_log))


# --------------------------------------------------------------------------- point 3: NaN and far queries
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("method", ["forward", "log_prob"])
def test_non_finite_features_raise_naming_them(bad, method):
    kde = GaussianKDE(torch.randn(50, 3, generator=torch.Generator().manual_seed(2)))
    features = torch.tensor([[0.0, 0.0, 0.0], [bad, 0.0, 1.0]])
    before = features.clone()
    with pytest.raises(ValueError, match=re.escape("features must contain only finite values")):
        getattr(kde, method)(features)
    torch.testing.assert_close(features, before, rtol=0, atol=0, equal_nan=True)  # untouched


@given(
    seed=st.integers(0, 2**16),
    d=st.integers(1, 5),
    exponent=st.integers(0, 308),
    mantissa=st.floats(1.0, 1.79),
    signs=st.integers(0, 31),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
@settings(max_examples=60)
def test_finite_features_at_any_distance_give_zero_or_a_log_never_nan(seed, d, exponent, mantissa, signs, dtype):
    g = torch.Generator().manual_seed(seed)
    kde = GaussianKDE(torch.randn(40, d, generator=g, dtype=dtype) * 10.0 ** (seed % 7 - 3))
    sign = torch.tensor([1.0 if (signs >> k) & 1 else -1.0 for k in range(d)], dtype=torch.float64)
    value = sign * mantissa * 10.0**exponent
    top = torch.finfo(dtype).max
    features = value.clamp(-top, top).to(dtype)[None, :]
    density, log_density = kde(features), kde.log_prob(features)
    assert not torch.isnan(density).any() and not torch.isnan(log_density).any()
    assert density.item() >= 0 and log_density.item() < math.inf
    reach = 20 if dtype == torch.float32 else 155  # whitened squared norms overflow beyond ~1e19 / ~1e154
    if exponent >= reach + 3:  # beyond float's range whatever the bandwidth (data scales 1e-3..1e3)
        assert density.item() == 0.0 and log_density.item() == -math.inf


def test_traced_and_exported_graphs_skip_the_check_and_score_nan_for_bad_rows():
    x = torch.randn(100, 3, generator=torch.Generator().manual_seed(3))
    kde = GaussianKDE(x).eval()
    example = torch.randn(4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(kde, example)
    exported = torch.export.export(kde, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    rows = torch.tensor([[math.nan, 0.0, 0.0], [1e19, 0.0, 0.0], [0.1, 0.2, 0.3], [-math.inf, 0.0, 0.0]])
    for graph in (traced, exported):
        got = graph(rows)
        # A NaN or infinite query scores NaN (never a plausible density); a far finite query 0, as in eager mode.
        assert math.isnan(got[0]) and math.isnan(got[3]) and got[1] == 0.0
        eager = kde(rows[2:3])
        # A good row as in eager mode: the same buffers, the graph's streaming log-sum-exp against the eager
        # plain sum: kde_route_error of two float32 routes on a shared whitening.
        h = bandwidth_from_whitening(kde.bw_transform.double())
        bound = KDEErrorModel.of(x.double().numpy(), rows[2:3].double().numpy(), h,
                                 (ADAPTER32, ADAPTER32), shared_whitening=True)
        want_log = kde.log_prob(rows[2:3]).double().numpy()
        assert_close_each(got[2:3], eager, rtol=bound.rtol_each(want_log))


# --------------------------------------------------------------------------- point 9: gradients
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [1, 2, 3, 8])
def test_gradients_are_finite_at_training_points_and_far_away(dtype, d):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(150, d, generator=g, dtype=dtype) * 0.5 + 3.0
    kde = GaussianKDE(x)
    top = torch.finfo(dtype).max
    points = [x[:3], x[:3] + 1e3, torch.full((1, d), 1e19, dtype=dtype), torch.full((1, d), -top, dtype=dtype)]
    for point in points:
        for method in (kde.log_prob, kde.forward):
            q = point.clone().requires_grad_(True)
            method(q).sum().backward()
            assert torch.isfinite(q.grad).all(), (method.__name__, point[0, 0].item())
    # At a training point the gradient of log p is that of a finite sum of Gaussians: check it against
    # finite differences in float64 (torch.autograd.gradcheck: its own default tolerances, 1e-5 relative, far
    # above the float64 rounding of these O(1) values).
    if dtype == torch.float64:
        q = x[:2].clone().requires_grad_(True)
        assert torch.autograd.gradcheck(kde.log_prob, (q,))


# --------------------------------------------------------------------------- point 6: checkpoint consistency
def _fitted(d=3, n=40, seed=5):
    return GaussianKDE(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))


INCONSISTENT = [
    ("bw_transform (3, 3) with dataset (40, 4)", lambda s: {**s, "dataset": torch.zeros(40, 4, dtype=torch.float64)}, "dataset must be"),
    ("non-square bw_transform", lambda s: {**s, "bw_transform": torch.eye(3, 4, dtype=torch.float64)}, "bw_transform must be"),
    ("norm of shape (2,)", lambda s: {**s, "norm": torch.ones(2, dtype=torch.float64)}, "norm must be 0-d"),
    ("empty dataset", lambda s: {**s, "dataset": torch.zeros(0, 3, dtype=torch.float64)}, "dataset must be"),
    ("NaN in the dataset", lambda s: {**s, "dataset": s["dataset"].clone().fill_(math.nan)}, "dataset must be finite"),
    ("negative diagonal", lambda s: {**s, "bw_transform": -s["bw_transform"]}, "positive diagonal"),
    # An upper-triangular entry: the diagonal would no longer give log det, so the normaliser would be wrong.
    ("not lower-triangular", lambda s: {**s, "bw_transform": s["bw_transform"] + torch.triu(torch.full_like(s["bw_transform"], 0.25), 1)}, "bw_transform must be lower-triangular"),
    ("transposed factor", lambda s: {**s, "bw_transform": s["bw_transform"].mT.contiguous()}, "bw_transform must be lower-triangular"),
    ("half an unfitted state", lambda s: {"bw_transform": s["bw_transform"], "dataset": torch.empty(0, dtype=torch.float64), "norm": torch.empty(0, dtype=torch.float64)}, "dataset must be"),
]


@pytest.mark.parametrize("what, corrupt, match", INCONSISTENT, ids=[c[0] for c in INCONSISTENT])
def test_the_consistency_hook_refuses_buffers_that_do_not_fit_together(what, corrupt, match):
    kde = _fitted()
    state = {k: v.clone() for k, v in kde.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"Error\(s\) in loading state_dict for GaussianKDE: inconsistent buffers: ") as error:
        kde._check_state_consistency(corrupt(state))
    assert match in str(error.value) and "nothing was loaded" in str(error.value)
    kde._check_state_consistency(state)  # the module's own state fits
    GaussianKDE()._check_state_consistency({k: torch.empty(0) for k in state})  # an unfitted state too
    GaussianKDE()._check_state_consistency({})  # nothing of this module in the checkpoint


HOOK = hasattr(DynamicBufferModule, "_check_state_consistency")


@pytest.mark.xfail(not HOOK, reason="needs DynamicBufferModule's _check_state_consistency hook (issue 11, point 6)", strict=True)
@pytest.mark.parametrize("what, corrupt, match", INCONSISTENT, ids=[c[0] for c in INCONSISTENT])
@pytest.mark.parametrize("target", ["fitted", "fresh"])
def test_an_inconsistent_checkpoint_raises_and_leaves_the_module_unchanged(what, corrupt, match, target):
    # LANDS WITH THE HOOK: load_state_dict must call _check_state_consistency before resizing anything.
    source = _fitted()
    module = _fitted(seed=6) if target == "fitted" else GaussianKDE().double()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    queries = torch.randn(5, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    scores = module(queries) if target == "fitted" else None
    state = corrupt({k: v.clone() for k, v in source.state_dict().items()})
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=match):
            module.load_state_dict(state, strict=strict)
        after = module.state_dict()
        assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
        if scores is not None:
            assert torch.equal(module(queries), scores)  # exact: the same buffers and centring


def test_a_consistent_checkpoint_still_loads():
    source, target = _fitted(), GaussianKDE().double()
    target.load_state_dict(source.state_dict())
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())


# --------------------------------------------------------------------------- point 10: argument parity
def test_boolean_data_and_features_count_as_zero_and_one():
    rng = np.random.default_rng(8)
    data = torch.from_numpy(rng.random((80, 3)) > 0.4)
    features = torch.from_numpy(rng.random((5, 3)) > 0.5)
    kde, as_float = GaussianKDE(data), GaussianKDE(data.float())
    # Exact (bound 0): bool -> float is exact, so the same float32 computation runs on 0.0 / 1.0.
    assert all(torch.equal(a, b) for a, b in zip(kde.state_dict().values(), as_float.state_dict().values()))
    assert torch.equal(kde(features), kde(features.float()))
    assert torch.equal(kde.log_prob(features), kde.log_prob(features.float()))
    core = anomstats.GaussianKDE(data.numpy().T)  # the core takes boolean data and points too
    assert np.isfinite(core.logpdf(features.numpy().T)).all()


@pytest.mark.parametrize("shape", [(3,), (2, 4), (2, 3, 1), (3, 2), ()])
def test_wrongly_shaped_features_name_the_expected_shape(shape):
    kde = GaussianKDE(torch.randn(30, 3, generator=torch.Generator().manual_seed(9)))
    for method in (kde.forward, kde.log_prob):
        with pytest.raises(ValueError, match=re.escape("features must have shape (M, 3) to match the fitted dataset, got " + str(tuple(shape)))):
            method(torch.zeros(shape))


@pytest.mark.parametrize("bw_method", [math.inf, -math.inf, 0, 0.0, -1, -0.5, math.nan, np.float64(np.nan), np.int64(0)])
def test_unusable_bandwidth_factors_get_the_cores_exception_and_message(bw_method):
    x = np.random.default_rng(10).normal(size=(30, 2))
    with pytest.raises(ValueError) as core:
        anomstats.GaussianKDE(x.T, bw_method=bw_method)
    with pytest.raises(ValueError) as ours:
        GaussianKDE(torch.from_numpy(x), bw_method=bw_method)
    assert str(ours.value) == str(core.value)
    assert "positive, finite real number" in str(ours.value)
    kde = GaussianKDE()  # a rule set after construction is checked at fit, with the same message
    kde.bw_method = bw_method
    with pytest.raises(ValueError, match=re.escape(str(core.value))):
        kde.fit(torch.from_numpy(x))


def test_numpy_integers_are_accepted_where_python_ints_are():
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(11))
    a = GaussianKDE(x, bw_method=np.int64(1), chunk_bytes=np.int64(2**20))
    b = GaussianKDE(x, bw_method=1, chunk_bytes=2**20)
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))  # exact
    assert a.chunk_bytes == 2**20 and type(a.chunk_bytes) is int
    assert torch.equal(GaussianKDE.cov(x.T, ddof=np.int64(2)), GaussianKDE.cov(x.T, ddof=2))


# --------------------------------------------------------------------------- point 13: cov is numpy.cov
def _cov_outcome(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return "value", np.asarray(fn(), dtype=np.float64), [w.category for w in caught]
        except Exception as exc:  # noqa: BLE001 - the exception type is what is compared
            return "error", type(exc), str(exc)


@given(
    seed=st.integers(0, 2**16),
    variables=st.integers(1, 4),
    observations=st.integers(1, 12),
    rowvar=st.booleans(),
    bias=st.booleans(),
    ddof=st.sampled_from([None, 0, 1, 2, 5, 2.0, 1.5, -1]),
    weights=st.sampled_from([None, "random", "zeros", "negative", "short", "matrix", "one_zero"]),
)
@settings(max_examples=120)
def test_cov_follows_numpy_cov_for_every_argument(seed, variables, observations, rowvar, bias, ddof, weights):
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(variables, observations)) * 3.0 + 1.0
    if not rowvar:
        data = data.T.copy()
    w = {
        None: None,
        "random": rng.random(observations) + 0.1,
        "zeros": np.zeros(observations),
        "negative": np.concatenate([[-1.0], np.ones(observations - 1)]),
        "short": np.ones(observations + 1),
        "matrix": np.ones((2, observations)),
        "one_zero": np.concatenate([[0.0], np.ones(observations - 1)]),
    }[weights]
    want = _cov_outcome(lambda: np.cov(data, rowvar=rowvar, bias=bias, ddof=ddof, aweights=w))
    tensor_w = None if w is None else torch.from_numpy(w)
    got = _cov_outcome(lambda: GaussianKDE.cov(torch.from_numpy(data), rowvar=rowvar, bias=bias, ddof=ddof, aweights=tensor_w))
    assert got[0] == want[0], (got, want)
    if want[0] == "error":
        assert got[1] is want[1]  # numpy's exception type (ValueError, RuntimeError, ZeroDivisionError)
        # and numpy's message: every fault drawn here is checked by the core's numpy-exact validators
        # (check_ddof(numpy_exact=True), as_analytic_weights, the zero-sum check of anomstats._weights).
        assert got[2] == want[2]
        return
    # numpy's RuntimeWarning where the degrees of freedom are not positive (numpy adds its division's own).
    assert (RuntimeWarning in got[2]) == (RuntimeWarning in want[2])
    expected = np.atleast_2d(want[1])
    assert got[1].shape == expected.shape  # (D, D) always; numpy squeezes one variable to 0-d (documented)
    # inf/NaN exactly where numpy's are (no degrees of freedom: x/0 is inf, 0/0 NaN). With a single observation
    # of positive weight the exact centred sums are 0 (0/0): numpy's weighted mean (Σwx)/Σw may round off x and
    # leave a residual (inf), the adapter's w/Σw = 1 does not (NaN); only non-finiteness is then compared.
    finite = np.isfinite(expected)
    assert np.array_equal(np.isfinite(got[1]), finite)
    if (observations if w is None else np.count_nonzero(w)) > 1:
        assert np.array_equal(np.isnan(got[1]), np.isnan(expected))
    if finite.all() and observations > 1:
        # Bound: tests/_tolerances.covariance_atol, both sides' rounding of the sums S_ij of the n weighted
        # products of centred data, (sqrt(n) + 3)·eps relative to |Xc|ᵀW|Xc| (the sum, the products, the
        # division), divided by numpy's ddof = 1 normaliser norm1 = Σw − Σw²/Σw. The entries here are the same
        # sums divided by this call's normaliser norm = Σw − ddof·Σw²/Σw (numpy's: ddof = 0 for bias, 1 by
        # default), so the bound is rescaled by norm1/|norm|. The adapter also rounds the weights to w/Σw and
        # the normaliser to norm/Σw before dividing: two more roundings of eps relative to each entry, against
        # the (sqrt(n) + 3)·eps >= 4·eps per side already counted: at most a factor 1.5 on the bound (2 here).
        # The normaliser itself cancels where ddof·Σw²/Σw is close to Σw (ddof = 5 of 6 weighted points leave
        # norm ~ 0.05 of Σw ~ 2.7): each side sums Σw and Σw² in its own order, (sqrt(n) + 3)·eps relative to
        # Σw + |ddof|·Σw²/Σw (the sums, the product, the division, the difference), which reaches every entry
        # relative to |norm|.
        used_ddof = (0 if bias else 1) if ddof is None else int(ddof)
        weighted = w if weights in ("random", "one_zero") else None  # the other kinds raised above
        unit = np.ones(observations) if weighted is None else weighted
        total, squares = unit.sum(), np.dot(unit, unit)
        norm1 = max(total - squares / total, 1e-300)  # covariance_atol's normaliser (its floor too)
        norm = total - used_ddof * squares / total
        sums = covariance_atol(data.T if rowvar else data, weighted) * (norm1 / abs(norm)) * 2.0
        cancellation = (math.sqrt(observations) + 3) * np.finfo(np.float64).eps * (total + abs(used_ddof) * squares / total) / abs(norm)
        assert_close_each(got[1], expected, atol=sums + TWO_SIDES * cancellation * np.abs(expected))


def test_cov_keeps_anomalibs_call_and_never_touches_its_input():
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(12), dtype=torch.float64) + 5.0
    before = x.clone()
    got = GaussianKDE.cov(x)
    assert torch.equal(x, before) and got.shape == (3, 3)
    # Bound: covariance_atol on both sides (numpy's cov of the same float64 numbers).
    assert_close_each(got.numpy(), np.cov(x.numpy()), atol=covariance_atol(x.numpy().T))
    assert GaussianKDE.cov(x[:1]).shape == (1, 1)


# --------------------------------------------------------------------------- the same faults on the device
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_the_faults_on_the_modules_device(device):
    # Fit and scoring run on the data's device (the rank test on a host copy of the D x D covariance).
    rng = np.random.default_rng(13)
    base = rng.normal(size=(300, 3)).astype(np.float32)
    collinear = torch.from_numpy(np.column_stack([base, base[:, 0] * np.float32(0.7) + base[:, 1]])).to(device)
    with pytest.raises(LinAlgError, match=SUBSPACE):
        GaussianKDE(collinear)
    g = torch.Generator().manual_seed(14)
    x = (torch.randn(500, 16, generator=g) * 1e-3).to(device)
    kde = GaussianKDE(x)
    assert torch.isinf(kde.norm) and kde.norm.device.type == device
    queries = torch.cat([x[:2] + 2e-4, torch.full((1, 16), 3e38, device=device)])
    log_density = kde.log_prob(queries)
    core = anomstats.GaussianKDE(x.double().cpu().numpy().T)
    want_log = core.logpdf(queries[:2].double().cpu().numpy().T)
    # kde_route_error of the float32 adapter against the float64 core (the first test of point 2).
    bound = KDEErrorModel.of(x.double().cpu().numpy(), queries[:2].double().cpu().numpy(), core.covariance,
                             (ADAPTER32, core_route(16)))
    assert_close_each(log_density[:2].double().cpu(), want_log, atol=bound.log_atol_each(want_log))
    assert log_density[2].item() == -math.inf and kde(queries)[2].item() == 0.0
    with pytest.raises(ValueError, match="features must contain only finite values"):
        kde(torch.full((1, 16), math.nan, device=device))
    for point in (x[:2], torch.full((1, 16), -3e38, device=device)):
        q = point.clone().requires_grad_(True)
        kde.log_prob(q).sum().backward()
        assert torch.isfinite(q.grad).all()
    state = {k: v.clone() for k, v in kde.state_dict().items()}
    with pytest.raises(RuntimeError, match="inconsistent buffers"):
        kde._check_state_consistency({**state, "dataset": state["dataset"][:, :3]})
