"""The dense stream's memory (issue 12): packed sums, and a compute() that writes the precision over them.

- ``update`` keeps the centred sums packed (P, C·(C+1)/2) in float64; ``compute()`` writes the float32 precision
  over them chunk by chunk (``inv_covariance`` is a view of that storage) and spends the stream; the result is
  the same, bit for bit, as with the precision in a tensor of its own (``keep_stream=True``), for every chunking
  (no chunk's precision overwrites sums not yet read);
- where the precision does not fit (float32 sums, a float64 or half fit, the packed storage) it is a tensor of
  its own; a spent stream refuses ``update``/``compute`` until ``reset()``;
- a failure before any chunk is written leaves the stream as it was, a later one spends it and says so;
- the in-place fit saves, loads, moves and copies as any fit, and its checkpoint is the buffers' bytes plus the
  storage's ``P·C·4`` spare bytes;
- a default ``compute()`` needs no memory beyond the stream's, measured in a fresh process;
- the batches waiting to be folded in (``stream_pending``) ride in checkpoints, and the former layout of the
  sums loads; the torch kernels (CUDA's) give the CPU kernels' numbers.
"""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from anomstats.gaussian import DEFAULT_RIDGE  # noqa: E402
from anomstats_torch import MultiVariateGaussian, _streaming  # noqa: E402
from tests._tolerances import eps, patch_covariances, precision_atol  # noqa: E402
from tests.anomalib_oracle import AnomalibMultiVariateGaussian  # noqa: E402
from tests.test_faults_torch_stream import unpack_sums  # noqa: E402

STREAM_KEYS = {"stream_count", "stream_info", "stream_shift", "stream_mean", "stream_m2", "stream_pending"}


def _embedding(b=30, c=6, h=3, w=2, seed=0, offset=3.0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(c, c, generator=g, dtype=torch.float64) * 0.3 + torch.eye(c, dtype=torch.float64)
    x = torch.einsum("bchw,cd->bdhw", torch.randn(b, c, h, w, generator=g, dtype=torch.float64), mixing) + offset
    return x.to(dtype)


def _streamed(x, splits, **options) -> MultiVariateGaussian:
    module = MultiVariateGaussian(**options)
    for part in torch.split(x, splits):
        module.update(part)
    return module


def _saved_bytes(state) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


# --------------------------------------------------------------------------- packed sums, in-place compute
def test_the_stream_keeps_packed_sums_in_float64():
    x = _embedding(b=30, c=6)
    module = _streamed(x, [10, 10, 10])  # the third batch waits to be folded in
    p, c = 6, 6
    assert module.stream_m2.shape == (p, c * (c + 1) // 2) and module.stream_m2.dtype == torch.float64
    assert module.stream_pending.shape == (10, c, p) and module.stream_pending.dtype == torch.float32
    assert int(module.stream_count) == 30


@pytest.mark.parametrize("channels", [1, 2, 3, 7])
@pytest.mark.parametrize("patches", [1, 5])
@pytest.mark.parametrize("chunk_patches", [1, 2, 3, 100])
def test_in_place_compute_equals_a_separate_precision_bit_for_bit(channels, patches, chunk_patches):
    # Chunks of 1, 2, 3 or all patches: if a chunk's precision overwrote sums not yet read, some patch would differ.
    x = _embedding(b=12, c=channels, h=patches, w=1, seed=channels * 10 + patches)
    # the LAPACK path's chunk: the copied sums plus two diagonals, per patch
    per_patch = (channels * (channels + 1) // 2 + 2 * channels) * 8
    budget = per_patch * chunk_patches
    kept = _streamed(x, [5, 7], chunk_bytes=budget)
    spent = _streamed(x, [5, 7], chunk_bytes=budget)
    sums = spent.stream_m2
    mean, precision = spent.compute()
    expected = kept.compute(keep_stream=True)
    assert precision.data_ptr() == sums.data_ptr()  # written over the sums: no second stack
    assert precision.untyped_storage().nbytes() == patches * channels * (channels + 1) * 4
    assert precision.dtype == torch.float32 and precision.shape == (patches, channels, channels)
    assert torch.equal(precision, expected[1]) and torch.equal(mean, expected[0])
    assert torch.equal(precision, precision.mT)  # exactly symmetric
    assert not STREAM_KEYS & set(spent._buffers) and STREAM_KEYS & set(kept._buffers)


def test_the_in_place_fit_is_the_one_shot_fit():
    x = _embedding(b=40, c=5, seed=1, offset=50.0)
    mean, precision = _streamed(x, [7, 13, 20]).compute()
    reference = MultiVariateGaussian().double().fit(x.double())[1]
    # float64 sums and factorisation: precision_atol of a float64 fit, plus the final rounding to float32
    # (half an ulp of each entry)
    atol = precision_atol(patch_covariances(x.double().numpy(), DEFAULT_RIDGE), 40) + eps(np.float32) / 2 * float(
        reference.abs().max()
    )
    torch.testing.assert_close(precision.double(), reference, rtol=0, atol=atol)


@pytest.mark.parametrize(
    "options, data_dtype, module_dtype",
    [
        ({"accumulate_dtype": torch.float32}, torch.float32, None),  # float32 sums: half the bytes
        ({}, torch.float64, None),  # float64 data: a float64 fit, twice the sums' bytes
        ({}, torch.float32, torch.float64),  # module.double()
        ({}, torch.float32, torch.float16),  # a half module: a float16 fit
        ({"storage": "packed"}, torch.float32, None),  # a packed precision: half the sums' bytes
    ],
)
def test_where_the_precision_does_not_fit_it_has_its_own_tensor(options, data_dtype, module_dtype):
    x = _embedding(b=24, c=5, dtype=data_dtype)
    module = MultiVariateGaussian(**options)
    if module_dtype is not None:
        module.to(module_dtype)
    for part in torch.split(x, 12):
        module.update(part)
    sums = module.stream_m2
    fitted = module.compute()
    precision = fitted[1]
    assert precision.data_ptr() != sums.data_ptr()
    assert precision.untyped_storage().nbytes() == precision.numel() * precision.element_size()
    assert not STREAM_KEYS & set(module._buffers)  # spent all the same
    with pytest.raises(RuntimeError, match=r"compute\(\) spent this stream"):
        module.update(x)


def test_a_spent_stream_refuses_until_reset_and_keep_stream_keeps_it():
    x = _embedding(b=20, c=4)
    module = _streamed(x, [10, 10])
    module.compute()
    for call in (lambda: module.update(x), module.compute):
        with pytest.raises(RuntimeError, match=r"compute\(\) spent this stream.*reset\(\).*keep_stream=True"):
            call()
    module.reset()
    module.update(x)
    first = module.compute(keep_stream=True)
    assert STREAM_KEYS & set(module._buffers) and not STREAM_KEYS & set(module.state_dict())
    second = module.compute(keep_stream=True)  # kept: compute again, the same numbers
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.raises(TypeError, match="keep_stream must be True or False"):
        module.compute(keep_stream="no")
    # a load (a fit's checkpoint, or a stream's) makes the module what the checkpoint holds: streaming may start
    module.compute()
    fitted = MultiVariateGaussian()
    fitted.fit(x)
    module.load_state_dict(fitted.state_dict())
    module.update(x)
    assert int(module.stream_count) == 20


def test_a_failure_in_the_first_chunk_leaves_the_stream_as_it_was():
    # ridge=0 and a duplicated feature in patch 0: the first chunk fails before anything is written.
    x = _embedding(b=20, c=4, h=3, w=1)
    x[:, 3, 0] = x[:, 2, 0]
    module = _streamed(x, [10, 10], ridge=0.0, chunk_bytes=1)
    before = {name: t.clone() for name, t in module.state_dict().items()}
    with pytest.raises(np.linalg.LinAlgError, match="patch 0") as error:
        module.compute()
    assert "spent" not in str(error.value)
    after = module.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    module.ridge = DEFAULT_RIDGE  # fix the cause, compute again: the stream was intact
    expected = _streamed(x, [10, 10]).compute()
    assert all(torch.equal(a, b) for a, b in zip(module.compute(), expected))


def test_a_failure_after_a_written_chunk_spends_the_stream_and_says_so():
    x = _embedding(b=20, c=4, h=3, w=1)
    x[:, 3, 2] = x[:, 2, 2]  # patch 2, the third chunk of one patch each
    module = _streamed(x, [10, 10], ridge=0.0, chunk_bytes=1)
    with pytest.raises(np.linalg.LinAlgError, match=r"patch 2.*the stream is spent: call reset\(\)"):
        module.compute()
    assert not STREAM_KEYS & set(module._buffers)
    with pytest.raises(RuntimeError, match="spent"):
        module.update(x)
    # keep_stream=True (a separate precision) leaves the stream intact when it fails
    kept = _streamed(x, [10, 10], ridge=0.0, chunk_bytes=1)
    with pytest.raises(np.linalg.LinAlgError, match="patch 2") as error:
        kept.compute(keep_stream=True)
    assert "spent" not in str(error.value) and int(kept.stream_count) == 20


@pytest.mark.parametrize("lapack", [True, False], ids=["cpu_kernels", "torch_kernels"])
@pytest.mark.parametrize("options, keep", [({}, False), ({}, True), ({"storage": "packed"}, False)])
@pytest.mark.parametrize("compute_mode", ["inference_mode", "no_grad"])
def test_streams_accumulated_under_inference_mode_compute_in_either_mode(monkeypatch, lapack, options, keep, compute_mode):
    # Sums accumulated under torch.inference_mode are inference tensors: compute() writes them (or a new store)
    # in place inside or outside that mode.
    monkeypatch.setattr(_streaming, "uses_lapack", lambda device: lapack)
    x = _embedding(b=20, c=4)
    module = MultiVariateGaussian(**options)
    with torch.inference_mode():
        module.update(x[:10])
        module.update(x[10:])
    expected = _streamed(x, [10, 10], **options).compute(keep_stream=keep)
    with torch.inference_mode() if compute_mode == "inference_mode" else torch.no_grad():
        got = module.compute(keep_stream=keep)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


# --------------------------------------------------------------------------- the in-place fit as a checkpoint
def test_the_in_place_fit_saves_loads_moves_and_copies_as_any_fit():
    x = _embedding(b=30, c=8, h=4, w=4, seed=3)
    module = _streamed(x, [10, 10, 10])
    mean, precision = module.compute()
    patches, channels = 16, 8
    state = module.state_dict()
    assert set(state) == {"mean", "inv_covariance"}
    # torch.save writes the whole storage: the precision's bytes plus the P·C·4 spare ones (1/C of it), no more
    exact = mean.numel() * 4 + precision.numel() * 4
    spare = patches * channels * 4
    fitted = MultiVariateGaussian()  # a checkpoint of tensors of their own: the container's overhead
    fitted.fit(x)
    overhead = _saved_bytes(fitted.state_dict()) - sum(t.numel() * t.element_size() for t in fitted.state_dict().values())
    assert _saved_bytes(state) == exact + spare + overhead
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)
    for target in (MultiVariateGaussian(), AnomalibMultiVariateGaussian()):
        target.load_state_dict(loaded)  # strict
        assert torch.equal(target.inv_covariance, precision) and torch.equal(target.mean, mean)
    fresh = MultiVariateGaussian()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.mahalanobis(x[:3]), module.mahalanobis(x[:3]))
    # a load into the in-place module itself copies into the view
    module.load_state_dict(fitted.state_dict())
    assert torch.equal(module.inv_covariance, fitted.inv_covariance)
    # moves and casts make tensors of their own; deep copies keep the values
    again = _streamed(x, [10, 10, 10])
    again.compute()
    duplicate = copy.deepcopy(again)
    assert torch.equal(duplicate.inv_covariance, again.inv_covariance)
    wide = copy.deepcopy(again).double()
    assert wide.inv_covariance.dtype == torch.float64 and torch.equal(wide.inv_covariance.float(), again.inv_covariance)
    assert wide.inv_covariance.untyped_storage().nbytes() == precision.numel() * 8
    assert copy.deepcopy(again).to("meta").inv_covariance.is_meta


# --------------------------------------------------------------------------- waiting batches, the former layout
def test_a_checkpoint_with_a_waiting_batch_resumes_exactly():
    x = _embedding(b=30, c=6, seed=4)
    splits = [4, 1, 2, 9, 14]
    uninterrupted = _streamed(x, splits).compute()
    first = _streamed(x[:7], splits[:3])  # 4 waits, 4 + 1 are folded, 2 waits
    state = first.state_dict()
    assert state["stream_pending"].shape[0] == 2 and int(state["stream_count"]) == 7
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    resumed = MultiVariateGaussian()
    resumed.load_state_dict(torch.load(buffer))
    for part in torch.split(x[7:], splits[3:]):
        resumed.update(part)
    assert all(torch.equal(a, b) for a, b in zip(resumed.compute(), uninterrupted))


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda s: s.update(stream_pending=s["stream_pending"].double()[:, :2]), r"stream_pending must be \(k, C, P\)"),
        (lambda s: s.update(stream_pending=s["stream_pending"].half()), "float32 or float64"),
        (lambda s: s.update(stream_count=torch.tensor(1)), "stream_pending holds 2 observations but stream_count is 1"),
        (lambda s: s["stream_pending"].__setitem__((0, 0, 0), float("nan")), "stream_pending holds NaN"),
    ],
)
def test_inconsistent_waiting_batches_are_refused(change, words):
    state = {k: v.clone() for k, v in _streamed(_embedding(b=7, c=3), [4, 1, 2]).state_dict().items()}
    change(state)
    module = MultiVariateGaussian()
    with pytest.raises(RuntimeError, match=words):
        module.load_state_dict(state)
    assert not STREAM_KEYS & set(module._buffers)


def test_a_checkpoint_of_the_former_layout_is_packed_on_load():
    x = _embedding(b=20, c=5, seed=5)
    module = _streamed(x[:10], [10])  # folded: no waiting batch
    module.update(x[10:15])  # waits
    state = module.state_dict()
    former = dict(state, stream_m2=torch.from_numpy(unpack_sums(state["stream_m2"])))  # (P, C, C) stacks
    resumed = MultiVariateGaussian()
    resumed.load_state_dict(former)
    assert torch.equal(resumed.stream_m2, state["stream_m2"])  # the upper triangles, exactly
    for m in (resumed, module):
        m.update(x[15:])
    assert all(torch.equal(a, b) for a, b in zip(resumed.compute(), module.compute()))


# --------------------------------------------------------------------------- the torch kernels (CUDA's) on the CPU
@pytest.mark.parametrize("options", [{}, {"storage": "packed"}, {"accumulate_dtype": torch.float32}])
def test_the_torch_kernels_give_the_cpu_kernels_numbers(monkeypatch, options):
    x = _embedding(b=70, c=6, h=3, w=3, seed=6, offset=20.0)
    splits = [5, 9, 70 - 14]
    expected = _streamed(x, splits, **options)
    sums = expected.stream_m2.clone()
    expected_fit = expected.compute()
    monkeypatch.setattr(_streaming, "uses_lapack", lambda device: False)
    module = _streamed(x, splits, **options)
    storage = module.stream_m2.data_ptr()
    # the sums: two float64 (or float32) accumulations of the same products in different orders
    dtype = np.float64 if sums.dtype == torch.float64 else np.float32
    m2 = unpack_sums(sums)
    scale = np.sqrt(np.einsum("pii,pjj->pij", m2, m2))
    assert np.all(np.abs(unpack_sums(module.stream_m2) - m2) <= 64 * 70 * eps(dtype) * scale)
    fitted = module.compute()
    assert (fitted[1].data_ptr() == storage) == (not options)  # in place where it fits, on this path too
    covariances = patch_covariances(x.double().numpy(), DEFAULT_RIDGE)
    atol = precision_atol(covariances, 70, dtype) + eps(np.float32) / 2 * float(expected_fit[1].abs().max())
    torch.testing.assert_close(module.inv_covariance, expected.inv_covariance, rtol=0, atol=atol)
    torch.testing.assert_close(fitted[0], expected_fit[0], rtol=eps(np.float32), atol=0)


def test_the_torch_kernels_raise_the_cpu_kernels_faults(monkeypatch):
    x = _embedding(b=20, c=4, h=3, w=1)
    x[:, 3, 1] = x[:, 2, 1]
    messages = []
    for lapack in (True, False):
        monkeypatch.setattr(_streaming, "uses_lapack", lambda device, lapack=lapack: lapack)
        with pytest.raises(np.linalg.LinAlgError) as error:
            _streamed(x, [10, 10], ridge=0.0).compute()
        messages.append(str(error.value))
    assert messages[0] == messages[1] and "patch 1" in messages[0]


# --------------------------------------------------------------------------- peak memory, in a fresh process
_PEAK = textwrap.dedent(
    """
    import gc, json
    import torch
    from anomstats_torch import MultiVariateGaussian

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    def growth(keep):
        channels, side, batch = 96, 32, 30
        gen = torch.Generator().manual_seed(0)
        module = MultiVariateGaussian(chunk_bytes=1 << 22)
        for _ in range(4):  # pairs of batches are folded in: nothing waits at the end
            module.update(torch.randn(batch, channels, side, side, generator=gen))
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident size (VmHWM) to the current one
        before = status("VmRSS")
        module.compute(keep_stream=keep)
        return status("VmHWM") - before

    print(json.dumps({"default": growth(False), "keep": growth(True)}))
    """
)


def _compute_growth() -> dict[str, int]:
    """How far the resident memory of a fresh process rose during ``compute()``, by mode, in bytes."""
    # glibc: large blocks always from mmap, returned when freed (no dynamic threshold keeping freed batches resident)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    run = subprocess.run([sys.executable, "-c", _PEAK], capture_output=True, text=True, timeout=300, env=env)
    if run.returncode != 0 and "clear_refs" in run.stderr:
        pytest.skip("the peak resident size cannot be reset here (/proc/self/clear_refs)")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs: Linux")
def test_the_default_compute_needs_no_memory_beyond_the_stream():
    patches, channels = 32 * 32, 96
    precision = patches * channels * channels * 4  # 37.7 MB (the sums: 38.1 MB)
    growth = _compute_growth()
    # The default writes the precision over the sums: it needs chunk buffers (chunk_bytes, 4 MiB) and small
    # ones, far below a quarter of the stack; keep_stream=True allocates a stack of its own (the measurement works).
    assert growth["default"] < precision / 4, growth
    assert growth["keep"] > precision * 3 / 4, growth
