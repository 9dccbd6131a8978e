"""Dtypes that follow the model (issue 13, point 4): half precision in, half precision out, float32 inside.

Under ``model.half()`` / ``model.to(torch.bfloat16)`` the modules compute in float32 (buffers upcast for the
computation) and return the input's dtype, so the layers after them (cast with the model) get what they expect;
``model.double()`` keeps float64 end to end. The rules are :mod:`anomstats_torch._policy`'s.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from anomstats_torch import GaussianKDE, MultiVariateGaussian  # noqa: E402
from anomstats_torch._policy import result_dtype, storage_dtype, working_dtype  # noqa: E402
from tests._tolerances import (  # noqa: E402
    adapter_route,
    assert_close_each,
    cast_kde_log_atol,
    cast_mahalanobis_atol,
    kde_exponent,
    kde_log_density_whitened,
    kde_route_error,
    rounding_bounds,
)

HALF = [torch.float16, torch.bfloat16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _embedding(b=40, c=6, h=3, w=4, seed=0, offset=2.0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(c, c, generator=g) * 0.3 + torch.eye(c)
    return torch.einsum("bchw,cd->bdhw", torch.randn(b, c, h, w, generator=g), mixing) + offset


def _kde_data(n=300, d=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.tensor([1.0, 2.0, 0.5])[:d] + 1.0


def _fitted(kind):
    """A float32 module of each scoring kind, and its score function."""
    if kind.startswith("kde"):
        kde = GaussianKDE(_kde_data())
        return kde, (kde.log_prob if kind == "kde_log_prob" else kde)
    form, storage = {"mvg": ("dense", "dense"), "mvg_low_rank": ("low_rank", "dense"), "mvg_packed": ("dense", "packed")}[kind]
    c = 12 if form == "low_rank" else 6
    mvg = MultiVariateGaussian(form=form, storage=storage)
    mvg.fit(_embedding(b=8 if form == "low_rank" else 40, c=c))
    return mvg, mvg.mahalanobis


def _queries(kind, seed=3):
    if kind.startswith("kde"):
        return _kde_data(n=20, seed=seed) + 0.3
    return _embedding(b=5, c=12 if kind == "mvg_low_rank" else 6, seed=seed)


KINDS = ["kde", "kde_log_prob", "mvg", "mvg_low_rank", "mvg_packed"]


def _score(module, kind):
    if kind == "kde":
        return module
    return module.log_prob if kind == "kde_log_prob" else module.mahalanobis


# --------------------------------------------------------------------------- the policy's three rules
def test_policy_rules():
    f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
    assert working_dtype(f16, f16) == working_dtype(bf16, f16) == f32 and working_dtype(f16, f64) == f64
    assert result_dtype(f16, f32) == f16 and result_dtype(bf16, f64) == bf16 and result_dtype(f32, f64) == f64
    assert result_dtype(torch.int64, f32) == f32
    assert storage_dtype(f16, f16) == f16 and storage_dtype(bf16, f32) == bf16  # a cast module keeps its dtype
    assert storage_dtype(f32, f16) == f32 and storage_dtype(f16, f64) == f64


def _result_dtype(kind, dtype):
    """Half in, half out, except KDE densities for float16 (they exceed its range: float32 is returned)."""
    return torch.float32 if kind == "kde" and dtype == torch.float16 else dtype


def test_float16_kde_with_a_large_normaliser_stays_finite():
    # DFKDE-like: 16 PCA components scaled by the largest norm: the normaliser is ~1e10, past float16's
    # 65504, so a float16 `norm` buffer is inf and float16 densities would be too. The cast module derives
    # the normaliser from bw_transform, and float16 queries get float32 densities.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 16, generator=g) * torch.logspace(0, -1, 16)
    x = x / x.norm(dim=1).max()
    reference = GaussianKDE(x)
    cast = copy.deepcopy(reference).half()
    assert torch.isinf(cast.norm)
    q = x[:8].half()
    got = cast(q)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # Bound: the cast buffers carry float16 rounding (2^-11 relative) in the 16 diagonal entries of the
    # normaliser's product and in every whitened coordinate (the exponent moves by ~2^-11 (|y|^2 + |t|^2));
    # 5% is far above both here and far below a wrong normaliser (inf, or off by orders of magnitude).
    torch.testing.assert_close(got, reference(q.float()), rtol=0.05, atol=0)
    assert cast.log_prob(q).dtype == torch.float16


# --------------------------------------------------------------------------- half inputs
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_half_input_gets_its_dtype_back(kind, dtype, device):
    module, score = _fitted(kind)
    module.to(device)
    q = _queries(kind).to(device=device, dtype=dtype)
    got = score(q)
    assert got.dtype == _result_dtype(kind, dtype)
    # The same float32 computation (half values are exact in float32), rounded once: bound rounding_bounds.
    expected = score(q.float())
    assert expected.dtype == torch.float32
    rtol, atol = rounding_bounds(dtype)
    assert_close_each(got.float(), expected, rtol=rtol, atol=atol)
    assert torch.equal(got, expected.to(got.dtype))  # the rounding is the only difference, bit for bit


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_cast_module_computes_in_float32(kind, dtype, device):
    module, _ = _fitted(kind)
    cast = copy.deepcopy(module).to(device=device, dtype=dtype)  # model.half() / .to(torch.bfloat16): rounded buffers
    assert all(b.dtype == dtype for b in cast.buffers() if b.is_floating_point())
    q = _queries(kind).to(device=device, dtype=dtype)
    got = _score(cast, kind)(q)
    assert got.dtype == _result_dtype(kind, dtype)
    # The float32 computation on the cast module's own (rounded) buffers, upcast exactly: one rounding apart.
    upcast = copy.deepcopy(cast).float()
    expected = _score(upcast, kind)(q.float())
    rtol, atol = rounding_bounds(dtype)
    assert_close_each(got.float(), expected, rtol=rtol, atol=atol)
    # float32 input to the cast module: the float32 result itself (the working dtype), no rounding.
    assert torch.equal(_score(cast, kind)(q.float()), expected)
    # Scoring never changes the buffers' dtype.
    assert all(b.dtype == dtype for b in cast.buffers() if b.is_floating_point())


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("storage", ["dense", "packed"])
def test_cast_mahalanobis_against_the_float32_module(dtype, storage):
    mvg = MultiVariateGaussian(storage=storage)
    mvg.fit(_embedding(seed=4))
    q = _embedding(b=5, seed=5).to(dtype)
    got = copy.deepcopy(mvg).to(dtype).mahalanobis(q)
    expected = mvg.mahalanobis(q.float())
    # Bound: cast_mahalanobis_atol (the rounding of mean and precision to `dtype`, both sides' float32
    # evaluation) plus one rounding of the output (rounding_bounds).
    dense = mvg.inv_covariance  # with storage="packed": unpacked, the same numbers
    atol = cast_mahalanobis_atol(
        q.float().flatten(2).numpy(), mvg.mean.numpy(), dense.numpy(), mean_dtype=dtype, precision_dtype=dtype
    ).reshape(got.shape)
    rtol, eta = rounding_bounds(dtype)
    assert_close_each(got.float(), expected, rtol=rtol, atol=atol * (1 + rtol) + eta)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("log", [False, True])
def test_cast_kde_against_the_float32_module(dtype, log):
    kde = GaussianKDE(_kde_data())
    q = (_kde_data(n=20, seed=6) + 0.3).to(dtype)
    cast = copy.deepcopy(kde).to(dtype)
    got = cast.log_prob(q) if log else cast(q)
    expected = kde.log_prob(q.float()) if log else kde(q.float())
    # Bound: cast_kde_log_atol (the buffers' rounding, on log p) plus each side's float32 evaluation
    # (kde_route_error of the adapter's float32 route; the whitening is shared, cond = 0), then one rounding
    # of the output (rounding_bounds). The exact float64 reference gives the problem's numbers (q, |y|^2).
    centre, centred, whitening, norm = (t.double().numpy() for t in (kde._centre, kde._centred, kde.bw_transform, kde.norm))
    f = q.double().numpy()
    buffers = cast_kde_log_atol(f, centre, centred, whitening, norm, buffer_dtype=dtype)
    y = (f - centre) @ whitening
    log_density = kde_log_density_whitened(centred, y, np.log(norm))
    n, d = centred.shape
    route = kde_route_error(
        adapter_route(d, np.float32), kde_exponent(log_density, np.log(norm)), (y * y).sum(1), log_density, d=d, n=n, cond=0
    )
    log_bound = buffers + 2 * -np.log1p(-route)
    rtol, eta = rounding_bounds(dtype)
    if log:
        assert_close_each(got.float(), expected, rtol=rtol, atol=log_bound * (1 + rtol) + eta)
    else:
        assert_close_each(got.float(), expected, rtol=np.expm1(log_bound) * (1 + rtol) + rtol, atol=eta)


# --------------------------------------------------------------------------- float64 end to end
@pytest.mark.parametrize("kind", KINDS)
def test_double_module_keeps_float64(kind):
    module, _ = _fitted(kind)
    double = copy.deepcopy(module).double()
    q = _queries(kind).double()
    assert _score(double, kind)(q).dtype == torch.float64
    assert _score(double, kind)(q.float()).dtype == torch.float64  # the working dtype of a float64 module


def test_fit_on_a_double_module_stores_float64():
    for module, x in ((MultiVariateGaussian().double(), _embedding()),
                      (MultiVariateGaussian(storage="packed").double(), _embedding()),
                      (MultiVariateGaussian(form="low_rank").double(), _embedding(b=8, c=12))):
        buffers = module.fit(x.float())
        assert all(b.dtype == torch.float64 for b in buffers)
    kde = GaussianKDE().double()
    kde.fit(_kde_data().double())
    assert kde.dataset.dtype == kde.norm.dtype == torch.float64


# --------------------------------------------------------------------------- fit on a half module
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("storage", ["dense", "packed"])
def test_fit_on_a_half_module(dtype, storage, device):
    x = _embedding(seed=7).to(device=device, dtype=dtype)
    half = MultiVariateGaussian(storage=storage).to(device=device, dtype=dtype)
    buffers = half.fit(x)
    assert all(b.dtype == dtype for b in buffers)  # the module's dtype is kept (PaDiM's own map reads them)
    # Computed in float32, rounded once when stored: the float32 module's fit of the same input, rounded
    # (bound: rounding_bounds, one rounding; the float32 computations are the same, so bit for bit).
    reference = MultiVariateGaussian(storage=storage)
    expected = reference.fit(x)
    assert all(b.dtype == torch.float32 for b in expected)
    rtol, atol = rounding_bounds(dtype)
    for got, want in zip(buffers, expected):
        assert_close_each(got.float(), want, rtol=rtol, atol=atol)
        assert torch.equal(got, want.to(dtype))
    assert half.mahalanobis(x[:3]).dtype == dtype
    # Streaming on a half module stores in its dtype too.
    half.reset()
    half.update(x[:20])
    half.update(x[20:])
    assert all(b.dtype == dtype for b in half.compute())


def test_fit_on_a_half_low_rank_module():
    x = _embedding(b=8, c=12, seed=8).half()
    low = MultiVariateGaussian(form="low_rank").half()
    mean, basis, eigenvalues, ridge = low.fit(x)
    assert mean.dtype == basis.dtype == eigenvalues.dtype == ridge.dtype == torch.float16
    reference = MultiVariateGaussian(form="low_rank")
    expected = reference.fit(x)
    rtol, atol = rounding_bounds(torch.float16)  # one rounding of the float64-computed, float32-stored fit
    for got, want in zip((mean, basis, eigenvalues), expected[:3]):
        # the float32 buffers are themselves one rounding of the float64 result: two roundings at most
        assert_close_each(got.float(), want, rtol=2 * rtol, atol=2 * atol)
    assert low.mahalanobis(x[:2]).dtype == torch.float16


def test_kde_under_half():
    # GaussianKDE.fit stores float32 buffers whatever the module's dtype (unchanged); scoring follows the input.
    kde = GaussianKDE().half()
    kde.fit(_kde_data().half())
    assert kde.dataset.dtype == torch.float32
    q = _kde_data(n=5, seed=9).half()
    # Densities in float32 for float16 queries (they exceed float16's range in general); log-densities in float16.
    assert kde(q).dtype == torch.float32 and kde.log_prob(q).dtype == torch.float16


# --------------------------------------------------------------------------- a PaDiM-like model under model.half()
def _gaussian_blur(sigma=1.0, size=5):
    blur = nn.Conv2d(1, 1, size, padding=size // 2, bias=False)
    r = torch.arange(size, dtype=torch.float32) - size // 2
    kernel = torch.exp(-(r**2) / (2 * sigma**2))
    kernel = torch.outer(kernel, kernel)
    with torch.no_grad():
        blur.weight.copy_((kernel / kernel.sum())[None, None])
    return blur


class _TinyPadim(nn.Module):
    """Feature conv → our Mahalanobis (or anomalib's own map from our buffers) → upsample → blur / avg-pool."""

    def __init__(self, anomalib_map: bool = False, storage: str = "dense") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.gaussian = MultiVariateGaussian(storage=storage)
        self.blur = _gaussian_blur()
        self.anomalib_map = anomalib_map

    def embed(self, images):
        return self.features(images)

    def forward(self, images):
        emb = self.embed(images)
        if self.anomalib_map:  # anomalib's PaDiM reads the buffers and computes in the model's dtype
            b, c, h, w = emb.shape
            delta = (emb.reshape(b, c, -1) - self.gaussian.mean).permute(2, 0, 1)
            d2 = torch.matmul(delta, self.gaussian.inv_covariance).mul(delta).sum(2).permute(1, 0)
            distances = d2.clamp(min=0).sqrt().reshape(b, h, w)
        else:
            distances = self.gaussian.mahalanobis(emb)
        maps = F.interpolate(distances.unsqueeze(1), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return self.blur(maps), F.avg_pool2d(maps, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("anomalib_map", [False, True], ids=["mahalanobis", "anomalib_map"])
@pytest.mark.parametrize("fit_after_cast", [False, True], ids=["cast_after_fit", "fit_after_cast"])
def test_padim_like_model_under_half(dtype, anomalib_map, fit_after_cast, device):
    g = torch.Generator().manual_seed(10)
    train = torch.rand(30, 3, 16, 16, generator=g).to(device)
    test = torch.rand(2, 3, 16, 16, generator=g).to(device)
    model = _TinyPadim(anomalib_map).to(device)
    if fit_after_cast:
        model.to(dtype)
        with torch.no_grad():
            model.gaussian.fit(model.embed(train.to(dtype)))
    else:
        with torch.no_grad():
            model.gaussian.fit(model.embed(train))
        model.to(dtype)
    with torch.no_grad():
        blurred, pooled = model(test.to(dtype))  # no dtype error anywhere
    assert blurred.dtype == pooled.dtype == dtype and blurred.shape == (2, 1, 16, 16) and pooled.shape == (2, 1, 8, 8)
    assert bool(torch.isfinite(blurred).all())


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_padim_like_model_with_packed_storage_under_half(dtype):
    # anomalib's own map reads gaussian.inv_covariance: the packed module unpacks it on access, in its dtype.
    g = torch.Generator().manual_seed(12)
    model = _TinyPadim(anomalib_map=True, storage="packed").to(dtype)
    with torch.no_grad():
        model.gaussian.fit(model.embed(torch.rand(30, 3, 16, 16, generator=g).to(dtype)))
        blurred, pooled = model(torch.rand(2, 3, 16, 16, generator=g).to(dtype))
    assert model.gaussian.inv_covariance.dtype == blurred.dtype == pooled.dtype == dtype


def test_padim_like_model_under_double():
    g = torch.Generator().manual_seed(11)
    model = _TinyPadim().double()
    with torch.no_grad():
        model.gaussian.fit(model.embed(torch.rand(30, 3, 16, 16, generator=g, dtype=torch.float64)))
        blurred, pooled = model(torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64))
    assert model.gaussian.inv_covariance.dtype == blurred.dtype == pooled.dtype == torch.float64


def test_half_distances_keep_gradients():
    mvg, _ = _fitted("mvg")
    q = _queries("mvg").half().requires_grad_()
    mvg.mahalanobis(q).float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float16 and bool(torch.isfinite(q.grad).all())
