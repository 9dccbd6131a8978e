"""Dask inputs: tree-reduced fits equal the in-memory ones; scores come back lazily, chunk by chunk.

Run with dask's synchronous scheduler and with a two-process ``distributed.LocalCluster`` (one
module-scoped cluster), through the public API (the ``anomstats._dask.dispatch`` decorator routes dask
input) and, for the reduction tree's fan-in, through ``anomstats._dask.reduce_observations``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from unittest import mock
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")

import anomstats  # noqa: E402
from anomstats import GaussianKDE, RunningMoments, _dask  # noqa: E402

from tests._tolerances import (  # noqa: E402
    KDEErrorModel,
    assert_close_each,
    core_route,
    mahalanobis_tolerances,
    mean_atol,
    patch_covariances,
    precision_atol,
    streaming_covariance_atol,
)


def _assert_cov(got, x, ddof=1, aweights=None, dtype=np.float64) -> None:
    """Covariances of x (N, C, *batch) within tests/_tolerances.streaming_covariance_atol: dask merges
    chunks' moments, so the streamed means' sqrt(n) eps |offset| / s relative loss (offset 100) is in it."""
    view = np.moveaxis(np.asarray(x, dtype=np.float64), (0, 1), (-2, -1))
    atol = streaming_covariance_atol(view, aweights, dtype, ddof)
    assert_close_each(got, _per_batch_cov(x, ddof=ddof, aweights=aweights), atol=atol)


def _assert_mean(got, expected, x) -> None:
    """Bound: mean_atol of the data's magnitude (n terms and a division, both sides)."""
    assert_close_each(got, expected, atol=mean_atol(np.abs(x).max(), x.shape[0]))


def _assert_kde(kde, q, got, method) -> None:
    """Bound: KDEErrorModel of two computations of the same fit (shared whitening) by the core's route."""
    routes = (core_route(kde.d), core_route(kde.d))
    points = q.T if q.ndim > 1 else q[:, None]
    model = KDEErrorModel.of(kde.dataset.T, points, kde.covariance, routes, shared_whitening=True)
    expected = getattr(kde, method)(q)
    log_ref = expected if method == "logpdf" else kde.logpdf(q)
    if method == "logpdf":
        assert_close_each(got, expected, atol=model.log_atol_each(log_ref))
    else:
        assert_close_each(got, expected, rtol=model.rtol_each(log_ref), atol=model.atol())


def _assert_precision(got, expected, emb, ridge) -> None:
    """Bound: precision_atol of the regularised covariances, plus the streamed fit's covariance error
    (streaming_covariance_atol, its offset term included) carried to the inverse: |dP| <= |P|_2^2 |dA|_F."""
    a = patch_covariances(emb, ridge)
    view = np.moveaxis(np.asarray(emb, dtype=np.float64), (0, 1), (-2, -1)).reshape(-1, emb.shape[0], emb.shape[1])
    d_a = np.linalg.norm(streaming_covariance_atol(view), axis=(-2, -1))
    p_norm = 1.0 / np.linalg.eigvalsh(a)[:, 0]
    atol = precision_atol(a, emb.shape[0]) + float(np.max(p_norm**2 * d_a))
    assert_close_each(got, expected, atol=atol)


def _assert_scores(model, q, got, method, kwargs) -> None:
    """Bound: mahalanobis_tolerances with the shared fit (the same stored mean and precision): rtol of the
    distance, twice that for its square; logpdf = -d^2 / 2 + const: that much of d^2 / 2 plus 4 roundings
    of the magnitudes involved."""
    expected = getattr(model, method)(q, **kwargs)
    cov = np.linalg.inv(np.asarray(model.precision, dtype=np.float64))
    rtol, _ = mahalanobis_tolerances(cov, 2, shared_fit=True)
    if method == "mahalanobis":
        assert_close_each(got, expected, rtol=2 * rtol if kwargs.get("squared") else rtol)
    else:
        d2 = model.mahalanobis(q, squared=True)
        eps64 = np.finfo(np.float64).eps
        assert_close_each(got, expected, atol=2 * rtol * d2 / 2 + 4 * eps64 * (np.abs(expected) + d2))


def _per_batch_cov(x: np.ndarray, ddof: int = 1, aweights: np.ndarray | None = None) -> np.ndarray:
    """(N, C, *batch) → (*batch, C, C) by a loop of numpy.cov."""
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    out = [np.cov(flat[:, :, i], rowvar=False, ddof=ddof, aweights=aweights) for i in range(flat.shape[2])]
    return np.stack(out).reshape(*x.shape[2:], c, c)


def _data(n: int = 60, c: int = 4, batch: tuple[int, ...] = (3, 2), offset: float = 100.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, c, *batch))
    x[:, 1] += 0.5 * x[:, 0]
    return x + offset


@pytest.fixture(scope="module")
def client() -> Iterator[object]:
    cluster = distributed.LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
    )
    client = distributed.Client(cluster, set_as_default=False)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


@pytest.fixture(params=["sync", "distributed"])
def scheduler(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "sync":
        with dask.config.set(scheduler="synchronous"):
            yield "sync"
    else:
        client = request.getfixturevalue("client")
        with dask.config.set(scheduler=client.get):
            yield "distributed"


def _dispatches(owner: object, name: str) -> bool:
    """Whether ``owner.name`` carries the dask dispatch decorator (anomstats._dask.dispatch)."""
    return hasattr(getattr(owner, name), "__dask_dispatch__")


# --------------------------------------------------------------------------------------------- basics


def test_is_dask_array() -> None:
    assert _dask.is_dask_array(da.ones(3))
    assert not _dask.is_dask_array(np.ones(3))
    assert not _dask.is_dask_array([1.0, 2.0])


def test_numpy_users_never_import_dask() -> None:
    code = (
        "import sys, numpy as np, anomstats\n"
        "from anomstats import _dask\n"
        "anomstats.batched_cov(np.ones((3, 2, 2)))\n"
        "assert not _dask.is_dask_array(np.ones(2))\n"
        "assert 'dask' not in sys.modules, sorted(m for m in sys.modules if 'dask' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------- fitting


def test_batched_cov_is_lazy_and_exact(scheduler: str) -> None:
    x = _data()
    before = x.copy()
    dx = da.from_array(x, chunks=(7, 2, 3, 1))  # chunked along every axis, also var and batch
    with mock.patch.object(_dask, "DEFAULT_SPLIT_EVERY", 2):
        c = anomstats.batched_cov(dx)
    assert _dask.is_dask_array(c)
    assert c.shape == (3, 2, 4, 4) and c.dtype == np.float64
    _assert_cov(c.compute(), x)
    np.testing.assert_array_equal(x, before)


@given(
    cuts=st.lists(st.integers(min_value=1, max_value=29), max_size=6, unique=True),
    split_every=st.integers(min_value=2, max_value=5),
    ddof=st.integers(min_value=0, max_value=2),
)
def test_batched_cov_any_chunking_sync(cuts: list[int], split_every: int, ddof: int) -> None:
    x = _data(n=30, c=3, batch=(2,), seed=1)
    bounds = [0, *sorted(cuts), 30]
    chunks = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    dx = da.from_array(x, chunks=(chunks, 3, 2))
    with mock.patch.object(_dask, "DEFAULT_SPLIT_EVERY", split_every):
        got = anomstats.batched_cov(dx, ddof=ddof).compute(scheduler="sync")
    _assert_cov(got, x, ddof=ddof)


def test_batched_cov_other_axes_and_dtype() -> None:
    x = _data(n=20, c=3, batch=(2,), seed=2)
    moved = np.moveaxis(x, (0, 1), (2, 0))  # (C, batch, N): var_axis=0, obs_axis=2
    dx = da.from_array(moved, chunks=(3, 2, 6))
    got = anomstats.batched_cov(dx, obs_axis=2, var_axis=0).compute(scheduler="sync")
    _assert_cov(got, x)
    got32 = anomstats.batched_cov(da.from_array(x.astype(np.float32), chunks=(5, 3, 2)), dtype=np.float32)
    assert got32.dtype == np.float32
    assert got32.compute(scheduler="sync").dtype == np.float32


def test_batched_cov_weights(scheduler: str) -> None:
    x = _data(n=30, c=3, batch=(2,), seed=3)
    w = np.random.default_rng(3).uniform(0.1, 2.0, size=30)
    dx = da.from_array(x, chunks=(8, 3, 2))
    _assert_cov(anomstats.batched_cov(dx, aweights=w).compute(), x, aweights=w)
    dw = da.from_array(w, chunks=11)  # mismatched chunks are realigned
    _assert_cov(anomstats.batched_cov(dx, aweights=dw).compute(), x, aweights=w)


def test_running_moments_update(scheduler: str) -> None:
    x = _data(n=45, c=3, batch=(2, 2), seed=4)
    first = x[:5]
    moments = RunningMoments().update(first)
    result = moments.update(da.from_array(x[5:], chunks=(9, 3, 2, 2)))
    assert result is moments
    one_shot = RunningMoments().update(x)
    assert moments.count == 45
    _assert_mean(moments.mean, one_shot.mean, x)
    # Bound: both streamed (streaming_covariance_atol against numpy's one-shot each; the triangle inequality).
    view = np.moveaxis(x, (0, 1), (-2, -1))
    assert_close_each(moments.covariance(), one_shot.covariance(), atol=2 * streaming_covariance_atol(view))
    _assert_cov(moments.covariance(), x)


def test_running_moments_update_keeps_the_configuration() -> None:
    x = _data(n=30, c=3, batch=(2,), offset=1.0, seed=11).astype(np.float32)
    expected = RunningMoments(dtype=np.float32).update(x).covariance()
    with dask.config.set(scheduler="synchronous"):
        moments = RunningMoments(dtype=np.float32).update(da.from_array(x, chunks=(7, 3, 2)))
    got = moments.covariance()
    assert got.dtype == np.float32
    # Bound: streaming_covariance_atol in float32, both sides streamed (twice it).
    view = np.moveaxis(x, (0, 1), (-2, -1))
    assert_close_each(got, expected, atol=2 * streaming_covariance_atol(view, dtype=np.float32))


def test_running_moments_delayed() -> None:
    x = _data(n=12, c=2, batch=(), seed=5)
    delayed = _dask.reduce_observations(RunningMoments(), da.from_array(x, chunks=(5, 2)), 0)
    moments = delayed.compute(scheduler="sync")
    assert_close_each(moments.covariance(), np.cov(x, rowvar=False), atol=streaming_covariance_atol(x))


def test_fitting_errors() -> None:
    dx = da.ones((10, 3), chunks=(5, 3))
    with pytest.raises(ValueError, match="split_every must be an integer >= 2"):
        _dask.reduce_observations(RunningMoments(), dx, 0, split_every=1)
    # Dask input gets the in-memory path's validation: the same exception types and messages.
    with pytest.raises(ValueError, match="must name two different axes"):
        anomstats.batched_cov(dx, obs_axis=1, var_axis=1)
    with pytest.raises(ValueError, match="obs_axis=2 is out of range"):
        anomstats.batched_cov(dx, obs_axis=2)
    with pytest.raises(RuntimeError, match=r"9 weights for 10 observations along obs_axis"):
        anomstats.batched_cov(dx, aweights=np.ones(9))
    with pytest.raises(TypeError, match="x must be a dask array"):
        _dask.reduce_observations(RunningMoments(), np.ones((10, 3)), 0)


# --------------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("method", ["pdf", "logpdf"])
def test_kde_scores_lazily(scheduler: str, method: str) -> None:
    rng = np.random.default_rng(6)
    kde = GaussianKDE(rng.normal(size=(3, 80)))
    q = rng.normal(size=(3, 25)) * 2
    before = q.copy()
    out = getattr(kde, method)(da.from_array(q, chunks=(2, 7)))
    assert _dask.is_dask_array(out)
    assert out.shape == (25,) and out.numblocks == (4,)
    expected = getattr(kde, method)(q)
    assert out.dtype == expected.dtype
    got = out.compute()
    _assert_kde(kde, q, got, method)
    np.testing.assert_array_equal(q, before)


def test_kde_one_dimensional_points_and_errors() -> None:
    rng = np.random.default_rng(7)
    kde1 = GaussianKDE(rng.normal(size=40))
    q = rng.normal(size=11)
    got = kde1.pdf(da.from_array(q, chunks=4)).compute(scheduler="sync")
    _assert_kde(kde1, q, got, "pdf")
    kde2 = GaussianKDE(rng.normal(size=(2, 40)))
    # The in-memory path's shape check and message (dask parity).
    with pytest.raises(ValueError, match=r"points have dimension 3, dataset has dimension 2"):
        kde2.pdf(da.ones((3, 5)))


# --------------------------------------------------------------------------------------------- Gaussian

def test_gaussian_fit_partial_fit_and_scores(scheduler: str) -> None:
    emb = _data(n=40, c=3, batch=(2, 2), offset=5.0, seed=8)
    before = emb.copy()
    reference = anomstats.MultiVariateGaussian().fit(emb)
    dx = da.from_array(emb, chunks=(9, 3, 2, 2))
    model = anomstats.MultiVariateGaussian().fit(dx)
    _assert_mean(model.mean, reference.mean, emb)
    _assert_precision(model.precision, reference.precision, emb, reference.ridge)
    streamed = anomstats.MultiVariateGaussian().partial_fit(emb[:4])
    streamed.partial_fit(da.from_array(emb[4:], chunks=(10, 3, 2, 2)))
    _assert_precision(streamed.precision, reference.precision, emb, reference.ridge)
    q = _data(n=11, c=3, batch=(2, 2), offset=5.0, seed=9)
    dq = da.from_array(q, chunks=(4, 3, 2, 2))
    for method, kwargs in [("mahalanobis", {}), ("mahalanobis", {"squared": True}), ("logpdf", {})]:
        out = getattr(reference, method)(dq, **kwargs)
        assert _dask.is_dask_array(out) and out.shape == (11, 2, 2) and out.numblocks == (3, 1, 1)
        _assert_scores(reference, q, out.compute(), method, kwargs)
    np.testing.assert_array_equal(emb, before)


def test_gaussian_fit_keeps_the_configuration() -> None:
    emb = _data(n=30, c=3, batch=(2,), offset=5.0, seed=12)
    reference = anomstats.MultiVariateGaussian(ridge=0.5).fit(emb)
    with dask.config.set(scheduler="synchronous"):
        model = anomstats.MultiVariateGaussian(ridge=0.5).fit(da.from_array(emb, chunks=(8, 3, 2)))
    assert model.ridge == 0.5
    _assert_precision(model.precision, reference.precision, emb, 0.5)


@pytest.mark.filterwarnings("ignore:form='low_rank' with N:UserWarning")  # N > C here: no advantage, same fit
@pytest.mark.parametrize("options", [{}, {"dtype": np.float32}, {"store_covariance": True}, {"form": "low_rank"}])
def test_a_dask_fit_keeps_no_stream_as_an_in_memory_fit(options) -> None:
    # An in-memory fit keeps no running moments (partial_fit then raises naming fit()); the dask fit merges
    # partial fits, and must end that stream too rather than hold (at PaDiM's size) 5 GB of moments.
    emb = _data(n=24, c=3, batch=(2,), offset=5.0, seed=13)
    with dask.config.set(scheduler="synchronous"):
        model = anomstats.MultiVariateGaussian(**options).fit(da.from_array(emb, chunks=(7, 3, 2)))
    in_memory = anomstats.MultiVariateGaussian(**options).fit(emb)
    assert model._moments is None and model.n_samples_seen_ == in_memory.n_samples_seen_ == 24
    for fitted in (model, in_memory):
        with pytest.raises(ValueError, match=r"was fitted with fit\(\), which keeps no running moments"):
            fitted.partial_fit(emb[:2])
    if options.get("store_covariance"):
        _assert_precision(model.precision, in_memory.precision, emb, in_memory.ridge)
        assert model.covariance.shape == in_memory.covariance.shape


def test_gaussian_score_checks_shape_now() -> None:
    model = anomstats.MultiVariateGaussian().fit(_data(n=20, c=3, batch=(2, 2)))
    expected = re.escape("must have shape (M, 3, 2, 2)") + ".*" + re.escape("got shape (5, 4, 2, 2)")
    with pytest.raises(ValueError, match=expected):
        model.mahalanobis(da.ones((5, 4, 2, 2)))
    with pytest.raises(ValueError, match=re.escape("got shape (7, 3, 2, 3)")):  # x's shape, not the probe's
        model.logpdf(da.ones((7, 3, 2, 3), chunks=(2, 3, 2, 3)))


def test_gaussian_fit_errors_come_from_fit() -> None:
    """Like an in-memory fit: too few observations and a singular patch raise from fit itself."""
    with dask.config.set(scheduler="synchronous"):
        with pytest.raises(ValueError, match=r"embedding has 1 observation .*at least 2 observations"):
            anomstats.MultiVariateGaussian().fit(da.ones((1, 3, 2), chunks=(1, 3, 2)))
        x = _data(n=12, c=3, batch=(2,), seed=4)
        x[:, 2, 1] = x[:, 0, 1]  # patch 1: a duplicated feature, singular without a ridge
        with pytest.raises(np.linalg.LinAlgError, match="patch 1"):
            anomstats.MultiVariateGaussian(ridge=0.0).fit(da.from_array(x, chunks=(5, 3, 2)))


# --------------------------------------------------------------------------------------------- public API


def test_public_batched_cov_dispatch() -> None:
    assert _dispatches(anomstats.batched, "batched_cov")
    x = _data(n=20, c=3, batch=(2,))
    got = anomstats.batched_cov(da.from_array(x, chunks=(6, 3, 2)))
    assert _dask.is_dask_array(got)
    _assert_cov(got.compute(scheduler="sync"), x)


def test_public_running_moments_dispatch() -> None:
    assert _dispatches(anomstats.moments.RunningMoments, "update")
    x = _data(n=20, c=3, batch=(2,))
    with dask.config.set(scheduler="synchronous"):
        m = RunningMoments().update(da.from_array(x, chunks=(6, 3, 2)))
    _assert_cov(m.covariance(), x)


def test_public_kde_dispatch() -> None:
    assert _dispatches(GaussianKDE, "logpdf") and _dispatches(GaussianKDE, "evaluate")
    rng = np.random.default_rng(10)
    kde = GaussianKDE(rng.normal(size=(2, 30)))
    q = rng.normal(size=(2, 9))
    for method in ("pdf", "logpdf"):
        out = getattr(kde, method)(da.from_array(q, chunks=(2, 4)))
        assert _dask.is_dask_array(out)
        _assert_kde(kde, q, out.compute(scheduler="sync"), method)


def test_public_gaussian_dispatch() -> None:
    cls = anomstats.MultiVariateGaussian
    assert all(_dispatches(cls, name) for name in ("fit", "partial_fit", "mahalanobis", "logpdf"))
    emb = _data(n=30, c=3, batch=(2,), offset=5.0)
    with dask.config.set(scheduler="synchronous"):
        model = cls().fit(da.from_array(emb, chunks=(8, 3, 2)))
        reference = cls().fit(emb)
        _assert_precision(model.precision, reference.precision, emb, reference.ridge)
        out = reference.mahalanobis(da.from_array(emb, chunks=(7, 3, 2)))
        assert _dask.is_dask_array(out)
        _assert_scores(reference, emb, out.compute(), "mahalanobis", {})
