"""All-reduce of streaming Gaussian moments across torch.distributed ranks.

Each rank holds (count, mean, centred sum of products M2) per patch. The global moments are exact:
mean = Σ n_r·mean_r / Σ n_r and M2 = Σ (M2_r + n_r·(mean_r − mean)(mean_r − mean)ᵀ), i.e. the parallel
form of Chan et al.'s merge, with deviations taken from the global mean (no cancellation).
"""

from __future__ import annotations

import torch
from torch import Tensor

from anomstats._validation import NotFittedError


def _is_distributed() -> bool:
    dist = getattr(torch, "distributed", None)
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def _collective_device(state: Tensor | None) -> torch.device:
    import torch.distributed as dist

    if state is not None:
        return state.device
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_moments(
    count: int, mean: Tensor | None, m2: Tensor | None, wide_input: bool
) -> tuple[int, Tensor, Tensor, bool]:
    """Return the moments over every rank (just the local ones when torch.distributed is not initialised).

    A collective when distributed: every rank must call it. Ranks without data contribute nothing; shapes
    are agreed first so every rank raises the same error if they differ. ``wide_input`` (the rank saw
    float64 input) is OR-ed over ranks, so every rank stores its buffers in the same dtype.
    """
    if not _is_distributed():
        if mean is None or m2 is None:
            raise NotFittedError("no data: call update(embedding) before compute()")
        return count, mean, m2, wide_input

    import torch.distributed as dist

    device = _collective_device(m2)
    missing = -(2**62)
    if mean is None:
        shape = torch.tensor([-1, -1, missing, missing, int(wide_input)], dtype=torch.int64, device=device)
    else:
        c, p = mean.shape
        shape = torch.tensor([c, p, -c, -p, int(wide_input)], dtype=torch.int64, device=device)
    dist.all_reduce(shape, op=dist.ReduceOp.MAX)
    wide_input = bool(shape[4].item())
    c_max, p_max, c_min, p_min = shape[0].item(), shape[1].item(), -shape[2].item(), -shape[3].item()
    if c_max < 0:
        raise NotFittedError("no rank has data: call update(embedding) before compute()")
    if (c_max, p_max) != (c_min, p_min):
        raise ValueError(
            f"ranks streamed embeddings of different shapes (C from {c_min} to {c_max}, H*W from {p_min} to "
            f"{p_max}); every rank must use the same feature extractor and image size"
        )
    dtype = m2.dtype if m2 is not None else torch.float64
    if mean is None or m2 is None:
        mean = torch.zeros(c_max, p_max, dtype=dtype, device=device)
        m2 = torch.zeros(p_max, c_max, c_max, dtype=dtype, device=device)

    total = torch.tensor([float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    n_total = int(round(total.item()))
    if n_total == 0:
        return 0, mean, m2, wide_input
    global_mean = mean * count
    dist.all_reduce(global_mean)
    global_mean /= n_total
    deviation = (mean - global_mean).mT  # (P, C)
    global_m2 = torch.baddbmm(m2, deviation.unsqueeze(2), deviation.unsqueeze(1), alpha=float(count))
    dist.all_reduce(global_m2)
    return n_total, global_mean, global_m2, wide_input
