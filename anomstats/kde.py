"""GaussianKDE (placeholder)."""


class GaussianKDE:  # pragma: no cover - replaced by the real implementation
    def __init__(self, *args, **kwargs):
        raise NotImplementedError
