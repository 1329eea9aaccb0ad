"""Autograd / torch.compile glue around the fused RFSQ Triton kernels.

Two ``torch.library.custom_op``s, ``rfsq_kernels::rfsq_forward`` and ``rfsq_kernels::rfsq_backward``,
each with a fake (meta) implementation, tie the kernels into autograd (``register_autograd``) so
that ``torch.compile(fullgraph=True)`` treats the whole K-stage quantizer as one opaque node
(no graph breaks; works with ``aot_eager`` and ``inductor``, also on CPU under the Triton
interpreter). ``levels``/``stages``/``strategy``/``eps`` are non-tensor arguments.

Autocast: custom ops fall through autocast untouched, so a bf16/fp16 ``z`` reaches the kernel as
is; the kernels compute in float32 and return ``quantized`` in ``z``'s dtype, like the reference.
The ``scale`` strategy's ``a = softplus(scale_param)`` is computed in float32 outside the op, so its
derivative is applied by autograd and the op only returns ``dL/da``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor

from .kernels.launch import backward_outputs, forward_outputs, rfsq_backward_launch, rfsq_forward_launch
from .reference import check_eps, check_levels, check_stages, get_strategy, rfsq_forward
from .reference.strategies import ALL_PARAM_NAMES

__all__ = ["rfsq_fused"]


@torch.library.custom_op("rfsq_kernels::rfsq_forward", mutates_args=())
def _forward_op(
    z: Tensor, scale: Optional[Tensor], ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
    mask: Optional[Tensor], active: Optional[Tensor], levels: List[int], stages: int, strategy: str, eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return rfsq_forward_launch(z, levels, stages, strategy, scale, ln_weight, ln_bias, eps,
                               mask=mask, active_stages=active)


@_forward_op.register_fake
def _forward_fake(z, scale, ln_weight, ln_bias, mask, active, levels, stages, strategy, eps):
    return forward_outputs(z, levels, stages, strategy)


@torch.library.custom_op("rfsq_kernels::rfsq_backward", mutates_args=())
def _backward_op(
    grad_q: Tensor, z: Tensor, scale: Optional[Tensor], ln_weight: Optional[Tensor],
    ln_bias: Optional[Tensor], mean: Tensor, std: Tensor, mask: Optional[Tensor], active: Optional[Tensor],
    levels: List[int], stages: int, strategy: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return rfsq_backward_launch(grad_q, z, levels, stages, strategy, scale, ln_weight, ln_bias, mean, std,
                                mask=mask, active_stages=active)


@_backward_op.register_fake
def _backward_fake(grad_q, z, scale, ln_weight, ln_bias, mean, std, mask, active, levels, stages, strategy):
    return backward_outputs(z, stages, strategy, scale, ln_weight, ln_bias)


def _setup_context(ctx, inputs, output) -> None:
    z, scale, ln_weight, ln_bias, mask, active, levels, stages, strategy, _eps = inputs
    _, indices, mean, std = output
    ctx.save_for_backward(z, scale, ln_weight, ln_bias, mean, std, mask, active)
    ctx.levels, ctx.stages, ctx.strategy = levels, stages, strategy
    ctx.mark_non_differentiable(indices, mean, std)


def _backward(ctx, grad_q, _grad_indices, _grad_mean, _grad_std):
    z, scale, ln_weight, ln_bias, mean, std, mask, active = ctx.saved_tensors
    grad_z, grad_scale, grad_w, grad_b = torch.ops.rfsq_kernels.rfsq_backward(
        grad_q, z, scale, ln_weight, ln_bias, mean, std, mask, active, ctx.levels, ctx.stages, ctx.strategy)
    names = get_strategy(ctx.strategy).param_names
    grads = {"scale_param": grad_scale, "ln_weight": grad_w, "ln_bias": grad_b}
    return (grad_z, *(grads[n] if n in names else None for n in ALL_PARAM_NAMES),
            None, None, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "double backward (a gradient of a gradient: create_graph=True, torch.func.hessian, ...) through the fused "
        "RFSQ kernels is not implemented; use backend='reference' (or rfsq_kernels.reference.rfsq_forward), whose "
        "straight-through gradient is differentiable")


# The backward op's outputs carry a graph under create_graph=True; differentiating them says what to do
# instead of PyTorch's "no autograd formula was registered".
_backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _needs_reference_autodiff(*tensors: Optional[Tensor]) -> bool:
    """True when a forward-mode tangent or a ``torch.func`` transform (jvp, grad, vmap, ...) is active:
    the custom op implements reverse mode only, so those go through the reference, whose autodiff
    gives the same straight-through derivatives (the kernels would give a zero tangent or fail).
    Under ``torch.compile`` tracing the op is kept."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active():
        return True
    return any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def rfsq_fused(
    z: Tensor,
    levels: Sequence[int],
    stages: int,
    strategy: str,
    scale_param: Optional[Tensor] = None,
    ln_weight: Optional[Tensor] = None,
    ln_bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    mask: Optional[Tensor] = None,
    active_stages: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused K-stage RFSQ: same contract as :func:`rfsq_kernels.reference.rfsq_forward`, ``mask``
    (``(B, *spatial)`` bool, True = valid) and ``active_stages`` (``(B,)`` integer per-sample stage
    counts, read on the device: one compiled kernel serves every mix, no host sync) included.

    Returns ``(quantized, indices, mean, std)``: ``quantized`` in ``z``'s dtype and layout
    (contiguous / channels_last / channels_last_3d kept), ``indices`` ``(B, *spatial, K)`` int32
    (int64 when ``prod(levels) >= 2**31``), LN ``mean``/``std`` ``(B, K, C)`` float32 (detached)
    or empty ``(0,)`` tensors. Differentiable w.r.t. ``z``, ``scale_param`` ``(K,)``,
    ``ln_weight`` and ``ln_bias`` ``(K, C)``. ``z`` must be on CUDA, or on CPU with
    ``TRITON_INTERPRET=1`` set before Triton was imported.

    Forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``) and ``torch.func`` transforms
    (``grad``, ``vmap``, ...) run the reference instead (same values and straight-through derivatives);
    double backward (``create_graph=True`` and differentiating the gradient) raises, naming
    ``backend='reference'``.
    """
    levels, eps = list(check_levels(levels)), check_eps(eps)
    stages = check_stages(stages)
    spec = get_strategy(strategy)
    given = {"scale_param": scale_param, "ln_weight": ln_weight, "ln_bias": ln_bias}
    for p in spec.params:
        want, got = p.shape(stages, len(levels)), given[p.name]
        if got is None or tuple(got.shape) != want:
            raise ValueError(f"strategy={strategy!r} needs {p.name} of shape {want}, got "
                             f"{None if got is None else tuple(got.shape)}")
    if _needs_reference_autodiff(z, scale_param, ln_weight, ln_bias):
        return rfsq_forward(z, levels, stages, strategy, scale_param=scale_param, ln_weight=ln_weight,
                            ln_bias=ln_bias, eps=eps, mask=mask, active_stages=active_stages)
    # The kernels take a = softplus(p) (float32): autograd applies the softplus derivative.
    scale = F.softplus(scale_param.float()) if "scale_param" in spec.param_names else None
    if "ln_weight" not in spec.param_names:  # parameters of another strategy are not the op's inputs
        ln_weight = ln_bias = None
    if active_stages is not None:
        active_stages = active_stages.to(torch.int32)
    return torch.ops.rfsq_kernels.rfsq_forward(z, scale, ln_weight, ln_bias, mask, active_stages, levels, stages,
                                               strategy, float(eps))
