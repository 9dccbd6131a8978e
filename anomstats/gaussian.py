"""MultiVariateGaussian (placeholder)."""


class MultiVariateGaussian:  # pragma: no cover - replaced by the real implementation
    def __init__(self, *args, **kwargs):
        raise NotImplementedError
