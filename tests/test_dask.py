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

RTOL = 1e-10


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a) - b).max() / max(np.abs(b).max(), 1e-300))


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
    assert _rel(c.compute(), _per_batch_cov(x)) < RTOL
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
    assert _rel(got, _per_batch_cov(x, ddof=ddof)) < RTOL


def test_batched_cov_other_axes_and_dtype() -> None:
    x = _data(n=20, c=3, batch=(2,), seed=2)
    moved = np.moveaxis(x, (0, 1), (2, 0))  # (C, batch, N): var_axis=0, obs_axis=2
    dx = da.from_array(moved, chunks=(3, 2, 6))
    got = anomstats.batched_cov(dx, obs_axis=2, var_axis=0).compute(scheduler="sync")
    assert _rel(got, _per_batch_cov(x)) < RTOL
    got32 = anomstats.batched_cov(da.from_array(x.astype(np.float32), chunks=(5, 3, 2)), dtype=np.float32)
    assert got32.dtype == np.float32
    assert got32.compute(scheduler="sync").dtype == np.float32


def test_batched_cov_weights(scheduler: str) -> None:
    x = _data(n=30, c=3, batch=(2,), seed=3)
    w = np.random.default_rng(3).uniform(0.1, 2.0, size=30)
    expected = _per_batch_cov(x, aweights=w)
    dx = da.from_array(x, chunks=(8, 3, 2))
    assert _rel(anomstats.batched_cov(dx, aweights=w).compute(), expected) < RTOL
    dw = da.from_array(w, chunks=11)  # mismatched chunks are realigned
    assert _rel(anomstats.batched_cov(dx, aweights=dw).compute(), expected) < RTOL


def test_running_moments_update(scheduler: str) -> None:
    x = _data(n=45, c=3, batch=(2, 2), seed=4)
    first = x[:5]
    moments = RunningMoments().update(first)
    result = moments.update(da.from_array(x[5:], chunks=(9, 3, 2, 2)))
    assert result is moments
    one_shot = RunningMoments().update(x)
    assert moments.count == 45
    assert _rel(moments.mean, one_shot.mean) < RTOL
    assert _rel(moments.covariance(), one_shot.covariance()) < RTOL
    assert _rel(moments.covariance(), _per_batch_cov(x)) < RTOL


def test_running_moments_update_keeps_the_configuration() -> None:
    x = _data(n=30, c=3, batch=(2,), offset=1.0, seed=11).astype(np.float32)
    expected = RunningMoments(dtype=np.float32).update(x).covariance()
    with dask.config.set(scheduler="synchronous"):
        moments = RunningMoments(dtype=np.float32).update(da.from_array(x, chunks=(7, 3, 2)))
    got = moments.covariance()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_running_moments_delayed() -> None:
    x = _data(n=12, c=2, batch=(), seed=5)
    delayed = _dask.reduce_observations(RunningMoments(), da.from_array(x, chunks=(5, 2)), 0)
    moments = delayed.compute(scheduler="sync")
    assert _rel(moments.covariance(), np.cov(x, rowvar=False)) < RTOL


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
    assert _rel(got, expected) < 1e-12
    np.testing.assert_array_equal(q, before)


def test_kde_one_dimensional_points_and_errors() -> None:
    rng = np.random.default_rng(7)
    kde1 = GaussianKDE(rng.normal(size=40))
    q = rng.normal(size=11)
    got = kde1.pdf(da.from_array(q, chunks=4)).compute(scheduler="sync")
    assert _rel(got, kde1.pdf(q)) < 1e-12
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
    assert _rel(model.mean, reference.mean) < 1e-9
    assert _rel(model.precision, reference.precision) < 1e-9
    streamed = anomstats.MultiVariateGaussian().partial_fit(emb[:4])
    streamed.partial_fit(da.from_array(emb[4:], chunks=(10, 3, 2, 2)))
    assert _rel(streamed.precision, reference.precision) < 1e-9
    q = _data(n=11, c=3, batch=(2, 2), offset=5.0, seed=9)
    dq = da.from_array(q, chunks=(4, 3, 2, 2))
    for method, kwargs in [("mahalanobis", {}), ("mahalanobis", {"squared": True}), ("logpdf", {})]:
        out = getattr(reference, method)(dq, **kwargs)
        assert _dask.is_dask_array(out) and out.shape == (11, 2, 2) and out.numblocks == (3, 1, 1)
        assert _rel(out.compute(), getattr(reference, method)(q, **kwargs)) < 1e-12
    np.testing.assert_array_equal(emb, before)


def test_gaussian_fit_keeps_the_configuration() -> None:
    emb = _data(n=30, c=3, batch=(2,), offset=5.0, seed=12)
    reference = anomstats.MultiVariateGaussian(ridge=0.5).fit(emb)
    with dask.config.set(scheduler="synchronous"):
        model = anomstats.MultiVariateGaussian(ridge=0.5).fit(da.from_array(emb, chunks=(8, 3, 2)))
    assert model.ridge == 0.5
    assert _rel(model.precision, reference.precision) < 1e-9


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
    assert _rel(got.compute(scheduler="sync"), _per_batch_cov(x)) < RTOL


def test_public_running_moments_dispatch() -> None:
    assert _dispatches(anomstats.moments.RunningMoments, "update")
    x = _data(n=20, c=3, batch=(2,))
    with dask.config.set(scheduler="synchronous"):
        m = RunningMoments().update(da.from_array(x, chunks=(6, 3, 2)))
    assert _rel(m.covariance(), _per_batch_cov(x)) < RTOL


def test_public_kde_dispatch() -> None:
    assert _dispatches(GaussianKDE, "logpdf") and _dispatches(GaussianKDE, "evaluate")
    rng = np.random.default_rng(10)
    kde = GaussianKDE(rng.normal(size=(2, 30)))
    q = rng.normal(size=(2, 9))
    for method in ("pdf", "logpdf"):
        out = getattr(kde, method)(da.from_array(q, chunks=(2, 4)))
        assert _dask.is_dask_array(out)
        assert _rel(out.compute(scheduler="sync"), getattr(kde, method)(q)) < 1e-12


def test_public_gaussian_dispatch() -> None:
    cls = anomstats.MultiVariateGaussian
    assert all(_dispatches(cls, name) for name in ("fit", "partial_fit", "mahalanobis", "logpdf"))
    emb = _data(n=30, c=3, batch=(2,), offset=5.0)
    with dask.config.set(scheduler="synchronous"):
        model = cls().fit(da.from_array(emb, chunks=(8, 3, 2)))
        reference = cls().fit(emb)
        assert _rel(model.precision, reference.precision) < 1e-9
        out = reference.mahalanobis(da.from_array(emb, chunks=(7, 3, 2)))
        assert _dask.is_dask_array(out)
        assert _rel(out.compute(), reference.mahalanobis(emb)) < 1e-12
