"""MultiVariateGaussian (placeholder)."""


class MultiVariateGaussian:  # pragma: no cover - replaced by the real implementation
    def __init__(self, *args, **kwargs):
        raise NotImplementedError

#: anomalib 2.x's regularisation: 0.01·I added to the covariance, then 1e-5·I more.
DEFAULT_RIDGE = 0.01 + 1e-5
