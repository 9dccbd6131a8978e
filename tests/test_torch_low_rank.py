"""anomstats_torch.MultiVariateGaussian(form="low_rank"): core parity, dense parity, export, checkpoints, streaming."""

from __future__ import annotations

import copy
import io
import math
import re
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import anomstats  # noqa: E402
from anomstats._low_rank import (  # noqa: E402
    dense_from_low_rank,
    low_rank_width,
    needs_ridge_message,
    no_advantage_message,
)
from anomstats.gaussian import DEFAULT_RIDGE  # noqa: E402
from anomstats_torch import MultiVariateGaussian  # noqa: E402
from anomstats_torch.gaussian import LowRankMultiVariateGaussian  # noqa: E402
from tests._export import PadimScore  # noqa: E402
from tests._tolerances import (  # noqa: E402
    assert_close_each,
    covariance_backward_error,
    log_det_atol,
    low_rank_backward_error,
    low_rank_basis_atol,
    low_rank_eigenvalue_atol,
    low_rank_evaluation_rtol,
    low_rank_mahalanobis_tolerances,
    mahalanobis_tolerances,
    mean_atol,
    patch_covariances,
    precision_atol,
    streamed_covariance_atol,
)
from tests.anomalib_oracle import AnomalibMultiVariateGaussian, anomalib_padim_distance  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _embedding(b=10, c=30, h=3, w=4, offset=0.0, seed=0, scale=1.0):
    """(b, c, h, w) float64 with correlated features (a random mixing), PaDiM-like: fewer images than features."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(c, c)) * 0.3 + np.eye(c)
    return np.einsum("bchw,cd->bdhw", rng.normal(size=(b, c, h, w)), mixing) * scale + offset


def _low_rank(x, **kwargs):
    model = MultiVariateGaussian(form="low_rank", **kwargs)
    model.fit(torch.from_numpy(x) if isinstance(x, np.ndarray) else x)
    return model


def _aligned(basis, reference):
    """``basis`` (P, C, r) with each column's sign flipped to agree with ``reference``'s column."""
    signs = np.sign(np.einsum("pcr,pcr->pr", basis, reference))
    signs[signs == 0] = 1.0
    return basis * signs[:, None, :]


def _model_covariance(model):
    """The regularised covariances (P, C, C) a fitted low-rank module's buffers define, in float64."""
    basis = model.basis.double().cpu().numpy()
    out = np.empty((basis.shape[0], basis.shape[1], basis.shape[1]))
    eigenvalues = model.eigenvalues.double().cpu().numpy()
    return dense_from_low_rank(basis, eigenvalues, float(model.ridge), inverse=False, out=out)


# --------------------------------------------------------------------------- the form and its buffers
def test_the_form_keyword_chooses_the_class_and_dense_stays_the_default():
    dense = MultiVariateGaussian()
    assert type(dense) is MultiVariateGaussian and dense.form == "dense"
    assert type(MultiVariateGaussian(form="dense")) is MultiVariateGaussian
    assert set(dense.state_dict()) == {"mean", "inv_covariance"}
    low = MultiVariateGaussian(form="low_rank")
    assert type(low) is LowRankMultiVariateGaussian and isinstance(low, MultiVariateGaussian)
    assert low.form == "low_rank"
    assert set(low.state_dict()) == {"mean", "basis", "eigenvalues", "ridge"}
    assert type(copy.deepcopy(low)) is LowRankMultiVariateGaussian
    with pytest.raises(ValueError, match="form must be 'dense' or 'low_rank', got 'sparse'"):
        MultiVariateGaussian(form="sparse")
    with pytest.raises(ValueError, match="form='low_rank'"):
        LowRankMultiVariateGaussian(form="dense")
    with pytest.raises(ValueError, match="apply to form='dense' only"):
        MultiVariateGaussian(3, 4, form="low_rank")


def test_buffers_shapes_dtypes_and_no_precision_stack():
    x = _embedding(10, 30, 3, 4)
    low = MultiVariateGaussian(form="low_rank")
    out = low.fit(torch.from_numpy(x).float())
    r = low_rank_width(10, 30)
    assert [tuple(t.shape) for t in out] == [(30, 12), (12, 30, r), (12, r), ()]
    assert all(t.dtype == torch.float32 for t in out)  # float32 input: stored in float32 (computed in float64)
    assert set(low.state_dict()) == {"mean", "basis", "eigenvalues", "ridge"}
    assert "inv_covariance" not in dict(low.named_buffers())
    assert float(low.ridge) == pytest.approx(DEFAULT_RIDGE, rel=1e-7)  # the float32 rounding of 0.01001
    assert low(torch.from_numpy(x))[1].dtype == torch.float64  # forward fits; float64 input stays float64
    assert "rank=9" in repr(low)


# --------------------------------------------------------------------------- parity: the core, the dense form
@pytest.mark.parametrize("b, c, offset", [(10, 30, 0.0), (6, 25, 40.0), (2, 8, 0.0)])
def test_float64_equals_the_core_low_rank_form(b, c, offset):
    x = _embedding(b, c, 3, 4, offset=offset, seed=b)
    q = _embedding(5, c, 3, 4, offset=offset, seed=b + 1)
    core = anomstats.MultiVariateGaussian(form="low_rank").fit(x)
    low = _low_rank(x)
    covariances = patch_covariances(x, DEFAULT_RIDGE)
    r = low_rank_width(b, c)
    assert low.basis.dtype == torch.float64 and low.basis.shape == core.basis.shape == (12, c, r)
    # mean_atol: two computed means of b values of magnitude <= max|x|.
    mean_tol = mean_atol(np.abs(x).max(), b)
    np.testing.assert_allclose(low.mean.numpy(), core.mean, rtol=0, atol=mean_tol)
    # low_rank_eigenvalue_atol: Weyl, |dλ| <= |dA|_2 for the basis route's backward error, per patch.
    assert_close_each(low.eigenvalues.numpy(), core.eigenvalues, atol=low_rank_eigenvalue_atol(covariances, b))
    # log_det_atol: |d log det A| <= c kappa(A) δ per patch (c δ_dense >> the basis route's max(2 max(c, n), 256) eps).
    log_det_tol = np.array([log_det_atol(a, b) for a in covariances])
    assert_close_each(low.log_det.numpy(), core.log_det, atol=log_det_tol)
    # low_rank_basis_atol: Davis-Kahan, each column up to its sign (an eigenvector is defined up to its sign).
    aligned = _aligned(low.basis.numpy(), core.basis)
    basis_tol = np.broadcast_to(low_rank_basis_atol(covariances, r, b), core.basis.shape)
    assert_close_each(aligned, core.basis, atol=basis_tol)
    # low_rank_mahalanobis_tolerances: both fits' backward errors (kappa = λ_max / ρ), evaluation, means.
    rtol, atol = low_rank_mahalanobis_tolerances(covariances, b, mean_tol)
    assert rtol < 1e-8  # the bound stays meaningful: PaDiM-like data in float64 agree to ~1e-10 relative
    np.testing.assert_allclose(low.mahalanobis(torch.from_numpy(q)).numpy(), core.mahalanobis(q), rtol=rtol, atol=atol)


def test_float64_equals_the_dense_torch_module():
    x = _embedding(12, 40, 4, 4, offset=3.0, seed=2)
    q = torch.from_numpy(_embedding(6, 40, 4, 4, offset=3.0, seed=3))
    low = _low_rank(x)
    dense = MultiVariateGaussian()
    dense.fit(torch.from_numpy(x))
    covariances = patch_covariances(x, DEFAULT_RIDGE)
    # low_rank_mahalanobis_tolerances: a dense (Cholesky) and a low-rank (Gram-route) fit of the same data, float64.
    rtol, atol = low_rank_mahalanobis_tolerances(covariances, 12, mean_atol(np.abs(x).max(), 12))
    assert rtol < 1e-8
    torch.testing.assert_close(low.mahalanobis(q), dense.mahalanobis(q), rtol=rtol, atol=atol)
    # and the distance of the mean itself is 0 to rounding, never negative or NaN
    at_mean = low.mean.T.reshape(1, 4, 4, 40).permute(0, 3, 1, 2)
    d = low.mahalanobis(at_mean)
    assert torch.isfinite(d).all() and (d >= 0).all() and d.max() < 1e-6


@given(
    b=st.integers(2, 12), c=st.integers(1, 14), p=st.integers(1, 4), offset=st.sampled_from([0.0, 30.0]),
    seed=st.integers(0, 999),
)
def test_float64_parity_for_any_shape(b, c, p, offset, seed):
    x = _embedding(b, c, 1, p, offset, seed)
    q = _embedding(3, c, 1, p, offset, seed + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # B - 1 >= C: the no-advantage warning (tested below)
        core = anomstats.MultiVariateGaussian(form="low_rank").fit(x)
        low = _low_rank(x)
    covariances = patch_covariances(x, DEFAULT_RIDGE)
    mean_tol = mean_atol(np.abs(x).max(), b)
    # Bounds: low_rank_eigenvalue_atol (Weyl) and low_rank_mahalanobis_tolerances, as above.
    assert_close_each(low.eigenvalues.numpy(), core.eigenvalues, atol=low_rank_eigenvalue_atol(covariances, b))
    rtol, atol = low_rank_mahalanobis_tolerances(covariances, b, mean_tol)
    np.testing.assert_allclose(low.mahalanobis(torch.from_numpy(q)).numpy(), core.mahalanobis(q), rtol=rtol, atol=atol)


def test_float32_against_float64():
    x = _embedding(8, 16, 3, 3, offset=2.0, seed=4, scale=0.1)  # kappa ~ 10: float32 bounds of ~1e-3
    q = _embedding(5, 16, 3, 3, offset=2.0, seed=5, scale=0.1)
    low64 = _low_rank(x)
    low32 = _low_rank(torch.from_numpy(x).float())
    assert low32.basis.dtype == low32.eigenvalues.dtype == low32.mean.dtype == torch.float32
    covariances = patch_covariances(x, DEFAULT_RIDGE)
    # Float32 bounds: the input's rounding to float32 and the buffers' are within the float32 backward error
    # (low_rank_backward_error with eps of float32); the fit itself runs in float64.
    mean_tol32 = mean_atol(np.abs(x).max(), 8, np.float32)
    np.testing.assert_allclose(low32.mean.numpy(), low64.mean.numpy(), rtol=0, atol=mean_tol32)
    eig_tol = low_rank_eigenvalue_atol(covariances, 8, np.float32)  # Weyl, float32
    assert_close_each(low32.eigenvalues.double(), low64.eigenvalues, atol=eig_tol)
    rtol32, atol32 = low_rank_mahalanobis_tolerances(covariances, 8, mean_tol32, np.float32)
    got32 = low32.mahalanobis(torch.from_numpy(q).float()).double()
    assert_close_each(got32, low64.mahalanobis(torch.from_numpy(q)), rtol=rtol32, atol=atol32)
    # A float64 module (.double()) fits float32 input in float64 buffers; half input is computed and stored in float32.
    assert _low_rank(torch.from_numpy(x).float(), ).basis.dtype == torch.float32
    as_double = MultiVariateGaussian(form="low_rank").double()
    assert as_double.fit(torch.from_numpy(x).float())[1].dtype == torch.float64
    half = _low_rank(torch.from_numpy(x).half())
    # ... and its distances are returned in the input's half dtype (issue 13; tests/test_torch_dtypes.py).
    assert half.basis.dtype == torch.float32 and half.mahalanobis(torch.from_numpy(q).half()).dtype == torch.float16


@pytest.mark.parametrize("chunk_bytes", [1, 20_000])
def test_chunking_does_not_change_the_result(chunk_bytes):
    x = _embedding(9, 20, 5, 3, seed=6)
    q = torch.from_numpy(_embedding(4, 20, 5, 3, seed=7))
    expected = _low_rank(x)
    got = _low_rank(x, chunk_bytes=chunk_bytes)
    covariances = patch_covariances(x, DEFAULT_RIDGE)
    # Bounds: low_rank_eigenvalue_atol and low_rank_mahalanobis_tolerances (chunks change only the blocking).
    assert_close_each(got.eigenvalues, expected.eigenvalues, atol=low_rank_eigenvalue_atol(covariances, 9))
    rtol, atol = low_rank_mahalanobis_tolerances(covariances, 9, mean_atol(np.abs(x).max(), 9))
    torch.testing.assert_close(got.mahalanobis(q), expected.mahalanobis(q), rtol=rtol, atol=atol)


def test_scoring_is_differentiable_with_respect_to_the_embedding():
    low = _low_rank(_embedding(5, 7, 2, 2, seed=8))
    q = torch.from_numpy(_embedding(2, 7, 2, 2, offset=1.0, seed=9)).requires_grad_(True)
    assert torch.autograd.gradcheck(low.mahalanobis, (q,))


# --------------------------------------------------------------------------- trace, export, ONNX
def _fitted_for_export():
    g = torch.Generator().manual_seed(0)
    low = MultiVariateGaussian(form="low_rank")
    low.fit(torch.randn(6, 60, 3, 5, generator=g))  # r = 5, C = 60: the dense stack would be 12x larger
    return low, torch.randn(7, 60, 3, 5, generator=g)


def _score_rtol(low):
    """low_rank_evaluation_rtol: two float32 evaluations of the same buffers (sqrt(kappa), not kappa)."""
    return low_rank_evaluation_rtol(_model_covariance(low), low.basis.shape[2], np.float32)


def test_jit_trace_at_batch_one_is_correct_at_other_batch_sizes():
    low, embeddings = _fitted_for_export()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("error", torch.jit.TracerWarning)  # our code gives the tracer nothing to doubt
        traced = torch.jit.trace(PadimScore(low), embeddings[:1])
    rtol = _score_rtol(low)  # the same buffers: float32 evaluation rounding only
    for b in (1, 4, 7):
        torch.testing.assert_close(traced(embeddings[:b]), low.mahalanobis(embeddings[:b]), rtol=rtol, atol=0)


def test_torch_export_with_a_dynamic_batch():
    low, embeddings = _fitted_for_export()
    exported = torch.export.export(
        PadimScore(low), (embeddings,), dynamic_shapes={"embedding": {0: torch.export.Dim("batch")}}
    ).module()
    rtol = _score_rtol(low)  # the same buffers: float32 evaluation rounding only
    for b in (1, 4, 7):
        torch.testing.assert_close(exported(embeddings[:b]), low.mahalanobis(embeddings[:b]), rtol=rtol, atol=0)


def test_onnx_export_holds_the_low_rank_numbers(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    low, embeddings = _fitted_for_export()
    path = tmp_path / "padim_low_rank.onnx"
    batch = torch.export.Dim("batch")
    torch.onnx.export(PadimScore(low).eval(), (embeddings,), str(path), dynamic_shapes=({0: batch},))
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    c, p = low.mean.shape
    r = low.basis.shape[2]
    stored = sum(math.prod(initializer.dims) for initializer in model.graph.initializer)
    low_rank_numbers = p * c * r + c * p + p * r  # basis, mean, eigenvalues (and a few scalars)
    assert stored <= 1.5 * low_rank_numbers + 64, (stored, low_rank_numbers)
    assert stored < p * c * c / 4  # far from a dense (P, C, C) stack
    session = ort.InferenceSession(str(path))
    rtol = _score_rtol(low)  # ONNX Runtime against eager torch, both float32 on the same buffers
    for b in (1, 4, 7):
        got = session.run(None, {session.get_inputs()[0].name: embeddings[:b].numpy()})[0]
        assert_close_each(torch.from_numpy(got), low.mahalanobis(embeddings[:b]), rtol=rtol, atol=0)


# --------------------------------------------------------------------------- checkpoints
def test_dense_state_dict_loads_into_dense_modules_and_anomalib():
    # Scaled so that kappa = λ_max / ρ is ~30: the dense evaluation's bound grows with kappa itself.
    x = torch.from_numpy(_embedding(10, 24, 3, 4, seed=10, scale=0.1)).float()
    q = torch.from_numpy(_embedding(5, 24, 3, 4, seed=11, scale=0.1)).float()
    low = _low_rank(x)
    state = low.dense_state_dict()
    assert set(state) == {"mean", "inv_covariance"}
    assert state["mean"].shape == (24, 12) and state["inv_covariance"].shape == (12, 24, 24)
    assert state["mean"].dtype == state["inv_covariance"].dtype == torch.float32  # as anomalib's buffers
    assert torch.equal(state["inv_covariance"], state["inv_covariance"].mT)  # exactly symmetric
    assert state["mean"].data_ptr() != low.mean.data_ptr()  # a copy
    ours = MultiVariateGaussian()
    ours.load_state_dict(state)  # strict
    reference = AnomalibMultiVariateGaussian()
    reference.load_state_dict(state)  # strict
    # mahalanobis_tolerances, shared fit, float32: the dense evaluation of the same model ((c + 2) c eps
    # kappa, both sides; the precision's rounding to float32 adds c eps32 kappa / 2, within it), which
    # also covers the low-rank evaluation (low_rank_evaluation_rtol, sqrt(kappa)).
    rtol = mahalanobis_tolerances(_model_covariance(low), 2, dtype=np.float32, shared_fit=True)[0]
    assert rtol < 1e-2
    expected = low.mahalanobis(q)
    torch.testing.assert_close(ours.mahalanobis(q), expected, rtol=rtol, atol=0)
    anomalib_distance = anomalib_padim_distance(q, reference.mean, reference.inv_covariance)[:, 0]
    torch.testing.assert_close(anomalib_distance, expected, rtol=rtol, atol=0)


def test_dense_state_dict_in_float64_is_the_core_precision():
    x = _embedding(10, 24, 2, 3, offset=5.0, seed=12)
    low = _low_rank(x)
    state = low.dense_state_dict()
    assert state["inv_covariance"].dtype == torch.float64  # the module's dtype
    core = anomstats.MultiVariateGaussian(form="low_rank").fit(x)
    # precision_atol: two computed inverses of the regularised covariances, kappa(A) δ |A^-1|, with δ the
    # low-rank fit's (low_rank_backward_error) instead of the dense one's: scaled by their ratio.
    covariances = patch_covariances(x, DEFAULT_RIDGE)
    scale = low_rank_backward_error(10, 24) / covariance_backward_error(10, 24)
    atol = scale * precision_atol(covariances, 10)
    np.testing.assert_allclose(state["inv_covariance"].numpy(), core.precision, rtol=0, atol=atol)


def test_low_rank_state_dict_round_trip_save_load_and_moves():
    x = torch.from_numpy(_embedding(8, 20, 2, 3, seed=13)).float()
    q = torch.from_numpy(_embedding(3, 20, 2, 3, seed=14)).float()
    low = _low_rank(x)
    fresh = MultiVariateGaussian(form="low_rank")
    fresh.load_state_dict(low.state_dict())  # strict
    # Exact (bound 0): the same buffers, the same computation.
    torch.testing.assert_close(fresh.mahalanobis(q), low.mahalanobis(q), rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(low.state_dict(), buffer)
    buffer.seek(0)
    reloaded = MultiVariateGaussian(form="low_rank")
    reloaded.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(reloaded.mahalanobis(q), low.mahalanobis(q), rtol=0, atol=0)
    # nested, as inside PaDiM (prefix model.gaussian.)
    parent = torch.nn.Module()
    parent.gaussian = MultiVariateGaussian(form="low_rank")
    parent.load_state_dict({f"gaussian.{k}": v for k, v in low.state_dict().items()})
    torch.testing.assert_close(parent.gaussian.mahalanobis(q), low.mahalanobis(q), rtol=0, atol=0)
    # .double() casts the buffers exactly; float64 evaluation of float32 buffers: the shared-fit float32 bound.
    doubled = copy.deepcopy(low).double()
    assert doubled.basis.dtype == doubled.ridge.dtype == torch.float64
    torch.testing.assert_close(doubled.mahalanobis(q).float(), low.mahalanobis(q), rtol=_score_rtol(low), atol=0)


def test_checkpoints_of_the_other_form_are_refused_with_directions():
    x = torch.randn(6, 10, 2, 2, generator=torch.Generator().manual_seed(0))
    dense = MultiVariateGaussian()
    dense.fit(x)
    low = MultiVariateGaussian(form="low_rank")
    refused = r"cannot be recovered from a precision matrix without refitting.*form='dense'"
    with pytest.raises(RuntimeError, match=refused):
        low.load_state_dict(dense.state_dict())
    with pytest.raises(RuntimeError, match=r"form='dense'"):
        low.load_state_dict(dense.state_dict(), strict=False)  # never half-loaded
    assert low.basis.shape == (0,)
    parent = torch.nn.Module()
    parent.gaussian = MultiVariateGaussian(form="low_rank")
    with pytest.raises(RuntimeError, match=re.escape("under 'gaussian.'")):
        parent.load_state_dict({f"gaussian.{k}": v for k, v in dense.state_dict().items()})
    fitted_low = _low_rank(x)
    with pytest.raises(RuntimeError, match=r"MultiVariateGaussian\(form='low_rank'\).*dense_state_dict"):
        MultiVariateGaussian().load_state_dict(fitted_low.state_dict())


# --------------------------------------------------------------------------- errors and warnings
def test_ridge_zero_needs_more_images_than_features():
    x = torch.from_numpy(_embedding(10, 30, 2, 2, seed=15))
    with pytest.raises(np.linalg.LinAlgError, match=re.escape(needs_ridge_message(10, 30))):
        MultiVariateGaussian(form="low_rank", ridge=0.0).fit(x)
    with pytest.raises(np.linalg.LinAlgError, match=re.escape(needs_ridge_message(30, 30))):
        MultiVariateGaussian(form="low_rank", ridge=0.0).fit(torch.from_numpy(_embedding(30, 30, 1, 1)))


def test_enough_images_warn_that_the_form_has_no_advantage_and_stay_exact():
    x = _embedding(12, 5, 2, 2, seed=16)
    q = torch.from_numpy(_embedding(3, 5, 2, 2, seed=17))
    with pytest.warns(UserWarning, match=re.escape(no_advantage_message(12, 5))):
        low = _low_rank(x)
    dense = MultiVariateGaussian()
    dense.fit(torch.from_numpy(x))
    covariances = patch_covariances(x, DEFAULT_RIDGE)
    # low_rank_mahalanobis_tolerances: dense against low-rank fits, float64.
    rtol, atol = low_rank_mahalanobis_tolerances(covariances, 12, mean_atol(np.abs(x).max(), 12))
    torch.testing.assert_close(low.mahalanobis(q), dense.mahalanobis(q), rtol=rtol, atol=atol)
    # ridge 0 is allowed at full rank: the residual term is dropped, the result is the dense form's.
    with pytest.warns(UserWarning, match="no advantage"):
        exact = _low_rank(x, ridge=0.0)
    dense0 = MultiVariateGaussian(ridge=0.0)
    dense0.fit(torch.from_numpy(x))
    covariances0 = patch_covariances(x, 0.0)
    rtol0, atol0 = low_rank_mahalanobis_tolerances(covariances0, 12, mean_atol(np.abs(x).max(), 12))
    torch.testing.assert_close(exact.mahalanobis(q), dense0.mahalanobis(q), rtol=rtol0, atol=atol0)
    assert torch.isfinite(exact.log_det).all()


def test_a_singular_patch_without_ridge_is_named():
    x = torch.from_numpy(_embedding(12, 4, 2, 2, seed=18))
    x[:, 0, 1, 0] = 3.0  # a constant feature at patch (1, 0): singular without a ridge
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(np.linalg.LinAlgError, match=r"patch .*\(1, 0\).*singular"):
            MultiVariateGaussian(form="low_rank", ridge=0.0).fit(x)


def test_clear_errors():
    low = MultiVariateGaussian(form="low_rank")
    with pytest.raises(RuntimeError, match="not fitted"):
        low.mahalanobis(torch.randn(2, 3, 2, 2))
    with pytest.raises(RuntimeError, match="not fitted"):
        low.dense_state_dict()
    with pytest.raises(ValueError, match="1 observation"):
        low.fit(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="NaN or infinite"):
        low.fit(torch.tensor([[[1.0]], [[float("nan")]], [[2.0]]]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        low.fit(np.zeros((3, 2, 2, 2)))
    with pytest.raises(ValueError, match="ridge"):
        MultiVariateGaussian(form="low_rank", ridge=-1.0)
    low.fit(torch.randn(4, 5, 2, 2))
    with pytest.raises(ValueError, match=r"\(B, 5, \*spatial\)"):
        low.mahalanobis(torch.randn(2, 4, 2, 2))


def test_inputs_are_never_modified():
    for dtype in (torch.float32, torch.float64):
        x = torch.from_numpy(_embedding(6, 10, 2, 2, seed=19)).to(dtype)
        before = x.clone()
        low = MultiVariateGaussian(form="low_rank").to(dtype)
        low.fit(x)
        low.update(x)
        low.update(x[:1])
        low.compute()
        low.mahalanobis(x)
        low.dense_state_dict()
        assert torch.equal(x, before)


# --------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("splits", [[1, 1, 8], [5, 5], [2, 3, 4, 1], [3, 3, 3, 1]])
def test_streaming_update_compute_equals_fit(splits):
    # C = 10 > B - 1 = 9; the last two splits grow the factor past C columns (10 + 3 merges): it is reduced.
    x = _embedding(10, 10, 2, 3, offset=20.0, seed=20)
    q = torch.from_numpy(_embedding(4, 10, 2, 3, offset=20.0, seed=21))
    expected = _low_rank(x)
    low = MultiVariateGaussian(form="low_rank", chunk_bytes=500)
    for part in torch.split(torch.from_numpy(x), splits):
        low.update(part)
    got = low.compute(keep_stream=True)
    merges = len(splits) - 1
    covariances = patch_covariances(x, DEFAULT_RIDGE)
    # Bounds: mean_atol (Chan's running mean: one more rounding per merge); the merges' correction columns
    # carry the partial means' rounding, streamed_covariance_atol per patch, relative to |A|_2 (a further
    # backward error), in low_rank_eigenvalue_atol (Weyl) and low_rank_mahalanobis_tolerances.
    mean_tol = mean_atol(np.abs(x).max(), 10) * (1 + len(splits))
    flat = x.reshape(10, 10, -1)
    streamed = max(
        np.linalg.norm(streamed_covariance_atol(flat[:, :, p], merges)) / np.linalg.norm(covariances[p], 2)
        for p in range(flat.shape[2])
    )
    torch.testing.assert_close(got[0], expected.mean, rtol=0, atol=mean_tol)
    eig_tol = low_rank_eigenvalue_atol(covariances, 10, extra_error=streamed)
    assert_close_each(got[2], expected.eigenvalues, atol=eig_tol)
    rtol, atol = low_rank_mahalanobis_tolerances(covariances, 10, mean_tol, extra_error=streamed)
    torch.testing.assert_close(low.mahalanobis(q), expected.mahalanobis(q), rtol=rtol, atol=atol)
    assert low._moments.factor.shape[2] <= 10  # never wider than C
    low.update(torch.from_numpy(x))  # the state is kept: more updates can follow
    with pytest.warns(UserWarning, match="no advantage"):  # 20 images of 10 features: full rank
        both = low.compute()
        twice = _low_rank(np.concatenate([x, x]))
    torch.testing.assert_close(both[0], twice.mean, rtol=0, atol=2 * mean_tol)
    covariances2 = patch_covariances(np.concatenate([x, x]), DEFAULT_RIDGE)
    eig_tol2 = low_rank_eigenvalue_atol(covariances2, 20, extra_error=2 * streamed)
    assert_close_each(both[2], twice.eigenvalues, atol=eig_tol2)


def test_streaming_float32_input_accumulates_in_float64_and_stores_float32():
    x = torch.from_numpy(_embedding(9, 12, 2, 2, offset=50.0, seed=22)).float()
    low = MultiVariateGaussian(form="low_rank")
    for part in torch.split(x, 4):
        low.update(part)
    mean, basis, eigenvalues, ridge = low.compute(keep_stream=True)
    assert mean.dtype == basis.dtype == eigenvalues.dtype == ridge.dtype == torch.float32
    assert low._moments.factor.dtype == torch.float64
    reference = _low_rank(x.double())
    covariances = patch_covariances(x.double().numpy(), DEFAULT_RIDGE)
    # Accumulated in float64 from the same float32 values: the float64 bounds (Weyl; 2 merges, as above)
    # plus the final rounding of the stored eigenvalues, half an ulp (eps32 / 2 relative).
    flat = x.double().numpy().reshape(9, 12, -1)
    streamed = max(
        np.linalg.norm(streamed_covariance_atol(flat[:, :, p], 2)) / np.linalg.norm(covariances[p], 2)
        for p in range(4)
    )
    atol = low_rank_eigenvalue_atol(covariances, 9, extra_error=streamed)
    assert_close_each(eigenvalues.double(), reference.eigenvalues, rtol=np.finfo(np.float32).eps / 2, atol=atol)


def test_streaming_errors():
    low = MultiVariateGaussian(form="low_rank")
    with pytest.raises(ValueError, match="update"):
        low.compute()
    low.update(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="at least 2"):
        low.compute()
    with pytest.raises(ValueError, match="reset"):
        low.update(torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match="NaN or infinite"):
        low.update(torch.full((2, 3, 2, 2), float("inf")))
    assert low._moments.count == 1  # a refused batch leaves the state as it was
    low.reset()
    low.update(torch.randn(3, 4, 2, 2))
    assert low.compute()[1].shape == (4, 4, 2)


def test_streaming_refuses_a_process_group(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("no gloo backend")
    x = torch.randn(4, 6, 2, 2, generator=torch.Generator().manual_seed(1))
    low = MultiVariateGaussian(form="low_rank")
    low.update(x)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(NotImplementedError, match=r"all-reduce.*fit\(\).*partial_fit.*form='dense'"):
            low.update(x)
        with pytest.raises(NotImplementedError, match="torch.distributed"):
            low.compute()
        low.fit(x)  # a one-shot fit is local, as the dense form's
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- devices
@pytest.mark.parametrize("device", DEVICES)
def test_devices_and_moves(device):
    x = _embedding(10, 30, 3, 3, offset=1.0, seed=23, scale=0.1)  # kappa ~ 30 (the float32 bound grows with it)
    q = _embedding(4, 30, 3, 3, offset=1.0, seed=24, scale=0.1)
    cpu = _low_rank(x)
    on_device = _low_rank(torch.from_numpy(x).to(device))
    assert on_device.basis.device.type == device and on_device.ridge.device.type == device
    covariances = patch_covariances(x, DEFAULT_RIDGE)
    mean_tol = mean_atol(np.abs(x).max(), 10)
    # Bounds: low_rank_eigenvalue_atol and low_rank_mahalanobis_tolerances (devices differ in their eigensolvers and
    # summation order), float64.
    assert_close_each(on_device.eigenvalues.cpu(), cpu.eigenvalues, atol=low_rank_eigenvalue_atol(covariances, 10))
    rtol, atol = low_rank_mahalanobis_tolerances(covariances, 10, mean_tol)
    qd = torch.from_numpy(q).to(device)
    expected = cpu.mahalanobis(torch.from_numpy(q))
    torch.testing.assert_close(on_device.mahalanobis(qd).cpu(), expected, rtol=rtol, atol=atol)
    # streaming on the device
    streamed = MultiVariateGaussian(form="low_rank")
    for part in torch.split(torch.from_numpy(x).to(device), 4):
        streamed.update(part)
    streamed.compute()
    assert streamed.basis.device.type == device
    flat = x.reshape(10, 30, -1)
    extra = max(
        np.linalg.norm(streamed_covariance_atol(flat[:, :, p], 2)) / np.linalg.norm(covariances[p], 2)
        for p in range(flat.shape[2])
    )
    rtol_s, atol_s = low_rank_mahalanobis_tolerances(covariances, 10, 3 * mean_tol, extra_error=extra)
    torch.testing.assert_close(streamed.mahalanobis(qd).cpu(), expected, rtol=rtol_s, atol=atol_s)
    # dense checkpoint on the device, then a float32 module moved there
    state = on_device.dense_state_dict()
    precision = state["inv_covariance"]
    assert precision.device.type == device and torch.equal(precision, precision.mT)
    moved = copy.deepcopy(cpu).to(device).float()
    assert moved.basis.device.type == device and moved.basis.dtype == torch.float32
    # The float64 fit rounded to float32 buffers and evaluated in float32: the float32 bounds.
    mean_tol32 = mean_atol(np.abs(x).max(), 10, np.float32)
    rtol32, atol32 = low_rank_mahalanobis_tolerances(covariances, 10, mean_tol32, np.float32)
    torch.testing.assert_close(moved.mahalanobis(qd.float()).cpu().double(), expected, rtol=rtol32, atol=atol32)


def test_compute_spends_the_stream_unless_asked_to_keep_it():
    # As the dense form: compute() frees the streamed factors (they would sit next to the fitted basis), and the
    # stream refuses more data until reset(); keep_stream=True gives the same fit and keeps streaming possible.
    x = torch.from_numpy(_embedding(8, 12, 2, 2, offset=3.0, seed=31))
    kept, spent = MultiVariateGaussian(form="low_rank"), MultiVariateGaussian(form="low_rank")
    for module in (kept, spent):
        module.update(x[:4])
        module.update(x[4:])
    same = kept.compute(keep_stream=True)
    assert all(torch.equal(a, b) for a, b in zip(same, spent.compute()))  # the same numbers either way
    assert "stream_factor" not in spent._buffers and "stream_factor" in kept._buffers
    for call in (lambda: spent.update(x), spent.compute):
        with pytest.raises(RuntimeError, match=r"spent this stream.*reset\(\)"):
            call()
    kept.update(x[:2])  # kept: more data may follow
    assert kept.compute()[1].shape == (4, 12, 9)  # 10 observations: width min(N - 1, C)
    spent.reset()
    spent.update(x)
    assert spent.compute()[1].shape == (4, 12, 7)
    with pytest.raises(TypeError, match="keep_stream"):
        MultiVariateGaussian(form="low_rank").compute(keep_stream="yes")
