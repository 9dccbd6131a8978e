"""Buffers that take the checkpoint's shape when a state dict is loaded.

anomalib's statistics modules register their buffers as ``torch.empty(0)`` and learn the real shape at fit
time, so a fresh module must be able to load a fitted checkpoint. A plain :class:`torch.nn.Module` refuses
("size mismatch"); this base class reshapes first, then lets torch copy the values in as usual.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["DynamicBufferModule", "DynamicBufferMixin"]


class DynamicBufferModule(nn.Module):
    """A module whose persistent buffers adopt the shape of a loaded checkpoint.

    On :meth:`~torch.nn.Module.load_state_dict`, every persistent, non-``None`` buffer whose shape differs
    from the checkpoint entry ``prefix + name`` is replaced by an uninitialised tensor of the checkpoint's
    shape, keeping the buffer's dtype and device; torch's usual copy then casts the values in. Entries
    missing from the checkpoint are left alone (torch reports them under ``strict=True`` as usual) and
    parameters are never reshaped.

    Differences from anomalib's ``DynamicBufferMixin`` (deliberate):

    - the buffer is *replaced* rather than resized in place, so buffers created under
      :func:`torch.inference_mode` load too (anomalib raises "Inplace update to inference tensor outside
      InferenceMode"); for the same reason a buffer that is an inference tensor is replaced even when its
      shape already matches.

    Examples
    --------
    >>> import torch
    >>> from anomstats_torch import DynamicBufferModule
    >>> class Stats(DynamicBufferModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.register_buffer("mean", torch.empty(0))
    >>> fitted = Stats()
    >>> fitted.mean = torch.arange(6.0).reshape(2, 3)
    >>> fresh = Stats()
    >>> fresh.load_state_dict(fitted.state_dict())
    <All keys matched successfully>
    >>> fresh.mean.shape
    torch.Size([2, 3])
    """

    def get_tensor_attribute(self, attribute_name: str) -> Tensor:
        """Return the tensor attribute ``attribute_name`` (anomalib's helper), or raise a clear error.

        Parameters
        ----------
        attribute_name : str
            Name of a buffer, parameter or plain tensor attribute.

        Returns
        -------
        torch.Tensor

        Raises
        ------
        ValueError
            If the attribute is not a tensor.

        Examples
        --------
        >>> import torch
        >>> from anomstats_torch import DynamicBufferModule
        >>> m = DynamicBufferModule()
        >>> m.register_buffer("count", torch.tensor(3))
        >>> int(m.get_tensor_attribute("count"))
        3
        """
        attribute = getattr(self, attribute_name)
        if isinstance(attribute, Tensor):
            return attribute
        raise ValueError(
            f"attribute {attribute_name!r} of {type(self).__name__} is a {type(attribute).__name__}, "
            "not a torch.Tensor"
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for name, buffer in list(self._buffers.items()):
            if buffer is None or name in self._non_persistent_buffers_set:
                continue
            incoming = state_dict.get(prefix + name)
            if not isinstance(incoming, Tensor):
                continue
            if incoming.shape != buffer.shape or buffer.is_inference():
                # A fresh (non-inference) tensor: resizing in place is refused for inference tensors.
                self._buffers[name] = torch.empty(incoming.shape, dtype=buffer.dtype, device=buffer.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


#: anomalib's later name for the same base class.
DynamicBufferMixin = DynamicBufferModule
