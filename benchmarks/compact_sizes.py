"""Checkpoint size and scoring error of the compact precision formats at PaDiM's sizes (``python -m benchmarks.compact_sizes``).

For each ``MultiVariateGaussian.compact_state_dict(format)`` (and ``storage="packed"``, whose ``state_dict()`` is the
``"packed"`` format, and a whole-module ``.half()`` for comparison): the bytes of the ``torch.save`` checkpoint,
and the relative error of the distances of a float32 module loaded from it against the float32 dense module
(largest and median over every query and patch). PaDiM-like float32 embeddings: non-negative, correlated
features (ReLU of a random mixing of 48 latent factors plus noise), per-patch offsets, N = 200 training images,
32 held-out images (half of them with a shifted patch). Sizes: resnet18, C = 100 at 56×56; wide_resnet50,
C = 550 at 16×16 (measured), scaled to 64×64 by arithmetic (the tensors' bytes ×16; the patches are
independent, so the error statistics carry over). Not part of ``make bench``; docs/torch_adapter.rst quotes it.
"""

from __future__ import annotations

import io
import time

import torch

from anomstats_torch import MultiVariateGaussian

FORMATS = ["packed", "float16", "bfloat16", "packed_float16", "packed_bfloat16"]


def _embeddings(n: int, c: int, side: int, seed: int, latent: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(c, latent, generator=torch.Generator().manual_seed(1000 + c)) / latent**0.5
    offsets = torch.rand(c, side * side, generator=torch.Generator().manual_seed(2000 + c))
    z = torch.randn(n, latent, side * side, generator=g)
    x = torch.relu(torch.einsum("cl,nlp->ncp", mixing, z) + offsets) + 0.1 * torch.randn(n, c, side * side, generator=g)
    return x.reshape(n, c, side, side)


def _saved_bytes(state: dict[str, torch.Tensor]) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes


def _relative_errors(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    rel = ((got.double() - ref.double()).abs() / ref.double().abs().clamp_min(1e-30)).flatten()
    return float(rel.max()), float(rel.median())


def measure(c: int, side: int, n: int = 200, queries: int = 32) -> list[dict[str, object]]:
    train = _embeddings(n, c, side, seed=0)
    test = _embeddings(queries, c, side, seed=1)
    test[: queries // 2, :, side // 3 : side // 2, side // 3 : side // 2] += 1.0  # anomalous patches
    start = time.perf_counter()
    dense = MultiVariateGaussian()
    dense.fit(train)
    fit_s = time.perf_counter() - start
    del train
    reference = dense.mahalanobis(test)
    rows: list[dict[str, object]] = [
        {"format": "float32 dense (anomalib's)", "bytes": _saved_bytes(dense.state_dict()), "max": 0.0, "median": 0.0}
    ]
    for fmt in FORMATS:
        state = dense.compact_state_dict(fmt)
        restored = MultiVariateGaussian()
        restored.load_state_dict(state)
        if fmt == "packed":
            assert torch.equal(restored.inv_covariance, dense.inv_covariance)  # bit for bit
        worst, median = _relative_errors(restored.mahalanobis(test), reference)
        rows.append({"format": fmt, "bytes": _saved_bytes(state), "max": worst, "median": median})
        del state, restored
    packed = MultiVariateGaussian(storage="packed")
    packed.load_state_dict(dense.state_dict())
    worst, median = _relative_errors(packed.mahalanobis(test), reference)
    rows.append({"format": 'storage="packed" (its state_dict)', "bytes": _saved_bytes(packed.state_dict()), "max": worst, "median": median})
    del packed
    half = MultiVariateGaussian()
    half.load_state_dict(dense.state_dict())
    half.half()  # mean and precision rounded; scored in float32 from float32 queries
    worst, median = _relative_errors(half.mahalanobis(test), reference)
    rows.append({"format": "module.half() (mean too)", "bytes": _saved_bytes(half.state_dict()), "max": worst, "median": median})
    print(f"C={c}, {side}x{side} patches, N={n}: dense fit {fit_s:.1f} s; distances median {float(reference.median()):.3g}")
    return rows


def main() -> None:
    torch.set_num_threads(2)
    for c, side, scale_to in ((100, 56, None), (550, 16, 64)):
        rows = measure(c, side)
        factor = (scale_to / side) ** 2 if scale_to else 1
        scaled = f" | bytes at {scale_to}x{scale_to}" if scale_to else ""
        print(f"| format | bytes at {side}x{side}{scaled} | of dense | max rel. error | median rel. error |")
        dense_bytes = rows[0]["bytes"]
        for row in rows:
            size = int(row["bytes"])
            extra = f" | {size * factor / 1e9:.2f} GB" if scale_to else ""
            print(
                f"| {row['format']} | {size / 1e6:.1f} MB{extra} | {size / dense_bytes:.3f} | "
                f"{row['max']:.2e} | {row['median']:.2e} |"
            )
        print()


if __name__ == "__main__":
    main()
