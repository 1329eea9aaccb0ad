"""Frozen-rounding helpers for gradcheck of the reference's straight-through rounding.

Rounding is piecewise constant, so a finite difference of the real function sees 0 where the
straight-through estimator says 1. Freezing each rounding offset ``round(x) - x`` at the base
point gives the smooth function whose exact derivative *is* the STE gradient.
"""
from typing import Callable, Dict, List, Tuple

import torch

import rfsq_kernels.reference.fsq as fsq_module


def freeze_rounding(monkeypatch, forward: Callable[..., torch.Tensor], z: torch.Tensor,
                    params: Dict[str, torch.Tensor]) -> Tuple[Callable[..., torch.Tensor], List[torch.Tensor]]:
    """Run ``forward(z, **params)`` once, recording every rounding offset; return ``(frozen, offsets)``
    where ``frozen(z, *param_values)`` replays those offsets (params in ``params``' order)."""
    offsets: List[torch.Tensor] = []

    def record(x):
        off = (torch.round(x) - x).detach()
        offsets.append(off)
        return x + off

    monkeypatch.setattr(fsq_module, "round_ste", record)
    forward(z, **params)

    def frozen(z, *values):
        replay = iter(offsets)
        monkeypatch.setattr(fsq_module, "round_ste", lambda x: x + next(replay))
        return forward(z, **dict(zip(params, values)))

    return frozen, offsets


def unfreeze_rounding(monkeypatch) -> None:
    """Put the real straight-through rounding back (after :func:`freeze_rounding`)."""
    monkeypatch.setattr(fsq_module, "round_ste", lambda x: x + (torch.round(x) - x).detach())
