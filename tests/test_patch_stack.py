"""The one-shot fit finishes patches a stack at a time (:class:`anomstats._patch_kernels.PatchFinisher`).

Stacking is an implementation detail: results must be bit-identical to finishing one patch at a time (the
same LAPACK calls on the same matrices, and element-wise steps that do not depend on how many patches one
NumPy call covers), and a fault must name the patch a patch-by-patch run names: the first faulty patch,
whichever step of the stack finds it.
"""

from __future__ import annotations

import numpy as np
import pytest

from anomstats import MultiVariateGaussian
from anomstats import _patch_kernels
from anomstats._patch_kernels import stack_patches


#: The library's stack budget, read before any test changes it.
STACK_BYTES = _patch_kernels.FINISH_STACK_BYTES


def _fit(monkeypatch: pytest.MonkeyPatch, x: np.ndarray, stacked: bool, **kwargs) -> MultiVariateGaussian:
    # One slot: the patch-by-patch run (a stack budget below one matrix still gives one slot).
    monkeypatch.setattr(_patch_kernels, "FINISH_STACK_BYTES", STACK_BYTES if stacked else 1)
    return MultiVariateGaussian(**kwargs).fit(x)


def _error(monkeypatch: pytest.MonkeyPatch, x: np.ndarray, stacked: bool, **kwargs) -> str:
    with pytest.raises((np.linalg.LinAlgError, ValueError)) as info:
        _fit(monkeypatch, x, stacked, **kwargs)
    return str(info.value)


def test_stack_sizes_follow_the_budget() -> None:
    assert stack_patches(100, 8) == _patch_kernels.FINISH_STACK_BYTES // 80_000
    assert stack_patches(8, 8) == 64  # at most 64
    assert stack_patches(600, 8) == 1  # at least one, never a second matrix beyond the budget
    assert stack_patches(32, 8, memory_budget=3 * 32 * 32 * 8) == 3  # the fit's budget bounds it too


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"ridge": 0.0},
        {"shrinkage": "ledoit-wolf"},
        {"shrinkage": "oas", "store_covariance": True},
        {"dtype": np.float32, "store_covariance": True},
        {"workers": 1, "ridge": 0.5},
    ],
    ids=["default", "unregularised", "ledoit-wolf", "oas-kept", "float32-kept", "one-worker"],
)
def test_stacked_fit_is_bit_identical_to_one_patch_at_a_time(monkeypatch: pytest.MonkeyPatch, kwargs) -> None:
    rng = np.random.default_rng(7)
    # 150 patches in chunks of at most 64: stacks of 64 (C = 12) split each chunk unevenly.
    x = (rng.standard_normal((40, 12, 10, 15)) * rng.uniform(0.5, 3.0, (1, 12, 1, 1)) + 5.0).astype(np.float32)
    one = _fit(monkeypatch, x, stacked=False, **kwargs)
    many = _fit(monkeypatch, x, stacked=True, **kwargs)
    assert stack_patches(12, 8) == 64  # (the budget restored)
    names = ["mean", "precision", "log_det"] + (["covariance", "cholesky"] if kwargs.get("store_covariance") else [])
    if "shrinkage" in kwargs:
        names.append("shrinkage_")
    for name in names:
        a, b = getattr(one, name), getattr(many, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)  # no tolerance: the same operations on the same values
    precision = many.precision
    np.testing.assert_array_equal(precision, precision.transpose(0, 2, 1))  # exactly symmetric


def _singular_patches(patches: list[int], n: int = 30, c: int = 6, spatial: tuple[int, int] = (4, 5)) -> np.ndarray:
    """float64 data whose listed patches have a duplicated feature (singular covariance)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((n, c) + spatial)
    flat = x.reshape(n, c, -1)
    for p in patches:
        flat[:, 1, p] = flat[:, 0, p]
    return x


@pytest.mark.parametrize("patches", [[3, 11], [11, 3, 17], [0, 19]])
def test_the_first_singular_patch_is_named(monkeypatch: pytest.MonkeyPatch, patches: list[int]) -> None:
    # Unregularised: a duplicated feature is refused by potrf or by the rank test after potri (rounding
    # decides which); either way the message names the patch, and the first one in patch order.
    x = _singular_patches(patches)
    stacked = _error(monkeypatch, x, stacked=True, ridge=0.0)
    single = _error(monkeypatch, x, stacked=False, ridge=0.0)
    first = min(patches)
    assert f"patch {first} " in stacked and "numerically singular" in stacked
    assert stacked == single


def _finisher(slots: int, result_dtype=np.float32) -> _patch_kernels.PatchFinisher:
    """A float64 finisher writing ``result_dtype`` outputs (as the streamed float32 fits do), unregularised."""
    outputs = _patch_kernels.PatchOutputs.allocate(8, 3, np.dtype(result_dtype), keep_covariance=False)
    settings = _patch_kernels.PatchFitSettings(ridge=0.0, shrinkage=None, n_samples=50, spatial=(8,))
    return _patch_kernels.PatchFinisher(outputs, settings, 3, np.dtype(np.float64), slots)


def _load(finisher: _patch_kernels.PatchFinisher, lowers: list[np.ndarray]) -> None:
    for i, lower in enumerate(lowers):
        finisher.stack[i] = np.tril(lower)


GOOD = np.diag([1.0, 2.0, 4.0])
UNDERFLOWS = np.diag([1.0, 1e39, 1.0])  # fine in float64; its precision's 1e-39 is subnormal in float32
SINGULAR = np.zeros((3, 3))  # potrf fails at once
OVERFLOWED = np.diag([1.0, np.inf, 1.0])  # found by the stack's first step


@pytest.mark.parametrize(
    "lowers, named, words",
    [
        # patch 3's fault is found by the last step (the stored precision), patch 4's by potrf: 3 is named
        ([GOOD, GOOD, UNDERFLOWS, SINGULAR], 3, "underflow"),
        ([GOOD, GOOD, SINGULAR, UNDERFLOWS], 3, "numerically singular"),
        # patch 4's fault is found by the first step (finite diagonals), patch 3's by potrf: 3 is named
        ([GOOD, GOOD, SINGULAR, OVERFLOWED], 3, "numerically singular"),
        ([GOOD, OVERFLOWED, SINGULAR, GOOD], 2, "overflow"),
    ],
    ids=["store-before-potrf", "potrf-before-store", "potrf-before-finite", "finite-first"],
)
def test_a_stack_names_its_first_faulty_patch(lowers: list[np.ndarray], named: int, words: str) -> None:
    finisher = _finisher(len(lowers))
    _load(finisher, lowers)
    with pytest.raises((np.linalg.LinAlgError, ValueError)) as info:
        finisher.finish_stack(1, len(lowers))
    message = str(info.value)
    assert f"patch {named} " in message or message.endswith(f"patch {named}") or f"patch {named}:" in message, message
    assert words in message, message
    # The patches before it were finished and stored, as a patch-by-patch run would have left them.
    out = finisher.outputs
    for patch in range(1, named):
        np.testing.assert_allclose(out.precision[patch], np.diag([1.0, 0.5, 0.25]), rtol=1e-6)  # float32 result
        assert out.log_det[patch] == pytest.approx(np.log(8.0), rel=1e-15)
    # The same verdict, one patch at a time.
    single = _finisher(1)
    with pytest.raises(type(info.value)) as one_info:
        for patch, lower in enumerate(lowers, start=1):
            _load(single, [lower])
            single.finish(patch)
    assert str(one_info.value) == message


def test_inputs_are_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _singular_patches([])
    before = x.copy()
    _fit(monkeypatch, x, stacked=True, ridge=0.0)
    np.testing.assert_array_equal(x, before)
