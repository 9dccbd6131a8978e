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
from tests._tolerances import (  # noqa: E402
    assert_close_each,
    covariance_atol,
    eps,
    mahalanobis_tolerances,
    mean_atol,
    patch_covariances,
    precision_atol,
)
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


# --------------------------------------------------------------------------- parity
@given(b=st.integers(2, 30), c=st.integers(1, 6), p=st.integers(1, 5), offset=st.sampled_from([0.0, 50.0]), seed=st.integers(0, 999))
def test_float64_fit_and_distances_equal_numpy(b, c, p, offset, seed):
    x = _embedding(b, c, 1, p, offset, seed)
    mvg = MultiVariateGaussian()
    mean, precision = mvg.fit(torch.from_numpy(x))
    ref_mean, ref_precision = _numpy_fit(x)
    assert mean.dtype == torch.float64 and mean.shape == (c, p) and precision.shape == (p, c, c)
    # Bounds (tests/_tolerances.py): mean_atol (sums of b values up to |offset| + a few), precision_atol
    # (kappa(A) delta_A |A^-1| for A = cov + ridge I: b = 2 gives a rank-one cov, kappa ~ 1 / ridge).
    covariances = patch_covariances(x, DEFAULT_RIDGE)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=0, atol=mean_atol(np.abs(x).max(), b))
    np.testing.assert_allclose(precision.numpy(), ref_precision, rtol=0, atol=precision_atol(covariances, b))
    assert torch.equal(precision, precision.mT)  # exactly symmetric
    queries = _embedding(3, c, 1, p, offset, seed + 1)
    # mahalanobis_tolerances: both fits' kappa(A) delta_A, the evaluation rounding, and the means' error.
    rtol, atol = mahalanobis_tolerances(covariances, b, mean_atol(np.abs(x).max(), b))
    np.testing.assert_allclose(
        mvg.mahalanobis(torch.from_numpy(queries)).numpy(), _numpy_distance(queries, ref_mean, ref_precision), rtol=rtol, atol=atol
    )


def test_parity_with_the_numpy_core():
    x = _embedding(60, 6, 4, 5, offset=3.0, seed=1)
    q = _embedding(7, 6, 4, 5, offset=3.0, seed=2)
    core = anomstats.MultiVariateGaussian().fit(x)
    mvg = MultiVariateGaussian()
    mean, precision = mvg.fit(torch.from_numpy(x))
    # Bounds: mean_atol, precision_atol, mahalanobis_tolerances (float64, 60 samples, both sides).
    covariances = patch_covariances(x, DEFAULT_RIDGE)
    mean_tol = mean_atol(np.abs(x).max(), 60)
    rtol, atol = mahalanobis_tolerances(covariances, 60, mean_tol)
    np.testing.assert_allclose(mean.numpy(), core.mean, rtol=0, atol=mean_tol)
    np.testing.assert_allclose(precision.numpy(), core.precision, rtol=0, atol=precision_atol(covariances, 60))
    np.testing.assert_allclose(mvg.mahalanobis(torch.from_numpy(q)).numpy(), core.mahalanobis(q), rtol=rtol, atol=atol)
    # float32 input: computed in float32; the same bounds with eps of float32 (the float64 core adds little)
    mean32, precision32 = MultiVariateGaussian().fit(torch.from_numpy(x).float())
    assert precision32.dtype == torch.float32
    mean_tol32 = mean_atol(np.abs(x).max(), 60, np.float32)
    rtol32, atol32 = mahalanobis_tolerances(covariances, 60, mean_tol32, np.float32)
    np.testing.assert_allclose(mean32.numpy(), core.mean, rtol=0, atol=mean_tol32)
    np.testing.assert_allclose(precision32.numpy(), core.precision, rtol=0, atol=precision_atol(covariances, 60, np.float32))
    mvg32 = MultiVariateGaussian()
    mvg32.fit(torch.from_numpy(x).float())
    np.testing.assert_allclose(
        mvg32.mahalanobis(torch.from_numpy(q).float()).numpy(), core.mahalanobis(q), rtol=rtol32, atol=atol32
    )


@pytest.mark.parametrize("chunk_bytes", [1, 3000, 2**26])
def test_chunking_does_not_change_the_result(chunk_bytes):
    x = torch.from_numpy(_embedding(20, 4, 5, 3, seed=3))
    expected = MultiVariateGaussian().fit(x)
    mvg = MultiVariateGaussian(chunk_bytes=chunk_bytes)
    got = mvg.fit(x)
    # Bounds: mean_atol and precision_atol (chunks change only the blocking of the batched products).
    covariances = patch_covariances(x.numpy(), DEFAULT_RIDGE)
    for a, b, atol in zip(got, expected, (mean_atol(x.abs().max().item(), 20), precision_atol(covariances, 20))):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)
    # mahalanobis_tolerances: the fit against numpy's evaluation of the same (expected) buffers.
    rtol, _ = mahalanobis_tolerances(covariances, 20, shared_fit=False)
    torch.testing.assert_close(mvg.mahalanobis(x[:3]), _distance(x[:3], *expected), rtol=rtol, atol=0)


def _distance(x, mean, precision):
    return torch.from_numpy(_numpy_distance(x.numpy(), mean.numpy(), precision.numpy()))


# --------------------------------------------------------------------------- anomalib compatibility
def test_agrees_with_anomalib_within_float32_tolerance():
    x = torch.from_numpy(_embedding(64, 8, 4, 4, seed=4)).float()
    ref_mean, ref_inv = AnomalibMultiVariateGaussian().fit(x)
    mean, inv = MultiVariateGaussian().fit(x)
    assert mean.dtype == inv.dtype == torch.float32
    assert mean.shape == ref_mean.shape and inv.shape == ref_inv.shape
    # Bounds (float32, 64 samples): mean_atol; precision_atol (anomalib inverts explicitly, we factor).
    covariances = patch_covariances(x.double().numpy(), DEFAULT_RIDGE)
    mean_tol = mean_atol(x.abs().max().item(), 64, np.float32)
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=mean_tol)
    torch.testing.assert_close(inv, ref_inv, rtol=0, atol=precision_atol(covariances, 64, np.float32))
    q = x[:5] + 0.1
    ours = MultiVariateGaussian()
    ours.fit(x)
    # mahalanobis_tolerances: two float32 fits and evaluations.
    rtol, atol = mahalanobis_tolerances(covariances, 64, mean_tol, np.float32)
    torch.testing.assert_close(ours.mahalanobis(q), anomalib_padim_distance(q, ref_mean, ref_inv)[:, 0], rtol=rtol, atol=atol)


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
    # mahalanobis_tolerances with shared buffers (the given precision P; A = P^-1), float32 evaluation.
    covariance = np.linalg.inv(state["model.gaussian.inv_covariance"].double().numpy())
    rtol, _ = mahalanobis_tolerances(covariance, 2, dtype=np.float32, shared_fit=True)
    torch.testing.assert_close(gaussian.mahalanobis(q), expected, rtol=rtol, atol=0)
    standalone = MultiVariateGaussian()
    standalone.load_state_dict({"mean": state["model.gaussian.mean"], "inv_covariance": state["model.gaussian.inv_covariance"]})
    assert set(standalone.state_dict()) == {"mean", "inv_covariance"}
    # and anomalib's module loads ours
    reference = AnomalibMultiVariateGaussian()
    reference.load_state_dict(standalone.state_dict())
    torch.testing.assert_close(reference.inv_covariance, standalone.inv_covariance, rtol=0, atol=0)  # a copy: exact


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
    # Exact (bound 0): the same buffers, the same computation.
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
    # Bound: covariance_atol, scaled by (n - 1) / (n - ddof_effective) for numpy's normaliser (which may
    # be n, n - 1 or n - 2, or a weighted one: the weights are within [0.5, 2], a factor 4 on the sums).
    observations = obs.T if rowvar else obs
    effective_ddof = (0 if bias else 1) if ddof is None else ddof
    scale = (n - 1) / max(n - effective_ddof, 1) * (4.0 if weighted else 1.0)
    atol = np.squeeze(covariance_atol(observations)) * scale
    finite = np.isfinite(expected)
    assert_close_each(got.numpy(), np.squeeze(expected), atol=np.where(np.squeeze(finite), atol, 0.0), equal_nan=True)


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
    # numpy.cov's exception type and message for the wrong number of weights (one vocabulary, issue 10).
    with pytest.raises(RuntimeError, match="incompatible numbers of samples and aweights"):
        MultiVariateGaussian._cov(obs, aweights=torch.ones(2))


# --------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("splits", [[1, 1, 10], [6, 6], [2, 3, 4, 3]])
def test_streaming_update_compute_equals_fit(splits):
    x = torch.from_numpy(_embedding(12, 4, 2, 3, offset=20.0, seed=6))
    expected = MultiVariateGaussian().fit(x)
    mvg = MultiVariateGaussian(chunk_bytes=500)
    for part in torch.split(x, splits):
        mvg.update(part)
    got = mvg.compute(keep_stream=True)
    # Bounds: mean_atol (Chan's running mean: one more rounding per merge, ~ |mean| eps each) and
    # precision_atol; the merges' cross terms round by ~eps |offset| |delta| (offset 20): within delta_A.
    covariances = patch_covariances(x.numpy(), DEFAULT_RIDGE)
    mean_tol = mean_atol(x.abs().max().item(), 12) * (1 + len(splits))
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=mean_tol)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=precision_atol(covariances, 12))
    mvg.update(x)  # keep_stream=True: the moments are kept and more updates can follow
    doubled = mvg.compute()
    torch.testing.assert_close(doubled[0], expected[0], rtol=0, atol=mean_tol * 2)
    # The default compute() spent the stream: update() and compute() refuse until reset().
    for call in (lambda: mvg.update(x), mvg.compute):
        with pytest.raises(RuntimeError, match=r"compute\(\) spent this stream.*reset\(\).*keep_stream=True"):
            call()
    mvg.reset()
    mvg.update(x)
    torch.testing.assert_close(mvg.compute()[0], expected[0], rtol=0, atol=mean_tol)


def test_streaming_float32_input_accumulates_in_float64_and_stores_float32():
    x = torch.from_numpy(_embedding(30, 3, 2, 2, offset=100.0, seed=7)).float()
    mvg = MultiVariateGaussian()
    for part in torch.split(x, 7):
        mvg.update(part)
    mean, precision = mvg.compute()
    assert mean.dtype == precision.dtype == torch.float32
    ref_mean, ref_precision = _numpy_fit(x.double().numpy())
    # Accumulated in float64: the only float32 error is the final rounding of the stored values, half an
    # ulp (eps32 / 2 relative) of each entry; precision: ``precision_atol`` of the float64 fits (tiny)
    # plus that rounding of the largest entry.
    x_max = x.abs().max().item()
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=eps(np.float32) / 2, atol=mean_atol(x_max, 30))
    atol = precision_atol(patch_covariances(x.double().numpy(), DEFAULT_RIDGE), 30) + eps(np.float32) / 2 * np.abs(ref_precision).max()
    np.testing.assert_allclose(precision.numpy(), ref_precision, rtol=0, atol=atol)


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
    # Half in, half out (issue 13: the layers after the module are half too); see tests/test_torch_dtypes.py.
    assert half.mahalanobis(x.half()).dtype == torch.float16
    assert half.mahalanobis(x.bfloat16()).dtype == torch.bfloat16
    assert half.mahalanobis(x.float()).dtype == torch.float32
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
    # mahalanobis_tolerances: two float64 fits (devices differ in blocking and summation order).
    covariances = patch_covariances(x.numpy(), DEFAULT_RIDGE)
    rtol, atol = mahalanobis_tolerances(covariances, 16, mean_atol(x.abs().max().item(), 16))
    torch.testing.assert_close(on_device.mahalanobis(x.to(device)).cpu(), cpu.mahalanobis(x), rtol=rtol, atol=atol)
    moved = MultiVariateGaussian()
    moved.fit(x)
    moved = moved.to(device).float()
    assert moved.mean.device.type == device and moved.mean.dtype == torch.float32
    # The float64 fit rounded to float32 buffers and evaluated in float32: the float32 bounds.
    rtol32, atol32 = mahalanobis_tolerances(covariances, 16, mean_atol(x.abs().max().item(), 16, np.float32), np.float32)
    torch.testing.assert_close(moved.mahalanobis(x.float().to(device)).cpu().double(), cpu.mahalanobis(x), rtol=rtol32, atol=atol32)


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
