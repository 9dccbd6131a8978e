"""Around the fixes of tests/test_faults_review_streams.py (points 8, 13, 14 and the shrinkage sums).

The CLI's output check through symbolic links, ``numpy.cov``'s ddof beyond float64 in torch, shrinkage fits of
features whose squares leave float's range (tiny ones too, and float32 fits), and float32 torch streams of
tiny features next to constant ones. Tolerances follow tests/_tolerances.py.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import anomstats
from anomstats._shrinkage import (
    ledoit_wolf_coefficient,
    oas_coefficient,
    power_of_two_scale,
    scaled_trace_and_frobenius,
)
from tests._tolerances import TWO_SIDES


def _normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape)


# --------------------------------------------------------------------------- the CLI's output check
def test_a_relative_dangling_link_into_a_folder_leaves_no_file(tmp_path):
    from anomstats.cli.commands import _unwritable

    (tmp_path / "sub").mkdir()
    link = tmp_path / "link.json"
    link.symlink_to("sub/target.json")  # relative to the link's folder
    assert _unwritable(str(link)) is None
    assert link.is_symlink() and not (tmp_path / "sub" / "target.json").exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["link.json", "sub"]


def test_a_link_to_an_existing_file_keeps_it(tmp_path):
    from anomstats.cli.commands import _unwritable

    target = tmp_path / "target.json"
    target.write_text("kept")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert _unwritable(str(link)) is None
    assert target.read_text() == "kept" and link.is_symlink()


def test_a_dangling_link_into_a_missing_folder_is_refused_and_creates_nothing(tmp_path):
    from anomstats.cli.commands import _unwritable

    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "missing" / "target.json")
    problem = _unwritable(str(link))
    assert problem is not None and "ENOENT" in problem
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json"]


# --------------------------------------------------------------------------- numpy.cov's ddof in torch
def test_cov_of_a_ddof_beyond_float64_follows_numpy():
    torch = pytest.importorskip("torch")
    from anomstats_torch import MultiVariateGaussian

    x = _normal(0, (6, 3))
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        expected = np.cov(x, rowvar=False, ddof=10**400)  # also numpy's own "divide by zero"
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        got = MultiVariateGaussian._cov(torch.from_numpy(x), ddof=10**400).numpy()
    dof = [str(w.message) for w in theirs if "Degrees of freedom" in str(w.message)]
    assert dof and [str(w.message) for w in ours if "Degrees of freedom" in str(w.message)] == dof
    # Bound 0: numpy's 1/0 (no degrees of freedom), the same infinities and signs.
    np.testing.assert_array_equal(got, expected)
    # numpy cannot make a float of 6 + 10**400 (its 1/fact): the same OverflowError
    with pytest.raises(OverflowError):
        np.cov(x, rowvar=False, ddof=-(10**400))
    with pytest.raises(OverflowError):
        MultiVariateGaussian._cov(torch.from_numpy(x), ddof=-(10**400))


# --------------------------------------------------------------------------- the shrinkage sums
def test_power_of_two_scale_leaves_ordinary_scales_alone():
    assert power_of_two_scale(1.0) == power_of_two_scale(2.0**300) == power_of_two_scale(2.0**-300) == 1.0
    assert power_of_two_scale(0.0) == power_of_two_scale(np.inf) == power_of_two_scale(np.nan) == 1.0
    for size in (2.0**532, 3.0 * 2.0**-532):
        s = power_of_two_scale(size)
        assert 0.5 <= size / s < 1.0 and np.frexp(s)[0] == 0.5  # a power of two: the division is exact
    assert power_of_two_scale(2.0**40, np.float32) == 1.0 and power_of_two_scale(2.0**50, np.float32) == 2.0**51


@pytest.mark.parametrize("seed", range(5))
def test_shrinkage_coefficients_do_not_depend_on_a_power_of_two_scaling(seed):
    x = _normal(seed, (30, 5)) @ _normal(seed + 100, (5, 5))
    xc = x - x.mean(axis=0)
    s = xc.T @ xc / 30
    lower = np.tril(s)
    trace, frobenius = scaled_trace_and_frobenius(lower)
    fourth = ((xc**2).sum(1) ** 2).sum()
    k = 2.0**-200  # exact both ways: every intermediate stays in the normal range
    small_trace, small_frobenius = scaled_trace_and_frobenius(lower * k, k)
    assert (small_trace, small_frobenius) == (trace, frobenius)
    # Bound 0: the coefficients are homogeneous of degree 0 and the scaling is exact.
    assert ledoit_wolf_coefficient(trace / 8, frobenius / 64, fourth / 64, 30, 5) == ledoit_wolf_coefficient(
        trace, frobenius, fourth, 30, 5
    )
    assert oas_coefficient(trace / 8, frobenius / 64, 30, 5) == oas_coefficient(trace, frobenius, 30, 5)


@pytest.mark.parametrize(
    ("dtype", "k", "shrinkage", "how"),
    [
        (np.float64, -266, "ledoit-wolf", "fit"),
        (np.float64, -266, "oas", "fit"),
        (np.float64, -266, "oas", "partial_fit"),
        (np.float64, 400, "ledoit-wolf", "fit"),
        (np.float64, 400, "oas", "partial_fit"),
        (np.float32, 40, "ledoit-wolf", "fit"),
        (np.float32, 40, "ledoit-wolf", "partial_fit"),
        (np.float32, -40, "ledoit-wolf", "fit"),
        (np.float32, 40, "oas", "fit"),
        (np.float32, -40, "oas", "partial_fit"),
    ],
)
def test_shrinkage_fits_of_features_whose_squares_leave_the_range(dtype, k, shrinkage, how):
    # float64 at 2**±266 / 2**400 and float32 at 2**±40: the covariance and precision are representable,
    # the sums of squares of the covariance (and the fourth moments) are not without scaling.
    z = _normal(3, (40, 3, 2, 2)).astype(dtype)

    def fitted(data):
        model = anomstats.MultiVariateGaussian(ridge=0.0, shrinkage=shrinkage, store_covariance=True, dtype=dtype)
        if how == "fit":
            return model.fit(data)
        for piece in np.array_split(data, 4):
            model.partial_fit(piece)
        return model

    reference = fitted(z).covariance.astype(np.float64) * 2.0 ** (2 * k)  # exact: a power of two
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = fitted(z * dtype(2.0**k)).covariance.astype(np.float64)
    # Bound: tests/test_faults_review_streams.py's: the sums' rounding, (sqrt(40) + 3) eps, amplified by the
    # coefficient's cancellation (~13), doubled for both sides; a power-of-two scaling itself is exact.
    eps = float(np.finfo(dtype).eps)
    assert np.abs(got - reference).max() <= TWO_SIDES * 125 * eps * np.abs(reference).max()


# --------------------------------------------------------------------------- float32 torch streams of tiny features
def _stream_error(torch, x, **kwargs):
    from anomstats_torch import MultiVariateGaussian

    stream = MultiVariateGaussian(ridge=0.0, accumulate_dtype=torch.float32, **kwargs)
    stream.update(x[:10])
    stream.update(x[10:])
    with pytest.raises((ValueError, np.linalg.LinAlgError)) as error:
        stream.compute()
    return stream, error.value


@pytest.mark.parametrize("constant", [0.0, 1e-20, 1.0])
def test_a_constant_feature_of_a_float32_stream_is_still_singular_as_in_fit(constant):
    torch = pytest.importorskip("torch")
    from anomstats_torch import MultiVariateGaussian

    x = _normal(1, (30, 3, 2, 2))
    x[:, 1] = constant
    x = torch.from_numpy(x).float()
    with pytest.raises(np.linalg.LinAlgError, match="numerically singular"):
        MultiVariateGaussian(ridge=0.0).fit(x)
    _, error = _stream_error(torch, x)
    assert isinstance(error, np.linalg.LinAlgError) and "numerically singular" in str(error)


@pytest.mark.parametrize("chunk_bytes", [1, 64 * 2**20], ids=["one_patch_chunks", "one_chunk"])
@pytest.mark.parametrize("tiny_first", [True, False])
def test_a_float32_stream_names_the_first_fault_in_patch_order(chunk_bytes, tiny_first):
    torch = pytest.importorskip("torch")

    x = _normal(5, (30, 3, 1, 2))
    tiny, singular = (0, 1) if tiny_first else (1, 0)
    x[:, :, 0, tiny] *= 1e-25  # products round to zero in float32
    x[:, 2, 0, singular] = x[:, 0, 0, singular]  # a duplicated feature
    x = torch.from_numpy(x).float()
    stream, error = _stream_error(torch, x, chunk_bytes=chunk_bytes)
    assert f"patch {0} (position (0, 0)" in str(error)
    if tiny_first:
        assert type(error) is ValueError and "features of scale" in str(error)
    else:
        assert isinstance(error, np.linalg.LinAlgError) and "numerically singular" in str(error)
    # float32 sums are never overwritten in place: the stream stays open, and refuses the same way again
    with pytest.raises(type(error), match="patch 0"):
        stream.compute()
