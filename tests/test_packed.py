"""PackedGaussianAccumulator: the memory-lean streaming PaDiM fit against numpy.cov + ridge + inv per patch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from anomstats._packed import PackedGaussianAccumulator, packed_state_bytes
from anomstats.gaussian import DEFAULT_RIDGE
from tests._tolerances import (
    TWO_SIDES,
    eps,
    assert_close_each,
    inverse_perturbation_atol,
    mean_atol,
    patch_covariances,
    precision_atol,
    streamed_covariance_atol,
)


def _embedding(n: int = 40, c: int = 5, h: int = 3, w: int = 2, offset: float = 0.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, c, h, w))
    x[:, 1] += 0.7 * x[:, 0]  # correlated channels, so off-diagonal terms matter
    return (x + offset).astype(np.float32)


def _reference(emb: np.ndarray, ridge: float = DEFAULT_RIDGE) -> tuple[np.ndarray, np.ndarray]:
    n, c = emb.shape[:2]
    x = emb.astype(np.float64).reshape(n, c, -1)
    mean = x.mean(axis=0)
    prec = np.stack(
        [np.linalg.inv(np.cov(x[:, :, p], rowvar=False) + ridge * np.eye(c)) for p in range(x.shape[2])]
    )
    return mean, prec


def _bounds(emb: np.ndarray, merges: int, ridge: float = DEFAULT_RIDGE, dtype=np.float64) -> tuple[float, np.ndarray]:
    """``(mean_atol, precision atol per patch)`` of a streamed fit against the one-shot numpy reference.

    mean_atol (n-term sums, ``dtype`` the accumulation's); precision_atol (kappa(A) times the backward error
    of accumulation and factorisation, both sides) plus what ``merges`` Chan merges' mean corrections
    (streamed_covariance_atol) do to the inverse (inverse_perturbation_atol: ``||A^-1||^2 ||dA||_F``).
    """
    n, c = emb.shape[:2]
    x = emb.astype(np.float64).reshape(n, c, -1)
    a = patch_covariances(emb, ridge)
    prec = np.array(
        [
            precision_atol(a[k], n, dtype) + inverse_perturbation_atol(a[k], streamed_covariance_atol(x[:, :, k], merges, dtype))
            for k in range(len(a))
        ]
    )
    return mean_atol(np.abs(x).max(), n, dtype), prec[:, None, None]


@given(
    cuts=st.lists(st.integers(min_value=1, max_value=39), max_size=5, unique=True),
    merge_at=st.integers(min_value=0, max_value=5),
    budget=st.sampled_from([1, 4096, 2**26]),
    fold_every=st.sampled_from([1, 7, 64]),
)
def test_any_split_equals_one_shot_float64(cuts: list[int], merge_at: int, budget: int, fold_every: int) -> None:
    emb = _embedding(offset=100.0)  # far from the origin: a raw-sums estimator would lose digits here
    batches = np.split(emb, sorted(cuts))
    merge_at = min(merge_at, len(batches))
    left = PackedGaussianAccumulator(5, 6, memory_budget=budget, fold_every=fold_every)
    right = PackedGaussianAccumulator(5, 6, memory_budget=budget, fold_every=fold_every)
    for b in batches[:merge_at]:
        left.update(b)
    for b in batches[merge_at:]:
        right.update(b)
    left.merge(right)
    assert left.count == 40
    mean, prec = left.finalise(out_dtype=np.float64)
    ref_mean, ref_prec = _reference(emb)
    assert mean.shape == (5, 6) and prec.shape == (6, 5, 5)
    # _bounds: mean_atol, precision_atol + streamed_covariance_atol (fold_every=1: up to one merge per row)
    mean_tol, prec_tol = _bounds(emb, merges=40 + len(cuts) + 1)
    assert_close_each(mean, ref_mean, atol=mean_tol)
    assert_close_each(prec, ref_prec, atol=prec_tol)
    np.testing.assert_array_equal(prec, prec.transpose(0, 2, 1))  # bound 0: symmetrised


def test_float32_result_is_the_rounded_float64_one_and_in_place_is_identical() -> None:
    emb = _embedding(n=60, c=7, h=4, w=4, offset=3.0)
    accs = [PackedGaussianAccumulator(7, 16) for _ in range(3)]
    for acc in accs:
        for b in np.split(emb, 4):
            acc.update(b)
    _, p64 = accs[0].finalise(out_dtype=np.float64)
    m32, p32 = accs[1].finalise()
    m32_in, p32_in = accs[2].finalise(in_place=True)
    assert p32.dtype == np.float32 and m32.dtype == np.float32
    np.testing.assert_array_equal(p32, p64.astype(np.float32))  # bound 0: the same float64 result, rounded once
    np.testing.assert_array_equal(p32_in, p32)
    np.testing.assert_array_equal(m32_in, m32)
    np.testing.assert_array_equal(p32_in, p32_in.transpose(0, 2, 1))
    with pytest.raises(RuntimeError, match="in_place=True"):
        accs[2].update(emb[:2])


def test_float32_accumulation_is_close_and_stores_half() -> None:
    emb = _embedding(n=50, c=6, h=2, w=2, offset=1.0)
    acc = PackedGaussianAccumulator(6, 4, dtype=np.float32)
    for b in np.split(emb, 5):
        acc.update(b)
    assert acc.nbytes == packed_state_bytes(6, 4, np.float32) == 4 * 4 * (21 + 6)
    mean, prec = acc.finalise(out_dtype=np.float64)
    ref_mean, ref_prec = _reference(emb)
    # _bounds in float32 (the accumulation's dtype): mean_atol, precision_atol, merges (5 batches, 1 fold each)
    mean_tol, prec_tol = _bounds(emb, merges=10, dtype=np.float32)
    assert_close_each(prec, ref_prec, atol=prec_tol)
    assert_close_each(mean, ref_mean, atol=mean_tol)


def test_state_is_packed() -> None:
    acc = PackedGaussianAccumulator(550, 3)
    assert acc.n_tri == 550 * 551 // 2
    assert acc.nbytes == 3 * (550 * 551 // 2 + 550) * 8
    # The float64 triangle of a patch is big enough to hold its float32 full precision.
    assert acc.n_tri * 8 >= 550 * 550 * 4


def test_inputs_never_modified_and_mean_layout() -> None:
    emb = _embedding()
    before = emb.copy()
    acc = PackedGaussianAccumulator(5, 6).update(emb)
    np.testing.assert_array_equal(emb, before)
    # (P, C): the layout of every streaming accumulator's running mean (RunningMoments.mean), issue 10.
    # mean_atol: one batch, sums of 40 values
    expected = emb.astype(np.float64).reshape(40, 5, 6).mean(axis=0).T
    assert_close_each(acc.mean, expected, atol=mean_atol(np.abs(emb).max(), 40))
    other = PackedGaussianAccumulator(5, 6).update(emb[:10])
    snapshot = (other.count, other.mean)
    acc.merge(other)
    assert other.count == snapshot[0]
    np.testing.assert_array_equal(other.mean, snapshot[1])


def test_ridge_is_applied() -> None:
    emb = _embedding()
    acc = PackedGaussianAccumulator(5, 6).update(emb)
    _, prec = acc.finalise(ridge=0.5, out_dtype=np.float64)
    assert_close_each(prec, _reference(emb, ridge=0.5)[1], atol=_bounds(emb, merges=1, ridge=0.5)[1])  # precision_atol


def test_errors_name_the_problem() -> None:
    acc = PackedGaussianAccumulator(5, 6)
    with pytest.raises(ValueError, match=r"batch must have shape \(B, 5, \*spatial\).*got shape \(2, 4, 6\)"):
        acc.update(np.zeros((2, 4, 6)))
    with pytest.raises(ValueError, match="prod\\(spatial\\) == 6"):
        acc.update(np.zeros((2, 5, 7)))
    bad = _embedding()
    bad[3, 2, 1, 1] = np.nan  # patch 1*2 + 1 = 3
    with pytest.raises(ValueError, match="first at patch 3"):
        acc.update(bad)
    assert acc.count == 0  # a rejected batch leaves the state untouched
    acc.update(_embedding(n=1))
    with pytest.raises(ValueError, match="at least 2 observations"):
        acc.finalise()
    acc.update(_embedding(n=3))
    with pytest.raises(ValueError, match="ridge must be a finite number"):
        acc.finalise(ridge=-1.0)
    with pytest.raises(ValueError, match="in_place=True needs float64 accumulation"):
        acc.finalise(out_dtype=np.float64, in_place=True)
    # 4 observations of 5 channels: singular without a ridge.
    with pytest.raises(np.linalg.LinAlgError, match="patch 0 .*larger ridge"):
        acc.finalise(ridge=0.0)
    with pytest.raises(ValueError, match="same n_features, n_patches and dtype"):
        acc.merge(PackedGaussianAccumulator(5, 7))
    with pytest.raises(TypeError, match="must be a PackedGaussianAccumulator"):
        acc.merge(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_features must be a positive integer"):
        PackedGaussianAccumulator(0, 3)
    with pytest.raises(TypeError, match="dtype must be float64 or float32"):  # one message (issue 10)
        PackedGaussianAccumulator(3, 3, dtype=np.int64)


def test_empty_batch_is_a_no_op() -> None:
    acc = PackedGaussianAccumulator(5, 6).update(np.zeros((0, 5, 3, 2)))
    assert acc.count == 0


def test_failed_in_place_finalise_refuses_further_use() -> None:
    acc = PackedGaussianAccumulator(5, 6).update(_embedding(n=3))
    with pytest.raises(np.linalg.LinAlgError, match="partly overwritten"):
        acc.finalise(ridge=0.0, in_place=True)
    with pytest.raises(RuntimeError, match="create a new PackedGaussianAccumulator"):
        acc.finalise()


def test_buffered_batches_are_private_copies() -> None:
    emb = _embedding()
    acc = PackedGaussianAccumulator(5, 6, fold_every=1000)
    reused = np.empty_like(emb[:10])
    for batch in np.split(emb, 4):
        reused[...] = batch  # a DataLoader may hand out the same buffer every time
        acc.update(reused)
    assert acc.count == 40
    _, prec = acc.finalise(out_dtype=np.float64)
    assert_close_each(prec, _reference(emb)[1], atol=_bounds(emb, merges=5)[1])  # precision_atol, 4 batches


def test_benchmark_quick_mode_writes_rows(tmp_path, monkeypatch) -> None:
    import json

    from benchmarks import bench_padim_memory

    monkeypatch.setattr(bench_padim_memory, "RESULTS_PATH", tmp_path / "padim_memory.json")
    summary = bench_padim_memory.main(quick=True)
    rows = json.loads((tmp_path / "padim_memory.json").read_text())
    assert rows == summary["rows"]
    for row in rows:
        assert {"suite", "case", "library", "seconds"} <= row.keys()
    memory = [r for r in rows if "peak_rss_bytes" in r]
    assert {r["library"] for r in memory} == {"anomstats", "anomalib (numpy)"}
    assert all(r["peak_rss_bytes"] > 0 and "peak_ratio_ours_over_anomalib" in r for r in memory)
    accuracy = {r["library"]: r for r in rows if "max_rel_error_vs_float64" in r}
    # Bound: float64 accumulation and factorisation, then one rounding to float32: eps32/2 = 6e-8 of each
    # entry (the float64 work adds κ·C·eps64, below 1e-10 at the quick sizes); 1e-6 keeps a margin of 16
    # and still fails a float32 accumulation (about 1e-4 measured).
    assert accuracy["anomstats (float64 acc)"]["max_rel_error_vs_float64"] < 1e-6
    assert accuracy["anomstats (float64 acc)"]["max_asymmetry"] == 0.0


# ---------------------------------------------------------------- RFP storage and threads (issue 12)
@pytest.mark.parametrize("c", [1, 2, 3, 4, 7, 8])  # LAPACK's RFP layout differs for odd and even C
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_rfp_kernels_accumulate_and_unpack_the_lower_triangle(c, dtype) -> None:
    from anomstats._lapack import RfpKernels

    rng = np.random.default_rng(c)
    a, b = rng.normal(size=(5, c)).astype(dtype), rng.normal(size=(3, c)).astype(dtype)
    kernels, packed = RfpKernels(c, dtype), np.full(c * (c + 1) // 2, np.nan, dtype=dtype)
    kernels.rank_update(a, packed, 2.0, 0.0)  # beta = 0 never reads the NaN it overwrites
    kernels.rank_update(b, packed, 0.5, 1.0)
    t = np.full((c, c), -7.0, dtype=dtype)
    kernels.unpack(packed, t)
    expected = 2.0 * a.T.astype(np.float64) @ a + 0.5 * b.T.astype(np.float64) @ b
    # Bound: sums of K = 5 and 3 products, each within K eps of the sum of the products' magnitudes.
    magnitude = 2.0 * np.abs(a.T) @ np.abs(a) + 0.5 * np.abs(b.T) @ np.abs(b)
    lower = np.tril(np.ones((c, c), dtype=bool))
    assert_close_each(t[lower], expected[lower], atol=TWO_SIDES * 8 * eps(dtype) * magnitude[lower])
    np.testing.assert_array_equal(t[~lower], -7.0)  # bound 0: the strict upper triangle is never written


def test_rfp_kernels_without_the_c_pointers_give_the_same_result() -> None:
    from anomstats._lapack import RfpKernels

    rng = np.random.default_rng(3)
    rows = rng.normal(size=(9, 6))
    fast, slow = RfpKernels(6, np.float64), RfpKernels(6, np.float64)
    slow._sfrk = slow._tfttr = None  # as where scipy exports no C pointers: scipy's wrappers
    packed = [np.zeros(21), np.zeros(21)]
    t = [np.zeros((6, 6)), np.zeros((6, 6))]
    for kernels, p, m in zip((fast, slow), packed, t):
        kernels.rank_update(rows, p, 1.0, 0.0)
        kernels.rank_update(rows[:4], p, -0.5, 1.0)
        kernels.unpack(p, m)
    # Bound: the same LAPACK routine on the same numbers; 9 + 4 products per entry, K eps of their magnitude.
    magnitude = np.abs(rows.T) @ np.abs(rows)
    assert_close_each(t[1], t[0], atol=TWO_SIDES * 13 * eps(np.float64) * magnitude)
    np.testing.assert_array_equal(np.triu(t[1], 1), 0.0)


@pytest.mark.parametrize("workers", [1, 2])
def test_in_place_finalisation_in_many_chunks_on_threads_equals_the_copy(workers: int) -> None:
    # One patch per chunk: every chunk's precision overwrites moments of the chunks just before it, so a chunk
    # that wrote before its predecessors copied their moments out would corrupt them. Repeated for the threads.
    emb = _embedding(n=50, c=9, h=8, w=8, offset=2.0)
    for _ in range(5):
        accs = [PackedGaussianAccumulator(9, 64, memory_budget=1, workers=workers) for _ in range(2)]
        for acc in accs:
            acc.update(emb)
        _, copied = accs[0].finalise()
        _, in_place = accs[1].finalise(in_place=True)
        np.testing.assert_array_equal(in_place, copied)  # bound 0: the same float64 work, rounded once
        assert accs[1].spent and not accs[0].spent


def test_threads_and_chunks_do_not_change_the_moments() -> None:
    emb = _embedding(n=70, c=6, h=5, w=5, offset=10.0)
    results = []
    for workers, budget, fold_every in ((1, 2**26, 64), (2, 1, 64), (2, 4096, 5)):
        acc = PackedGaussianAccumulator(6, 25, workers=workers, memory_budget=budget, fold_every=fold_every)
        for b in np.array_split(emb, 3):
            acc.update(b)
        results.append(acc.finalise(out_dtype=np.float64))
    # _bounds with up to a merge per 5-row fold (70 / 5 + 3 batches): precision_atol + streamed_covariance_atol
    mean_tol, prec_tol = _bounds(emb, merges=70 // 5 + 4)
    for mean, prec in results[1:]:
        assert_close_each(mean, results[0][0], atol=mean_tol)
        assert_close_each(prec, results[0][1], atol=prec_tol)


def test_spending_and_the_estimators_the_packed_moments_serve() -> None:
    from anomstats._patch_kernels import PatchFitSettings

    emb = _embedding(n=30, c=4, h=2, w=2)
    acc = PackedGaussianAccumulator(4, 4).update(emb)
    with pytest.raises(ValueError, match="no fourth moments: shrinkage='ledoit-wolf' needs the dense accumulator"):
        acc.finalise_patches(PatchFitSettings(0.1, "ledoit-wolf", 30, (4,)), np.dtype(np.float64), 2**20, 1)
    _, oas = acc.finalise_patches(PatchFitSettings(0.0, "oas", 30, (4,)), np.dtype(np.float64), 2**20, 1)
    assert np.all((oas.shrinkage > 0) & (oas.shrinkage <= 1))  # OAS's coefficient lies in (0, 1] here
    assert not acc.spent
    # spend=True with a float64 result: a new stack, then the moments are freed
    _, outputs = acc.finalise_patches(PatchFitSettings(0.1, None, 30, (4,)), np.dtype(np.float64), 2**20, 1, spend=True)
    assert acc.spent and outputs.precision.dtype == np.float64
    with pytest.raises(RuntimeError, match="create a new PackedGaussianAccumulator"):
        acc.update(emb)


@given(c=st.integers(1, 40), p=st.integers(1, 60), step=st.integers(1, 9), itemsize=st.sampled_from([8]))
def test_in_place_dependencies_cover_every_overwritten_patch(c: int, p: int, step: int, itemsize: int) -> None:
    # Brute force over bytes: the float32 precision of chunk j overwrites the packed moments of patch q iff
    # their byte ranges meet; every such q must lie in a chunk from in_place_dependencies(...)[j] to j, and
    # the first of those chunks must really be overwritten (else the chunk would wait for no reason).
    from anomstats._packed import in_place_dependencies, packed_length

    chunks = [(s, min(s + step, p)) for s in range(0, p, step)]
    first = in_place_dependencies(chunks, c, itemsize)
    moments, out = packed_length(c) * itemsize, c * c * 4
    for j, (start, stop) in enumerate(chunks):
        hit = [q for q in range(p) if q * moments < stop * out and start * out < (q + 1) * moments]
        owners = {next(i for i, (a, b) in enumerate(chunks) if a <= q < b) for q in hit}
        assert owners <= set(range(first[j], j + 1))
        assert first[j] in owners
