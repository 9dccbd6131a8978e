"""Streamed moments of the per-patch Gaussians, kept as buffers: they move with the module and ride in checkpoints.

While a stream is open (from the first ``update`` to ``reset``) the module holds these buffers:

- ``stream_count``: 0-d int64, the number of observations (>= 1);
- ``stream_info``: 1-D int64, ``[wide, *spatial]``: ``wide`` is 1 when some batch was float64 (the fit is then
  stored in float64), ``spatial`` the last batch's spatial shape (for messages);
- ``stream_shift``: (C, P), a fixed origin: the first batch's mean per patch;
- ``stream_mean``: (C, P), the running mean minus ``stream_shift``;
- ``stream_m2`` (dense and packed storage): (P, C, C), the centred sums of products; or ``stream_factor``
  (low-rank form): (P, C, k), a scatter factor ``F`` with ``F Fᵀ`` the centred sums of products.

The floating buffers are in the accumulation dtype (``accumulate_dtype``, or float64 for float64 input).

Accumulating around a fixed shift makes the stream location-free: every batch enters as ``x − shift``,
whose rounding is relative to ``|x − shift|`` (the data's spread), not to ``|x|``; the means, their
differences and Chan's cross terms are all of the spread's size, so splitting the data into updates costs a
few ``eps·(1 + |μ − shift|/σ)`` relative, at any distance ``|μ|`` from the origin. The one rounding relative
to ``|μ|`` is the final ``shift + mean`` (the one-shot mean has it too).

The buffers are persistent (in ``state_dict()``) while the stream is open and not yet computed: a checkpoint
taken mid-stream resumes exactly. ``compute()`` makes them non-persistent (kept in memory, so more updates can
follow, which make them persistent again), so that a finished fit's checkpoint holds exactly anomalib's keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from anomstats._rules import chan_merge_weights

from ._policy import rows_per_chunk

COUNT, INFO, SHIFT, MEAN, SCATTER, FACTOR = (
    "stream_count", "stream_info", "stream_shift", "stream_mean", "stream_m2", "stream_factor",
)

#: The buffers of an open stream, by kind: the dense form's centred sums, the low-rank form's scatter factor.
KEYS = {"dense": (COUNT, INFO, SHIFT, MEAN, SCATTER), "low_rank": (COUNT, INFO, SHIFT, MEAN, FACTOR)}

#: Every stream buffer name of either kind.
ALL_KEYS = (COUNT, INFO, SHIFT, MEAN, SCATTER, FACTOR)

#: The accumulation dtypes.
ACCUMULATE_DTYPES = (torch.float32, torch.float64)


@dataclass
class Stream:
    """An open stream's state; ``spread`` is ``stream_m2`` (dense) or ``stream_factor`` (low-rank)."""

    count: int
    wide: bool
    spatial: tuple[int, ...]
    shift: Tensor
    mean: Tensor
    spread: Tensor

    @property
    def n_features(self) -> int:
        return self.shift.shape[0]

    @property
    def n_patches(self) -> int:
        return self.shift.shape[1]

    def writable(self) -> Stream:
        """This stream, with copies of tensors made under :func:`torch.inference_mode` (updated in place later)."""
        if torch.is_inference_mode_enabled() or not any(t.is_inference() for t in (self.shift, self.mean, self.spread)):
            return self
        return Stream(self.count, self.wide, self.spatial, self.shift.clone(), self.mean.clone(), self.spread.clone())


def read(module: nn.Module, kind: str) -> Stream | None:
    """The open stream of ``module`` (None when there is none)."""
    buffers = module._buffers
    if COUNT not in buffers:
        return None
    info = [int(v) for v in buffers[INFO].tolist()]
    spread = buffers[SCATTER if kind == "dense" else FACTOR]
    return Stream(int(buffers[COUNT]), bool(info[0]), tuple(info[1:]), buffers[SHIFT], buffers[MEAN], spread)


def write(module: nn.Module, kind: str, stream: Stream) -> None:
    """Register (or replace) the stream's buffers, persistent: the stream is open and not computed."""
    device = stream.shift.device
    tensors = {
        COUNT: torch.tensor(stream.count, dtype=torch.int64, device=device),
        INFO: torch.tensor([int(stream.wide), *stream.spatial], dtype=torch.int64, device=device),
        SHIFT: stream.shift,
        MEAN: stream.mean,
        SCATTER if kind == "dense" else FACTOR: stream.spread,
    }
    for name, tensor in tensors.items():
        module._non_persistent_buffers_set.discard(name)
        module._buffers[name] = tensor


def close(module: nn.Module) -> None:
    """Forget the stream (``reset()``; a checkpoint without one)."""
    for name in ALL_KEYS:
        module._buffers.pop(name, None)
        module._non_persistent_buffers_set.discard(name)


def set_persistent(module: nn.Module, persistent: bool) -> None:
    """Keep the open stream's buffers in ``state_dict()`` (mid-stream) or out of it (after ``compute()``)."""
    for name in ALL_KEYS:
        if name in module._buffers:
            if persistent:
                module._non_persistent_buffers_set.discard(name)
            else:
                module._non_persistent_buffers_set.add(name)


def prepare_load(module: nn.Module, kind: str, incoming: dict[str, Tensor], device: torch.device) -> None:
    """Match the stream's buffers to a checkpoint: empty placeholders in the entries' dtypes, or no stream.

    With stream entries (checked by :func:`anomstats_torch._checkpoints.check_stream`), the stream's buffers are
    registered persistent in the checkpoint's dtypes (a stream resumes in the precision it was accumulated in);
    without them, a checkpoint that holds any of the module's entries has no stream: the module's is closed.
    """
    if any(name in incoming for name in ALL_KEYS):
        where = module._buffers[SHIFT].device if SHIFT in module._buffers else device
        close(module)
        for name in KEYS[kind]:
            module._buffers[name] = torch.empty(0, dtype=incoming[name].dtype, device=where)
    elif incoming:
        close(module)


def apply_keeping_dtype(module: nn.Module, fn: Callable[[Tensor], Tensor], apply: Callable[[], nn.Module]) -> nn.Module:
    """``module._apply(fn)`` (the callable ``apply``) with the stream's buffers moved but never cast.

    ``.to(device)``, ``.cuda()``, ``.cpu()`` move the stream; dtype casts of the module (``.double()``,
    ``.half()``, ``.to(dtype)``) leave its precision alone: the moments stay in the dtype they were
    accumulated in (a cast to half precision would destroy them).
    """
    held = {name: module._buffers.pop(name) for name in ALL_KEYS if name in module._buffers}
    try:
        result = apply()
    except BaseException:
        module._buffers.update(held)
        raise
    for name, tensor in held.items():
        probe = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device))
        module._buffers[name] = fn(tensor) if probe.dtype == tensor.dtype else tensor.to(device=probe.device)
    return result


# ---------------------------------------------------------------------- kernels
def shifted_mean(vectors: Tensor, shift: Tensor, dtype: torch.dtype, chunk_bytes: int) -> Tensor:
    """Mean over the batch of ``x − shift`` for ``vectors`` (B, C, P): (C, P) in ``dtype``, chunk by chunk.

    Each difference is rounded once, relative to itself (the shift is exact in ``dtype``), then averaged.
    """
    batch, channels, patches = vectors.shape
    out = torch.empty(channels, patches, dtype=dtype, device=shift.device)
    block = rows_per_chunk(batch * channels * 16, chunk_bytes, patches)
    for p0 in range(0, patches, block):
        p1 = min(p0 + block, patches)
        out[:, p0:p1] = torch.sub(vectors[:, :, p0:p1], shift[:, p0:p1]).to(dtype).mean(dim=0)
    return out


def _centred(vectors: Tensor, shift: Tensor, centre: Tensor, dtype: torch.dtype) -> Tensor:
    """``(x − shift) − centre`` for a slice (B, C, p) → a (p, B, C) view for batched products, in ``dtype``.

    Written to a (B, p, C) buffer (each image's block transposed in cache); BLAS reads the view with strides.
    """
    batch, channels, patches = vectors.shape
    out = torch.empty(batch, patches, channels, dtype=dtype, device=shift.device)
    torch.sub(vectors.transpose(1, 2), shift.mT, out=out)
    out.sub_(centre.mT)
    return out.permute(1, 0, 2)


def accumulate_scatter(stream: Stream, vectors: Tensor, batch_mean: Tensor, chunk_bytes: int) -> int:
    """Chan's merge of a batch (B, C, P) into the dense stream, in place; returns the new count.

    ``batch_mean`` is :func:`shifted_mean` of the batch (checked finite by the caller). The batch's centred sums
    are formed about its own shifted mean, the cross term from the difference of the shifted means, with
    :func:`anomstats._rules.chan_merge_weights`' coefficients.
    """
    batch, channels, patches = vectors.shape
    m2, mean = stream.spread, stream.mean
    chan = chan_merge_weights(stream.count, batch)
    delta = batch_mean - mean
    per_patch = (batch * channels * 2 + channels * channels) * m2.element_size()
    block = rows_per_chunk(per_patch, chunk_bytes, patches)
    for p0 in range(0, patches, block):
        p1 = min(p0 + block, patches)
        centred = _centred(vectors[:, :, p0:p1], stream.shift[:, p0:p1], batch_mean[:, p0:p1], m2.dtype)
        chunk = m2[p0:p1]
        chunk.baddbmm_(centred.mT, centred)
        if chan.cross:
            step = delta[:, p0:p1].mT
            chunk.baddbmm_(step.unsqueeze(2), step.unsqueeze(1), alpha=chan.cross)
    mean += delta * chan.mean_step
    return int(chan.total)


def merge_factor_columns(counts: list[int], means: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Chan's pairwise merges of states with ``counts`` and ``means`` (C, P) (one origin), in order.

    Returns the merged mean (C, P) and the correction factor (P, C, k): ``D Dᵀ`` is the sum of the merges'
    cross terms ``δδᵀ·w_a·w_b/W`` (:func:`anomstats._rules.chan_merge_weights`), to add to the summed centred
    sums of products. States with no observations are skipped.
    """
    total, merged = 0, torch.zeros_like(means[0])
    columns = []
    for count, mean in zip(counts, means):
        if count == 0:
            continue
        chan = chan_merge_weights(total, count)
        delta = mean - merged
        if chan.cross:
            columns.append(delta * math.sqrt(chan.cross))
        merged = merged + delta * chan.mean_step
        total = int(chan.total)
    if not columns:
        return merged, merged.new_zeros(merged.shape[1], merged.shape[0], 0)
    return merged, torch.stack(columns, dim=-1).permute(1, 0, 2)
