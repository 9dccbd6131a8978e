"""Export: torch.jit.trace at batch 1 is right at every batch size; torch.export with a dynamic batch; ONNX."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

from anomstats_torch import GaussianKDE, MultiVariateGaussian  # noqa: E402
from tests.anomalib_oracle import AnomalibGaussianKDE  # noqa: E402


class PadimScore(torch.nn.Module):
    """What a deployed PaDiM exports: the Mahalanobis map of a fitted Gaussian."""

    def __init__(self, gaussian: MultiVariateGaussian) -> None:
        super().__init__()
        self.gaussian = gaussian

    def forward(self, embedding):
        return self.gaussian.mahalanobis(embedding)


def _fitted():
    g = torch.Generator().manual_seed(0)
    kde = GaussianKDE(torch.randn(300, 3, generator=g) + 2.0)
    mvg = MultiVariateGaussian()
    mvg.fit(torch.randn(20, 4, 3, 5, generator=g))
    queries = torch.randn(9, 3, generator=g) + 2.0
    embeddings = torch.randn(7, 4, 3, 5, generator=g)
    return kde, mvg, queries, embeddings


def _trace(fn, example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace is deprecated in favour of export
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("error", torch.jit.TracerWarning)  # our code gives the tracer nothing to doubt
        return fn(example)


def test_jit_trace_at_batch_one_is_correct_at_other_batch_sizes():
    kde, mvg, queries, embeddings = _fitted()
    traced_kde = _trace(lambda ex: torch.jit.trace(kde, ex), queries[:1])
    for m in (1, 2, 9):
        torch.testing.assert_close(traced_kde(queries[:m]), kde(queries[:m]), rtol=1e-6, atol=0)
    traced_score = _trace(lambda ex: torch.jit.trace(PadimScore(mvg), ex), embeddings[:1])
    for b in (1, 3, 7):
        torch.testing.assert_close(traced_score(embeddings[:b]), mvg.mahalanobis(embeddings[:b]), rtol=1e-6, atol=1e-6)


def test_anomalib_style_loop_trace_scores_only_the_first_row():
    # the defect this module fixes: a per-row Python loop is unrolled by the tracer
    kde, _, queries, _ = _fitted()
    reference = AnomalibGaussianKDE()
    reference.load_state_dict(kde.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(reference, queries[:1])
    out = traced(queries)
    assert torch.count_nonzero(out[1:]) == 0 and out[0] != 0


def test_torch_export_with_a_dynamic_batch():
    kde, mvg, queries, embeddings = _fitted()
    batch = torch.export.Dim("batch")
    exported_kde = torch.export.export(kde, (queries,), dynamic_shapes={"features": {0: batch}}).module()
    for m in (1, 4, 9):
        torch.testing.assert_close(exported_kde(queries[:m]), kde(queries[:m]), rtol=1e-6, atol=0)
    exported_score = torch.export.export(
        PadimScore(mvg), (embeddings,), dynamic_shapes={"embedding": {0: batch}}
    ).module()
    for b in (1, 2, 7):
        torch.testing.assert_close(exported_score(embeddings[:b]), mvg.mahalanobis(embeddings[:b]), rtol=1e-6, atol=1e-6)


def test_log_prob_traces_too():
    kde, _, queries, _ = _fitted()

    class LogDensity(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, features):
            return self.model.log_prob(features)

    traced = _trace(lambda ex: torch.jit.trace(LogDensity(kde), ex), queries[:1])
    far = queries + 100.0
    torch.testing.assert_close(traced(far), kde.log_prob(far), rtol=1e-6, atol=0)
    assert torch.isfinite(traced(far)).all()


def test_onnx_export(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    kde, mvg, queries, embeddings = _fitted()
    for name, module, example in (("kde", kde, queries), ("padim", PadimScore(mvg), embeddings)):
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(module, (example,), str(path), dynamic_shapes=({0: torch.export.Dim("batch")},))
        onnx.checker.check_model(onnx.load(str(path)))
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(path))
        feed = {session.get_inputs()[0].name: example[:3].numpy()}
        got = torch.from_numpy(session.run(None, feed)[0])
        expected = module(example[:3])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
