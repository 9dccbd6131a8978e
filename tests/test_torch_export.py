"""Export: torch.jit.trace at batch 1 is right at every batch size; torch.export with a dynamic batch; ONNX."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from anomstats_torch import GaussianKDE, MultiVariateGaussian  # noqa: E402
from tests._tolerances import (  # noqa: E402
    ADAPTER32,
    KDEErrorModel,
    assert_close_each,
    bandwidth_from_whitening,
    kde_log_density_whitened,
    mahalanobis_tolerances,
)
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


def _kde_bound(kde, queries):
    """kde_route_error for two float32 evaluations of one module (traced / exported / ONNX against eager).

    Shared whitening; both form expanded squares of centred float32 queries (the traced graph through the
    log-sum-exp route, whose exp(log p) is term (4)). ``q`` from a float64 evaluation of the same buffers.
    """
    train = np.linalg.solve(kde.bw_transform.double().numpy().T, kde.dataset.double().numpy().T).T
    h = bandwidth_from_whitening(kde.bw_transform)
    log_density = _log_density64(kde, queries)
    bound = KDEErrorModel.of(train, queries.double().numpy(), h, (ADAPTER32, ADAPTER32), shared_whitening=True)
    return bound, log_density


def _log_density64(kde, queries):
    whitening = kde.bw_transform.double().numpy()
    return kde_log_density_whitened(
        kde.dataset.double().numpy(), queries.double().numpy() @ whitening, float(torch.log(kde.norm.double()))
    )


def _score_rtol(mvg):
    """mahalanobis_tolerances for two float32 evaluations of the same buffers (shared fit)."""
    covariance = np.linalg.inv(mvg.inv_covariance.double().numpy())
    return mahalanobis_tolerances(covariance, 2, dtype=np.float32, shared_fit=True)[0]


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
        bound, log_density = _kde_bound(kde, queries[:m])  # float32 rounding of both evaluations
        assert_close_each(traced_kde(queries[:m]), kde(queries[:m]), rtol=bound.rtol_each(log_density), atol=0)
    traced_score = _trace(lambda ex: torch.jit.trace(PadimScore(mvg), ex), embeddings[:1])
    rtol = _score_rtol(mvg)  # the same buffers: float32 evaluation rounding only
    for b in (1, 3, 7):
        torch.testing.assert_close(traced_score(embeddings[:b]), mvg.mahalanobis(embeddings[:b]), rtol=rtol, atol=0)


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
        bound, log_density = _kde_bound(kde, queries[:m])  # float32 rounding of both evaluations
        assert_close_each(exported_kde(queries[:m]), kde(queries[:m]), rtol=bound.rtol_each(log_density), atol=0)
    exported_score = torch.export.export(
        PadimScore(mvg), (embeddings,), dynamic_shapes={"embedding": {0: batch}}
    ).module()
    rtol = _score_rtol(mvg)  # the same buffers: float32 evaluation rounding only
    for b in (1, 2, 7):
        torch.testing.assert_close(exported_score(embeddings[:b]), mvg.mahalanobis(embeddings[:b]), rtol=rtol, atol=0)


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
    # _kde_bound as an absolute bound on log p: q ~ |y|^2 ~ 1e5 here, so eps32 q ~ 1e-2 absolute.
    bound, log_density = _kde_bound(kde, far)
    assert_close_each(traced(far), kde.log_prob(far), atol=bound.log_atol_each(log_density))
    assert torch.isfinite(traced(far)).all()


def test_onnx_export(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    kde, mvg, queries, embeddings = _fitted()
    bound, log_density = _kde_bound(kde, queries[:3])
    # ONNX Runtime against eager torch, both float32: _kde_bound for the KDE, _score_rtol for PaDiM.
    tolerances = {"kde": dict(rtol=bound.rtol_each(log_density), atol=0), "padim": dict(rtol=_score_rtol(mvg), atol=0)}
    for name, module, example in (("kde", kde, queries), ("padim", PadimScore(mvg), embeddings)):
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(module, (example,), str(path), dynamic_shapes=({0: torch.export.Dim("batch")},))
        onnx.checker.check_model(onnx.load(str(path)))
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(path))
        feed = {session.get_inputs()[0].name: example[:3].numpy()}
        got = torch.from_numpy(session.run(None, feed)[0])
        expected = module(example[:3])
        assert_close_each(got, expected, **tolerances[name])

