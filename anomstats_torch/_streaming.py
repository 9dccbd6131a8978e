"""Streamed moments of the per-patch Gaussians, kept as buffers: they move with the module and ride in checkpoints.

While a stream is open (from the first ``update`` to ``reset``, or to a ``compute`` that spends it) the module
holds these buffers:

- ``stream_count``: 0-d int64, the number of observations (>= 1);
- ``stream_info``: 1-D int64, ``[wide, *spatial]``: ``wide`` is 1 when some batch was float64 (the fit is then
  stored in float64), ``spatial`` the last batch's spatial shape (for messages);
- ``stream_shift``: (C, P), a fixed origin: the first batch's mean per patch;
- ``stream_mean``: (C, P), the running mean minus ``stream_shift``;
- ``stream_m2`` (dense and packed storage): (P, C·(C+1)/2), the centred sums of products of each patch, packed
  (the upper triangle row by row, the core's layout: :func:`anomstats._packed.packed_length`); or
  ``stream_factor`` (low-rank form): (P, C, k), a scatter factor ``F`` with ``F Fᵀ`` the centred sums of products.

The floating buffers are in the accumulation dtype (``accumulate_dtype``, or float64 for float64 input).

Accumulating around a fixed shift makes the stream location-free: every batch enters as ``x − shift``,
whose rounding is relative to ``|x − shift|`` (the data's spread), not to ``|x|``; the means, their
differences and Chan's cross terms are all of the spread's size, so splitting the data into updates costs a
few ``eps·(1 + |μ − shift|/σ)`` relative, at any distance ``|μ|`` from the origin. The one rounding relative
to ``|μ|`` is the final ``shift + mean`` (the one-shot mean has it too).

The buffers are persistent (in ``state_dict()``) while the stream is open and not yet computed: a checkpoint
taken mid-stream resumes exactly. ``compute()`` spends the stream by default: a float64 stream's packed sums
take ``P·C·(C+1)·4`` bytes, just more than the ``P·C²·4`` of a float32 precision, so the precision is written
over them chunk by chunk (:func:`precision_view`) and the stream closes (:func:`spend`); ``update`` and
``compute`` then refuse (:func:`spent_error`) until ``reset()``. ``compute(keep_stream=True)`` keeps the
stream instead, non-persistent (kept in memory, so more updates can follow, which make it persistent again),
so that a finished fit's checkpoint holds exactly anomalib's keys either way.

Kernels of the dense stream: on the CPU, the core's LAPACK/BLAS routines (:class:`anomstats._lapack.ScratchKernels`:
``syrk`` per patch into a ``C×C`` scratch, packed by one gather; ``ScratchKernels.invert`` (``potrf`` +
``potri``, or their recursive form at large C) per patch when finishing) on the shared thread pool (:func:`anomstats._parallel.run_chunks`, ``torch.get_num_threads()``
workers, BLAS held to one thread each), through NumPy views of the tensors; on other devices, batched torch
operations (``bmm`` into a chunk of dense scratch, packed by ``index_select``).
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from anomstats._lapack import ScratchKernels
from anomstats._moment_kernels import gather
from anomstats._packed import packed_length
from anomstats._parallel import run_chunks
from anomstats._rules import ChanWeights, chan_merge_weights

from ._policy import rows_per_chunk

COUNT, INFO, SHIFT, MEAN, SCATTER, FACTOR, PENDING = (
    "stream_count", "stream_info", "stream_shift", "stream_mean", "stream_m2", "stream_factor", "stream_pending",
)

#: The buffers of an open stream, by kind: the dense form's centred sums, the low-rank form's scatter factor.
KEYS = {"dense": (COUNT, INFO, SHIFT, MEAN, SCATTER), "low_rank": (COUNT, INFO, SHIFT, MEAN, FACTOR)}

#: The buffers an open stream holds only at times: the dense form's batch waiting to be folded in.
OPTIONAL_KEYS = {"dense": (PENDING,), "low_rank": ()}

#: Every stream buffer name of either kind.
ALL_KEYS = (COUNT, INFO, SHIFT, MEAN, SCATTER, FACTOR, PENDING)

#: A dense stream folds batches into its sums at least this many observations at a time, where it can: a batch
#: of fewer waits (a private copy, ``stream_pending``) when none is waiting, and is folded in with the next one.
#: Each fold reads and writes the whole packed sums once (P·C·(C+1)/2 numbers: 4.96 GB in float64 at C = 550,
#: 64×64), so PaDiM's batches of 20 cost half the passes over them, and the products of the rows are larger.
FOLD_ROWS = 64

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
    #: (k, C, P): observations counted in ``count`` but not yet in ``mean`` and ``spread`` (dense form only).
    pending: Tensor | None = None

    @property
    def n_features(self) -> int:
        return self.shift.shape[0]

    @property
    def n_patches(self) -> int:
        return self.shift.shape[1]

    @property
    def folded(self) -> int:
        """Observations in ``mean`` and ``spread`` (``count`` less the pending ones)."""
        return self.count - (0 if self.pending is None else self.pending.shape[0])

    def widened(self) -> Stream:
        """This stream in float64 (new tensors: exact copies of float32 sums, means and waiting observations)."""
        wide = [t.to(torch.float64) for t in (self.shift, self.mean, self.spread)]
        pending = None if self.pending is None else self.pending.to(torch.float64)
        return Stream(self.count, self.wide, self.spatial, *wide, pending)

    def writable(self) -> Stream:
        """This stream, with copies of tensors made under :func:`torch.inference_mode` (updated in place later)."""
        tensors = (self.shift, self.mean, self.spread)
        if torch.is_inference_mode_enabled() or not any(t.is_inference() for t in tensors):
            return self
        return Stream(
            self.count, self.wide, self.spatial, self.shift.clone(), self.mean.clone(), self.spread.clone(),
            self.pending,  # never written in place (replaced)
        )


def read(module: nn.Module, kind: str) -> Stream | None:
    """The open stream of ``module`` (None when there is none)."""
    buffers = module._buffers
    if COUNT not in buffers:
        return None
    info = [int(v) for v in buffers[INFO].tolist()]
    spread = buffers[SCATTER if kind == "dense" else FACTOR]
    return Stream(
        int(buffers[COUNT]), bool(info[0]), tuple(info[1:]), buffers[SHIFT], buffers[MEAN], spread,
        buffers.get(PENDING),
    )


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
    if stream.pending is not None:
        tensors[PENDING] = stream.pending
    else:
        module._buffers.pop(PENDING, None)
        module._non_persistent_buffers_set.discard(PENDING)
    for name, tensor in tensors.items():
        module._non_persistent_buffers_set.discard(name)
        module._buffers[name] = tensor


#: The module attribute that marks a stream spent by ``compute()`` (a plain attribute: restored by a failed load).
SPENT = "_stream_spent"


def close(module: nn.Module) -> None:
    """Forget the stream (``reset()``; a checkpoint with or without one): the module can stream afresh."""
    for name in ALL_KEYS:
        module._buffers.pop(name, None)
        module._non_persistent_buffers_set.discard(name)
    module.__dict__[SPENT] = False


def spend(module: nn.Module) -> None:
    """Close the stream as spent by ``compute()``: ``update`` and ``compute`` refuse until ``reset()``."""
    close(module)
    module.__dict__[SPENT] = True


def is_spent(module: nn.Module) -> bool:
    """Whether ``compute()`` spent the module's stream (and no ``reset()`` or load followed)."""
    return bool(module.__dict__.get(SPENT, False))


#: What a failed ``compute()`` adds to its error once it had overwritten the stream's sums (which closes the stream).
SPENT_BY_FAILURE = (
    "compute() had already written part of the precision over the streamed sums (or all-reduced them in place "
    "across torch.distributed ranks), so the stream is spent: call reset() and update() with the data again "
    "(compute(keep_stream=True) leaves the stream intact when it fails)"
)


@dataclass
class Progress:
    """Whether ``compute()`` has changed the stream's own sums (then a failure from there on spends the stream)."""

    spent: bool = False


#: What a spending ``compute()`` did with each form's stream, for :func:`spent_error`.
_SPENT_HOW = {
    "dense": "writes the float32 precision over the float64 sums where it fits, to save memory",
    "low_rank": "frees the streamed factors, which would otherwise sit next to the fitted basis",
}


def spent_error(call: str, kind: str = "dense") -> RuntimeError:
    """The error of ``update()``/``compute()`` (``call``) on a stream of form ``kind`` that ``compute()`` spent."""
    return RuntimeError(
        f"{call}: compute() spent this stream (by default it ends the stream, and {_SPENT_HOW[kind]}); call "
        "reset() to start a new stream, or use compute(keep_stream=True) to keep streaming after compute()"
    )


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
        for name in KEYS[kind] + tuple(name for name in OPTIONAL_KEYS[kind] if name in incoming):
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


# ---------------------------------------------------------------------- the packed sums
def inference_mode_for(tensor: Tensor) -> contextlib.AbstractContextManager:
    """:func:`torch.inference_mode` where ``tensor`` is an inference tensor written in place outside of it.

    Sums accumulated under inference mode are inference tensors, which torch lets change in place only in
    that mode (normal tensors may change in it too); otherwise the caller's mode is left as it is.
    """
    if tensor.is_inference() and not torch.is_inference_mode_enabled():
        return torch.inference_mode()
    return contextlib.nullcontext()


def uses_lapack(device: torch.device) -> bool:
    """Whether the dense stream's kernels on ``device`` run the core's LAPACK/BLAS routines (the CPU) or torch's."""
    return device.type == "cpu"


def _workers() -> int:
    """Worker threads of the CPU kernels: torch's own intra-op setting (``torch.set_num_threads``)."""
    return max(1, torch.get_num_threads())


def upper_positions(channels: int, device: torch.device | str | None = None) -> Tensor:
    """(C·(C+1)/2,) flat positions in a C-ordered ``C×C`` matrix of the packed entries, in packed order.

    Entry ``(a, b)``, ``a <= b``, the upper triangle row by row (``torch.triu_indices``, the core's packed layout).
    """
    rows, cols = torch.triu_indices(channels, channels, device=device)
    return rows * channels + cols


def diagonal_positions(channels: int, device: torch.device | str | None = None) -> Tensor:
    """(C,) positions of the diagonal entries in a packed triangle: row ``a`` starts at ``a·C − a·(a − 1)/2``."""
    a = torch.arange(channels, device=device)
    return a * channels - a * (a - 1) // 2


def pack_upper(dense: Tensor, chunk_bytes: int) -> Tensor:
    """The packed upper triangles (P, C·(C+1)/2) of a stack (P, C, C), exactly (no symmetrisation), chunk by chunk."""
    patches, channels = dense.shape[0], dense.shape[-1]
    out = torch.empty(patches, packed_length(channels), dtype=dense.dtype, device=dense.device)
    positions = upper_positions(channels, dense.device)
    block = rows_per_chunk(channels * channels * dense.element_size(), chunk_bytes, patches)
    for p0 in range(0, patches, block):
        chunk = dense[p0 : p0 + block].reshape(-1, channels * channels)
        torch.index_select(chunk, 1, positions, out=out[p0 : p0 + block])
    return out


def add_packed_outer(m2: Tensor, factor: Tensor, chunk_bytes: int) -> None:
    """``m2 += packed(F Fᵀ)`` for packed sums (P, C·(C+1)/2) and a factor (P, C, k), chunk by chunk, in place."""
    patches, channels, width = factor.shape
    if width == 0:
        return
    positions = upper_positions(channels, m2.device)
    block = rows_per_chunk(channels * channels * m2.element_size() * 2, chunk_bytes, patches)
    for p0 in range(0, patches, block):
        chunk = factor[p0 : p0 + block].to(m2.dtype)
        outer = torch.bmm(chunk, chunk.mT).reshape(-1, channels * channels)
        m2[p0 : p0 + block] += outer.index_select(1, positions)


def fits_in_place(m2: Tensor, store: torch.dtype) -> bool:
    """Whether a (P, C, C) precision in ``store`` fits in the bytes of packed sums ``m2``: float64 sums, float32 store.

    ``P·C²·4 <= P·C·(C+1)/2·8`` bytes; contiguous sums (always, as the stream allocates them).
    """
    return m2.dtype == torch.float64 and store == torch.float32 and m2.is_contiguous()


def precision_view(m2: Tensor, channels: int) -> Tensor:
    """The float32 (P, C, C) stack over the first ``P·C²·4`` bytes of packed float64 sums ``m2`` (P, C·(C+1)/2).

    Writing patch ``p``'s precision there touches bytes ``[4·p·C², 4·(p + 1)·C²)``, while the sums of patch ``q``
    occupy ``[4·q·C·(C + 1), 4·(q + 1)·C·(C + 1))``: since ``(p + 1)·C² <= (p + 1)·C·(C + 1)``, the write ends
    before the sums of patch ``p + 1`` begin. So the precisions of patches ``p0:p1`` overwrite only sums of
    patches below ``p1``: once those are read (the chunk's own sums copied out first, the earlier chunks' used
    up), the later chunks' sums are intact. The storage keeps ``P·C·4`` bytes beyond the view (``1/C`` of it):
    ``torch.save`` writes them too.
    """
    patches = m2.shape[0]
    return m2.reshape(-1).view(torch.float32)[: patches * channels * channels].view(patches, channels, channels)


def add_batch(stream: Stream, vectors: Tensor, batch_mean: Tensor, chunk_bytes: int) -> None:
    """Take a batch (B, C, P) into the dense stream: fold it into the packed sums, or let it wait (:data:`FOLD_ROWS`).

    ``batch_mean`` is :func:`shifted_mean` of the batch (checked finite by the caller). A batch of fewer than
    :data:`FOLD_ROWS` observations waits as a private copy when none is waiting (float32 and float64 batches keep
    their dtype, others are converted to the accumulation dtype, exactly for half-precision and integer values
    up to 2**24 or 2**53); otherwise the waiting batch and this one are folded in together (:func:`_fold`).
    ``stream.count`` counts the waiting observations too.
    """
    rows = vectors.shape[0]
    if stream.pending is None and rows < FOLD_ROWS:
        dtype = vectors.dtype if vectors.dtype in ACCUMULATE_DTYPES else stream.shift.dtype
        stream.pending = vectors.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
        stream.count += rows
        return
    pieces, means = [vectors], [batch_mean]
    if stream.pending is not None:
        pending = stream.pending
        pieces.insert(0, pending)
        means.insert(0, shifted_mean(pending, stream.shift, stream.shift.dtype, chunk_bytes))
    _fold(stream, pieces, means, chunk_bytes)
    stream.count += rows


def settle(module: nn.Module, kind: str, chunk_bytes: int) -> Stream | None:
    """The module's open stream with its waiting batch, if any, folded into the packed sums (and written back).

    Before a stream is finished or merged across ranks: those read ``count``, ``mean`` and the sums only.
    """
    stream = read(module, kind)
    if stream is None or stream.pending is None:
        return stream
    stream = stream.writable()
    pending = stream.pending
    _fold(stream, [pending], [shifted_mean(pending, stream.shift, stream.shift.dtype, chunk_bytes)], chunk_bytes)
    write(module, kind, stream)
    return stream


def _fold(stream: Stream, pieces: list[Tensor], means: list[Tensor], chunk_bytes: int) -> None:
    """Chan's merge of a block of observations (``pieces`` (B_i, C, P), shifted means ``means``) into the packed sums.

    The block's shifted mean is the pieces' means merged (Chan's update of a mean). Per patch, the block is
    centred about it (``(x − shift) − block_mean``, in the accumulation dtype) and Chan's cross term rides along
    as one more row, ``δ·sqrt(w_a·w_b/W)`` (:func:`anomstats._rules.chan_merge_weights`), so one symmetric
    product of the rows gives the block's sums plus the correction; its upper triangle is added to the packed
    sums (written by the first fold). The mean moves by ``δ·w_b/W``; the waiting batch is gone.
    """
    block_mean, rows = means[0], pieces[0].shape[0]
    for piece, mean in zip(pieces[1:], means[1:]):
        step = chan_merge_weights(rows, piece.shape[0])
        block_mean = block_mean + (mean - block_mean) * step.mean_step
        rows = int(step.total)
    folded = stream.folded
    chan = chan_merge_weights(folded, rows)
    delta = block_mean - stream.mean
    cross = delta.mul(math.sqrt(chan.cross)) if chan.cross else None
    if uses_lapack(stream.spread.device):
        _fold_lapack(stream, pieces, block_mean, cross, folded == 0, chunk_bytes)
    else:
        _fold_torch(stream, pieces, block_mean, cross, folded == 0, chunk_bytes)
    stream.mean += delta * chan.mean_step
    stream.pending = None


class _Scratch(threading.local):
    """One worker thread's buffers for one call: a ``C×C`` matrix with its bound LAPACK/BLAS routines, and more."""

    def matrix(self, channels: int, dtype: np.dtype) -> tuple[np.ndarray, ScratchKernels]:
        if getattr(self, "kernels", None) is None:
            self.t = np.zeros((channels, channels), dtype=dtype)  # its strict upper triangle stays zero
            self.kernels = ScratchKernels(self.t)
        return self.t, self.kernels

    def array(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        buffer = getattr(self, name, None)
        size = math.prod(shape)
        if buffer is None or buffer.size < size:
            buffer = np.empty(size, dtype=dtype)
            setattr(self, name, buffer)
        return buffer[:size].reshape(shape)


def _lower_positions(channels: int) -> np.ndarray:
    """Flat positions, in a C-ordered ``C×C`` matrix, of the mirror images in the lower triangle of the packed
    entries (in packed order): the triangle the core's routines work on (:mod:`anomstats._lapack`)."""
    rows, cols = np.triu_indices(channels)
    return cols * channels + rows


def _as_numpy(tensor: Tensor, dtype: torch.dtype) -> np.ndarray:
    """A NumPy view of a CPU tensor (float32/float64), other dtypes converted to ``dtype`` first (exactly: a
    half-precision or integer value is representable in float64; in float32 for float32 streams, as the torch
    path's own promotion rounds it)."""
    if tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.to(dtype)
    return tensor.detach().numpy()


def _fold_lapack(
    stream: Stream, pieces: list[Tensor], block_mean: Tensor, cross: Tensor | None, first: bool, chunk_bytes: int
) -> None:
    """:func:`_fold` on the CPU: per patch, the core's gather and ``syrk``, and one gather packs it."""
    channels, patches = stream.shift.shape
    m2 = stream.spread.numpy()
    dtype = m2.dtype
    sources = [_as_numpy(piece, stream.shift.dtype) for piece in pieces]
    shift, centre = stream.shift.numpy(), block_mean.numpy()
    extra = None if cross is None else cross.numpy()
    observations = sum(source.shape[0] for source in sources)
    height = observations + (extra is not None)
    lower = _lower_positions(channels)
    workers = _workers()
    # Each task gathers its patches' rows (p, N(+1), C) in the accumulation dtype: the budget shared by the workers.
    block = rows_per_chunk(height * channels * dtype.itemsize, max(1, chunk_bytes // workers), min(patches, 64))
    local = _Scratch()

    def task(span: tuple[int, int]) -> None:
        p0, p1 = span
        t, kernels = local.matrix(channels, dtype)
        rows = local.array("rows", (p1 - p0, height, channels), dtype)
        offset = 0
        for source in sources:  # x − shift, rounded once into the accumulation dtype
            gather(source.transpose(2, 0, 1)[p0:p1], rows[:, offset : offset + source.shape[0]], shift[:, p0:p1].T)
            offset += source.shape[0]
        rows[:, :observations] -= centre[:, p0:p1].T[:, None, :]
        if extra is not None:
            rows[:, observations] = extra[:, p0:p1].T
        packed = None if first else local.array("packed", (lower.size,), dtype)
        flat = t.reshape(-1)
        for k in range(p1 - p0):
            kernels.syrk(1.0, rows[k])  # the lower triangle of t: rowsᵀ rows
            if first:
                np.take(flat, lower, out=m2[p0 + k], mode="clip")
            else:
                np.take(flat, lower, out=packed, mode="clip")
                m2[p0 + k] += packed

    run_chunks(task, [(p0, min(p0 + block, patches)) for p0 in range(0, patches, block)], workers)


def _fold_torch(
    stream: Stream, pieces: list[Tensor], block_mean: Tensor, cross: Tensor | None, first: bool, chunk_bytes: int
) -> None:
    """:func:`_fold` with batched torch operations (CUDA and other devices)."""
    channels, patches = stream.shift.shape
    m2 = stream.spread
    observations = sum(piece.shape[0] for piece in pieces)
    positions = upper_positions(channels, m2.device)
    per_patch = ((observations + 1) * channels * 3 + channels * channels * 2) * m2.element_size()
    block = rows_per_chunk(per_patch, chunk_bytes, patches)
    for p0 in range(0, patches, block):
        p1 = min(p0 + block, patches)
        shift, centre = stream.shift[:, p0:p1], block_mean[:, p0:p1]
        rows = [_centred(piece[:, :, p0:p1], shift, centre, m2.dtype) for piece in pieces]
        if cross is not None:
            rows.append(cross[:, p0:p1].mT.unsqueeze(1))
        stacked = torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]
        sums = torch.bmm(stacked.mT, stacked).reshape(p1 - p0, channels * channels)
        if first:
            torch.index_select(sums, 1, positions, out=m2[p0:p1])
        else:
            m2[p0:p1] += sums.index_select(1, positions)


def lapack_precisions(
    sums: np.ndarray,
    scale: float,
    ridge: float,
    out: np.ndarray,
    variances: np.ndarray,
    diagonals: np.ndarray,
    status: np.ndarray,
) -> None:
    """Precisions of packed sums on the CPU, patch by patch with the core's LAPACK kernels.

    ``sums`` (p, C·(C+1)/2): each patch's packed centred sums (read only); ``scale``: ``1/(n − 1)``. Each patch's
    covariance ``sums·scale`` is unpacked into the lower triangle of a thread's ``C×C`` scratch (its strict upper
    triangle stays zero), ``ridge`` is added to the diagonal (recorded in ``variances`` (p, C)), the scratch is
    factored and inverted from its factor (:meth:`anomstats._lapack.ScratchKernels.invert`), the precision's
    diagonal is recorded in ``diagonals`` (p, C) (both in ``sums``' dtype), and ``t + tᵀ`` with the diagonal put back (both exact) is
    written to ``out[k]`` (p, C, C), rounded once to ``out``'s dtype: exactly symmetric. ``status[k]``: 0
    done; -1 the covariance's diagonal is not finite; ``info > 0`` the leading minor of that order is not
    positive definite (those patches are left unwritten: the caller raises the first fault in patch order).
    """
    patches, channels = out.shape[0], out.shape[1]
    lower = _lower_positions(channels)
    local = _Scratch()

    def task(patch: int) -> None:
        t, kernels = local.matrix(channels, sums.dtype)
        covariance = local.array("covariance", (lower.size,), sums.dtype)
        np.multiply(sums[patch], scale, out=covariance)
        flat = t.reshape(-1)
        flat[lower] = covariance
        diagonal = flat[:: channels + 1]
        diagonal += ridge
        variances[patch] = diagonal
        if not np.isfinite(diagonal).all():
            status[patch] = -1
            return
        status[patch] = kernels.invert()  # potrf + potri, or their faster recursive form at large C
        if status[patch]:
            return
        diagonals[patch] = diagonal
        target = out[patch]
        np.add(t, t.T, out=target)  # off the diagonal one term is zero: exact, rounded once
        target.reshape(-1)[:: channels + 1] = diagonal  # (not the doubled one halved: 2·d may overflow the target)

    run_chunks(task, range(patches), _workers())


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
