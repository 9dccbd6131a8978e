"""Merge of streaming Gaussian moments across torch.distributed ranks, exact and polite.

Each rank holds a stream (:mod:`anomstats_torch._streaming`): a count, a shift (its first batch's mean), its
mean minus the shift and its centred sums of products M2, per patch. The merge:

1. **Agreement** (one small collective): every rank contributes a signature, ``[count, C, P, dtype,
   device type, wide input, spent]`` as int64, gathered on every rank. Every rank then reaches the same
   decision from the same numbers: ranks without data take the shape, dtype and device type of the ranks
   with data (so an empty rank works whatever its ``accumulate_dtype``); ranks with data that disagree
   (shapes, accumulation dtypes, device types) make every rank raise the same ``ValueError`` before any large
   collective, so none aborts or hangs; a rank whose stream an earlier ``compute()`` spent makes every rank
   raise the same ``RuntimeError`` (it must not count as an empty rank); no data anywhere raises
   :class:`anomstats.NotFittedError` everywhere, fewer than two observations in all the ``ValueError`` of
   :func:`anomstats._validation.require_observations`.
2. **Means** (``all_gather`` of each rank's shift and shifted mean, 2·C·P numbers per rank): every rank
   re-expresses each rank's mean about one common origin, the first rank-with-data's shift
   (``(shift_r − origin) + mean_r``: differences of nearby numbers, exact to the data's spread), and merges
   them pairwise in rank order by Chan's update (the coefficients are
   :func:`anomstats._rules.chan_merge_weights`), collecting each merge's cross term ``δδᵀ·w_a·w_b/W`` as a
   column ``δ·sqrt(w_a·w_b/W)`` of a small factor D (P, C, ranks).
3. **Sums** (one ``all_reduce`` of the packed (P, C·(C+1)/2) sums): ``M2 = Σ M2_r + D Dᵀ`` (the packed upper
   triangle of ``D Dᵀ`` added). A ``compute()`` that spends the stream all-reduces the local sums in place (no
   second copy of them); one that keeps the stream all-reduces a copy.

Everything about location stays relative to the data's spread: ranks whose shifts differ merge exactly (to
a few eps of the spread), at any distance of the data from the origin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from anomstats._packed import packed_length
from anomstats._validation import NotFittedError, require_observations

from . import _streaming

#: Codes of the accumulation dtypes and device types in a rank's signature.
_DTYPE_CODES = {torch.float32: 32, torch.float64: 64}
_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "meta")


def _is_distributed() -> bool:
    dist = getattr(torch, "distributed", None)
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def _collective_device() -> torch.device:
    """Where the small collectives run: the rank's CUDA device under NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _device_code(device: torch.device) -> int:
    return _DEVICE_TYPES.index(device.type) if device.type in _DEVICE_TYPES else len(_DEVICE_TYPES)


def _device_name(code: int) -> str:
    return _DEVICE_TYPES[code] if code < len(_DEVICE_TYPES) else "another device type"


@dataclass
class _Plan:
    """What every rank agreed on."""

    counts: list[int]
    channels: int
    patches: int
    dtype: torch.dtype
    device_type: str
    wide: bool

    @property
    def count(self) -> int:
        return sum(self.counts)

    @property
    def origin_rank(self) -> int:
        return next(rank for rank, count in enumerate(self.counts) if count > 0)


def _differ(what: str, values: dict[int, object], remedy: str) -> ValueError:
    listing = ", ".join(f"rank {rank}: {value}" for rank, value in values.items())
    return ValueError(f"torch.distributed ranks streamed {what} ({listing}); {remedy}")


def agree(signatures: list[list[int]], backend: str) -> _Plan:
    """The plan every rank follows, from every rank's signature; the same error on every rank if they differ."""
    spent = [rank for rank, sig in enumerate(signatures) if sig[6]]
    if spent:
        listing = ", ".join(str(rank) for rank in spent)
        error = _streaming.spent_error("compute()")
        raise RuntimeError(f"{error} (the stream of torch.distributed rank(s) {listing})")
    data = {rank: sig for rank, sig in enumerate(signatures) if sig[0] > 0}
    if not data:
        raise NotFittedError("no rank has data: call update(embedding) before compute()")
    shapes = {rank: (sig[1], sig[2]) for rank, sig in data.items()}
    if len(set(shapes.values())) > 1:
        listing = {rank: f"C={c}, H*W={p}" for rank, (c, p) in shapes.items()}
        raise _differ(
            "embeddings of different shapes", listing,
            "every rank must use the same feature extractor and image size",
        )
    dtypes = {rank: _DTYPES[sig[3]] for rank, sig in data.items()}
    if len(set(dtypes.values())) > 1:
        raise _differ(
            "moments in different dtypes", dtypes,
            "give every rank the same accumulate_dtype (and float64 input on all ranks or on none: float64 input "
            "is accumulated in float64)",
        )
    devices = {rank: _device_name(sig[4]) for rank, sig in data.items()}
    if len(set(devices.values())) > 1:
        raise _differ(
            "moments on different device types", devices,
            "keep every rank's streamed moments on the same kind of device (the rank's CUDA device under NCCL)",
        )
    device_type = next(iter(devices.values()))
    if backend == "nccl" and device_type != "cuda":
        raise ValueError(
            f"torch.distributed with NCCL all-reduces CUDA tensors, but the streamed moments are on {device_type}; "
            "stream the embeddings on the rank's CUDA device (or use the gloo backend)"
        )
    first = next(iter(data.values()))
    return _Plan(
        [sig[0] for sig in signatures], first[1], first[2], _DTYPES[first[3]], device_type,
        any(sig[5] for sig in signatures),
    )


def _signature(stream: _streaming.Stream | None, spent: bool, device: torch.device) -> Tensor:
    if stream is None:
        values = [0, 0, 0, 0, 0, 0, int(spent)]
    else:
        values = [
            stream.count, stream.n_features, stream.n_patches, _DTYPE_CODES[stream.shift.dtype],
            _device_code(stream.shift.device), int(stream.wide), 0,
        ]
    return torch.tensor(values, dtype=torch.int64, device=device)


def _data_device(plan: _Plan) -> torch.device:
    if plan.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(plan.device_type)


@dataclass
class Moments:
    """The moments ``compute()`` finishes: over every rank, or the local stream's own when not distributed.

    ``m2`` is the packed sums (P, C·(C+1)/2). ``owned``: the caller may overwrite ``m2`` (a private tensor, or
    the local stream's own when it is consumed); ``local``: ``m2`` is the local stream's own tensor (overwriting
    it spends the stream); ``consumed``: the local stream's sums were already changed (all-reduced in place).
    """

    count: int
    shift: Tensor
    mean: Tensor
    m2: Tensor
    wide: bool
    owned: bool
    local: bool
    consumed: bool


def _require_count(count: int) -> None:
    require_observations(count, name="compute: the stream", streamed=True, where="; call update() with more data")


def global_moments(stream: _streaming.Stream | None, *, spent: bool = False, consume: bool = False) -> Moments:
    """The moments over every rank (the local stream's own when not distributed); see the module notes.

    A collective when torch.distributed is initialised: every rank must call it, with or without data; the
    checks (a spent stream, no data, fewer than two observations, disagreeing ranks) raise before any large
    collective, the same error on every rank. ``consume``: the caller spends the local stream, whose sums
    may then be all-reduced (and overwritten) in place; otherwise the local stream is not modified. A batch
    waiting to be folded in must be folded first (:func:`anomstats_torch._streaming.settle`).
    """
    if stream is not None and stream.pending is not None:
        raise RuntimeError("global_moments() reads the folded moments: settle the stream's waiting batch first")
    if not _is_distributed():
        if spent:
            raise _streaming.spent_error("compute()")
        if stream is None:
            raise NotFittedError("no data: call update(embedding) before compute()")
        _require_count(stream.count)
        return Moments(
            stream.count, stream.shift, stream.mean, stream.spread, stream.wide, owned=consume, local=True,
            consumed=False,
        )

    import torch.distributed as dist

    small = _collective_device()
    signature = _signature(stream, spent, small)
    gathered = [torch.empty_like(signature) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, signature)
    plan = agree([[int(v) for v in sig.tolist()] for sig in gathered], str(dist.get_backend()))
    _require_count(plan.count)  # every rank sees the same total
    if stream is None:
        device = _data_device(plan)
        zeros = torch.zeros(plan.channels, plan.patches, dtype=plan.dtype, device=device)
        shift, mean = zeros, zeros
        total = torch.zeros(plan.patches, packed_length(plan.channels), dtype=plan.dtype, device=device)
    else:
        shift, mean = stream.shift, stream.mean
        total = stream.spread if consume else stream.spread.clone()
    pair = torch.stack([shift, mean])
    pairs = [torch.empty_like(pair) for _ in plan.counts]
    dist.all_gather(pairs, pair)
    origin = pairs[plan.origin_rank][0]
    # Each rank's mean about the common origin: (shift_r − origin) is a difference of nearby numbers.
    means = [(p[0] - origin) + p[1] for p in pairs]
    merged, correction = _streaming.merge_factor_columns(plan.counts, means)
    with _streaming.inference_mode_for(total):  # local sums accumulated under inference mode, reduced in place
        dist.all_reduce(total)
        _streaming.add_packed_outer(total, correction, _CORRECTION_BYTES)
    local = stream is not None and consume
    return Moments(plan.count, origin, merged, total, plan.wide, owned=True, local=local, consumed=local)


#: Budget of the temporaries of adding the merges' correction to the packed sums.
_CORRECTION_BYTES = 1 << 26
