"""Which path a drop-in takes when the fused kernels do not cover a configuration.

vector-quantize-pytorch accepts every option these modules do, so none of them is an error here:
a configuration the kernels do not compute runs on the reference path (same math as the library,
bit for bit). Under ``backend='auto'`` that is silent; a module built with ``backend='triton'``
asked for the kernels explicitly, so it says once why it does not get them.
"""
from __future__ import annotations

import warnings

from torch import nn


def warn_reference_path(module: nn.Module, reason: str) -> None:
    """Warn once per module and reason that ``backend='triton'`` runs the reference path."""
    seen = module.__dict__.setdefault("_reference_path_warned", set())
    if reason in seen:
        return
    seen.add(reason)
    warnings.warn(f"{type(module).__name__}(backend='triton'): the fused kernels do not compute {reason}; "
                  f"running the reference path (same math as vector-quantize-pytorch)", UserWarning, stacklevel=3)
