"""Second review of issue 11's checkpoint and rank-test promises: defects found by a hostile review, fixed.

Finite checkpoints (also once cast to the module's dtype, and for sparse or quantized entries), an empty
precision of the other storage, the low-rank form's spent stream, the rank test at huge but representable
variances, and remedies naming the dtype that overflowed. Each test states the promised behaviour (the
docstrings, ``anomstats._rules``, the library's stated limits); the comment above it says what was wrong.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import anomstats
from anomstats._patch_kernels import data_eps_of, patch_rank_eps, singular_feature

torch = pytest.importorskip("torch")

from anomstats_torch import MultiVariateGaussian  # noqa: E402


def _normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape)


pytestmark = [
    pytest.mark.filterwarnings("ignore:form='low_rank' with N:UserWarning"),  # N > C here: same fit, no advantage
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning"),  # deprecated, still a valid input
]


def _fitted_float64(**options) -> MultiVariateGaussian:
    module = MultiVariateGaussian(**options)
    module.fit(torch.from_numpy(_normal(0, (12, 3, 2, 2))))  # float64 input: float64 buffers
    return module


# --------------------------------------------------------------------------- 1. finite checkpoints
# Fixed defect of the review: the finiteness (and eigenvalue positivity) checks read the checkpoint's float64
# values, but the buffers keep the module's float32 dtype: a finite float64 entry beyond float32's range loads
# as inf (an eigenvalue below float32's range as 0), silently, in dense, packed and low-rank storage alike,
# while the same entry packed into a dense module is refused (the conversion casts before the check)
@pytest.mark.parametrize(
    "options, key, value",
    [
        ({}, "inv_covariance", 1e300),
        ({}, "mean", 1e300),
        ({"storage": "packed"}, "inv_covariance_packed", 1e300),
        ({"form": "low_rank"}, "eigenvalues", 1e300),
        ({"form": "low_rank"}, "mean", 1e300),
        ({"form": "low_rank"}, "eigenvalues", 1e-300),
    ],
)
def test_a_float64_checkpoint_beyond_float32_never_loads_as_inf_or_zero(options, key, value):
    state = {name: tensor.clone() for name, tensor in _fitted_float64(**options).state_dict().items()}
    state[key].view(-1)[0] = value  # finite in the checkpoint's float64
    module = MultiVariateGaussian(**options).float()
    try:
        module.load_state_dict(state)
    except RuntimeError:
        pass  # refused: fine (as a packed entry loaded into a dense module is)
    # Loaded or not, the module never holds a value the checks promise to exclude.
    for name, buffer in module.state_dict().items():
        assert bool(torch.isfinite(buffer).all()), name
    if options.get("form") == "low_rank" and module.eigenvalues.numel():
        assert bool((module.eigenvalues > 0).all())


# Fixed defect of the review: _check_finite runs isfinite/reshape on the raw entry: a sparse (or quantized)
# entry now fails inside the consistency check with torch's internal error ('reshape is not implemented for
# sparse tensors', NotImplementedError for QInt32), which names no entry; before, it was refused as a load error
# naming it
@pytest.mark.parametrize("kind", ["sparse", "quantized"])
def test_a_non_plain_checkpoint_entry_is_refused_naming_the_entry(kind):
    source = _fitted_float64().float()
    state = dict(source.state_dict())
    precision = state["inv_covariance"]
    if kind == "sparse":
        state["inv_covariance"] = precision.to_sparse()
    else:
        state["inv_covariance"] = torch.quantize_per_tensor(precision, 0.01, 0, torch.qint32)
    module = _fitted_float64().float()
    before = {name: value.clone() for name, value in module.state_dict().items()}
    with pytest.raises(RuntimeError, match="inv_covariance"):
        module.load_state_dict(state)
    assert all(torch.equal(module.state_dict()[name], value) for name, value in before.items())


# --------------------------------------------------------------------------- 2. empty other-storage precision
# Fixed defect of the review: an empty precision of the other storage skips the dtype check: an empty complex or
# bool inv_covariance_packed loads into a dense module (and vice versa), while the same entry in the module's
# own storage is refused ('not a real number type')
@pytest.mark.parametrize("dtype", [torch.complex64, torch.bool])
@pytest.mark.parametrize("storage, key", [("dense", "inv_covariance_packed"), ("packed", "inv_covariance")])
def test_an_empty_other_storage_precision_of_a_non_real_dtype_is_refused(dtype, storage, key):
    own = "inv_covariance" if storage == "dense" else "inv_covariance_packed"
    with pytest.raises(RuntimeError, match="not a real number type"):  # the module's own storage: refused today
        MultiVariateGaussian(storage=storage).load_state_dict({"mean": torch.empty(0), own: torch.empty(0, dtype=dtype)})
    with pytest.raises(RuntimeError, match="not a real number type"):
        MultiVariateGaussian(storage=storage).load_state_dict({"mean": torch.empty(0), key: torch.empty(0, dtype=dtype)})


# --------------------------------------------------------------------------- 3. low-rank compute spends the stream
# Fixed defect of the review: the spent-stream error of the low-rank form says compute() 'writes the float32
# precision over the float64 sums', which is the dense form's in-place finish; the low-rank compute only frees
# its factors
def test_the_low_rank_spent_error_describes_what_the_low_rank_compute_did():
    x = torch.from_numpy(_normal(1, (12, 3, 2, 2)))
    module = MultiVariateGaussian(form="low_rank")
    module.update(x)
    module.compute()
    with pytest.raises(RuntimeError, match="spent this stream") as error:
        module.update(x)
    assert "precision over" not in str(error.value)


# --------------------------------------------------------------------------- 4. the rank test
# Fixed defect of the review: singular_feature scales the variances by eps/eps64 (>= 16) before
# numerically_singular_pivot: for A_kk above float64's max/16 the product overflows to inf (RuntimeWarning) and
# the pivot is judged singular, although L_kk² = 1/(A⁻¹)_kk is far above C·eps·A_kk
@pytest.mark.parametrize("diagonal", [1e-308, 1 / 1.5e307])  # subnormal, normal
def test_rank_test_of_huge_but_representable_variances(diagonal):
    eps = patch_rank_eps(data_eps_of(np.float64), np.float64)
    variance = 1.0 / diagonal  # A_kk·(A⁻¹)_kk = 1: an independent feature, L_kk² = A_kk
    assert np.isfinite(variance) and 1.0 * eps * variance < variance  # the rule: C·eps·A_kk < L_kk², not singular
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert singular_feature(np.array([diagonal]), np.array([variance]), eps) == 0


# Fixed defect of the review: a one-feature patch of 3 distinct observations at scale 3.4e153 (variance
# 1.16e307, below the library's own stated covariance limit of features of scale 1.3e154) is refused with
# ridge=0 as 'numerically singular ... a linear combination' (the overflow in singular_feature)
@pytest.mark.parametrize("options", [{}, {"low_memory": True}])
def test_a_one_feature_patch_of_huge_but_representable_scale_fits_without_ridge(options):
    a = 3.4e153  # a² = 1.16e307 and 2a² are finite in float64: sqrt(max) = 1.34e154 is the stated limit
    x = np.array([-a, 0.0, a]).reshape(3, 1, 1, 1)
    model = anomstats.MultiVariateGaussian(ridge=0.0, **options).fit(x)
    # The variance is 2a²/2 = a²; a 1×1 precision is its reciprocal: a few roundings of float64 each.
    np.testing.assert_allclose(model.precision.ravel(), [1.0 / a**2], rtol=16 * np.finfo(np.float64).eps)


# --------------------------------------------------------------------------- 5. remedies naming the dtype
# Fixed defect of the review: PatchFinisher._remedy now always names the result's dtype: a float32 stream whose
# float64 work covariance overflows says 'overflowed float64 ...; ... or fit with dtype=np.float64', and a
# float64 fit fails the same way (the torch adapter names the work dtype for this fault)
@pytest.mark.parametrize("options", [{}, {"low_memory": True}])
def test_a_float64_covariance_overflow_does_not_suggest_float64(options):
    x = _normal(0, (10, 3, 2, 2)) * 1e155
    x -= x.mean(axis=0)
    with pytest.raises(ValueError, match=r"overflow(ed)? float64"):  # the float64 fit the remedy suggests fails too
        anomstats.MultiVariateGaussian(dtype=np.float64, **options).fit(x)
    model = anomstats.MultiVariateGaussian(dtype=np.float32, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the float32 cast of the mean
        model.partial_fit(x)
        with pytest.raises(ValueError, match="overflowed float64") as error:
            model.finalise()
    assert "dtype=np.float64" not in str(error.value)


# --------------------------------------------------------------------------- 6. far queries in the core
# Fixed defect of the review: a float32 core model gave d = inf for queries at 1e19 (d² = 1e40 overflowed float32
# although d = 2e19 does not; the torch adapter gave the finite distance), the low-rank form did so in float32
# too, and a query at 1.7e308 leaked overflow warnings (the rescoring's scale 2^1024).
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("form", ["dense", "low_rank"])
@pytest.mark.parametrize("exponent", [64, 100, 126, 500, 1020])
def test_far_query_distances_are_finite_wherever_representable(dtype, form, exponent):
    rng = np.random.default_rng(exponent)
    n = 6 if form == "low_rank" else 40  # low-rank: N < C
    model = anomstats.MultiVariateGaussian(form=form, dtype=dtype).fit(rng.normal(size=(n, 10, 2, 1)))
    direction = rng.normal(size=(1, 10, 2, 1))
    near = model.mahalanobis(model.mean.reshape(1, 10, 2, 1) + direction).astype(np.float64)
    # x = 2^e·v: δ = x − μ = 2^e·(v − 2^-e·μ), and 2^-e·|μ| < 2^-64 is below float64's rounding of v, so
    # d(x) = 2^e·d(μ + v) to the dtype's rounding: the reference is the model's own distance at an ordinary
    # scale, multiplied exactly by 2^e (inf where that is beyond float64).
    far = np.ldexp(direction, exponent)
    assert np.isfinite(far).all()
    with np.errstate(over="ignore"):
        expected = np.ldexp(near, exponent)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning leaks from the rescoring
        got = model.mahalanobis(far).astype(np.float64)
        logs = model.logpdf(far)
    largest = float(np.finfo(dtype).max)
    representable = expected < largest / 2  # away from the edge, where rounding decides
    assert np.isinf(got[expected > 2 * largest]).all()
    # Both sides round the same quadratic form in the model's dtype (C + 2 roundings of eps relative on d²,
    # halved by the root), the far side once more through the scaled float64 rescoring.
    rtol = (10 + 4) * np.finfo(dtype).eps
    np.testing.assert_allclose(got[representable], expected[representable], rtol=rtol)
    assert not np.isnan(logs).any() and (logs[~representable] == -np.inf).all()
