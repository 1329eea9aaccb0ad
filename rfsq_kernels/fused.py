"""Autograd / torch.compile glue around the fused RFSQ Triton kernels.

Two ``torch.library.custom_op``s, ``rfsq_kernels::rfsq_forward`` and ``rfsq_kernels::rfsq_backward``,
each with a fake (meta) implementation, tie the kernels into autograd (``register_autograd``) so
that ``torch.compile(fullgraph=True)`` treats the whole K-stage quantizer as one opaque node
(no graph breaks; works with ``aot_eager`` and ``inductor``, also on CPU under the Triton
interpreter). ``levels``/``stages``/``strategy``/``eps`` are non-tensor arguments.

The strategy's parameters are one ``Tensor[]`` argument, in strategy-table order, in kernel form
(``ParamSpec.kernel_form``: the ``scale`` strategy's ``a = softplus(scale_param)`` is computed in
float32 outside the op, so autograd applies its derivative and the op only returns ``dL/da``).
The ops never name a strategy's parameters, so a new strategy needs no change here.

Autocast: custom ops fall through autocast untouched, so a bf16/fp16 ``z`` reaches the kernel as
is; the kernels compute in float32 and return ``quantized`` in ``z``'s dtype, like the reference.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .autodiff import forbid_double_backward, needs_reference_autodiff
from .kernels.launch import backward_outputs, forward_outputs, rfsq_backward_launch, rfsq_forward_launch
from .reference import check_eps, check_levels, check_stages, get_strategy, rfsq_forward

__all__ = ["rfsq_fused"]


@torch.library.custom_op("rfsq_kernels::rfsq_forward", mutates_args=())
def _forward_op(
    z: Tensor, params: List[Tensor], mask: Optional[Tensor], active_stages: Optional[Tensor],
    levels: List[int], stages: int, strategy: str, eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return rfsq_forward_launch(z, levels, stages, strategy, params, eps, mask=mask, active_stages=active_stages)


@_forward_op.register_fake
def _forward_fake(z, params, mask, active_stages, levels, stages, strategy, eps):
    return forward_outputs(z, levels, stages, strategy)


@torch.library.custom_op("rfsq_kernels::rfsq_backward", mutates_args=())
def _backward_op(
    grad_q: Tensor, z: Tensor, params: List[Tensor], mean: Tensor, std: Tensor, mask: Optional[Tensor],
    active_stages: Optional[Tensor], levels: List[int], stages: int, strategy: str,
) -> List[Tensor]:
    """``[grad_z, *grad_params]`` (parameter gradients in the order of ``params``)."""
    grad_z, grad_params = rfsq_backward_launch(grad_q, z, levels, stages, strategy, params, mean, std,
                                               mask=mask, active_stages=active_stages)
    return [grad_z, *grad_params]


@_backward_op.register_fake
def _backward_fake(grad_q, z, params, mean, std, mask, active_stages, levels, stages, strategy):
    grad_z, grad_params = backward_outputs(z, stages, strategy, params)
    return [grad_z, *grad_params]


def _setup_context(ctx, inputs, output) -> None:
    z, params, mask, active_stages, levels, stages, strategy, _eps = inputs
    _, indices, mean, std = output
    ctx.save_for_backward(z, mean, std, mask, active_stages, *params)
    ctx.levels, ctx.stages, ctx.strategy = levels, stages, strategy
    ctx.mark_non_differentiable(indices, mean, std)


def _backward(ctx, grad_q, _grad_indices, _grad_mean, _grad_std):
    z, mean, std, mask, active_stages, *params = ctx.saved_tensors
    grad_z, *grad_params = torch.ops.rfsq_kernels.rfsq_backward(
        grad_q, z, params, mean, std, mask, active_stages, ctx.levels, ctx.stages, ctx.strategy)
    return grad_z, grad_params, None, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


forbid_double_backward(_backward_op, "RFSQ kernels", "backend='reference' (or rfsq_kernels.reference.rfsq_forward)")


def rfsq_fused(
    z: Tensor,
    levels: Sequence[int],
    stages: int,
    strategy: str,
    *,
    eps: float = 1e-5,
    mask: Optional[Tensor] = None,
    active_stages: Optional[Tensor] = None,
    **params: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused K-stage RFSQ: same contract as :func:`rfsq_kernels.reference.rfsq_forward`, ``mask``
    (``(B, *spatial)`` bool, True = valid) and ``active_stages`` (``(B,)`` integer per-sample stage
    counts, read on the device: one compiled kernel serves every mix, no host sync) included.

    ``params``: the strategy's parameters by name (``scale_param`` ``(K,)``; ``ln_weight``,
    ``ln_bias`` ``(K, C)``; ``RFSQ.strategy_parameters()``), differentiable. Everything after
    ``strategy`` is keyword-only.

    Returns ``(quantized, indices, mean, std)``: ``quantized`` in ``z``'s dtype and layout
    (contiguous / channels_last / channels_last_3d kept), ``indices`` ``(B, *spatial, K)`` int32
    (int64 when ``prod(levels) >= 2**31``), per-image ``mean``/``std`` ``(B, K, C)`` float32
    (detached) or empty ``(0,)`` tensors. Differentiable w.r.t. ``z`` and every parameter. ``z``
    must be on CUDA, or on CPU with ``TRITON_INTERPRET=1`` set before Triton was imported.

    Forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``) and ``torch.func`` transforms
    (``grad``, ``vmap``, ...) run the reference instead (same values and straight-through derivatives);
    double backward (``create_graph=True`` and differentiating the gradient) raises, naming
    ``backend='reference'``.
    """
    levels, eps = list(check_levels(levels)), check_eps(eps)
    stages = check_stages(stages)
    spec = get_strategy(strategy)
    group = spec.bind(params)
    for p, value in zip(spec.params, group):
        want = p.shape(stages, len(levels))
        if tuple(value.shape) != want:
            raise ValueError(f"strategy={strategy!r} needs {p.name} of shape {want}, got {tuple(value.shape)}")
    if needs_reference_autodiff(z, *group):
        return rfsq_forward(z, levels, stages, strategy, eps=eps, mask=mask, active_stages=active_stages, **params)
    kernel_params = [p.kernel_form(value) for p, value in zip(spec.params, group)]
    if active_stages is not None:
        active_stages = active_stages.to(torch.int32)
    return torch.ops.rfsq_kernels.rfsq_forward(z, kernel_params, mask, active_stages, levels, stages,
                                               spec.name, float(eps))
