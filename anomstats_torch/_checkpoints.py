"""Consistency of the per-patch Gaussians' checkpoints: the entries of one state dict must fit together.

Called by the modules' ``_check_state_consistency`` hook (:class:`anomstats_torch.DynamicBufferModule`)
before anything is loaded. The rules every module's hook shares live here too, for the KDE's hook
(:meth:`anomstats_torch.GaussianKDE._check_state_consistency`) as for the Gaussians': a real dtype
(:func:`check_real`), sparse and quantized entries read as dense (:func:`readable`), and values checked in the
dtype the module's buffers will give them (:func:`target_dtype`, :func:`all_finite`, :func:`beyond_dtype`).
Every refusal is :func:`anomstats._validation.inconsistent_state_error`, a ``RuntimeError`` as torch's own
load errors, that says what does not fit and what a consistent state holds.

The state after the load is checked: an entry of the checkpoint, or the module's own buffer where the
checkpoint lacks it (``strict=False``). An empty tensor there means "not fitted yet" and fits everything,
except that a checkpoint holding one of a fit's entries empty and another fitted is refused.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from anomstats._packed import features_of_packed_length, packed_length
from anomstats._validation import inconsistent_state_error

from . import _streaming
from ._policy import rows_per_chunk

__all__ = [
    "CAST_FIRST",
    "all_finite",
    "beyond_dtype",
    "check_dense",
    "check_low_rank",
    "check_real",
    "check_stream",
    "readable",
    "refusal",
    "target_dtype",
]

#: What the layouts hold, for the messages.
DENSE_LAYOUT = "mean (C, H*W) and inv_covariance (H*W, C, C)"
PACKED_LAYOUT = "mean (C, H*W) and inv_covariance_packed (H*W, C*(C+1)/2)"
LOW_RANK_LAYOUT = "mean (C, H*W), basis (H*W, C, r), eigenvalues (H*W, r) (positive, r <= C) and a 0-d ridge >= 0"
STREAM_LAYOUT = (
    "mid-stream, also stream_count (0-d int64 >= 1), stream_info (int64 [0 or 1, *spatial]), stream_shift and "
    "stream_mean (C, P) and stream_m2 (P, C*(C+1)/2, the packed upper triangles of the centred sums; low-rank "
    "form: stream_factor (P, C, k)), all float32 or all float64 and finite, and at times stream_pending (k, C, P), "
    "k <= stream_count observations not yet folded in"
)

#: What a refusal of values beyond the module's dtype tells the caller to do.
CAST_FIRST = "cast the module to the checkpoint's dtype (e.g. .double()) before loading"

#: Bytes of one chunk of the finiteness checks of large entries.
_CHECK_BYTES = 1 << 26


def _shape(tensor: Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _refuse(module: str, detail: str, layout: str) -> None:
    raise inconsistent_state_error(module, detail, layout)


def refusal(module: str, detail: str, packed: bool) -> RuntimeError:
    """The error for a dense module's entries that do not fit together, found while converting the precision."""
    return inconsistent_state_error(module, detail, PACKED_LAYOUT if packed else DENSE_LAYOUT)


def _merged(incoming: dict[str, Tensor], current: dict[str, Tensor], names: tuple[str, ...]) -> dict[str, Tensor]:
    """The entries after the load: the checkpoint's, else the module's own."""
    return {name: incoming[name] if name in incoming else current[name] for name in names}


def check_real(module: str, incoming: dict[str, Tensor], names: tuple[str, ...], layout: str) -> None:
    """Refuse, naming it, an entry of ``names`` in ``incoming`` that is complex or boolean (not a real number type)."""
    for name in names:
        if name in incoming and (incoming[name].is_complex() or incoming[name].dtype == torch.bool):
            _refuse(module, f"{name} has dtype {incoming[name].dtype}, not a real number type", layout)


def _check_half_fitted(module: str, incoming: dict[str, Tensor], names: tuple[str, ...], layout: str) -> None:
    """A checkpoint holding a fit's entries holds all of them fitted, or all of them empty."""
    present = [name for name in names if name in incoming]
    empty = [name for name in present if incoming[name].numel() == 0]
    if empty and len(empty) < len(present):
        shapes = ", ".join(f"{name} {_shape(incoming[name])}" for name in present)
        _refuse(module, f"{', '.join(empty)} empty but the others fitted ({shapes})", layout)


def all_finite(tensor: Tensor, dtype: torch.dtype | None = None) -> bool:
    """``isfinite(tensor.to(dtype)).all()`` chunk by chunk along the first axis (bounded temporaries); meta: True.

    ``dtype``: the buffer's the values will be copied into (a finite float64 1e300 is inf in float32).
    """
    if tensor.is_meta or tensor.numel() == 0:
        return True
    flat = tensor.reshape(tensor.shape[0], -1) if tensor.ndim > 1 else tensor.reshape(-1, 1)
    block = rows_per_chunk(flat.shape[1] * 2, _CHECK_BYTES, flat.shape[0])
    cast = (lambda chunk: chunk) if dtype is None else (lambda chunk: chunk.to(dtype))
    return all(bool(torch.isfinite(cast(flat[i : i + block])).all()) for i in range(0, flat.shape[0], block))


def readable(module: str, name: str, tensor: Tensor, layout: str) -> Tensor:
    """A checkpoint entry as a plain dense tensor whose values can be checked (sparse and quantized ones read)."""
    try:
        if tensor.layout != torch.strided:
            tensor = tensor.to_dense()
        if tensor.is_quantized:
            tensor = tensor.dequantize()
    except (RuntimeError, NotImplementedError) as exc:
        _refuse(module, f"{name} is a {tensor.layout} {tensor.dtype} tensor whose values cannot be read ({exc})", layout)
    return tensor


def target_dtype(tensor: Tensor, current: Tensor | None) -> torch.dtype | None:
    """The dtype the entry's values will have once loaded: the module's buffer's (torch's copy casts).

    ``None`` where no cast changes them: no buffer, a buffer that is not floating point, or one of the
    entry's own dtype.
    """
    if current is None or not current.dtype.is_floating_point or current.dtype == tensor.dtype:
        return None
    return current.dtype


def beyond_dtype(name: str, target: torch.dtype) -> str:
    """The detail of a refusal of entry ``name``, finite as stored, whose values overflow the ``target`` dtype."""
    return (
        f"{name} holds values beyond the range of this module's {target} buffers (largest "
        f"{torch.finfo(target).max:.3g}); {CAST_FIRST}"
    )


def _check_finite(
    module: str, incoming: dict[str, Tensor], names: tuple[str, ...], layout: str, current: dict[str, Tensor]
) -> None:
    """The checkpoint's fitted entries are finite, also once cast to the buffers' dtype: a NaN or an inf would
    make every distance NaN or inf, silently."""
    for name in names:
        if name not in incoming:
            continue
        tensor = readable(module, name, incoming[name], layout)
        if not all_finite(tensor):
            _refuse(module, f"{name} holds NaN or infinite values", layout)
        target = target_dtype(tensor, current.get(name))
        if target is not None and not all_finite(tensor, target):
            _refuse(module, beyond_dtype(name, target), layout)


def check_dense(module: str, incoming: dict[str, Tensor], current: dict[str, Tensor], packed: bool) -> None:
    """``mean`` (C, P) with ``inv_covariance`` (P, C, C), or with ``inv_covariance_packed`` (P, C·(C+1)/2)."""
    key, layout = ("inv_covariance_packed", PACKED_LAYOUT) if packed else ("inv_covariance", DENSE_LAYOUT)
    names = ("mean", key)
    if not any(name in incoming for name in names):
        return
    check_real(module, incoming, names, layout)
    _check_half_fitted(module, incoming, names, layout)
    state = _merged(incoming, current, names)
    mean, precision = state["mean"], state[key]
    shapes = f"mean {_shape(mean)}, {key} {_shape(precision)}"
    _check_finite(module, incoming, names, layout, current)
    if mean.numel() and mean.ndim != 2:
        _refuse(module, f"mean must be 2-D (C, H*W); got {shapes}", layout)
    if not precision.numel():
        return
    if packed:
        if precision.ndim != 2:
            _refuse(module, f"{key} must be 2-D (H*W, C*(C+1)/2); got {shapes}", layout)
        try:
            channels = features_of_packed_length(precision.shape[1], key)
        except ValueError as exc:
            _refuse(module, f"{exc} ({shapes})", layout)
    else:
        if precision.ndim != 3 or precision.shape[1] != precision.shape[2]:
            _refuse(module, f"{key} must be a stack of square matrices (H*W, C, C); got {shapes}", layout)
        channels = precision.shape[1]
    if mean.numel() and _shape(mean) != (channels, precision.shape[0]):
        _refuse(
            module,
            f"{key} holds {precision.shape[0]} patch(es) of {channels} features but mean has shape "
            f"{_shape(mean)} (C, H*W) ({shapes})",
            layout,
        )


def check_low_rank(module: str, incoming: dict[str, Tensor], current: dict[str, Tensor]) -> None:
    """``mean`` (C, P), ``basis`` (P, C, r), ``eigenvalues`` (P, r) positive with r <= C, ``ridge`` 0-d >= 0."""
    names = ("mean", "basis", "eigenvalues", "ridge")
    if not any(name in incoming for name in names):
        return
    layout = LOW_RANK_LAYOUT
    check_real(module, incoming, names, layout)
    _check_half_fitted(module, incoming, names[:3], layout)
    _check_finite(module, incoming, names[:2], layout, current)
    state = _merged(incoming, current, names)
    mean, basis, eigenvalues, ridge = (state[name] for name in names)
    shapes = ", ".join(f"{name} {_shape(state[name])}" for name in names)
    if ridge.numel() != 1 or ridge.ndim > 1:
        _refuse(module, f"ridge must be 0-d; got {shapes}", layout)
    if not ridge.is_meta and not (math.isfinite(float(ridge)) and float(ridge) >= 0):
        _refuse(module, f"ridge must be finite and >= 0, got {float(ridge)}", layout)
    fitted = {name: state[name].numel() > 0 for name in names[:3]}
    wanted = {"mean": 2, "basis": 3, "eigenvalues": 2}
    for name, ndim in wanted.items():
        if fitted[name] and state[name].ndim != ndim:
            _refuse(module, f"{name} must be {ndim}-D; got {shapes}", layout)
    if fitted["basis"]:
        patches, channels, width = basis.shape
        if width > channels:
            _refuse(module, f"basis has r = {width} columns for C = {channels} features (r <= C); got {shapes}", layout)
        if fitted["mean"] and _shape(mean) != (channels, patches):
            _refuse(module, f"basis is for {patches} patch(es) of {channels} features but mean has shape {_shape(mean)}; got {shapes}", layout)
        if fitted["eigenvalues"] and _shape(eigenvalues) != (patches, width):
            _refuse(module, f"eigenvalues must be (H*W, r) = {(patches, width)} to match basis; got {shapes}", layout)
    if fitted["eigenvalues"] and not eigenvalues.is_meta:
        eigenvalues = readable(module, "eigenvalues", eigenvalues, layout)
        # In the buffer's dtype, as they will be stored: a float64 1e-300 is 0 in float32, 1e300 is inf.
        stored = eigenvalues.to(target_dtype(eigenvalues, current["eigenvalues"]) or eigenvalues.dtype)
        if not all_finite(stored) or not bool((stored > 0).all()):
            _refuse(
                module,
                f"eigenvalues must be positive and finite in this module's {stored.dtype} (they are variances plus "
                f"the ridge); {CAST_FIRST} one beyond it",
                layout,
            )


def check_stream(module: str, incoming: dict[str, Tensor], kind: str, layout: str) -> None:
    """An open stream's entries (:mod:`anomstats_torch._streaming`): all of them, fitting together, finite."""
    present = [name for name in _streaming.ALL_KEYS if name in incoming]
    if not present:
        return
    layout = f"{layout}; {STREAM_LAYOUT}"
    keys = _streaming.KEYS[kind]
    allowed = keys + _streaming.OPTIONAL_KEYS[kind]
    foreign = [name for name in present if name not in allowed]
    if foreign:
        _refuse(module, f"{', '.join(foreign)} belong(s) to the other form's stream (this module's: {', '.join(allowed)})", layout)
    missing = [name for name in keys if name not in incoming]
    if missing:
        _refuse(module, f"a stream's entries come together, but {', '.join(missing)} missing (found {', '.join(present)})", layout)
    count, info, shift, mean, spread = (incoming[name] for name in keys)
    _check_stream_counts(module, count, info, layout)
    _check_stream_moments(module, kind, info, shift, mean, spread, layout)
    if _streaming.PENDING in incoming:
        _check_pending(module, incoming[_streaming.PENDING], count, shift, layout)


def _check_pending(module: str, pending: Tensor, count: Tensor, shift: Tensor, layout: str) -> None:
    """The batch waiting to be folded in: (k, C, P) observations, 1 <= k <= stream_count, float32 or float64, finite."""
    channels, patches = shift.shape
    if pending.dtype not in _streaming.ACCUMULATE_DTYPES:
        _refuse(module, f"stream_pending must be float32 or float64; got {pending.dtype}", layout)
    if pending.ndim != 3 or _shape(pending)[1:] != (channels, patches) or pending.shape[0] < 1:
        _refuse(module, f"stream_pending must be (k, C, P) = (k, {channels}, {patches}) with k >= 1; got {_shape(pending)}", layout)
    if not count.is_meta and pending.shape[0] > int(count):
        _refuse(module, f"stream_pending holds {pending.shape[0]} observations but stream_count is {int(count)}", layout)
    if not all_finite(pending):
        _refuse(module, "stream_pending holds NaN or infinite values", layout)


def _integer(tensor: Tensor) -> bool:
    return not tensor.dtype.is_floating_point and not tensor.is_complex() and tensor.dtype != torch.bool


def _check_stream_counts(module: str, count: Tensor, info: Tensor, layout: str) -> None:
    if not _integer(count) or count.ndim != 0:
        _refuse(module, f"stream_count must be a 0-d integer tensor; got {count.dtype} {_shape(count)}", layout)
    if not _integer(info) or info.ndim != 1 or info.shape[0] < 1:
        _refuse(module, f"stream_info must be a non-empty 1-D integer tensor; got {info.dtype} {_shape(info)}", layout)
    if count.is_meta or info.is_meta:
        return
    if int(count) < 1:
        _refuse(module, f"stream_count is {int(count)}: an open stream has seen at least one observation", layout)
    values = [int(v) for v in info.tolist()]
    if values[0] not in (0, 1) or any(size < 1 for size in values[1:]):
        _refuse(module, f"stream_info is {values}: [0 or 1, *positive spatial sizes] expected", layout)


def _check_stream_moments(
    module: str, kind: str, info: Tensor, shift: Tensor, mean: Tensor, spread: Tensor, layout: str
) -> None:
    spread_name = _streaming.KEYS[kind][-1]
    shapes = f"stream_shift {_shape(shift)}, stream_mean {_shape(mean)}, {spread_name} {_shape(spread)}"
    dtypes = {shift.dtype, mean.dtype, spread.dtype}
    if len(dtypes) != 1 or shift.dtype not in _streaming.ACCUMULATE_DTYPES:
        found = ", ".join(str(t.dtype) for t in (shift, mean, spread))
        _refuse(module, f"the stream's moments must all be float32 or all float64; got {found}", layout)
    if shift.ndim != 2 or _shape(mean) != _shape(shift):
        _refuse(module, f"stream_shift and stream_mean must both be (C, P); got {shapes}", layout)
    channels, patches = shift.shape
    if kind == "dense":
        fits = _shape(spread) == (patches, packed_length(channels))
    else:
        fits = spread.ndim == 3 and _shape(spread)[:2] == (patches, channels)
    if not fits:
        _refuse(module, f"{spread_name} does not match stream_shift's (C, P) = {(channels, patches)}; got {shapes}", layout)
    if not info.is_meta and len(info) > 1 and math.prod(int(v) for v in info.tolist()[1:]) != patches:
        _refuse(module, f"stream_info's spatial sizes {info.tolist()[1:]} do not multiply to P = {patches}", layout)
    for name, tensor in (("stream_shift", shift), ("stream_mean", mean), (spread_name, spread)):
        if not all_finite(tensor):
            _refuse(module, f"{name} holds NaN or infinite values", layout)
    if kind == "dense" and not spread.is_meta:
        diagonal = spread.index_select(1, _streaming.diagonal_positions(channels, spread.device))
        if not bool((diagonal >= 0).all()):
            _refuse(module, "stream_m2 has negative diagonal entries (sums of squares)", layout)
