"""The core's one-shot dense fit is location-free (issue 11, point 5, and its review).

``anomstats._patch_kernels.fit_chunk`` gathers each patch shifted by its first observation, so its mean,
centred values and fourth moments (Ledoit-Wolf's) round relative to the data's spread, not to their
distance from the origin. Every tolerance states its bound next to the assertion.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import anomstats
from tests._tolerances import eps


@settings(max_examples=30)
@given(
    seed=st.integers(0, 10**6),
    exponent=st.integers(4, 8),
    shrinkage=st.sampled_from([None, "ledoit-wolf", "oas"]),
)
def test_the_one_shot_fit_is_location_free(seed, exponent, shrinkage):
    # Unequal standard deviations (1, 3, 10), so that no shrinkage is clipped at 1, offset by 10**exponent:
    # up to 1e8 sigma of the narrowest feature.
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 3, 2, 2)) * np.array([1.0, 3.0, 10.0])[None, :, None, None] + 10.0**exponent
    # x - x[0] is exact (Sterbenz: every value is within a factor 2 of the first one), so the reference is
    # the fit of the same numbers moved to the origin.
    near_data = x - x[:1]
    options = dict(ridge=0.0, shrinkage=shrinkage, store_covariance=True, workers=1)
    far = anomstats.MultiVariateGaussian(**options).fit(x)
    near = anomstats.MultiVariateGaussian(**options).fit(near_data)
    # Issue 11's promise: 1e-12 relative at any offset up to 1e8 sigma. (Unshifted, the Ledoit-Wolf fit was off
    # by eps·offset/sigma, up to 5e-9 here.)
    scale = np.abs(near.covariance).max()
    assert np.abs(far.covariance - near.covariance).max() <= 1e-12 * scale
    assert np.abs(far.shrinkage_ - near.shrinkage_).max() <= 1e-12
    # The mean is the shifted mean plus the shift: one rounding relative to |mean| on top of the reference's
    # (near.mean + x[0] rounds once too): 2 eps |mean|. (Unshifted, a mean of 40 values at the offset was off
    # by up to 40 eps |mean|.)
    reference = near.mean + x[0].reshape(3, -1)
    assert np.all(np.abs(far.mean - reference) <= 2 * eps(np.float64) * np.abs(reference))
    np.testing.assert_array_equal(near_data, x - x[:1])  # inputs are never modified
