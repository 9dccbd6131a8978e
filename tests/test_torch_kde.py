"""anomstats_torch.GaussianKDE: scipy/core parity, anomalib checkpoint compatibility, dtypes, devices, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

torch = pytest.importorskip("torch")

import anomstats  # noqa: E402
from anomstats_torch import GaussianKDE  # noqa: E402
from tests.anomalib_oracle import AnomalibGaussianKDE  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _data(n=300, d=3, offset=0.0, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) * 0.3 + np.eye(d)
    return (rng.normal(size=(n, d)) @ mixing + offset).astype(dtype)


def _core_kde_ready() -> bool:
    try:
        anomstats.GaussianKDE(np.random.default_rng(0).normal(size=(1, 10)))
    except NotImplementedError:
        return False
    return True


# --------------------------------------------------------------------------- scipy / core parity
@given(n=st.integers(8, 120), d=st.integers(1, 4), offset=st.sampled_from([0.0, 3.0]), seed=st.integers(0, 2**16))
def test_float64_densities_equal_scipy(n, d, offset, seed):
    x = _data(n, d, offset, seed)
    queries = np.vstack([x[: min(n, 10)] + 0.3, x.mean(axis=0, keepdims=True)])
    ref = stats.gaussian_kde(x.T)
    kde = GaussianKDE(torch.from_numpy(x))
    got = kde(torch.from_numpy(queries)).numpy()
    np.testing.assert_allclose(got, ref(queries.T), rtol=1e-12, atol=0)
    np.testing.assert_allclose(kde.log_prob(torch.from_numpy(queries)).numpy(), ref.logpdf(queries.T), rtol=1e-12)


@pytest.mark.skipif(not _core_kde_ready(), reason="anomstats.GaussianKDE not implemented yet")
@given(
    n=st.integers(8, 120),
    d=st.integers(1, 4),
    offset=st.sampled_from([0.0, -250.0, 1e4]),  # scipy loses digits here (it does not centre); the core does not
    seed=st.integers(0, 2**16),
)
def test_float64_densities_equal_the_core_for_any_mean(n, d, offset, seed):
    x = _data(n, d, offset, seed)
    queries = np.vstack([x[: min(n, 10)] + 0.3, x.mean(axis=0, keepdims=True)])
    core = anomstats.GaussianKDE(x.T)
    kde = GaussianKDE(torch.from_numpy(x))
    np.testing.assert_allclose(kde(torch.from_numpy(queries)).numpy(), core.evaluate(queries.T), rtol=1e-12, atol=0)
    np.testing.assert_allclose(kde.log_prob(torch.from_numpy(queries)).numpy(), core.logpdf(queries.T), rtol=1e-12)


@pytest.mark.skipif(not _core_kde_ready(), reason="anomstats.GaussianKDE not implemented yet")
@pytest.mark.parametrize("offset", [0.0, 1e3, 1e6])
def test_parity_with_the_numpy_core_float64(offset):
    x = _data(500, 4, offset, seed=1)
    queries = _data(40, 4, offset, seed=2) * 1.5 - offset * 0.5
    core = anomstats.GaussianKDE(x.T)
    kde = GaussianKDE(torch.from_numpy(x))
    np.testing.assert_allclose(kde(torch.from_numpy(queries)).numpy(), core.evaluate(queries.T), rtol=1e-12, atol=0)
    np.testing.assert_allclose(kde.log_prob(torch.from_numpy(queries)).numpy(), core.logpdf(queries.T), rtol=1e-12)


@pytest.mark.skipif(not _core_kde_ready(), reason="anomstats.GaussianKDE not implemented yet")
def test_parity_with_the_numpy_core_float32():
    x = _data(2000, 4, 1.0, seed=3, dtype=np.float32)
    queries = _data(64, 4, 1.0, seed=4, dtype=np.float32)
    core = anomstats.GaussianKDE(x.T.astype(np.float64))
    kde = GaussianKDE(torch.from_numpy(x))
    got = kde(torch.from_numpy(queries))
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), core.evaluate(queries.T.astype(np.float64)), rtol=1e-5, atol=0)


def test_silverman_and_scalar_bandwidth_match_scipy():
    x = _data(200, 2, 5.0, seed=5)
    q = x[:7] + 0.1
    for method in ("silverman", 0.4):
        ref = stats.gaussian_kde(x.T, bw_method=method)
        got = GaussianKDE(torch.from_numpy(x), bw_method=method)(torch.from_numpy(q)).numpy()
        np.testing.assert_allclose(got, ref(q.T), rtol=1e-12)


def test_far_queries_underflow_in_density_but_not_in_log_prob():
    x = _data(100, 2, 0.0, seed=6)
    far = np.array([[60.0, -40.0], [0.0, 0.0]])
    ref = stats.gaussian_kde(x.T)
    for dtype in (torch.float32, torch.float64):
        kde = GaussianKDE(torch.from_numpy(x).to(dtype))
        log_prob = kde.log_prob(torch.from_numpy(far).to(dtype))
        assert torch.isfinite(log_prob).all()
        np.testing.assert_allclose(log_prob.double().numpy(), ref.logpdf(far.T), rtol=1e-5 if dtype == torch.float32 else 1e-12)
        assert kde(torch.from_numpy(far).to(dtype))[0] == 0  # true density below the dtype's range


@pytest.mark.parametrize("chunk_bytes", [64, 1000, 2**20])
def test_chunking_does_not_change_the_result(chunk_bytes):
    x = torch.from_numpy(_data(257, 3, 2.0, seed=7))
    q = torch.from_numpy(_data(33, 3, 2.0, seed=8))
    expected = GaussianKDE(x)(q)
    kde = GaussianKDE(x, chunk_bytes=chunk_bytes)
    torch.testing.assert_close(kde(q), expected, rtol=1e-13, atol=0)
    torch.testing.assert_close(kde.log_prob(q), GaussianKDE(x).log_prob(q), rtol=1e-13, atol=0)


def test_loaded_buffers_alone_give_the_same_densities():
    x = torch.from_numpy(_data(300, 3, 40.0, seed=16))
    q = x[:20] + 0.25
    fitted = GaussianKDE(x)
    loaded = GaussianKDE().double()
    loaded.load_state_dict(fitted.state_dict())
    assert loaded._centred.numel() == 0  # works from the anomalib buffers only
    torch.testing.assert_close(loaded(q), fitted(q), rtol=1e-12, atol=0)
    torch.testing.assert_close(loaded.log_prob(q), fitted.log_prob(q), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- anomalib compatibility
def _centred_float32(n=400, d=4, seed=9):
    x = torch.from_numpy(_data(n, d, 0.0, seed)).float()
    return x - x.mean(dim=0)  # what anomalib handles correctly (PCA output)


def test_anomalib_checkpoint_loads_strict_and_gives_anomalib_numbers():
    x = _centred_float32()
    reference = AnomalibGaussianKDE()
    reference.fit(x.clone())
    state = reference.state_dict()
    assert set(state) == {"bw_transform", "dataset", "norm"} and state["norm"].shape == ()
    kde = GaussianKDE()
    kde.load_state_dict(state)  # strict by default
    queries = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(kde(queries), reference(queries), rtol=1e-5, atol=1e-30)
    # an uncentred anomalib checkpoint: we reproduce anomalib's (wrong) numbers, as the checkpoint defines them
    shifted = AnomalibGaussianKDE()
    shifted.fit(x + 3.0)
    loaded = GaussianKDE()
    loaded.load_state_dict(shifted.state_dict())
    torch.testing.assert_close(loaded(queries + 3.0), shifted(queries + 3.0), rtol=1e-5, atol=1e-30)


def test_hand_built_dfkde_state_dict_loads_nested_and_follows_anomalib_formula():
    g = torch.Generator().manual_seed(3)
    d, n = 3, 50
    whitening = torch.tril(torch.rand(d, d, generator=g)) + torch.eye(d)  # lower triangular, positive diagonal
    stored = torch.randn(n, d, generator=g)
    norm = torch.prod(torch.diag(whitening)) * (2 * math.pi) ** (-d / 2)
    state = {
        "model.classifier.kde_model.bw_transform": whitening,
        "model.classifier.kde_model.dataset": stored,
        "model.classifier.kde_model.norm": norm,  # 0-d float32
    }
    assert all(v.dtype == torch.float32 for v in state.values()) and norm.shape == ()
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.classifier = torch.nn.Module()
    model.model.classifier.kde_model = GaussianKDE()
    model.load_state_dict(state)  # strict
    kde = model.model.classifier.kde_model
    queries = torch.randn(6, d, generator=g)
    y = queries.double() @ whitening.double()
    sq = ((y[:, None, :] - stored.double()[None, :, :]) ** 2).sum(-1)
    expected = norm.double() * torch.exp(-sq / 2).mean(dim=1)
    torch.testing.assert_close(kde(queries).double(), expected, rtol=1e-5, atol=0)
    assert kde(queries).dtype == torch.float32


def test_our_fit_agrees_with_anomalib_on_centred_data_and_anomalib_loads_ours():
    x = _centred_float32(seed=10)
    queries = torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
    reference = AnomalibGaussianKDE()
    reference.fit(x.clone())
    ours = GaussianKDE(x)
    for name in ("bw_transform", "dataset", "norm"):
        assert getattr(ours, name).dtype == torch.float32
        assert getattr(ours, name).shape == getattr(reference, name).shape
    torch.testing.assert_close(ours(queries), reference(queries), rtol=1e-4, atol=1e-30)
    # anomalib loading our checkpoint of *uncentred* data computes the right (scipy) densities
    far = x.double() + 50.0
    ours_far = GaussianKDE(far.float())
    anomalib_loading_ours = AnomalibGaussianKDE()
    anomalib_loading_ours.load_state_dict(ours_far.state_dict())
    expected = stats.gaussian_kde(far.float().double().numpy().T)((queries.double() + 50.0).numpy().T)
    np.testing.assert_allclose(anomalib_loading_ours(queries + 50.0).numpy(), expected, rtol=1e-3)


def test_nested_dfkde_keys_and_state_dict_round_trip():
    x = torch.from_numpy(_data(300, 3, 7.0, seed=11))
    parent = torch.nn.Module()
    parent.classifier = torch.nn.Module()
    parent.classifier.kde_model = GaussianKDE(x)
    state = parent.state_dict()
    assert set(state) == {f"classifier.kde_model.{k}" for k in ("bw_transform", "dataset", "norm")}
    fresh = torch.nn.Module()
    fresh.classifier = torch.nn.Module()
    fresh.classifier.kde_model = GaussianKDE().double()
    fresh.load_state_dict(state)
    q = x[:9] + 0.2
    # the loaded module works from the stored buffers alone: same densities (to rounding of the centring)
    torch.testing.assert_close(fresh.classifier.kde_model(q), parent.classifier.kde_model(q), rtol=1e-12, atol=0)
    as_float32 = GaussianKDE()
    as_float32.load_state_dict(parent.classifier.kde_model.state_dict())
    assert as_float32.dataset.dtype == torch.float32  # the module keeps its dtype; values are cast
    torch.testing.assert_close(as_float32(q.float()).double(), parent.classifier.kde_model(q), rtol=1e-4, atol=0)


def test_anomalib_fit_modifies_its_input_ours_never_does():
    x = torch.from_numpy(_data(100, 3, 4.0, seed=12)).float()
    before = x.clone()
    AnomalibGaussianKDE().fit(x.clone().requires_grad_(False))  # the reference would centre `x` itself
    kde = GaussianKDE(x)
    kde(x[:5])
    kde.log_prob(x[:5])
    GaussianKDE.cov(x.T)
    assert torch.equal(x, before)
    spoiled = before.clone()
    AnomalibGaussianKDE().fit(spoiled)
    assert not torch.equal(spoiled, before)


def test_static_cov_matches_numpy_and_keeps_dtype():
    x = torch.from_numpy(_data(50, 3, 2.0, seed=13)).T.contiguous()
    np.testing.assert_allclose(GaussianKDE.cov(x).numpy(), np.cov(x.numpy()), rtol=1e-12)
    assert GaussianKDE.cov(x.float()).dtype == torch.float32
    assert GaussianKDE.cov(torch.tensor([[1, 2, 4]])).dtype == torch.float32


# --------------------------------------------------------------------------- dtype / device policy
def test_half_input_is_computed_in_float32_and_float64_module_in_float64():
    x = torch.from_numpy(_data(200, 2, 1.0, seed=14))
    kde = GaussianKDE(x.float())
    q = x[:6].half()
    assert kde(q).dtype == torch.float32 and kde(q.bfloat16()).dtype == torch.float32
    torch.testing.assert_close(kde(q), kde(q.float()), rtol=0, atol=0)
    double = GaussianKDE(x).double()
    assert double.dataset.dtype == torch.float64 and double(q).dtype == torch.float64
    assert GaussianKDE(x[:, :].half()).dataset.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_device_and_dtype_moves(device):
    x = torch.from_numpy(_data(150, 3, 2.0, seed=15))
    q = x[:8] + 0.5
    kde = GaussianKDE(x)
    expected = kde(q)
    moved = GaussianKDE(x).to(device)
    assert moved.dataset.device.type == device
    torch.testing.assert_close(moved(q.to(device)).cpu(), expected, rtol=1e-12, atol=0)
    as_float = GaussianKDE(x).float()
    torch.testing.assert_close(as_float(q.float()).double(), expected, rtol=1e-4, atol=0)
    on_device = GaussianKDE(x.to(device))  # fit runs on the data's device
    assert on_device.bw_transform.device.type == device


# --------------------------------------------------------------------------- errors
def test_clear_errors():
    with pytest.raises(ValueError, match="more points than dimensions"):
        GaussianKDE(torch.randn(3, 3))
    with pytest.raises(ValueError, match="2-D"):
        GaussianKDE(torch.randn(10))
    with pytest.raises(ValueError, match="NaN or infinite"):
        GaussianKDE(torch.tensor([[0.0, 1.0], [1.0, math.nan], [2.0, 0.0], [3.0, 1.0]]))
    with pytest.raises(ValueError, match="singular"):
        GaussianKDE(torch.tensor([[0.0, 0.0], [1.0, 2.0], [2.0, 4.0], [3.0, 6.0]]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        GaussianKDE(np.zeros((10, 2)))
    with pytest.raises(RuntimeError, match="not fitted"):
        GaussianKDE()(torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"\(M, 2\)"):
        GaussianKDE(torch.randn(10, 2))(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="bw_method"):
        GaussianKDE(bw_method="scot")
    with pytest.raises(ValueError, match="chunk_bytes"):
        GaussianKDE(chunk_bytes=0)


def test_empty_query_batch():
    kde = GaussianKDE(torch.randn(20, 2, dtype=torch.float64))
    assert kde(torch.zeros(0, 2)).shape == (0,)
