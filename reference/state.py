"""Configuration in the ``state_dict``: a checkpoint remembers the levels/stages/strategy it was
trained with, and loading it into a module built differently fails with a clear error.

Stored as ``_extra_state`` (a dict of plain Python values, so ``torch.load(weights_only=True)``
reads it). A checkpoint written before this existed has no ``_extra_state``: it still loads (its
parameters are checked by shape as usual) with a warning that its configuration cannot be verified.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict

#: Version of the stored configuration dict.
CONFIG_FORMAT = 1
_LEGACY = "__legacy_checkpoint__"


class ConfigStateMixin:
    """Mixin for ``nn.Module``s: :meth:`config` goes into the state_dict and is checked on load."""

    def config(self) -> Dict[str, Any]:
        """The settings that decide what the module's parameters mean (plain Python values)."""
        raise NotImplementedError

    def get_extra_state(self) -> Dict[str, Any]:
        return {"format": CONFIG_FORMAT, **self.config()}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict) and state.get(_LEGACY):
            return
        if not isinstance(state, dict) or "format" not in state:
            raise ValueError(f"{type(self).__name__}: unrecognised _extra_state in the checkpoint: {state!r}")
        mine = self.config()
        diffs = [f"{k}: checkpoint has {state.get(k)!r}, this module has {v!r}"
                 for k, v in mine.items() if state.get(k, v) != v]
        if diffs:
            raise ValueError(
                f"{type(self).__name__}: the checkpoint was saved from a different configuration ("
                + "; ".join(diffs) + "). Build the module with the checkpoint's settings.")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "_extra_state"
        if key not in state_dict:
            warnings.warn(
                f"{type(self).__name__} at '{prefix or '<root>'}': the checkpoint has no stored configuration "
                f"(saved by an older rfsq-kernels); loading it without checking levels/stages/strategy",
                UserWarning, stacklevel=4)
            state_dict[key] = {_LEGACY: True}  # load_state_dict works on its own copy of the dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
