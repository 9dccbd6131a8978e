"""anomstats_torch.MultiVariateGaussian: numpy/core parity, anomalib checkpoints, streaming, dtypes, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import anomstats  # noqa: E402
from anomstats.gaussian import DEFAULT_RIDGE  # noqa: E402
from anomstats_torch import MultiVariateGaussian  # noqa: E402
from tests.anomalib_oracle import AnomalibMultiVariateGaussian, anomalib_padim_distance  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _embedding(b=40, c=5, h=3, w=4, offset=0.0, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(c, c)) * 0.3 + np.eye(c)
    x = np.einsum("bchw,cd->bdhw", rng.normal(size=(b, c, h, w)), mixing) + offset
    return x.astype(dtype)


def _numpy_fit(x, ridge=DEFAULT_RIDGE):
    b, c = x.shape[:2]
    v = x.reshape(b, c, -1).astype(np.float64)
    mean = v.mean(axis=0)
    precision = np.stack([np.linalg.inv(np.cov(v[:, :, p], rowvar=False) + ridge * np.eye(c)) for p in range(v.shape[2])])
    return mean, precision


def _numpy_distance(x, mean, precision):
    b, c = x.shape[:2]
    delta = x.reshape(b, c, -1) - mean
    d2 = np.einsum("bcp,pcd,bdp->bp", delta, precision, delta)
    return np.sqrt(np.maximum(d2, 0)).reshape((b,) + x.shape[2:])


def _core_ready() -> bool:
    try:
        anomstats.MultiVariateGaussian().fit(np.zeros((2, 1, 1)))
    except NotImplementedError:
        return False
    return True


# --------------------------------------------------------------------------- parity
@given(b=st.integers(2, 30), c=st.integers(1, 6), p=st.integers(1, 5), offset=st.sampled_from([0.0, 50.0]), seed=st.integers(0, 999))
def test_float64_fit_and_distances_equal_numpy(b, c, p, offset, seed):
    x = _embedding(b, c, 1, p, offset, seed)
    mvg = MultiVariateGaussian()
    mean, precision = mvg.fit(torch.from_numpy(x))
    ref_mean, ref_precision = _numpy_fit(x)
    assert mean.dtype == torch.float64 and mean.shape == (c, p) and precision.shape == (p, c, c)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-12, atol=1e-12 * (1 + offset))
    scale = np.abs(ref_precision).max()
    np.testing.assert_allclose(precision.numpy(), ref_precision, rtol=0, atol=1e-11 * scale)
    assert torch.equal(precision, precision.mT)  # exactly symmetric
    queries = _embedding(3, c, 1, p, offset, seed + 1)
    np.testing.assert_allclose(
        mvg.mahalanobis(torch.from_numpy(queries)).numpy(), _numpy_distance(queries, ref_mean, ref_precision), rtol=1e-10
    )


@pytest.mark.skipif(not _core_ready(), reason="anomstats.MultiVariateGaussian not implemented yet")
def test_parity_with_the_numpy_core():
    x = _embedding(60, 6, 4, 5, offset=3.0, seed=1)
    q = _embedding(7, 6, 4, 5, offset=3.0, seed=2)
    core = anomstats.MultiVariateGaussian().fit(x)
    mvg = MultiVariateGaussian()
    mean, precision = mvg.fit(torch.from_numpy(x))
    np.testing.assert_allclose(mean.numpy(), core.mean, rtol=1e-12)
    np.testing.assert_allclose(precision.numpy(), core.precision, rtol=1e-12, atol=1e-12 * np.abs(core.precision).max())
    np.testing.assert_allclose(mvg.mahalanobis(torch.from_numpy(q)).numpy(), core.mahalanobis(q), rtol=1e-12)
    # float32 input: computed in float32, within 1e-5 relative of the float64 core
    mean32, precision32 = MultiVariateGaussian().fit(torch.from_numpy(x).float())
    assert precision32.dtype == torch.float32
    np.testing.assert_allclose(mean32.numpy(), core.mean, rtol=1e-5)
    np.testing.assert_allclose(precision32.numpy(), core.precision, rtol=0, atol=1e-5 * np.abs(core.precision).max())
    mvg32 = MultiVariateGaussian()
    mvg32.fit(torch.from_numpy(x).float())
    np.testing.assert_allclose(mvg32.mahalanobis(torch.from_numpy(q).float()).numpy(), core.mahalanobis(q), rtol=1e-5)


@pytest.mark.parametrize("chunk_bytes", [1, 3000, 2**26])
def test_chunking_does_not_change_the_result(chunk_bytes):
    x = torch.from_numpy(_embedding(20, 4, 5, 3, seed=3))
    expected = MultiVariateGaussian().fit(x)
    mvg = MultiVariateGaussian(chunk_bytes=chunk_bytes)
    got = mvg.fit(x)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(mvg.mahalanobis(x[:3]), _distance(x[:3], *expected), rtol=1e-12, atol=0)


def _distance(x, mean, precision):
    return torch.from_numpy(_numpy_distance(x.numpy(), mean.numpy(), precision.numpy()))


# --------------------------------------------------------------------------- anomalib compatibility
def test_agrees_with_anomalib_within_float32_tolerance():
    x = torch.from_numpy(_embedding(64, 8, 4, 4, seed=4)).float()
    ref_mean, ref_inv = AnomalibMultiVariateGaussian().fit(x)
    mean, inv = MultiVariateGaussian().fit(x)
    assert mean.dtype == inv.dtype == torch.float32
    assert mean.shape == ref_mean.shape and inv.shape == ref_inv.shape
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(inv, ref_inv, rtol=0, atol=1e-4 * ref_inv.abs().max().item())
    q = x[:5] + 0.1
    ours = MultiVariateGaussian()
    ours.fit(x)
    torch.testing.assert_close(ours.mahalanobis(q), anomalib_padim_distance(q, ref_mean, ref_inv)[:, 0], rtol=1e-4, atol=1e-5)


def test_loads_hand_built_anomalib_state_dicts_nested_and_standalone():
    c, h, w = 4, 3, 2
    g = torch.Generator().manual_seed(0)
    a = torch.randn(h * w, c, c, generator=g)
    state = {
        "model.gaussian.mean": torch.randn(c, h * w, generator=g),  # float32, (C, H*W)
        "model.gaussian.inv_covariance": a @ a.mT + torch.eye(c),
    }
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.gaussian = MultiVariateGaussian()
    model.load_state_dict(state)  # strict
    gaussian = model.model.gaussian
    assert gaussian.mean.dtype == torch.float32 and gaussian.mean.shape == (c, h * w)
    q = torch.randn(3, c, h, w, generator=g)
    expected = anomalib_padim_distance(q, state["model.gaussian.mean"], state["model.gaussian.inv_covariance"])[:, 0]
    torch.testing.assert_close(gaussian.mahalanobis(q), expected, rtol=1e-5, atol=1e-6)
    standalone = MultiVariateGaussian()
    standalone.load_state_dict({"mean": state["model.gaussian.mean"], "inv_covariance": state["model.gaussian.inv_covariance"]})
    assert set(standalone.state_dict()) == {"mean", "inv_covariance"}
    # and anomalib's module loads ours
    reference = AnomalibMultiVariateGaussian()
    reference.load_state_dict(standalone.state_dict())
    torch.testing.assert_close(reference.inv_covariance, standalone.inv_covariance, rtol=0, atol=0)


def test_anomalib_0x_constructor_presizes_and_refits():
    mvg = MultiVariateGaussian(n_features=3, n_patches=4)
    assert torch.equal(mvg.mean, torch.zeros(3, 4))
    assert torch.equal(mvg.inv_covariance, torch.eye(3).expand(4, 3, 3))
    mvg.load_state_dict({"mean": torch.ones(3, 4), "inv_covariance": 2 * torch.eye(3).repeat(4, 1, 1)})
    assert mvg.mean.sum() == 12
    mean, inv = mvg.fit(torch.randn(10, 5, 2, 2))  # another shape replaces the buffers
    assert mean.shape == (5, 4) and inv.shape == (4, 5, 5)
    with pytest.raises(ValueError, match="both n_features and n_patches"):
        MultiVariateGaussian(n_features=3)
    with pytest.raises(ValueError, match="n_patches must be a positive int"):
        MultiVariateGaussian(3, 0)
    assert MultiVariateGaussian().mean.shape == (0,)


def test_state_dict_round_trip_and_forward_is_fit():
    x = torch.from_numpy(_embedding(12, 3, 2, 2, seed=5)).float()
    mvg = MultiVariateGaussian()
    out = mvg(x)
    assert isinstance(out, list) and len(out) == 2
    fresh = MultiVariateGaussian()
    fresh.load_state_dict(mvg.state_dict())
    torch.testing.assert_close(fresh.mahalanobis(x), mvg.mahalanobis(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- numpy.cov semantics
@given(
    n=st.integers(2, 12),
    c=st.integers(1, 4),
    rowvar=st.booleans(),
    bias=st.booleans(),
    ddof=st.sampled_from([None, 0, 1, 2]),
    weighted=st.booleans(),
    seed=st.integers(0, 999),
)
def test_static_cov_matches_numpy_cov(n, c, rowvar, bias, ddof, weighted, seed):
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(c, n) if rowvar else (n, c))
    weights = rng.uniform(0.5, 2.0, size=n) if weighted else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np.cov(obs, rowvar=rowvar, bias=bias, ddof=ddof, aweights=weights)
        got = MultiVariateGaussian._cov(
            torch.from_numpy(obs), rowvar=rowvar, bias=bias, ddof=ddof,
            aweights=None if weights is None else torch.from_numpy(weights),
        )
    assert got.shape == np.squeeze(expected).shape
    np.testing.assert_allclose(got.numpy(), np.squeeze(expected), rtol=1e-12, atol=1e-14)


def test_static_cov_details():
    obs = torch.tensor([[0.0, 2.0], [1.0, 1.0], [2.0, 0.0]])
    before = obs.clone()
    assert MultiVariateGaussian._cov(obs).dtype == torch.float32
    assert torch.equal(obs, before)
    np.testing.assert_allclose(MultiVariateGaussian._cov(torch.tensor([1.0, 2.0, 4.0])).numpy(), np.cov([1.0, 2.0, 4.0]))
    with pytest.warns(RuntimeWarning, match="Degrees of freedom"):
        MultiVariateGaussian._cov(torch.tensor([5.0]))  # one observation
    with pytest.raises(ValueError, match="aweights cannot be negative"):
        MultiVariateGaussian._cov(obs, aweights=torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="aweights must be 1-D"):
        MultiVariateGaussian._cov(obs, aweights=torch.ones(2))


# --------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("splits", [[1, 1, 10], [6, 6], [2, 3, 4, 3]])
def test_streaming_update_compute_equals_fit(splits):
    x = torch.from_numpy(_embedding(12, 4, 2, 3, offset=20.0, seed=6))
    expected = MultiVariateGaussian().fit(x)
    mvg = MultiVariateGaussian(chunk_bytes=500)
    for part in torch.split(x, splits):
        mvg.update(part)
    got = mvg.compute()
    torch.testing.assert_close(got[0], expected[0], rtol=1e-13, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-11 * expected[1].abs().max().item())
    mvg.update(x)  # moments are kept: more updates can follow
    doubled = mvg.compute()
    torch.testing.assert_close(doubled[0], expected[0], rtol=1e-13, atol=0)


def test_streaming_float32_input_accumulates_in_float64_and_stores_float32():
    x = torch.from_numpy(_embedding(30, 3, 2, 2, offset=100.0, seed=7)).float()
    mvg = MultiVariateGaussian()
    for part in torch.split(x, 7):
        mvg.update(part)
    mean, precision = mvg.compute()
    assert mean.dtype == precision.dtype == torch.float32
    ref_mean, ref_precision = _numpy_fit(x.double().numpy())
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-6)
    np.testing.assert_allclose(precision.numpy(), ref_precision, rtol=0, atol=1e-5 * np.abs(ref_precision).max())


def test_streaming_errors():
    mvg = MultiVariateGaussian()
    with pytest.raises(ValueError, match="update"):
        mvg.compute()
    mvg.update(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="at least 2"):
        mvg.compute()
    with pytest.raises(ValueError, match="reset"):
        mvg.update(torch.randn(2, 4, 2, 2))
    mvg.reset()
    mvg.update(torch.randn(2, 4, 2, 2))
    assert mvg.compute()[0].shape == (4, 4)


# --------------------------------------------------------------------------- dtype / device / errors
def test_dtype_policy():
    x = torch.from_numpy(_embedding(16, 3, 2, 2, seed=8))
    half = MultiVariateGaussian()
    mean, inv = half.fit(x.half())
    assert mean.dtype == inv.dtype == torch.float32  # half input is computed and stored in float32
    assert half.mahalanobis(x.half()).dtype == torch.float32
    assert half.mahalanobis(x.bfloat16()).dtype == torch.float32
    double = MultiVariateGaussian()
    assert double.fit(x)[1].dtype == torch.float64  # float64 stays float64 (anomalib: silently float32)
    as_double = MultiVariateGaussian().double()
    assert as_double.fit(x.float())[1].dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
def test_devices_and_moves(device):
    x = torch.from_numpy(_embedding(16, 3, 2, 2, seed=9))
    cpu = MultiVariateGaussian()
    cpu.fit(x)
    on_device = MultiVariateGaussian()
    on_device.fit(x.to(device))
    assert on_device.inv_covariance.device.type == device
    torch.testing.assert_close(on_device.mahalanobis(x.to(device)).cpu(), cpu.mahalanobis(x), rtol=1e-10, atol=1e-12)
    moved = MultiVariateGaussian()
    moved.fit(x)
    moved = moved.to(device).float()
    assert moved.mean.device.type == device and moved.mean.dtype == torch.float32
    torch.testing.assert_close(moved.mahalanobis(x.float().to(device)).cpu().double(), cpu.mahalanobis(x), rtol=1e-4, atol=1e-5)


def test_inputs_are_never_modified():
    x = torch.from_numpy(_embedding(10, 3, 2, 2, seed=10)).float()
    before = x.clone()
    mvg = MultiVariateGaussian()
    mvg.fit(x)
    mvg.update(x)
    mvg.compute()
    mvg.mahalanobis(x)
    assert torch.equal(x, before)


def test_clear_errors():
    mvg = MultiVariateGaussian()
    with pytest.raises(ValueError, match="1 observation"):
        mvg.fit(torch.randn(1, 3, 2, 2))  # anomalib: NaN
    with pytest.raises(ValueError, match="NaN or infinite"):
        mvg.fit(torch.tensor([[[1.0]], [[float("nan")]], [[2.0]]]))
    with pytest.raises(RuntimeError, match="not fitted"):
        mvg.mahalanobis(torch.randn(2, 3, 2, 2))
    mvg.fit(torch.randn(4, 3, 2, 2))
    with pytest.raises(ValueError, match=r"\(B, 3, \*spatial\)"):
        mvg.mahalanobis(torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match="ridge"):
        MultiVariateGaussian(ridge=-1.0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        mvg.fit(np.zeros((3, 2, 2, 2)))
    with pytest.raises(ValueError, match="not positive definite"):
        MultiVariateGaussian(ridge=0.0).fit(torch.ones(5, 2, 1, 1))


def test_distances_are_never_negative_or_nan():
    x = torch.from_numpy(_embedding(30, 4, 2, 2, seed=11)).float()
    mvg = MultiVariateGaussian()
    mvg.fit(x)
    d = mvg.mahalanobis(mvg.mean.T.reshape(1, 2, 2, 4).permute(0, 3, 1, 2))  # the mean itself
    assert torch.isfinite(d).all() and (d >= 0).all() and d.max() < 1e-2
