"""Buffers that take the checkpoint's shape when a state dict is loaded, all or nothing.

anomalib's statistics modules register their buffers as ``torch.empty(0)`` and learn the real shape at fit
time, so a fresh module must be able to load a fitted checkpoint. A plain :class:`torch.nn.Module` refuses
("size mismatch"); this base class reshapes first, then lets torch copy the values in as usual. It also checks
the checkpoint's entries against each other (a hook of the subclass) and makes the load of each module atomic:
a load that fails leaves the module as it was.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Any, Iterable

import torch
from torch import Tensor, nn

__all__ = ["DynamicBufferModule", "DynamicBufferMixin"]

#: torch's key suffix of ``get_extra_state()`` in a state dict.
_EXTRA_STATE = "_extra_state"

#: A key of ``local_metadata`` through which a subclass's ``_load_from_state_dict`` marks entries it built
#: itself (converted from another layout, already in the buffer's dtype and on its device): the named buffer
#: becomes that tensor, without a second copy. The entries of a caller's checkpoint are always copied.
ADOPT_KEY = "anomstats.adopt"


class _Snapshot:
    """What a failed load restores: the buffers (the tensors themselves), which are persistent, the attributes."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.buffers = dict(module._buffers)
        self.non_persistent = set(module._non_persistent_buffers_set)
        self.attributes = dict(module.__dict__)

    def restore(self) -> None:
        module = self.module
        module._buffers.clear()
        module._buffers.update(self.buffers)
        module._non_persistent_buffers_set.clear()
        module._non_persistent_buffers_set.update(self.non_persistent)
        for name in [name for name in module.__dict__ if name not in self.attributes]:
            del module.__dict__[name]
        module.__dict__.update(self.attributes)


def _incoming(state_dict: dict[str, Any], prefix: str) -> dict[str, Tensor]:
    """This module's own tensor entries of ``state_dict`` (not its children's, not the extra state), unprefixed."""
    entries = {}
    for key, value in state_dict.items():
        if isinstance(value, Tensor) and key.startswith(prefix):
            name = key[len(prefix):]
            if "." not in name and name != _EXTRA_STATE:
                entries[name] = value
    return entries


def _callers_strict(passed: bool) -> bool:
    """The ``strict`` the user gave :meth:`torch.nn.Module.load_state_dict` (torch passes True to every module).

    torch decides only after every module loaded whether missing and unexpected keys are errors, and tells
    the modules ``strict=True`` whatever the caller asked. A module that must not change on a load that will
    fail reads the caller's argument from the ``load_state_dict`` frame that is loading it; called some other
    way (not through ``load_state_dict``), the ``strict`` it was passed holds.
    """
    target = nn.Module.load_state_dict.__code__
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is target:
            return bool(frame.f_locals.get("strict", passed))
        frame = frame.f_back
    return passed


def _plain(value: Tensor, target: Tensor) -> bool:
    """Whether torch's ``target.copy_(value)`` cannot fail: a dense tensor with data, of the same shape."""
    return (
        type(value) in (Tensor, nn.Parameter)
        and value.layout == torch.strided
        and not value.is_quantized
        and not value.is_nested
        and (target.is_meta or not value.is_meta)
    )


def _shape_fits(parameter: Tensor, value: Tensor) -> bool:
    """torch's rule for parameters (never reshaped): equal shapes, or a (1,) entry for a 0-d parameter."""
    return value.shape == parameter.shape or (parameter.ndim == 0 and tuple(value.shape) == (1,))


class DynamicBufferModule(nn.Module):
    """A module whose persistent buffers adopt the shape of a loaded checkpoint, checked and loaded atomically.

    On :meth:`~torch.nn.Module.load_state_dict`, every persistent, non-``None`` buffer whose shape differs
    from the checkpoint entry ``prefix + name`` is replaced by an uninitialised tensor of the checkpoint's
    shape, keeping the buffer's dtype and device; torch's usual copy then casts the values in. Entries
    missing from the checkpoint are left alone (torch reports them under ``strict=True`` as usual) and
    parameters are never reshaped.

    Loading one module is all or nothing. In this order:

    1. torch's load-state-dict pre-hooks run (they may rewrite the checkpoint);
    2. ``self._check_state_consistency(incoming)`` (a hook, no-op by default) gets this module's own entries
       of the checkpoint, ``{name: tensor}`` without the prefix (a key the checkpoint lacks is absent;
       children's entries are not included), before anything of the module changes. **The rule for
       subclasses**: to refuse entries that do not fit together, raise
       :func:`anomstats._validation.inconsistent_state_error` (a ``RuntimeError``, torch's type for load
       failures, whose text reads as torch's: ``Error(s) in loading state_dict for <Class>: inconsistent
       buffers: <what>; a fitted <Class> holds <layout>. ... nothing was loaded.``). The exception
       propagates out of ``load_state_dict`` unchanged, whatever ``strict`` is. Any other exception the hook
       raises propagates unchanged too;
    3. ``self._prepare_state_load(incoming)`` (a hook, no-op by default) may register or remove optional
       buffers so that the module's buffers match the checkpoint (e.g. a stream's moments);
    4. every failure torch would find is looked for before any value changes: an entry that is not a tensor,
       a parameter of another shape, and under ``strict=True`` missing and unexpected keys (torch tells every
       module ``strict=True`` and decides at the end; the caller's ``strict`` is read from the
       ``load_state_dict`` call). If there is one, it is reported through torch's lists (``load_state_dict``
       raises its usual ``RuntimeError``) and the module is left as it was. An entry that is not a plain dense tensor (meta, sparse, quantized, a
       subclass) is copied into a tensor of the buffer's dtype and device first; if that fails, it is
       reported the same way;
    5. buffers are reshaped and torch copies the values in (a buffer of the checkpoint's shape is filled in
       place, as torch does; a reshaped one is a new tensor);
    6. ``self._finish_state_load(incoming)`` (a hook, no-op by default) updates derived attributes. It must
       not fail for data reasons: checks belong in step 2.

    If anything after step 2 raises or reports an error, the module's buffers (the same tensor objects, so
    the same shapes, values, dtypes and devices), their persistence and its plain attributes are restored
    before the error reaches the caller. Other modules of the same ``load_state_dict`` call load or fail on
    their own, as with any torch load.

    Differences from anomalib's ``DynamicBufferMixin`` (deliberate):

    - the buffer is *replaced* rather than resized in place, so buffers created under
      :func:`torch.inference_mode` load too (anomalib raises "Inplace update to inference tensor outside
      InferenceMode"); for the same reason a buffer that is an inference tensor is replaced even when its
      shape already matches;
    - a failed load leaves the module as it was (anomalib's resizes first: a load that then fails leaves
      resized, uninitialised buffers that score garbage).

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
    >>> fresh.load_state_dict({})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    RuntimeError: Error(s) in loading state_dict for Stats:...Missing key(s) in state_dict: "mean"...
    >>> fresh.mean.shape  # strict: the missing key was reported, nothing changed
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

    # ------------------------------------------------------------------ hooks of subclasses
    def _check_state_consistency(self, incoming: dict[str, Tensor]) -> None:
        """Refuse checkpoint entries that do not fit together; called before anything of the module changes.

        Parameters
        ----------
        incoming : dict of str to torch.Tensor
            This module's entries of the checkpoint, without the prefix; keys the checkpoint lacks are absent.

        Raises
        ------
        RuntimeError
            By the rule of the class notes: :func:`anomstats._validation.inconsistent_state_error`. The
            default accepts everything.
        """

    def _prepare_state_load(self, incoming: dict[str, Tensor]) -> None:
        """Register or remove optional buffers to match the checkpoint (inside the atomic part of the load)."""

    def _finish_state_load(self, incoming: dict[str, Tensor]) -> None:
        """Update derived attributes after this module's entries were loaded (must not fail for data reasons)."""

    # ------------------------------------------------------------------ loading
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
        # torch runs the pre-hooks inside its own _load_from_state_dict; here they run first, so that the
        # checks below see the checkpoint they produce (and they are not run twice).
        for hook in self._load_state_dict_pre_hooks.values():
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        incoming = _incoming(state_dict, prefix)
        self._check_state_consistency(incoming)  # raises before anything changed
        snapshot = _Snapshot(self)
        reported = len(error_msgs)
        try:
            self._prepare_state_load(incoming)
            if not self._precheck(state_dict, prefix, _callers_strict(strict), missing_keys, unexpected_keys, error_msgs):
                snapshot.restore()
                return
            self._reshape_buffers(state_dict, prefix, local_metadata.get(ADOPT_KEY, ()))
            self.__dict__["_load_state_dict_pre_hooks"] = OrderedDict()  # they ran above
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
            if len(error_msgs) != reported:  # not foreseen by the checks: put the module back
                snapshot.restore()
                return
            self.__dict__["_load_state_dict_pre_hooks"] = snapshot.attributes["_load_state_dict_pre_hooks"]
            self._finish_state_load(incoming)
        except BaseException:
            snapshot.restore()
            raise

    def _local_state(self) -> dict[str, Tensor]:
        """Parameters and persistent buffers that torch loads (not ``None``), by name."""
        local = {name: p for name, p in self._parameters.items() if p is not None}
        for name, buffer in self._buffers.items():
            if buffer is not None and name not in self._non_persistent_buffers_set:
                local[name] = buffer
        return local

    def _precheck(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> bool:
        """Find what torch's load would report as errors, before it copies anything; report it and return False if any.

        ``strict`` is the caller's: missing and unexpected keys are errors only then (otherwise torch lists them
        after the load, as usual).
        """
        local = self._local_state()
        problems: list[str] = []
        missing = [prefix + name for name in local if prefix + name not in state_dict]
        for name, target in local.items():
            key = prefix + name
            if key not in state_dict:
                continue
            value = state_dict[key]
            if not torch.overrides.is_tensor_like(value):
                problems.append(
                    f'While copying the parameter named "{key}", expected torch.Tensor or Tensor-like object from '
                    f"checkpoint but received {type(value)}"
                )
            elif name in self._parameters and not _shape_fits(target, value):
                problems.append(
                    f"size mismatch for {key}: copying a param with shape {value.shape} from checkpoint, the "
                    f"shape in current model is {target.shape}."
                )
            elif not isinstance(value, Tensor) or not _plain(value, target):
                try:  # staged into a plain tensor now, so that the copy below cannot fail
                    staged = torch.empty(value.shape, dtype=target.dtype, device=target.device)
                    staged.copy_(value)
                except Exception as exc:  # noqa: BLE001 - any failure of the copy is a load error
                    problems.append(f'While copying the entry named "{key}", an exception occurred: {exc}')
                else:
                    state_dict[key] = staged
        extra = prefix + _EXTRA_STATE
        has_extra = type(self).set_extra_state is not nn.Module.set_extra_state
        if has_extra and extra not in state_dict:
            missing.append(extra)
        unexpected = [key for key in state_dict if key.startswith(prefix) and not self._expects(key, prefix, local, has_extra)]
        if problems or (strict and (missing or unexpected)):
            error_msgs.extend(problems)
            if strict:
                missing_keys.extend(missing)
                unexpected_keys.extend(unexpected)
            return False
        return True

    def _expects(self, key: str, prefix: str, local: dict[str, Tensor], has_extra: bool) -> bool:
        """Whether torch would take ``key`` as this module's (or a child's) entry, not as unexpected."""
        name = key[len(prefix):]
        if name == _EXTRA_STATE:
            return has_extra
        head, dot, _ = name.partition(".")
        return head in self._modules if dot else head in local

    def _reshape_buffers(self, state_dict: dict[str, Any], prefix: str, adopt: Iterable[str]) -> None:
        """Give every persistent buffer with an entry the entry's shape (a new tensor, the buffer's dtype and device)."""
        adopt = set(adopt)
        for name, buffer in list(self._buffers.items()):
            if buffer is None or name in self._non_persistent_buffers_set:
                continue
            incoming = state_dict.get(prefix + name)
            if not isinstance(incoming, Tensor):
                continue
            if name in adopt and incoming.dtype == buffer.dtype and incoming.device == buffer.device:
                self._buffers[name] = incoming  # the subclass's own conversion: torch's copy onto itself is a no-op
            elif incoming.shape != buffer.shape or buffer.is_inference():
                # A fresh (non-inference) tensor: resizing in place is refused for inference tensors.
                self._buffers[name] = torch.empty(incoming.shape, dtype=buffer.dtype, device=buffer.device)


#: anomalib's later name for the same base class.
DynamicBufferMixin = DynamicBufferModule
