"""The fused kernels' entry points: pick the kernel family from the strategy table.

A strategy with per-image statistics (``Strategy.per_image_stats``) runs the one-program-per-image
kernels of :mod:`.layernorm`; the others run the elementwise kernels of :mod:`.elementwise`, with a
per-stage scale when the strategy has a ``scale_param``. Design: ``docs/kernel-design.md``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from ..reference import get_strategy
from . import elementwise, layernorm

Outputs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _no_positions(z: torch.Tensor) -> bool:
    """An empty batch or zero spatial extent: nothing to launch, every output is zeros. Handled
    here once, so the family launchers always see at least one position."""
    return z.shape[0] == 0 or math.prod(z.shape[2:]) == 0


def _has_scale(strategy: str) -> bool:
    return "scale_param" in get_strategy(strategy).param_names


def forward_outputs(z: torch.Tensor, levels: Sequence[int], stages: int, strategy: str) -> Outputs:
    """Uninitialised ``(quantized, indices, mean, std)`` with the reference's shapes and dtypes
    (shared by the launcher and the fake/meta implementation); mean/std are empty ``(0,)``
    tensors for strategies without per-image statistics."""
    family = layernorm if get_strategy(strategy).per_image_stats else elementwise
    return family.forward_outputs(z, levels, stages)


def rfsq_forward_launch(
    z: torch.Tensor,
    levels: Sequence[int],
    stages: int,
    strategy: str,
    scale: Optional[torch.Tensor] = None,
    ln_weight: Optional[torch.Tensor] = None,
    ln_bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    mask: Optional[torch.Tensor] = None,
    active_stages: Optional[torch.Tensor] = None,
) -> Outputs:
    """Run the fused K-stage forward; returns ``(quantized, indices, mean, std)`` like
    :func:`rfsq_kernels.reference.rfsq_forward` (``mask`` ``(B, *spatial)`` bool and
    ``active_stages`` ``(B,)`` int32 included: one launch serves any mix of per-sample counts).

    ``scale`` is ``a = softplus(scale_param)`` (``(K,)``, float32) for ``strategy='scale'``;
    ``ln_weight``/``ln_bias`` are ``(K, C)`` for ``'layernorm'``.
    """
    if _no_positions(z):
        return tuple(t.zero_() for t in forward_outputs(z, levels, stages, strategy))
    if get_strategy(strategy).per_image_stats:
        return layernorm.forward(z, levels, stages, ln_weight, ln_bias, eps, mask, active_stages)
    return elementwise.forward(z, levels, stages, scale if _has_scale(strategy) else None, mask, active_stages)


def backward_outputs(
    z: torch.Tensor, stages: int, strategy: str,
    scale: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
) -> Outputs:
    """Shapes/dtypes of ``(grad_z, grad_scale, grad_ln_weight, grad_ln_bias)``; unused
    parameter gradients are empty ``(0,)`` tensors. Shared with the fake implementation."""
    if get_strategy(strategy).per_image_stats:
        return layernorm.backward_outputs(z, ln_weight, ln_bias)
    return elementwise.backward_outputs(z, scale if _has_scale(strategy) else None)


def rfsq_backward_launch(
    grad_q: torch.Tensor,
    z: torch.Tensor,
    levels: Sequence[int],
    stages: int,
    strategy: str,
    scale: Optional[torch.Tensor] = None,
    ln_weight: Optional[torch.Tensor] = None,
    ln_bias: Optional[torch.Tensor] = None,
    mean: Optional[torch.Tensor] = None,
    std: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    active_stages: Optional[torch.Tensor] = None,
) -> Outputs:
    """Gradients ``(grad_z, grad_scale, grad_ln_weight, grad_ln_bias)`` of ``sum(grad_q * quantized)``.

    ``scale`` is ``a = softplus(scale_param)`` (the gradient returned is d/da; autograd applies
    the softplus derivative); ``mean``/``std`` are the forward's saved LN statistics.
    ``grad_q`` may have any strides (an expanded stride-0 gradient is read in place).
    """
    if _no_positions(z):
        return tuple(t.zero_() for t in backward_outputs(z, stages, strategy, scale, ln_weight, ln_bias))
    if get_strategy(strategy).per_image_stats:
        return layernorm.backward(grad_q, z, levels, stages, ln_weight, ln_bias, mean, std, mask, active_stages)
    return elementwise.backward(grad_q, z, levels, stages, scale if _has_scale(strategy) else None,
                                mask, active_stages)
