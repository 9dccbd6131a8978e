"""The library's validation vocabulary: one function, one exception type and one message per fault.

Used by every estimator of the core and by the torch adapter. Everything here works on plain Python
values (shapes, ints, strings, dtypes) or, for the finiteness checks, on a boolean summary computed by
the caller, so that the PyTorch adapter validates tensors with exactly the messages the NumPy core uses,
without converting them. Each check raises :class:`ValueError` (or :class:`TypeError` for a wrong kind
of argument) whose message names the bad argument and says what to do.

Two families of arguments keep the vocabulary of the library they replace, by design:
:func:`anomstats.cov`/:func:`anomstats.corrcoef` raise numpy's exact exceptions (:mod:`anomstats._weights`),
and :class:`anomstats.GaussianKDE` raises scipy's. Axes are validated in :mod:`anomstats._axes`, weights in
:mod:`anomstats._weights`.
"""

from __future__ import annotations

import math
import numbers
import operator
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

__all__ = [
    "DTypeError",
    "D_GREATER_THAN_N",
    "NON_FINITE_DATA",
    "NON_FINITE_POINTS",
    "NotFittedError",
    "SINGULAR_DATA",
    "SHRINKAGE_METHODS",
    "TOO_FEW_ELEMENTS",
    "MIN_FIT_OBSERVATIONS",
    "accumulation_dtype",
    "check_bool",
    "warn_at_caller",
    "check_ddof",
    "check_memory_budget",
    "check_patch_score_shape",
    "check_integer",
    "check_kde_data_shape",
    "check_positive_int",
    "check_workers",
    "require_finite",
    "require_observations",
    "check_fit_shape",
    "check_score_shape",
    "check_ridge",
    "check_shrinkage",
    "check_dtype",
    "describe_patch",
]

# The Gaussian KDE's data faults, in scipy.stats.gaussian_kde's words (both packages' KDEs raise these).
#: ``ValueError`` when the data have more dimensions than points.
D_GREATER_THAN_N = (
    "Number of dimensions is greater than number of samples. This results in a singular data "
    "covariance matrix, which cannot be treated using the algorithms implemented in `gaussian_kde`. "
    "Note that `gaussian_kde` interprets each *column* of `dataset` to be a point; consider "
    "transposing the input to `dataset`. A Gaussian KDE needs more points than dimensions."
)
#: ``ValueError`` when the data hold fewer than two numbers (a single point of one dimension, or none).
TOO_FEW_ELEMENTS = "`dataset` input should have multiple elements."
#: ``ValueError`` when the data hold NaN or infinity.
NON_FINITE_DATA = (
    "`dataset` must contain only finite values (array must not contain infs or NaNs); remove or replace "
    "the NaN or infinite values."
)
#: ``ValueError`` when query points hold NaN or infinity.
NON_FINITE_POINTS = "points must contain only finite values (array must not contain infs or NaNs)."
#: ``numpy.linalg.LinAlgError`` when the data covariance is singular.
SINGULAR_DATA = (
    "The data appears to lie in a lower-dimensional subspace of the space in which it is expressed. "
    "This has resulted in a singular data covariance matrix, which cannot be treated using the "
    "algorithms implemented in `gaussian_kde`. Consider performing principal component analysis / "
    "dimensionality reduction and using `gaussian_kde` with the transformed data."
)

#: A Gaussian (or covariance) fit needs at least this many observations (an unbiased covariance of one
#: observation is undefined).
MIN_FIT_OBSERVATIONS: int = 2


class NotFittedError(RuntimeError, ValueError, AttributeError):
    """Raised when a fitted quantity is requested before any data was seen.

    One type for every estimator of both packages. It is a :class:`RuntimeError` (what the running
    moments and the torch modules raised before), a :class:`ValueError` and an :class:`AttributeError`
    (what scikit-learn's ``NotFittedError`` is), so existing ``except`` clauses keep working.
    """


class DTypeError(TypeError, ValueError):
    """An unsupported dtype: a ``TypeError``, as numpy raises for dtype faults, and a ``ValueError``."""


#: Accepted values of ``shrinkage`` (``None`` means the plain unbiased covariance).
SHRINKAGE_METHODS: tuple[str, ...] = ("ledoit-wolf", "oas")


def _shape_text(shape: Sequence[int]) -> str:
    return str(tuple(int(s) for s in shape))  # Python's tuple text: "(10,)" for one axis


def check_fit_shape(
    shape: Sequence[int], *, min_observations: int = MIN_FIT_OBSERVATIONS, name: str = "embedding"
) -> tuple[int, int, tuple[int, ...]]:
    """Validate the shape of a training embedding ``(N, C, *spatial)``.

    Parameters
    ----------
    shape : sequence of int
        Shape of the embedding: N observations, C features, then any number of spatial axes
        (PaDiM: ``(B, C, H, W)``). No spatial axes means a single patch.
    min_observations : int, default 2
        Smallest acceptable N. A one-shot fit needs 2 (an unbiased covariance of one observation is
        undefined); a streaming update may bring a single observation.
    name : str, default "embedding"
        Argument name used in the messages.

    Returns
    -------
    n, c, spatial : int, int, tuple of int
        Observations, features and the spatial shape.

    Raises
    ------
    ValueError
        If the rank is below 2, a dimension is zero, or N is below ``min_observations``.

    Examples
    --------
    >>> check_fit_shape((200, 100, 56, 56))
    (200, 100, (56, 56))
    >>> check_fit_shape((1, 3, 4, 4))
    Traceback (most recent call last):
    ...
    ValueError: embedding has 1 observation (shape (1, 3, 4, 4)); a Gaussian fit needs at least 2 observations along axis 0
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(
            f"{name} must have shape (N, C, *spatial) with at least 2 axes "
            f"(observations, features), got shape {_shape_text(shape)}"
        )
    n, c, spatial = shape[0], shape[1], shape[2:]
    if c < 1 or any(s < 1 for s in spatial):
        raise ValueError(
            f"{name} has an empty feature or spatial axis (shape {_shape_text(shape)}); "
            "every axis after the first must be at least 1"
        )
    require_observations(n, min_observations, name=name, detail=f" (shape {_shape_text(shape)})", where=" along axis 0")
    return n, c, spatial


def require_observations(
    count: int, minimum: int = MIN_FIT_OBSERVATIONS, *, name: str = "embedding", detail: str = "", where: str = "",
    streamed: bool = False,
) -> None:
    """Raise ``ValueError`` when ``count`` observations are fewer than a Gaussian fit needs.

    Examples
    --------
    >>> require_observations(5)
    >>> require_observations(1, name="partial_fit", streamed=True)
    Traceback (most recent call last):
    ...
    ValueError: partial_fit has seen 1 observation(s); a Gaussian fit needs at least 2 observations
    """
    if count < minimum:
        if streamed:  # the count of a stream so far, which may still grow
            seen = f"has seen {count} observation(s)"
        else:
            seen = f"has {count} {'observation' if count == 1 else 'observations'}"
        raise ValueError(
            f"{name} {seen}{detail}; a Gaussian fit needs at "
            f"least {minimum} observation{'' if minimum == 1 else 's'}{where}"
        )


def check_score_shape(shape: Sequence[int], n_features: int, spatial: Sequence[int], *, name: str = "x") -> int:
    """Validate the shape of embeddings to score against a fitted ``(C, *spatial)`` model.

    Parameters
    ----------
    shape : sequence of int
        Shape of the embeddings, expected ``(M, C, *spatial)``.
    n_features : int
        C of the fitted model.
    spatial : sequence of int
        Spatial shape of the fitted model.
    name : str, default "x"
        Argument name used in the messages.

    Returns
    -------
    int
        M, the number of embeddings.

    Raises
    ------
    ValueError
        If the rank, the feature count or the spatial shape differ from the fitted model's.

    Examples
    --------
    >>> check_score_shape((8, 100, 56, 56), 100, (56, 56))
    8
    >>> check_score_shape((100, 56, 56), 100, (56, 56))
    Traceback (most recent call last):
    ...
    ValueError: x must have shape (M, 100, 56, 56) (M embeddings of the fitted model's features and spatial shape), got shape (100, 56, 56)
    """
    shape = tuple(int(s) for s in shape)
    spatial = tuple(int(s) for s in spatial)
    expected = (int(n_features),) + spatial
    if len(shape) != len(expected) + 1 or shape[1:] != expected:
        raise ValueError(
            f"{name} must have shape (M, {', '.join(str(s) for s in expected)}) (M embeddings of the "
            f"fitted model's features and spatial shape), got shape {_shape_text(shape)}"
        )
    return shape[0]


def check_patch_score_shape(shape: Sequence[int], n_features: int, n_patches: int, *, name: str = "embedding") -> int:
    """Validate embeddings ``(M, C, *spatial)`` against a fit known by its C and P = prod(spatial) only.

    The torch adapter's fitted buffers (anomalib's ``mean`` (C, P)) do not record the spatial shape, so
    any grid of P patches is accepted. Returns M.

    Examples
    --------
    >>> check_patch_score_shape((8, 100, 56, 56), 100, 3136)
    8
    >>> check_patch_score_shape((8, 99, 56, 56), 100, 3136)
    Traceback (most recent call last):
    ...
    ValueError: embedding has C=99 channels and 3136 patches, the fit has C=100 and 3136; shape must be (B, 100, *spatial) with prod(spatial) = 3136
    """
    # The batch size is left as it is (never int()-ed): while torch.export traces, it is symbolic.
    fixed = tuple(int(s) for s in tuple(shape)[1:])
    spatial_size = math.prod(fixed[1:])
    if len(fixed) < 1 or fixed[0] != n_features or spatial_size != n_patches:
        channels = fixed[0] if fixed else None
        raise ValueError(
            f"{name} has C={channels} channels and {spatial_size} patches, the fit has C={n_features} "
            f"and {n_patches}; shape must be (B, {n_features}, *spatial) with prod(spatial) = {n_patches}"
        )
    return shape[0]


def check_ridge(ridge: float) -> float:
    """Validate the ridge constant added to every covariance diagonal.

    Examples
    --------
    >>> check_ridge(0)
    0.0
    >>> check_ridge(-1.0)
    Traceback (most recent call last):
    ...
    ValueError: ridge must be a finite number >= 0, got -1.0
    """
    if isinstance(ridge, bool) or not isinstance(ridge, numbers.Real):
        raise TypeError(f"ridge must be a real number >= 0, got {type(ridge).__name__}")
    value = float(ridge)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    return value


def check_shrinkage(shrinkage: str | None) -> str | None:
    """Validate the shrinkage method name (``None``, ``"ledoit-wolf"`` or ``"oas"``).

    Examples
    --------
    >>> check_shrinkage("OAS")
    'oas'
    >>> check_shrinkage("lw")
    Traceback (most recent call last):
    ...
    ValueError: shrinkage must be None, 'ledoit-wolf' or 'oas', got 'lw'
    """
    if shrinkage is None:
        return None
    if isinstance(shrinkage, str):
        key = shrinkage.lower().replace("_", "-")
        if key in SHRINKAGE_METHODS:
            return key
    raise ValueError(f"shrinkage must be None, 'ledoit-wolf' or 'oas', got {shrinkage!r}")


def check_dtype(dtype: object, name: str = "dtype") -> np.dtype:
    """Validate a working or storage dtype that must be float64 or float32 (one check, one message).

    Raises :class:`DTypeError`, both a ``TypeError`` (numpy's type for dtype faults) and a ``ValueError``
    (what the per-patch Gaussian raised before).

    Examples
    --------
    >>> check_dtype("float32")
    dtype('float32')
    >>> check_dtype(np.float16)
    Traceback (most recent call last):
    ...
    anomstats._validation.DTypeError: dtype must be float64 or float32, got float16
    """
    try:
        resolved = np.dtype(dtype)
    except TypeError as err:
        raise DTypeError(f"{name} must be float64 or float32, got {dtype!r}") from err
    if resolved not in (np.dtype(np.float64), np.dtype(np.float32)):
        raise DTypeError(f"{name} must be float64 or float32, got {resolved}")
    return resolved


def describe_patch(index: int, spatial: Sequence[int]) -> str:
    """Name a flat patch index with its position in the spatial grid, for error messages.

    Examples
    --------
    >>> describe_patch(57, (56, 56))
    'patch 57 (position (1, 1) of the 56x56 grid)'
    >>> describe_patch(3, (10,))
    'patch 3'
    """
    spatial = tuple(int(s) for s in spatial)
    if len(spatial) < 2:  # the flat index already is the position
        return f"patch {int(index)}"
    position = tuple(int(i) for i in np.unravel_index(int(index), spatial))
    grid = "x".join(str(s) for s in spatial)
    return f"patch {int(index)} (position {_shape_text(position)} of the {grid} grid)"


def require_finite(
    all_finite: bool,
    name: str,
    *,
    where: str = "",
    remedy: str = "remove or replace the NaN or infinite values before fitting",
) -> None:
    """Raise ``ValueError`` naming ``name`` when the caller found NaN or infinity in it.

    The caller computes ``all_finite`` (``np.isfinite(x).all()`` or its torch twin), so this one message
    serves arrays and tensors alike; ``where`` locates the first bad value (e.g. a patch).

    Examples
    --------
    >>> require_finite(True, "x")
    >>> require_finite(False, "embedding", where=" in patch 3")
    Traceback (most recent call last):
    ...
    ValueError: embedding contains non-finite values (NaN or infinity) in patch 3; remove or replace the NaN or infinite values before fitting
    """
    if not all_finite:
        raise ValueError(f"{name} contains non-finite values (NaN or infinity){where}; {remedy}")


def check_bool(value: Any, name: str) -> bool:
    """Return a boolean option as ``bool``; ``numpy.bool_`` is accepted, other truthy values are not.

    Examples
    --------
    >>> check_bool(np.True_, "store_covariance")
    True
    >>> check_bool("no", "store_covariance")
    Traceback (most recent call last):
    ...
    TypeError: store_covariance must be True or False, got 'no'
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def check_integer(
    value: Any,
    name: str,
    expected: str,
    *,
    minimum: int,
    expected_type: str | None = None,
    type_error: type[Exception] = TypeError,
) -> int:
    """Return ``value`` as an ``int`` of at least ``minimum`` (any integer type, not bool), or raise naming it.

    The one integer check of the library: counts, sizes, budgets and the ``count`` of a saved state.
    Another type (bool included, and floats even when integral) raises ``type_error`` and a value below
    ``minimum`` raises ``ValueError``, both saying ``<name> must be <expected>, got <value>``
    (``expected_type``, when given, replaces ``expected`` in the type error's message).

    Examples
    --------
    >>> check_integer(np.int64(0), "state['count']", "a non-negative integer", minimum=0)
    0
    >>> check_integer(True, "fold_every", "a positive integer", minimum=1)
    Traceback (most recent call last):
    ...
    TypeError: fold_every must be a positive integer, got True
    >>> check_integer(-1, "state['count']", "a non-negative integer", minimum=0, type_error=ValueError)
    Traceback (most recent call last):
    ...
    ValueError: state['count'] must be a non-negative integer, got -1
    """
    type_text = expected_type or expected
    if isinstance(value, (bool, np.bool_)):
        raise type_error(f"{name} must be {type_text}, got {value!r}")
    try:
        count = operator.index(value)
    except TypeError:
        raise type_error(f"{name} must be {type_text}, got {value!r}") from None
    if count < minimum:
        raise ValueError(f"{name} must be {expected}, got {count}")
    return count


def _positive_integer(value: Any, name: str, expected: str, expected_type: str | None = None) -> int:
    """:func:`check_integer` with ``minimum=1``."""
    return check_integer(value, name, expected, minimum=1, expected_type=expected_type)


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` as a positive ``int`` (Python or NumPy integers; not bool), or raise naming it.

    Examples
    --------
    >>> check_positive_int(np.int64(3), "fold_every")
    3
    >>> check_positive_int(0, "fold_every")
    Traceback (most recent call last):
    ...
    ValueError: fold_every must be a positive integer, got 0
    """
    return _positive_integer(value, name, "a positive integer")


def check_memory_budget(memory_budget: Any, name: str = "memory_budget") -> int:
    """Return a memory budget as a positive number of bytes, or raise naming the argument (``name``).

    Examples
    --------
    >>> check_memory_budget(2**20)
    1048576
    >>> check_memory_budget(0)
    Traceback (most recent call last):
    ...
    ValueError: memory_budget must be a positive number of bytes, got 0
    """
    return _positive_integer(memory_budget, name, "a positive number of bytes", "an integer number of bytes")


def check_workers(workers: Any) -> int | None:
    """Validate a ``workers`` argument: ``None`` (the default policy) or a positive integer.

    Examples
    --------
    >>> check_workers(None), check_workers(2)
    (None, 2)
    >>> check_workers(0)
    Traceback (most recent call last):
    ...
    ValueError: workers must be a positive integer or None, got 0
    """
    return None if workers is None else _positive_integer(workers, "workers", "a positive integer or None")


def check_ddof(ddof: Any, *, numpy_exact: bool = False) -> Any:
    """Return an integer-valued ``ddof`` as ``int`` (``2.0`` is fine, ``1.5`` is not), as numpy does.

    ``numpy_exact=True`` is :func:`numpy.cov`'s own check, for the numpy drop-ins: ``None`` passes, the
    message is numpy's (``"ddof must be integer"``), and ``int(ddof)`` raises numpy's errors for NaN,
    infinity, complex or multi-element input; ``ddof`` is returned unchanged.

    Examples
    --------
    >>> check_ddof(2.0)
    2
    >>> check_ddof(1.5)
    Traceback (most recent call last):
    ...
    ValueError: ddof must be integer, got 1.5
    """
    if numpy_exact:
        if ddof is not None and ddof != int(ddof):
            raise ValueError("ddof must be integer")
        return ddof
    try:
        value = int(ddof)
    except (TypeError, ValueError):
        raise TypeError(f"ddof must be an integer, got {ddof!r}") from None
    if ddof != value:
        raise ValueError(f"ddof must be integer, got {ddof!r}")
    return value


def accumulation_dtype(x_dtype: np.dtype[Any], dtype: DTypeLike | None) -> np.dtype[Any]:
    """The dtype in which moments of data of ``x_dtype`` are accumulated and returned.

    ``None`` follows :func:`numpy.cov`: ``result_type(x_dtype, float64)`` (float64 for bool,
    integer, float16/32 and float64; longdouble and complex128 where those come in). An explicit
    ``dtype`` must be a floating or complex dtype, and complex data needs a complex one.

    Examples
    --------
    >>> accumulation_dtype(np.dtype(np.float32), None)
    dtype('float64')
    >>> accumulation_dtype(np.dtype(np.int64), np.float32)
    dtype('float32')
    """
    x_dtype = np.dtype(x_dtype)
    if x_dtype.kind not in "biufc":
        raise DTypeError(f"x must hold numbers (bool, integer, floating or complex), got dtype {x_dtype}")
    if dtype is None:
        return np.result_type(x_dtype, np.float64)
    result = check_accumulation_dtype(dtype)
    if x_dtype.kind == "c" and result.kind != "c":
        raise DTypeError(
            f"dtype={result} would discard the imaginary part of complex x ({x_dtype}); "
            "pass a complex dtype or leave dtype=None"
        )
    return result


def check_accumulation_dtype(dtype: DTypeLike) -> np.dtype[Any]:
    """An explicit accumulation ``dtype`` must be floating or complex.

    Examples
    --------
    >>> check_accumulation_dtype("complex128")
    dtype('complex128')
    >>> check_accumulation_dtype(int)
    Traceback (most recent call last):
    ...
    anomstats._validation.DTypeError: dtype must be a floating or complex dtype, got int64
    """
    result = np.dtype(dtype)
    if result.kind not in "fc":
        raise DTypeError(f"dtype must be a floating or complex dtype, got {result}")
    return result


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first frame outside the library (both packages).

    The depth of a warning's origin below the user's call differs between entry points (a fit, the first
    use after streaming, a dask dispatch), so a fixed ``stacklevel`` would point into the library.

    Examples
    --------
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn_at_caller("look here", UserWarning)
    >>> caught[0].filename == __file__ or "anomstats" not in caught[0].filename
    True
    """
    frame = sys._getframe(1)
    level = 2  # stacklevel 2 is the frame calling this function
    while frame is not None and str(frame.f_globals.get("__name__", "")).startswith("anomstats"):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def check_kde_data_shape(d: int, n: int, explicit_kernel_covariance: bool) -> None:
    """Refuse KDE data with more dimensions than points (scipy's ``ValueError`` and words), in both packages.

    The one home of the "d > n" rule of :class:`anomstats.GaussianKDE` (construction and a reassigned
    ``dataset``), :func:`anomstats.bandwidth.cv_ml_factor` and the torch adapter's ``GaussianKDE.fit``.
    scipy's condition: ``d > n`` raises :data:`D_GREATER_THAN_N`; ``d == n`` points span at most ``d - 1``
    dimensions around their mean, so they pass here and are refused by the rank test of the data covariance
    (:func:`anomstats.bandwidth.check_data_covariance`, a ``numpy.linalg.LinAlgError``), as scipy's Cholesky
    refuses them. With an explicit kernel covariance the data covariance is never formed: any ``n`` will do.

    Examples
    --------
    >>> check_kde_data_shape(3, 3, False)  # equal: left to the rank test
    >>> check_kde_data_shape(4, 3, True)  # an explicit kernel covariance needs no data covariance
    >>> check_kde_data_shape(4, 3, False)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: Number of dimensions is greater than number of samples. ...
    """
    if d > n and not explicit_kernel_covariance:
        raise ValueError(D_GREATER_THAN_N)


def singular_data_message(feature: int, d: int, *, constant: bool = False) -> str:
    """The KDE's message for data in a lower-dimensional subspace (both packages; ``numpy.linalg.LinAlgError``).

    Starts with scipy's words (:data:`SINGULAR_DATA`), names the dependent (or constant) ``feature``
    (0-based, of ``d``) and says what to do.

    Examples
    --------
    >>> print(singular_data_message(2, 3))  # doctest: +ELLIPSIS
    The data appears to lie in a lower-dimensional subspace ...: feature 2 (0-based, of 3) is, to rounding, a linear combination of the other features. ...
    """
    if constant:
        fault = f"feature {feature} (0-based, of {d}) is constant: its spread is within rounding"
    else:
        fault = f"feature {feature} (0-based, of {d}) is, to rounding, a linear combination of the other features"
    return (
        "The data appears to lie in a lower-dimensional subspace of the space in which it is expressed: "
        f"{fault}. This has resulted in a singular data covariance matrix, which cannot be treated using the "
        "algorithms implemented in `gaussian_kde`. Drop or combine the dependent feature (e.g. by principal "
        "component analysis / dimensionality reduction), give positive weight to points that span every "
        "feature, or pass an explicit `kernel_covariance`."
    )


def require_finite_points(all_finite: bool, name: str = "points") -> None:
    """Raise the KDE's ``ValueError`` for query points holding NaN or infinity, naming the argument.

    With ``name="points"`` the message is :data:`NON_FINITE_POINTS` (the core KDE's); the torch adapter
    names its argument ``features``.

    Examples
    --------
    >>> require_finite_points(True)
    >>> require_finite_points(False, "features")
    Traceback (most recent call last):
    ...
    ValueError: features must contain only finite values (array must not contain infs or NaNs).
    """
    if not all_finite:
        raise ValueError(NON_FINITE_POINTS.replace("points", name, 1))


def require_no_nan(no_nan: bool, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` when an integration bound holds NaN (infinite bounds are fine).

    Examples
    --------
    >>> require_no_nan(False, "low")
    Traceback (most recent call last):
    ...
    ValueError: low must not contain NaN (infinite bounds are allowed: they leave the box open on that side).
    """
    if not no_nan:
        raise ValueError(f"{name} must not contain NaN (infinite bounds are allowed: they leave the box open on that side).")


def reassigned_dataset_weights_message(n_new: int, n_weights: int) -> str:
    """The KDE's ``ValueError`` text for a new ``dataset`` whose length differs from the KDE's non-uniform weights.

    Examples
    --------
    >>> print(reassigned_dataset_weights_message(5, 4))  # doctest: +ELLIPSIS
    dataset: the new data have n=5 points but the KDE's weights were given for 4; ...
    """
    return (
        f"dataset: the new data have n={n_new} points but the KDE's weights were given for {n_weights}; "
        "weights belong to the points they weigh. Build a new GaussianKDE(dataset, bw_method=..., "
        "weights=...) for weighted data of another length."
    )


def inconsistent_state_error(module: str, detail: str, layout: str) -> RuntimeError:
    """The ``RuntimeError`` a module's ``load_state_dict`` raises for mutually inconsistent buffers.

    A ``RuntimeError``, as torch's own ``load_state_dict`` raises for a size mismatch; raised before any
    buffer changes (both packages' torch modules: the KDE and the per-patch Gaussian).

    Parameters
    ----------
    module : str
        The module's class name.
    detail : str
        What does not fit, with the shapes found, e.g. ``"bw_transform has shape (3, 3) but dataset (100, 4)"``.
    layout : str
        What a consistent fitted state holds, e.g. ``"bw_transform (D, D), dataset (N, D) and a 0-d norm"``.

    Examples
    --------
    >>> raise inconsistent_state_error("GaussianKDE", "norm has shape (2,)", "a 0-d norm")
    Traceback (most recent call last):
    ...
    RuntimeError: Error(s) in loading state_dict for GaussianKDE: inconsistent buffers: norm has shape (2,); a fitted GaussianKDE holds a 0-d norm. Load all of them from one fitted module's state_dict; nothing was loaded.
    """
    return RuntimeError(
        f"Error(s) in loading state_dict for {module}: inconsistent buffers: {detail}; a fitted {module} holds "
        f"{layout}. Load all of them from one fitted module's state_dict; nothing was loaded."
    )
