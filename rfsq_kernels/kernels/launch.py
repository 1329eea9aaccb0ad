"""The fused kernels' entry points: run the kernel family the strategy table names.

``Strategy.kernel_family`` picks the file: ``layernorm`` (one program per image, per-image
statistics) or ``elementwise`` (one program per image tile). The strategy's parameters arrive as
one group in table order (kernel form: ``ParamSpec.kernel_form``, e.g. ``a = softplus(p)``) and
go to the family as that group; parameter gradients come back as a group in the same order.
Design: ``docs/kernel-design.md``.
"""
from __future__ import annotations

import math
from types import ModuleType
from typing import Optional, Sequence, Tuple

import torch

from ..reference import get_strategy
from . import config, elementwise, layernorm

Outputs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
#: ``(grad_z, parameter gradients in table order)``.
Gradients = Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]

#: The kernel family modules by ``Strategy.kernel_family``; each has ``forward_outputs``,
#: ``forward`` and ``backward`` with the signatures used below (the backward's outputs are
#: allocated the same way for every family: :func:`backward_outputs` here).
FAMILIES = {"elementwise": elementwise, "layernorm": layernorm}


def _family(strategy: str) -> ModuleType:
    return FAMILIES[get_strategy(strategy).kernel_family]


def _no_positions(z: torch.Tensor) -> bool:
    """An empty batch or zero spatial extent: nothing to launch, every output is zeros. Handled
    here once, so the family launchers always see at least one position."""
    return z.shape[0] == 0 or math.prod(z.shape[2:]) == 0


def forward_outputs(z: torch.Tensor, levels: Sequence[int], stages: int, strategy: str) -> Outputs:
    """Uninitialised ``(quantized, indices, mean, std)`` with the reference's shapes and dtypes
    (shared by the launcher and the fake/meta implementation); mean/std are empty ``(0,)``
    tensors for strategies without per-image statistics."""
    return _family(strategy).forward_outputs(z, levels, stages)


def rfsq_forward_launch(
    z: torch.Tensor,
    levels: Sequence[int],
    stages: int,
    strategy: str,
    params: Sequence[torch.Tensor] = (),
    eps: float = 1e-5,
    mask: Optional[torch.Tensor] = None,
    active_stages: Optional[torch.Tensor] = None,
    fsq_shift: str = "atanh",
) -> Outputs:
    """Run the fused K-stage forward; returns ``(quantized, indices, mean, std)`` like
    :func:`rfsq_kernels.reference.rfsq_forward` (``mask`` ``(B, *spatial)`` bool and
    ``active_stages`` ``(B,)`` int32 included: one launch serves any mix of per-sample counts).

    ``params``: the strategy's parameter group in table order and kernel form (for ``'scale'``
    ``(a,)`` with ``a = softplus(scale_param)`` ``(K,)`` float32; for ``'layernorm'``
    ``(ln_weight, ln_bias)``, ``(K, C)``). ``fsq_shift``: ``'atanh'`` or the official code's ``'tan'``.
    """
    if _no_positions(z):
        return tuple(t.zero_() for t in forward_outputs(z, levels, stages, strategy))
    return _family(strategy).forward(z, levels, stages, strategy, tuple(params), eps, mask, active_stages,
                                     fsq_shift=fsq_shift)


def backward_outputs(z: torch.Tensor, stages: int, strategy: str, params: Sequence[torch.Tensor]) -> Gradients:
    """Uninitialised ``(grad_z, grad_params)``, ``grad_params`` shaped like ``params``. Shared
    with the fake implementation."""
    return config.new_output(z), tuple(torch.empty_like(p) for p in params)


def rfsq_backward_launch(
    grad_q: torch.Tensor,
    z: torch.Tensor,
    levels: Sequence[int],
    stages: int,
    strategy: str,
    params: Sequence[torch.Tensor] = (),
    mean: Optional[torch.Tensor] = None,
    std: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    active_stages: Optional[torch.Tensor] = None,
    fsq_shift: str = "atanh",
    indices: Optional[torch.Tensor] = None,
) -> Gradients:
    """Gradients ``(grad_z, grad_params)`` of ``sum(grad_q * quantized)``, ``grad_params`` in the
    order of ``params`` (kernel form: for ``'scale'`` d/da; autograd applies the softplus
    derivative). ``mean``/``std`` are the forward's saved statistics and ``indices`` its packed
    indices (per-image strategies: the backward rebuilds the stages' residuals from them).
    ``grad_q`` may have any strides (an expanded stride-0 gradient is read in place).
    """
    params = tuple(params)
    if _no_positions(z):
        grad_z, grad_params = backward_outputs(z, stages, strategy, params)
        return grad_z.zero_(), tuple(g.zero_() for g in grad_params)
    return _family(strategy).backward(grad_q, z, levels, stages, strategy, params, mean, std, mask, active_stages,
                                      fsq_shift=fsq_shift, indices=indices)
