"""Fault injection for the per-patch Gaussians (issue 11): the torch adapter keeps the core's promises.

Each section is one point of issue 11, for ``anomstats_torch.MultiVariateGaussian`` in its three forms
(dense, ``form="low_rank"``, ``storage="packed"``) and, where the core shares the rule, for
``anomstats.MultiVariateGaussian``:

1. ``ridge=0`` refuses patches that are singular to rounding, deterministically, by the core's rank test
   (:func:`anomstats._patch_kernels.singular_feature`), with the core's exception and message;
3. NaN/inf queries raise a ``ValueError`` naming the input in eager mode; finite queries at any distance give
   finite or ``+inf`` distances, never NaN (eager, traced and exported);
8. float32 fits whose covariance or precision float32 cannot represent raise an error naming the scale (or fit
   in float64 when asked), never an all-zero precision;
9. gradients of ``mahalanobis`` are finite everywhere, 0 at the patch mean; values are anomalib's formula;
10. argument parity: bool embeddings, wrongly shaped queries, NumPy integers, boolean options;
13. ``MultiVariateGaussian._cov`` follows ``numpy.cov`` (values and exception types) for every argument.

Every tolerance states its error bound next to the assertion.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import anomstats  # noqa: E402
from anomstats._patch_kernels import (  # noqa: E402
    ThreadScratch,
    check_query_results,
    patch_rank_eps,
    score_chunk,
    singular_feature,
)
from anomstats._validation import check_patch_score_shape  # noqa: E402
from anomstats_torch import MultiVariateGaussian  # noqa: E402
from tests._export import PadimScore, export_onnx, export_program, onnx_stack, run_onnx  # noqa: E402
from tests._tolerances import TWO_SIDES, assert_close_each, eps, low_rank_evaluation_rtol  # noqa: E402

FORMS = [{}, {"storage": "packed"}, {"form": "low_rank"}]
FORM_IDS = ["dense", "packed", "low_rank"]
TORCH_DTYPES = [torch.float32, torch.float64]


def _embedding(b=12, c=3, h=2, w=2, *, seed=0, scale=1.0, offset=0.0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(c, c)) * 0.3 + np.eye(c)
    x = np.einsum("bchw,cd->bdhw", rng.normal(size=(b, c, h, w)), mixing) * scale + offset
    return x.astype(dtype)


def _fitted(form, dtype=torch.float32, b=12, c=3, seed=0):
    mvg = MultiVariateGaussian(**form)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # low rank with B - 1 >= C: "no advantage"
        mvg.fit(torch.from_numpy(_embedding(b, c, seed=seed)).to(dtype))
    return mvg


def _dense_precision(mvg) -> np.ndarray:
    """The precision the module scores with, as a float64 (P, C, C) array (the low-rank form materialised)."""
    if mvg.form == "low_rank":
        return mvg.dense_state_dict()["inv_covariance"].double().numpy()
    return mvg.inv_covariance.double().numpy()


def _message_before_remedy(error: BaseException) -> str:
    """The fault part of a message (before the remedy, which names each package's own options)."""
    return str(error).split("; ", 1)[0]


# ============================================================================ 1. rank test of ridge=0
def _with_combination(seed, c, n, dtype, offset=0.0):
    """(n, c, 2, 2) data whose patch 3 has feature c-1 an exact combination of the others (coefficients
    1e-2..1e2, both signs), then rounded to ``dtype``: singular in exact arithmetic (float64 data) or to
    within float32's rounding of the combination (float32 data)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, c, 2, 2)) + offset
    coefficients = 10.0 ** rng.uniform(-2, 2, size=c - 1) * rng.choice([-1.0, 1.0], size=c - 1)
    x[:, c - 1, 1, 1] = np.einsum("nc,c->n", x[:, : c - 1, 1, 1], coefficients)
    return x.astype(dtype)


@settings(max_examples=25)
@given(seed=st.integers(0, 10**6), c=st.integers(2, 6), extra=st.integers(1, 30), wide=st.booleans())
def test_exact_combinations_are_refused_in_both_packages_with_one_message(seed, c, extra, wide):
    dtype = np.float64 if wide else np.float32
    x = _with_combination(seed, c, c + extra, dtype)
    before = x.copy()
    with pytest.raises(np.linalg.LinAlgError) as core:
        anomstats.MultiVariateGaussian(ridge=0.0, dtype=dtype).fit(x)
    for form in FORMS[:2]:  # the low-rank form has its own rule (anomstats._low_rank.check_definite)
        with pytest.raises(np.linalg.LinAlgError) as adapter:
            MultiVariateGaussian(ridge=0, **form).fit(torch.from_numpy(x))
        # The same patch, fault, C and eps (float32 data computed in float32 by the adapter: the core's
        # dtype=float32); only the remedy differs (the adapter has no shrinkage).
        assert _message_before_remedy(adapter.value) == _message_before_remedy(core.value)
    assert "patch 3 (position (1, 1) of the 2x2 grid)" in str(core.value)
    assert "numerically singular" in str(core.value) and "ridge=0.0" in str(core.value)
    np.testing.assert_array_equal(x, before)  # inputs are never modified


def _patches_with_faults(seed, kinds):
    """(40, 3, 1, P) float32 data, patch p made singular as ``kinds[p]`` says (None: left regular, well
    conditioned):

    * ``"constant"``: feature 1 constant, a zero variance: every Cholesky factorisation fails, at any dtype;
    * ``"near"``: feature 2 = feature 0 + feature 1 + 1e-4·noise, a Schur complement of about 5e-9 of its
      variance: far above float64's rounding (C·eps64 ≈ 7e-16: a float64 Cholesky succeeds) and far below
      the float32 data's rank tolerance (C·eps32 = 3.6e-7): only the rank test refuses it there.
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 3, 1, len(kinds)))
    for patch, kind in enumerate(kinds):
        if kind == "constant":
            x[:, 1, 0, patch] = 1.0
        elif kind == "near":
            x[:, 2, 0, patch] = x[:, 0, 0, patch] + x[:, 1, 0, patch] + 1e-4 * rng.normal(size=40)
    return x.astype(np.float32)


def _fault_before_remedy(error: BaseException) -> str:
    """A singular patch's message up to its remedy: the patch, the fault, C and eps (the remedies differ)."""
    return str(error).split(" with ridge=")[0]


@settings(max_examples=25)
@given(
    seed=st.integers(0, 10**6),
    kinds=st.lists(st.sampled_from([None, "constant", "near"]), min_size=2, max_size=6).filter(any),
    wide=st.booleans(),
    one_patch_chunks=st.booleans(),
)
def test_ridge_zero_names_the_first_singular_patch_in_patch_order_in_both_packages(seed, kinds, wide, one_patch_chunks):
    # Several singular patches, some refused by the rank test alone ("near", computed in float64), some by a
    # failed factorisation ("constant"): both packages name the first one in patch order, with one message,
    # whatever the chunking (one patch per chunk, or all in one). The core runs on one thread: with several, which
    # chunk's error it re-raises depends on timing (see the report of review issue 11).
    x = _patches_with_faults(seed, kinds)
    before = x.copy()
    first = next(patch for patch, kind in enumerate(kinds) if kind)
    with pytest.raises(np.linalg.LinAlgError) as core:
        anomstats.MultiVariateGaussian(ridge=0.0, dtype=np.float64 if wide else np.float32, workers=1).fit(x)
    assert f"patch {first} (position (0, {first}) of the 1x{len(kinds)} grid)" in str(core.value)
    assert "numerically singular" in str(core.value)
    for form in FORMS[:2]:
        module = MultiVariateGaussian(ridge=0.0, chunk_bytes=1 if one_patch_chunks else 64 * 2**20, **form)
        if wide:
            module = module.double()
        with pytest.raises(np.linalg.LinAlgError) as adapter:
            module.fit(torch.from_numpy(x))
        # The same patch, fault, C and eps (float32 computations are held to float32's eps even where a chunk
        # was computed in float64 because a constant feature's variance is not a float32 normal number).
        assert _fault_before_remedy(adapter.value) == _fault_before_remedy(core.value)
    np.testing.assert_array_equal(x, before)  # inputs are never modified


def test_the_issues_example_condition_1e16_is_refused():
    # The issue's patch: x2 = x1 + 1e-8 noise, condition ~5e16 (precision ~1e16, positive log densities).
    rng = np.random.default_rng(0)
    x1 = rng.normal(size=50)
    x = np.stack([x1, x1 + 1e-8 * rng.normal(size=50), rng.normal(size=50)], axis=1)[:, :, None]
    assert np.linalg.cond(np.cov(x[:, :, 0].T)) > 1e16
    with pytest.raises(np.linalg.LinAlgError, match="numerically singular"):
        anomstats.MultiVariateGaussian(ridge=0.0).fit(x)
    for form in FORMS[:2]:
        with pytest.raises(np.linalg.LinAlgError, match="numerically singular"):
            MultiVariateGaussian(ridge=0.0, **form).fit(torch.from_numpy(x))


def _correlated_pair(seed, n, smallest):
    """(n, 2, 1) float64 data whose sample correlation matrix has eigenvalues 2 - smallest and smallest.

    Centred orthonormal columns (QR of centred noise), scaled and rotated by 45°: cov = R exactly in exact
    arithmetic, so the only departures are the roundings of building and fitting the data.
    """
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 2))
    z -= z.mean(axis=0)
    q, _ = np.linalg.qr(z)
    values = np.array([2.0 - smallest, smallest])
    rotation = np.array([[1.0, -1.0], [1.0, 1.0]]) / math.sqrt(2.0)
    return (q * np.sqrt((n - 1) * values)) @ rotation.T


@settings(max_examples=20)
@given(seed=st.integers(0, 10**6), n=st.integers(4, 6))
def test_a_nearly_singular_patch_of_condition_1e16_is_refused(seed, n):
    # Not exactly singular: the correlation matrix has λ_min = 2e-16, condition (2 - λ)/λ = 1e16.
    # Bound (anomstats._patch_kernels.singular_feature): a patch is refused whenever λ_min(R) <= eps, here
    # eps = 16 eps64 = 3.6e-15 (patch_rank_eps). The computed R differs from the exact one by the data's
    # rounding and the (n + 3)-term sums of the covariance, (n + 3) u <= 1e-15 per entry (n <= 6), so its
    # λ_min <= 2e-16 + 2e-15 < 3.6e-15: refused, and by C·eps's margin also after Cholesky's backward error.
    x = _correlated_pair(seed, n, 2e-16)[:, :, None]
    assert patch_rank_eps(float(np.finfo(np.float64).eps), np.float64) == 16 * eps(np.float64)
    with pytest.raises(np.linalg.LinAlgError, match="numerically singular"):
        anomstats.MultiVariateGaussian(ridge=0.0).fit(x)
    with pytest.raises(np.linalg.LinAlgError, match="numerically singular"):
        MultiVariateGaussian(ridge=0.0).fit(torch.from_numpy(x))


@settings(max_examples=20)
@given(seed=st.integers(0, 10**6), n=st.integers(4, 30))
def test_well_conditioned_unregularised_patches_are_accepted(seed, n):
    # The other side of the bound: λ_min(R) > C·eps (here 1e-9 > 2 · 3.6e-15) is always accepted.
    x = _correlated_pair(seed, n, 1e-9)[:, :, None]
    core = anomstats.MultiVariateGaussian(ridge=0.0).fit(x)
    mvg = MultiVariateGaussian(ridge=0.0)
    mvg.fit(torch.from_numpy(x))
    reference = np.linalg.inv(np.cov(x[:, :, 0].T))
    # Both invert a covariance of condition ~2e9: backward errors of ~(n + 3)·C·eps become kappa·delta
    # relative to |P| (Higham thm. 14.1): 2e9 · 40 · 2.2e-16 ≈ 2e-5; doubled for the two sides.
    bound = TWO_SIDES * 2e9 * (n + 3) * 2 * eps(np.float64) * np.abs(reference).max()
    assert_close_each(core.precision[0], reference, atol=bound)
    assert_close_each(mvg.inv_covariance[0].numpy(), reference, atol=bound)


def test_the_rank_test_uses_the_eps_of_the_data_not_of_the_accumulation():
    # float32 data near 1e3 (std 1): x3 = round32(x1 + x2) leaves rounding noise of (ulp(1e3)²/12)/var
    # ~ 1.6e-10 of x3's variance. That is below C·eps32 = 3.6e-7 (the data's precision: refused) but far
    # above C·16·eps64 = 1.1e-14 (float64 data are taken at face value: accepted), margins 2e3 and 1e4.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 3, 1)) + 1000.0
    x[:, 2] = x[:, 0] + x[:, 1]
    x32 = x.astype(np.float32)
    with pytest.raises(np.linalg.LinAlgError, match=r"eps=1\.2e-07"):
        anomstats.MultiVariateGaussian(ridge=0.0).fit(x32)  # accumulated in float64, held to float32's eps
    with pytest.raises(np.linalg.LinAlgError, match="numerically singular"):
        MultiVariateGaussian(ridge=0.0).double().fit(torch.from_numpy(x32))  # computed in float64 too
    wide = x32.astype(np.float64)  # the same values, declared float64
    assert np.isfinite(anomstats.MultiVariateGaussian(ridge=0.0).fit(wide).precision).all()
    mvg = MultiVariateGaussian(ridge=0.0)
    mvg.fit(torch.from_numpy(wide))
    assert torch.isfinite(mvg.inv_covariance).all()


@settings(max_examples=30)
@given(seed=st.integers(0, 10**6), c=st.integers(2, 8), refused=st.booleans())
def test_singular_feature_two_sided_bound(seed, c, refused):
    # The bound of singular_feature on λ = λ_min(R): refused if λ <= eps, accepted if λ > C·eps. R is a
    # random correlation matrix shifted to a chosen λ (unit diagonal kept): eps·0.5 or 2·C·eps with
    # eps = 1e-6, so that float64's inversion (relative error <= cond·4·eps64 < 1e-8 of the diagonal, cond
    # <= 2e6) cannot move the verdict.
    rng = np.random.default_rng(seed)
    test_eps = 1e-6
    g = rng.normal(size=(c, c + 2))
    r0 = np.corrcoef(g)
    lam0 = np.linalg.eigvalsh(r0)[0]
    target = 0.5 * test_eps if refused else 2.0 * c * test_eps
    shift = target * (1.0 - lam0) / (1.0 - target)
    r = (r0 + (shift - lam0) * np.eye(c)) / (1.0 - lam0 + shift)
    np.fill_diagonal(r, 1.0)  # off by rounding (~1e-16) only: moves λ by 1e-16, 1e-10 of the target
    assert np.isclose(np.linalg.eigvalsh(r)[0], target, rtol=1e-6, atol=0)
    scale = 10.0 ** rng.uniform(-3, 3, size=c)  # the test is scale-free: A = D R D
    a = r * scale[:, None] * scale[None, :]
    verdict = singular_feature(np.diag(np.linalg.inv(a)), np.diag(a), test_eps)
    assert bool(verdict) == refused


# ============================================================================ 3. non-finite and far queries
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_non_finite_queries_raise_naming_the_input(form, dtype, bad):
    mvg = MultiVariateGaussian(**form)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mvg.fit(torch.from_numpy(_embedding(12, 3, 2, 4)).to(dtype))
    query = torch.zeros(3, 3, 2, 4, dtype=dtype)
    query[1, 2, 1, 1] = bad  # sample 1, patch 1*4 + 1 = 5
    query[2, 0, 0, 0] = bad  # a later sample: not the one reported
    before = query.clone()
    expected = (
        "embedding contains non-finite values (NaN or infinity) at sample 1, patch 5 (position (1, 1) of the 2x4 "
        "grid); remove or replace the NaN or infinite values before scoring"
    )
    with pytest.raises(ValueError) as info:
        mvg.mahalanobis(query)
    assert str(info.value) == expected
    assert torch.equal(query.nan_to_num(), before.nan_to_num())  # untouched


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_non_finite_data_in_a_fit_get_the_cores_message(form, dtype, bad):
    # Same fault, same message: the fit names the first patch holding NaN or infinity and, in the dense form (as
    # the core's dense fit), its first bad value in C order of that patch's (B, C) data; the low-rank form, as the
    # core's low-rank fit, the patch.
    x = _embedding(10, 3, 2, 3, dtype=np.float64 if dtype == torch.float64 else np.float32)
    x[6, 0, 1, 0] = bad  # patch 3 = position (1, 0), later than the first bad value below in C order
    x[4, 1, 1, 0] = bad  # patch 3, observation 4, feature 1: the first
    x[0, 2, 1, 2] = bad  # patch 5: a later patch
    before = x.copy()
    low_rank = form.get("form") == "low_rank"
    with pytest.raises(ValueError) as core:
        anomstats.MultiVariateGaussian(form="low_rank" if low_rank else "dense", workers=1).fit(x)
    with pytest.raises(ValueError) as adapter:
        MultiVariateGaussian(**form).fit(torch.from_numpy(x))
    assert str(adapter.value) == str(core.value)
    assert "patch 3 (position (1, 0) of the 2x3 grid)" in str(core.value)
    assert low_rank or "first at observation 4, feature 1" in str(core.value)
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("low_rank", [False, True])
def test_the_core_refuses_non_finite_queries_in_every_scoring_method(low_rank):
    x = _embedding(12, 3, 2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = anomstats.MultiVariateGaussian(form="low_rank" if low_rank else "dense").fit(x)
    query = x[:2].copy()
    query[1, 0, 1, 0] = np.nan
    for method in (model.mahalanobis, model.logpdf, lambda q: model.mahalanobis(q, squared=True)):
        with pytest.raises(ValueError, match=r"^x .*NaN or infinity"):
            method(query)


def _scaled_forms(delta, precision):
    """``(s, q(δ/s), |δ/s|ᵀ|P||δ/s|)`` per (sample, patch) in long double, ``s = max|δ|``: no overflow whatever
    long double is (80-bit on x86, float64 elsewhere); ``d = s·sqrt(q)``, ``d² = s²·q``."""
    s = np.abs(delta).max(axis=1, keepdims=True)
    unit = delta / np.where(s > 0, s, 1)
    q = np.einsum("bcp,pcd,bdp->bp", unit, precision, unit)
    magnitude = np.einsum("bcp,pcd,bdp->bp", np.abs(unit), np.abs(precision), np.abs(unit))
    return s[:, 0], q, magnitude


def _reference_distances(mvg, query: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distances of float64 ``query`` (B, C, P) against the module's buffers, exact enough (long double, scaled),
    with ``q`` and ``|δ|ᵀ|P||δ|`` of the scaled differences (their ratio is the rounding's amplification)."""
    wide = np.longdouble
    precision = _dense_precision(mvg).astype(wide)
    mean = mvg.mean.double().numpy().astype(wide)
    scale, q, magnitude = _scaled_forms(query.astype(wide) - mean[None], precision)
    with np.errstate(over="ignore"):
        return scale * np.sqrt(np.maximum(q, 0)), q, magnitude


@settings(max_examples=30)
@given(
    exponent=st.floats(0.0, 1.0), seed=st.integers(0, 10**6), form=st.sampled_from(range(3)),
    wide=st.booleans(),
)
def test_finite_queries_at_any_distance_give_finite_or_inf_never_nan(exponent, seed, form, wide):
    dtype = torch.float64 if wide else torch.float32
    info = torch.finfo(dtype)
    mvg = _fitted(FORMS[form], dtype)
    rng = np.random.default_rng(seed)
    magnitude = float(info.max) ** exponent  # 1 .. the dtype's largest number
    direction = rng.normal(size=(4, 3, 2, 2))
    query_np = (direction / np.abs(direction).max() * magnitude).astype(np.float64)
    query_np = np.clip(query_np, -float(info.max), float(info.max))
    query = torch.from_numpy(query_np).to(dtype)
    distances = mvg.mahalanobis(query)
    assert not torch.isnan(distances).any()
    reference, q, absolute = _reference_distances(mvg, query.double().numpy().reshape(4, 3, 4))
    reference = reference.reshape(distances.shape)
    fits = reference < float(info.max) / 2  # below: finite; far above: +inf
    assert torch.isfinite(distances[torch.from_numpy(fits)]).all()
    assert torch.isinf(distances[torch.from_numpy(reference > 2 * float(info.max))]).all()
    # Evaluation bound (one dtype, against an exact reference): the difference δ = x − mean rounds each entry
    # (eps relative), the division by s and the (C + 2)-term products and sums of q(δ/s) round relative to
    # |δ|ᵀ|P||δ|: (C + 4)·eps·|δ|ᵀ|P||δ| / q relative on q, halved by the square root, plus 2 eps for
    # s·sqrt(...). The low-rank form's evaluation has its own bound (low_rank_evaluation_rtol, sqrt(kappa)).
    c = 3
    rtol = 0.5 * (c + 4) * eps(dtype) * np.asarray(absolute / q, dtype=np.float64) + 2 * eps(dtype)
    if mvg.form == "low_rank":
        # Its own evaluation bound, plus the reference's: the materialised dense precision (float64, entries
        # off by ~C·eps64/ρ) moves d² by C·eps64·kappa relative (|δ|²/d² <= λ_max), halved by the root.
        covariance = np.linalg.inv(_dense_precision(mvg))
        kappa = float(np.linalg.cond(covariance).max())
        rtol = rtol + low_rank_evaluation_rtol(covariance, mvg.basis.shape[2], np.float64 if wide else np.float32)
        rtol = rtol + 0.5 * (c + 2) * c * eps(np.float64) * kappa
    rtol = rtol.reshape(distances.shape)
    expected = reference.astype(np.float64)
    assert_close_each(
        distances.double().numpy()[fits], expected[fits], rtol=rtol[fits]
    )


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_traced_graphs_score_far_queries_and_pass_nan_through(form):
    mvg = _fitted(form)
    model = PadimScore(mvg).eval()
    example = torch.from_numpy(_embedding(2, 3, seed=5)).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example)
    far = torch.full((3, 3, 2, 2), 1e30)
    far[:, 1] = -3e29
    eager = mvg.mahalanobis(far)
    graph = traced(far)
    assert torch.isfinite(graph).all() and not torch.isnan(graph).any()
    # Two float32 evaluations of the same buffers by the same operations: equal bit for bit (the traced and
    # the eager subtraction are the same elementwise operation on the same operands).
    assert torch.equal(graph, eager)
    nan_query = example.clone()
    nan_query[0, 1, 0, 1] = float("nan")
    scores = traced(nan_query)  # the check is skipped in graphs (documented): NaN stays at its patch
    assert torch.isnan(scores[0, 0, 1]) and torch.isfinite(scores[1]).all()
    with pytest.raises(ValueError, match="embedding contains non-finite values"):
        mvg.mahalanobis(nan_query)  # eager still refuses


def test_exported_programs_score_far_queries_without_nan():
    mvg = _fitted({})
    program = export_program(PadimScore(mvg), torch.from_numpy(_embedding(1, 3, seed=6)).float())
    far = torch.from_numpy(_embedding(5, 3, seed=7, scale=1e25)).float()
    result = program.module()(far)
    assert torch.isfinite(result).all()
    assert torch.equal(result, mvg.mahalanobis(far))  # the same operations on the same operands


def test_onnx_graphs_score_far_queries_without_nan(tmp_path):
    onnx, ort = onnx_stack()
    mvg = _fitted({})
    path = tmp_path / "padim.onnx"
    export_onnx(PadimScore(mvg), torch.from_numpy(_embedding(1, 3, seed=6)).float(), path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    far = torch.from_numpy(_embedding(4, 3, seed=8, scale=1e25)).float()
    result = run_onnx(session, far)
    assert torch.isfinite(result).all()
    # ONNX Runtime against eager torch, both float32, same buffers: the evaluation bound of the test above,
    # (C + 4) eps kappa-free here because the queries are far: |δ|ᵀ|P||δ| / q <= C·kappa(P), below 50 here.
    kappa = float(np.linalg.cond(mvg.inv_covariance.double().numpy()).max())
    assert_close_each(result, mvg.mahalanobis(far), rtol=TWO_SIDES * (0.5 * 7 * 3 * kappa + 2) * eps(torch.float32))


def _core_scores(model, x):
    """Squared distances of ``x`` by the core's dense scoring kernel (score_chunk), as the model calls it."""
    c, p = model.n_features, model.n_patches
    flat = x.reshape(x.shape[0], c, p)
    out = np.empty((x.shape[0], p), dtype=model.dtype)
    score_chunk(flat, 0, p, model.mean, model.precision, out, model.dtype, ThreadScratch())
    return flat, out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_core_kernel_scores_far_finite_queries_without_nan(dtype):
    x = _embedding(12, 3, 2, 2)
    model = anomstats.MultiVariateGaussian(dtype=dtype).fit(x)
    rng = np.random.default_rng(1)
    info = np.finfo(dtype)
    # Far queries: magnitudes up to the largest float64 (beyond float32's: inf once gathered into float32).
    queries = rng.normal(size=(6, 3, 2, 2)) * (10.0 ** rng.uniform(0, 307, size=(6, 1, 1, 1)))
    flat, squared = _core_scores(model, queries)
    assert not np.isnan(squared).any()
    check_query_results(flat, squared, (2, 2))  # finite queries: no error
    reference, _, absolute = _reference_distances_core(model, flat)
    fits = reference < float(info.max) / 2
    assert np.isfinite(squared[fits]).all() and np.isinf(squared[reference > 2 * float(info.max)]).all()
    # Rescored in float64 with an exact power-of-two scaling (or scored in the model's dtype when nothing
    # overflowed): (C + 4) eps |δ|ᵀ|P||δ| relative to d², with eps of the model's dtype.
    with np.errstate(invalid="ignore", over="ignore"):  # inf/inf where not compared (fits is False)
        rtol = (3 + 4) * eps(dtype) * np.asarray(absolute / reference, dtype=np.float64)
        expected = reference.astype(np.float64)
    assert_close_each(squared[fits], expected[fits], rtol=rtol[fits])
    bad = queries.copy()
    bad[2, 1, 0, 1] = np.nan
    flat, squared = _core_scores(model, bad)
    with pytest.raises(ValueError, match=r"^x contains non-finite values \(NaN or infinity\) at sample 2, patch 1 "):
        check_query_results(flat, squared, (2, 2))


def _reference_distances_core(model, flat):
    """Squared distances by the core model's buffers (long double, scaled) and ``|δ|ᵀ|P||δ|`` in the same units."""
    wide = np.longdouble
    scale, q, magnitude = _scaled_forms(flat.astype(wide) - model.mean.astype(wide)[None], model.precision.astype(wide))
    with np.errstate(over="ignore"):
        return scale * scale * q, None, scale * scale * magnitude


def test_the_core_scores_far_finite_queries_as_inf_not_errors():
    model = anomstats.MultiVariateGaussian().fit(_embedding(12, 3, 2, 2))
    far = np.full((1, 3, 2, 2), 1e200)
    # d ~ 1e200 is a float64 number, d² ~ 1e400 is not: the distance is finite, its square and the log are not.
    assert np.isfinite(model.mahalanobis(far)).all()
    assert np.isinf(model.mahalanobis(far, squared=True)).all()
    assert np.all(model.logpdf(far) == -np.inf)


# ============================================================================ 8. representability
@pytest.mark.parametrize("scale", [1e19, 1e25])
@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_float32_features_beyond_float32_name_the_scale_in_fit_and_compute(form, scale):
    # The low-rank form (here at full rank, B - 1 >= C: its "no advantage" warning is not the point) stores
    # eigenvalues and is held to the same rule: at 1e19 its precision underflows float32, at 1e25 its
    # eigenvalues (~1e50) overflow it.
    x = torch.from_numpy(_embedding(20, 3, scale=scale)).float()
    pattern = rf"features of scale \d\.\de\+{int(math.log10(scale))} .*float32.*module\.double\(\)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ValueError, match=pattern) as fitted:
            MultiVariateGaussian(**form).fit(x)
        assert "increase ridge" not in str(fitted.value)  # the scale, not the ridge, is the fault
        streamed = MultiVariateGaussian(**form)
        streamed.update(x[:10])
        streamed.update(x[10:])
        with pytest.raises(ValueError, match=pattern):
            streamed.compute()
        # Asked for float64, the same data fit: a precision of ~1/scale² (relative to the float64 reference:
        # one float64 fit of a well-conditioned covariance, kappa·delta ~ 1e-13, far below the 1e-6 asserted;
        # the ridge 0.01 is 1e-40 of the variances).
        wide = MultiVariateGaussian(**form).double()
        wide.fit(x)
    covariance = np.cov(x.double().numpy()[:, :, 0, 0].T)
    if form.get("form") == "low_rank":
        # Its eigenvalues are those of the covariance plus the ridge (the Gram route's relative error is about
        # B·eps·cond, cond ~ 10 here: far below the 1e-6 asserted).
        assert wide.eigenvalues.dtype == torch.float64
        expected = np.linalg.eigvalsh(covariance)[::-1] + wide.ridge.item()
        assert_close_each(wide.eigenvalues[0].numpy(), expected, rtol=1e-6)
        return
    assert wide.inv_covariance.dtype == torch.float64
    diagonal = wide.inv_covariance.diagonal(dim1=-2, dim2=-1)
    assert_close_each(diagonal[0].numpy(), np.linalg.inv(covariance).diagonal(), rtol=1e-6)


@pytest.mark.parametrize("package", ["torch", "core"])
def test_a_low_rank_state_beyond_float32_names_the_scale_and_one_within_it_scores(package):
    # B = 4 images of C = 16 features (rank 3, the low-rank form's case). Scale 1e19: the eigenvalues
    # s²/(B - 1) ~ C·1e38 overflow float32 (3.4e38), although the dense form's precision (about 1/ridge off the
    # basis) would fit: refused, naming the scale, never stored as inf. Scale 1e18: eigenvalues ~1e37 fit, and
    # every stored number is finite and normal, the training samples scored finite and positive.
    def fit(x):
        if package == "torch":
            module = MultiVariateGaussian(form="low_rank")
            module.fit(torch.from_numpy(x))
            return module.eigenvalues.numpy(), module.basis.numpy(), module.mahalanobis(torch.from_numpy(x)).numpy()
        model = anomstats.MultiVariateGaussian(form="low_rank", dtype=np.float32).fit(x)
        return model.eigenvalues, model.basis, model.mahalanobis(x)

    x = _embedding(4, 16, scale=1e19, dtype=np.float32)
    before = x.copy()
    remedy = "module.double()" if package == "torch" else "dtype=np.float64"
    with pytest.raises(ValueError, match=rf"features of scale \d\.\de\+19 overflow float32: .*{re.escape(remedy)}"):
        fit(x)
    np.testing.assert_array_equal(x, before)
    eigenvalues, basis, distances = fit(_embedding(4, 16, scale=1e18, dtype=np.float32))
    assert eigenvalues.dtype == np.float32
    assert np.isfinite(eigenvalues).all() and (eigenvalues >= np.finfo(np.float32).tiny).all()
    assert np.isfinite(basis).all()
    assert np.isfinite(distances).all() and (distances > 0).all()


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_half_modules_refuse_a_mean_float16_cannot_hold(form):
    # Features of std 10 about 1e5: every covariance and precision fits float16 (variances ~1e2), but the
    # mean is beyond its largest number 65504: stored, it would be inf and every distance inf.
    mvg = MultiVariateGaussian(**form).half()
    x = torch.from_numpy(_embedding(20, 3, scale=10.0, offset=1e5)).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the low-rank form at full rank: "no advantage"
        with pytest.raises(ValueError, match=r"the values of patch 0 \(position \(0, 0\) of the 2x2 grid\) overflowed"):
            mvg.fit(x)
    assert mvg.mean.numel() == 0  # nothing was stored


def test_a_half_low_rank_module_refuses_eigenvalues_float16_cannot_hold():
    # scale 1e3: eigenvalues ~1e6, beyond float16's largest number 65504 (stored, they would be inf).
    mvg = MultiVariateGaussian(form="low_rank").half()
    with pytest.raises(ValueError, match=r"features of scale \d\.\de\+03 overflow float16"):
        mvg.fit(torch.from_numpy(_embedding(4, 16, scale=1e3)).float())
    assert mvg.basis.numel() == 0  # nothing was stored


def test_float32_features_of_representable_scale_never_store_a_zero_precision():
    # scale 1e18: variances 1e36 (float32 holds up to 3.4e38), precision 1e-36 (normal above 1.2e-38).
    x = torch.from_numpy(_embedding(20, 3, scale=1e18)).float()
    for form in FORMS[:2]:
        mvg = MultiVariateGaussian(**form)
        mvg.fit(x)
        diagonal = mvg.inv_covariance.diagonal(dim1=-2, dim2=-1)
        assert (diagonal >= torch.finfo(torch.float32).tiny).all()
        distances = mvg.mahalanobis(x[:3])
        assert torch.isfinite(distances).all() and (distances > 0).all()


def test_float32_streams_whose_moments_overflow_name_float32():
    # accumulate_dtype=float32: sums of squares of features of scale 1e20 overflow in update.
    mvg = MultiVariateGaussian(accumulate_dtype=torch.float32)
    mvg.update(torch.from_numpy(_embedding(20, 3, scale=1e20)).float())
    with pytest.raises(ValueError, match=r"overflowed float32.*accumulate_dtype=torch\.float64"):
        mvg.compute()


def test_half_modules_refuse_a_precision_float16_cannot_hold():
    # scale 1e3: precision ~1e-6, below float16's smallest normal 6.1e-5 (it would be stored as subnormals).
    mvg = MultiVariateGaussian().half()
    with pytest.raises(ValueError, match=r"underflow a float16 precision"):
        mvg.fit(torch.from_numpy(_embedding(20, 3, scale=1e3)).float())


def test_tiny_float32_features_without_ridge_name_the_scale():
    # scale 1e-21: variances 1e-42 are subnormal in float32 (computed in float64 instead), and the
    # precision ~1e42 overflows float32.
    x = torch.from_numpy(_embedding(20, 3, scale=1e-21)).float()
    with pytest.raises(ValueError, match=r"features of scale \d\.\de-2\d overflow a float32 precision"):
        MultiVariateGaussian(ridge=0.0).fit(x)


def test_a_failed_factorisation_says_how_large_a_ridge_the_scale_needs():
    # 5 images of 10 features (rank 4) of scale 1e4 in float32: the ridge 1e-6 is far below the float32
    # rounding of the covariance (C·eps32·1e8 ≈ 1e2), so Cholesky fails. The core's LinAlgError (a
    # ValueError, what the adapter raised before) names the patch, and the remedy names the scale.
    # Both packages word the ridge a scale needs (anomstats._patch_kernels.ridge_rounding, C·eps·max variance)
    # in the one message of the core (not_definite_error); only the other options differ.
    x = torch.from_numpy(_embedding(5, 10, scale=1e4)).float()
    with pytest.raises(np.linalg.LinAlgError) as info:
        MultiVariateGaussian(ridge=1e-6).fit(x)
    with pytest.raises(np.linalg.LinAlgError) as core:
        anomstats.MultiVariateGaussian(ridge=1e-6, dtype=np.float32, workers=1).fit(x.numpy())
    largest = np.var(x.double().numpy()[:, :, 0, 0], axis=0, ddof=1).max() + 1e-6  # patch 0's largest variance
    for error, remedy in ((info.value, "module.double()"), (core.value, "dtype=np.float64")):
        message = str(error)
        assert message.startswith("the regularised covariance of patch 0 (position (0, 0) of the 2x2 grid) is not positive definite")
        found = re.search(r"with variances up to (\S+) it must be well above (\S+), the float32 rounding of the covariance", message)
        assert found is not None, message
        variance, needed = float(found.group(1)), float(found.group(2))
        # Printed to 2 significant digits (each within 5%), from float32 variances (within 1e-5 of float64's).
        assert variance == pytest.approx(largest, rel=0.05)
        assert needed == pytest.approx(10 * eps(np.float32) * variance, rel=0.1)
        assert remedy in message
        assert isinstance(error, ValueError)


@pytest.mark.parametrize("scale", [1e19, 1e25])
def test_the_core_names_the_scale_in_float32(scale):
    # One-shot: float32 sums of squares overflow (scale 1e19: 20 squares of ~1e38). Streamed: float64 sums,
    # then a float32 covariance (1e25: overflow) or precision (1e19: ~1e-38, below float32's smallest normal).
    x = _embedding(20, 3, 2, 2, scale=scale)
    exponent = int(math.log10(scale))
    pattern = rf"features of scale \d\.\de\+{exponent} (overflow|underflow) .*float32.*dtype=np\.float64"
    with pytest.raises(ValueError, match=pattern):
        anomstats.MultiVariateGaussian(dtype=np.float32).fit(x.astype(np.float32))
    stream = anomstats.MultiVariateGaussian(dtype=np.float32).partial_fit(x)
    with pytest.raises(ValueError, match=pattern):
        stream.precision  # noqa: B018 - finalised on first use
    with pytest.raises(ValueError, match=r"features of scale 1\.0e\+25 overflow float32: the covariance of patch 0 .*overflowed"):
        anomstats.MultiVariateGaussian(dtype=np.float32).fit(_embedding(20, 3, 2, 2, scale=1e25).astype(np.float32))


# ============================================================================ 9. gradients
@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_gradients_are_finite_everywhere_and_zero_at_the_mean(form, dtype):
    mvg = _fitted(form, dtype)
    at_mean = mvg.mean.reshape(1, 3, 2, 2).clone().requires_grad_(True)
    distances = mvg.mahalanobis(at_mean)
    assert torch.equal(distances, torch.zeros_like(distances))
    distances.sum().backward()
    assert torch.equal(at_mean.grad, torch.zeros_like(at_mean))  # a subgradient of the cone, not NaN
    far = torch.full((2, 3, 2, 2), 1e30, dtype=dtype)
    far[:, 1] = -1e30
    far.requires_grad_(True)
    mvg.mahalanobis(far).sum().backward()
    assert torch.isfinite(far.grad).all()


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_gradients_equal_the_analytic_gradient(form):
    mvg = _fitted(form, torch.float64)
    x = torch.from_numpy(_embedding(4, 3, seed=9)).requires_grad_(True)
    mvg.mahalanobis(x).sum().backward()
    precision = torch.from_numpy(_dense_precision(mvg))  # (P, C, C)
    delta = (x.detach().reshape(4, 3, 4) - mvg.mean.reshape(1, 3, 4)).permute(2, 0, 1)  # (P, B, C)
    pd = torch.matmul(delta, precision)
    d = (pd * delta).sum(-1).sqrt()
    analytic = (pd / d.unsqueeze(-1)).permute(1, 2, 0).reshape(4, 3, 2, 2)
    # d = sqrt(δᵀPδ): ∇ = Pδ/d. Both sides evaluate C-term products of the same float64 buffers: relative
    # (C + 2)·kappa·eps each (kappa = cond(P) <= 10 here), doubled; the low-rank form's own precision is
    # materialised from its basis (its evaluation bound, low_rank_evaluation_rtol, added).
    kappa = float(np.linalg.cond(precision.numpy()).max())
    rtol = TWO_SIDES * (3 + 2) * kappa * eps(torch.float64)
    if mvg.form == "low_rank":
        rtol += low_rank_evaluation_rtol(np.linalg.inv(precision.numpy()), mvg.basis.shape[2])
    scale = analytic.abs().amax().item()
    assert_close_each(x.grad, analytic, atol=rtol * scale)


@pytest.mark.parametrize("form", FORMS[:2], ids=FORM_IDS[:2])
def test_ordinary_distances_are_anomalibs_formula_bit_for_bit(form):
    mvg = _fitted(form)
    x = torch.from_numpy(_embedding(5, 3, seed=4)).float()
    precision = mvg.inv_covariance.float()  # the packed storage unpacks the same numbers
    delta = (x.reshape(5, 3, 4).transpose(1, 2) - mvg.mean.mT).permute(1, 0, 2)  # (P, B, C)
    squared = (torch.matmul(delta, precision) * delta).sum(dim=-1)
    expected = squared.mT.clamp(min=0).sqrt().reshape(5, 2, 2)
    assert torch.equal(mvg.mahalanobis(x), expected)


# ============================================================================ 10. argument parity
@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_bool_embeddings_are_accepted_as_the_core_accepts_them(form):
    rng = np.random.default_rng(0)
    flags = torch.from_numpy(rng.random((30, 3, 2, 2)) < 0.5)
    as_float = flags.float()
    a, b = MultiVariateGaussian(**form), MultiVariateGaussian(**form)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for fitted, fitted_float in zip(a.fit(flags), b.fit(as_float)):
            assert torch.equal(fitted, fitted_float)  # the same float32 computation on 0/1
    assert torch.equal(a.mahalanobis(flags[:4]), b.mahalanobis(as_float[:4]))
    core = anomstats.MultiVariateGaussian().fit(flags.numpy())  # the core accepts bool too
    assert np.isfinite(core.mahalanobis(flags[:4].numpy())).all()
    # Streaming takes them too: update/compute on 0/1 equals update/compute on their float32 copy.
    c, d = MultiVariateGaussian(**form), MultiVariateGaussian(**form)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        c.update(flags[:15]), c.update(flags[15:]), d.update(as_float[:15]), d.update(as_float[15:])
        for streamed, streamed_float in zip(c.compute(), d.compute()):
            assert torch.equal(streamed, streamed_float)  # identical operations on identical values: bound 0


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("shape", [(3,), (2, 3), (2, 4, 2, 2), (2, 3, 2, 3), (2, 3, 5), ()])
def test_wrongly_shaped_queries_name_the_expected_shape(form, shape):
    mvg = _fitted(form)
    query = torch.zeros(shape)
    with pytest.raises(ValueError) as info:
        mvg.mahalanobis(query)
    with pytest.raises(ValueError) as core_rule:
        check_patch_score_shape(shape, 3, 4)
    assert str(info.value) == str(core_rule.value)  # the core's message
    assert "shape must be (B, 3, *spatial) with prod(spatial) = 4" in str(info.value)


def test_a_query_of_another_grid_with_the_same_patches_is_accepted():
    mvg = _fitted({})
    assert mvg.mahalanobis(torch.zeros(2, 3, 4)).shape == (2, 4)  # any grid of P patches


def test_numpy_integers_are_accepted_where_python_ints_are():
    mvg = MultiVariateGaussian(np.int64(3), np.int32(4), ridge=np.int64(1), chunk_bytes=np.int64(2**20))
    assert tuple(mvg.mean.shape) == (3, 4) and mvg.ridge == 1.0 and mvg.chunk_bytes == 2**20
    assert MultiVariateGaussian(ridge=np.float32(0.5)).ridge == 0.5
    low = MultiVariateGaussian(form="low_rank", ridge=np.float64(0.25), chunk_bytes=np.uint32(1 << 16))
    assert low._fit_ridge == 0.25 and low.chunk_bytes == 1 << 16


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"n_features": True, "n_patches": 2}, TypeError),
        ({"n_features": 2.0, "n_patches": 2}, TypeError),
        ({"chunk_bytes": True}, TypeError),
        ({"chunk_bytes": np.bool_(True)}, TypeError),
        ({"ridge": True}, TypeError),
        ({"ridge": "0.1"}, TypeError),
        ({"ridge": np.float64("nan")}, ValueError),
    ],
)
def test_bools_and_strings_are_not_numbers(kwargs, error):
    with pytest.raises(error):
        MultiVariateGaussian(**kwargs)


@pytest.mark.parametrize("option", ["store_covariance", "low_memory"])
@pytest.mark.parametrize("value", ["no", 1, None, 0.0])
def test_the_cores_boolean_options_refuse_non_bools(option, value):
    with pytest.raises(TypeError, match=f"{option} must be True or False"):
        anomstats.MultiVariateGaussian(**{option: value})
    assert getattr(anomstats.MultiVariateGaussian(**{option: np.False_}), option) is False


# ============================================================================ 13. numpy.cov contract of _cov
_DDOFS = [None, 0, 1, 2, 2.0, np.int64(1), 1.5, float("nan"), 50, True]
_WEIGHTS = ["none", "positive", "zeros", "negative", "short", "2d", "scalar", "list", "tiny", "huge", "one_zero"]


def _weights(kind, n, rng):
    return {
        "none": None,
        "positive": rng.uniform(0.1, 2.0, size=n),
        "zeros": np.zeros(n),
        "negative": np.where(np.arange(n) == 0, -1.0, 1.0),
        "short": np.ones(max(n - 1, 0)),
        "2d": np.ones((n, 1)),
        "scalar": np.float64(1.0),
        "list": [1.0 + i for i in range(n)],
        "tiny": np.full(n, 1e-50),  # zero in float32: normalised first, as the covariance allows
        "huge": np.full(n, 1e30),
        "one_zero": np.where(np.arange(n) == 0, 0.0, 1.0),
    }[kind]


def _outcome(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = call()
        except Exception as error:  # noqa: BLE001 - the type is what is compared
            return type(error), None, []
    dof_warned = [w for w in caught if "Degrees of freedom <= 0" in str(w.message)]
    return None, result, dof_warned


@settings(max_examples=60)
@given(
    n=st.integers(1, 7), k=st.integers(1, 3), rowvar=st.sampled_from([False, True, 0, "yes"]),
    bias=st.sampled_from([False, True, None, 0, 1]), ddof=st.sampled_from(_DDOFS),
    weights=st.sampled_from(_WEIGHTS), one_d=st.booleans(), seed=st.integers(0, 10**6),
)
def test_cov_follows_numpy_cov(n, k, rowvar, bias, ddof, weights, one_d, seed):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=n) if one_d else rng.normal(size=(n, k) if not rowvar else (k, n))
    w = _weights(weights, n, rng)
    tensor_w = torch.from_numpy(w) if isinstance(w, np.ndarray) and w.ndim > 0 else w
    n_obs = m.shape[0] if (one_d or not rowvar) else m.shape[1]
    if one_d:
        n_obs = n
    expected_error, expected, numpy_warned = _outcome(
        lambda: np.cov(m, rowvar=rowvar, bias=bias, ddof=ddof, aweights=w)
    )
    error, result, warned = _outcome(
        lambda: MultiVariateGaussian._cov(torch.from_numpy(m), rowvar=rowvar, bias=bias, ddof=ddof, aweights=tensor_w)
    )
    assert error == expected_error
    if error is not None:
        return
    assert bool(warned) == bool(numpy_warned)  # numpy's "Degrees of freedom <= 0" RuntimeWarning
    expected = np.asarray(expected)
    assert tuple(result.shape) == expected.shape and result.dtype == torch.float64
    if numpy_warned:
        # numpy divides by 0: every entry is ±inf (x/0) or NaN (0/0, where rounding left exactly 0), which of
        # the two depending on the last bit of the centred data; both sides are non-finite everywhere.
        assert not np.isfinite(expected).any() and not torch.isfinite(result).any()
        return
    # Entries are sums of n_obs weighted products of centred data over numpy's normaliser: (sqrt(n) + 4) eps
    # relative to Σ w |x_i − μ_i||x_j − μ_j| / |norm| (the sums, the products, the normalised weights, the
    # division; tests/_tolerances.covariance_atol's argument), doubled for two implementations. Where numpy
    # divides by 0 (no degrees of freedom) both give inf/NaN in the same places.
    x = np.atleast_2d(m).astype(np.float64)
    if not one_d and not rowvar:
        x = x.T
    weights_used = np.ones(n_obs) if w is None else np.asarray(w, dtype=np.float64)
    mean = np.average(x, axis=1, weights=weights_used)
    centred = np.abs(x - mean[:, None])
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.abs(numpy_normaliser(weights_used, w is not None, n_obs, ddof, bias))
        scale = (centred * weights_used) @ centred.T / norm
    atol = TWO_SIDES * (math.sqrt(n_obs) + 4) * eps(np.float64) * np.squeeze(scale)
    assert_close_each(result.numpy(), expected, atol=np.where(np.isfinite(atol), atol, 0.0), equal_nan=True)


def numpy_normaliser(weights, weighted, n_obs, ddof, bias):
    """numpy.cov's ``fact`` (before its clamp at 0)."""
    if ddof is None:
        ddof = 1 if bias == 0 else 0
    if not weighted:
        return n_obs - ddof
    total = weights.sum()
    return total if ddof == 0 else total - ddof * (weights * weights).sum() / total


def test_cov_refuses_what_numpy_refuses_with_numpy_types_and_messages():
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="^ddof must be integer$"):
        MultiVariateGaussian._cov(x, ddof=1.5)
    with pytest.raises(ZeroDivisionError, match="Weights sum to zero, can't be normalized"):
        MultiVariateGaussian._cov(x, aweights=torch.zeros(5))
    with pytest.raises(ValueError, match="aweights cannot be negative"):
        MultiVariateGaussian._cov(x, aweights=torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(RuntimeError, match="incompatible numbers of samples and aweights"):
        MultiVariateGaussian._cov(x, aweights=torch.ones(4))
    with pytest.raises(RuntimeError, match="cannot handle multidimensional aweights"):
        MultiVariateGaussian._cov(x, aweights=torch.ones(5, 1))
    with pytest.raises(ValueError, match="ddof must be integer"):  # ddof is checked first, as numpy does
        MultiVariateGaussian._cov(torch.zeros(2, 2, 2), ddof=0.5)


def test_cov_of_float32_data_with_weights_beyond_float32():
    # Weights 1e-50 are 0 in float32 (0/0 before); normalised in float64 first, the covariance is numpy's.
    # float32 evaluation: (sqrt(n) + 4) eps32 relative to the entries' magnitudes (|c| <= 2 here), doubled.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 2)).astype(np.float32)
    w = rng.uniform(1, 2, size=8) * 1e-50
    expected = np.cov(x, rowvar=False, aweights=w)
    result = MultiVariateGaussian._cov(torch.from_numpy(x), aweights=torch.from_numpy(w))
    assert result.dtype == torch.float32
    assert_close_each(result.numpy(), expected, atol=TWO_SIDES * (math.sqrt(8) + 4) * eps(np.float32) * 2.0)


# ============================================================================ on the GPU (skipped without CUDA)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_the_faults_on_cuda(form):
    device = "cuda"
    # 1: the rank test reads the diagonals back to the host; the verdict and message are the CPU's.
    x = _with_combination(0, 3, 12, np.float64)
    if "form" not in form:
        with pytest.raises(np.linalg.LinAlgError) as on_cpu:
            MultiVariateGaussian(ridge=0.0, **form).fit(torch.from_numpy(x))
        with pytest.raises(np.linalg.LinAlgError) as on_gpu:
            MultiVariateGaussian(ridge=0.0, **form).fit(torch.from_numpy(x).to(device))
        assert str(on_gpu.value) == str(on_cpu.value)
        # 8: a float32 fit of scale 1e25 names the scale on the GPU too.
        with pytest.raises(ValueError, match=r"features of scale \d\.\de\+25"):
            MultiVariateGaussian(**form).fit(torch.from_numpy(_embedding(20, 3, scale=1e25)).float().to(device))
    mvg = MultiVariateGaussian(**form)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mvg.fit(torch.from_numpy(_embedding(12, 3)).float().to(device))
    # 3: NaN queries are refused; far ones score finite or inf, never NaN.
    query = torch.zeros(2, 3, 2, 2, device=device)
    query[1, 0, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="at sample 1, patch 1 "):
        mvg.mahalanobis(query)
    far = torch.full((2, 3, 2, 2), 1e30, device=device)
    far[:, 2] = -1e30
    assert torch.isfinite(mvg.mahalanobis(far)).all()
    # 9: a zero gradient at the mean.
    at_mean = mvg.mean.reshape(1, 3, 2, 2).clone().requires_grad_(True)
    mvg.mahalanobis(at_mean).sum().backward()
    assert torch.equal(at_mean.grad, torch.zeros_like(at_mean))
    # 10: bool embeddings.
    flags = torch.from_numpy(np.random.default_rng(0).random((2, 3, 2, 2)) < 0.5).to(device)
    assert torch.equal(mvg.mahalanobis(flags), mvg.mahalanobis(flags.float()))
    # 13: weights on the GPU, checked on the host.
    with pytest.raises(ZeroDivisionError):
        MultiVariateGaussian._cov(torch.randn(4, 2, device=device), aweights=torch.zeros(4, device=device))
