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

from .autodiff import forbid_double_backward, needs_reference_autodiff, saveable
from .backend import use_fused
from .kernels.launch import backward_outputs, forward_outputs, rfsq_backward_launch, rfsq_forward_launch
from .reference import (check_eps, check_fsq_shift, check_levels, check_stages, get_strategy, index_dtype,
                        rfsq_forward)
from .reference.validation import check_call_tensors

__all__ = ["rfsq_fused"]


@torch.library.custom_op("rfsq_kernels::rfsq_forward", mutates_args=())
def _forward_op(
    z: Tensor, params: List[Tensor], mask: Optional[Tensor], active_stages: Optional[Tensor],
    levels: List[int], stages: int, strategy: str, eps: float, fsq_shift: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    params = _kernel_params(z, params, mask, active_stages, levels, stages, strategy)
    return rfsq_forward_launch(z, levels, stages, strategy, params, eps, mask=mask, active_stages=active_stages,
                               fsq_shift=fsq_shift)


@_forward_op.register_fake
def _forward_fake(z, params, mask, active_stages, levels, stages, strategy, eps, fsq_shift):
    _kernel_params(z, params, mask, active_stages, levels, stages, strategy)
    return forward_outputs(z, levels, stages, strategy)


def _kernel_params(z: Tensor, params: Sequence[Tensor], mask: Optional[Tensor], active_stages: Optional[Tensor],
                   levels: Sequence[int], stages: int, strategy: str) -> List[Tensor]:
    """The op boundary: every tensor a kernel reads is checked here (``check_call_tensors``: dtype,
    device, shape), whoever calls the op, and the parameters are made contiguous (the kernels index
    them as ``k * C + c``; an expanded or transposed parameter is copied). ``z``, ``grad_q`` and
    ``mask`` may have any strides: the launchers read them through their strides or copy them.
    Shapes, dtypes and devices only, so real and fake (traced) calls run it alike, with no host sync."""
    spec = get_strategy(strategy)
    if len(params) != len(spec.params):
        raise ValueError(f"strategy={strategy!r} takes {len(spec.params)} parameter tensors {spec.param_names}, "
                         f"got {len(params)}")
    check_call_tensors(z, levels, stages, spec, params, mask, active_stages)
    return [p.contiguous() for p in params]


@torch.library.custom_op("rfsq_kernels::rfsq_backward", mutates_args=())
def _backward_op(
    grad_q: Tensor, z: Tensor, params: List[Tensor], indices: Optional[Tensor], mean: Tensor, std: Tensor,
    mask: Optional[Tensor], active_stages: Optional[Tensor], levels: List[int], stages: int, strategy: str,
    fsq_shift: str,
) -> List[Tensor]:
    """``[grad_z, *grad_params]`` (parameter gradients in the order of ``params``)."""
    params, indices, mean, std = _backward_inputs(grad_q, z, params, indices, mean, std, mask, active_stages, levels,
                                                  stages, strategy)
    grad_z, grad_params = rfsq_backward_launch(grad_q, z, levels, stages, strategy, params, mean, std,
                                               mask=mask, active_stages=active_stages, fsq_shift=fsq_shift,
                                               indices=indices)
    return [grad_z, *grad_params]


@_backward_op.register_fake
def _backward_fake(grad_q, z, params, indices, mean, std, mask, active_stages, levels, stages, strategy, fsq_shift):
    params, _, _, _ = _backward_inputs(grad_q, z, params, indices, mean, std, mask, active_stages, levels, stages,
                                       strategy)
    grad_z, grad_params = backward_outputs(z, stages, strategy, params)
    return [grad_z, *grad_params]


def _backward_inputs(grad_q, z, params, indices, mean, std, mask, active_stages, levels, stages, strategy):
    """:func:`_kernel_params` plus the backward's own inputs: ``grad_q`` a float tensor of ``z``'s shape
    on its device, and, for strategies with per-image statistics, ``mean``/``std`` float32
    ``(B, K, C)`` and the forward's ``indices`` ``(B, *spatial, K)`` in the levels' index dtype
    (all made contiguous: the kernels index them ``(b * K + k) * C + c`` and ``(b * S + s) * K + k``;
    the backward rebuilds the stages' residuals from the indices)."""
    params = _kernel_params(z, params, mask, active_stages, levels, stages, strategy)
    if not grad_q.dtype.is_floating_point or tuple(grad_q.shape) != tuple(z.shape) or grad_q.device != z.device:
        raise ValueError(f"grad_q must be a float tensor of z's shape {tuple(z.shape)} on {z.device}, got "
                         f"{grad_q.dtype} {tuple(grad_q.shape)} on {grad_q.device}")
    if get_strategy(strategy).per_image_stats:
        want = (z.shape[0], stages, z.shape[1])
        for name, t in (("mean", mean), ("std", std)):
            if t.dtype != torch.float32 or tuple(t.shape) != want or t.device != z.device:
                raise ValueError(f"{name} must be the forward's float32 {want} statistics on {z.device}, got "
                                 f"{t.dtype} {tuple(t.shape)} on {t.device}")
        want = (z.shape[0], *z.shape[2:], stages)
        dtype = index_dtype(levels)
        if (indices is None or indices.dtype != dtype or tuple(indices.shape) != want
                or indices.device != z.device):
            got = "None" if indices is None else f"{indices.dtype} {tuple(indices.shape)} on {indices.device}"
            raise ValueError(f"indices must be the forward's {dtype} {want} indices on {z.device}, got {got}")
        mean, std, indices = mean.contiguous(), std.contiguous(), indices.contiguous()
    return params, indices, mean, std


def _setup_context(ctx, inputs, output) -> None:
    # Called only when grad mode is on and some input requires grad (torch.library's autograd glue):
    # z is then needed, since every parameter gradient recomputes the stages from z. The
    # per-image strategies' backward also rebuilds each stage's residual from the indices.
    z, params, mask, active_stages, levels, stages, strategy, _eps, fsq_shift = inputs
    _, indices, mean, std = output
    saved_indices = indices if get_strategy(strategy).per_image_stats else None
    ctx.save_for_backward(*(saveable(t) for t in (z, saved_indices, mean, std, mask, active_stages, *params)))
    ctx.levels, ctx.stages, ctx.strategy, ctx.fsq_shift = levels, stages, strategy, fsq_shift
    ctx.mark_non_differentiable(indices, mean, std)


def _backward(ctx, grad_q, _grad_indices, _grad_mean, _grad_std):
    z, indices, mean, std, mask, active_stages, *params = ctx.saved_tensors
    grad_z, *grad_params = torch.ops.rfsq_kernels.rfsq_backward(
        grad_q, z, params, indices, mean, std, mask, active_stages, ctx.levels, ctx.stages, ctx.strategy, ctx.fsq_shift)
    return grad_z, grad_params, None, None, None, None, None, None, None


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
    fsq_shift: str = "atanh",
    **params: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused K-stage RFSQ: same contract as :func:`rfsq_kernels.reference.rfsq_forward`, ``mask``
    (``(B, *spatial)`` bool, True = valid) and ``active_stages`` (``(B,)`` integer per-sample stage
    counts, read on the device: one compiled kernel serves every mix, no host sync) included.

    ``params``: the strategy's parameters by name (``scale_param`` ``(K,)``; ``ln_weight``,
    ``ln_bias`` ``(K, C)``; ``RFSQ.strategy_parameters()``), differentiable. ``fsq_shift``:
    ``'atanh'`` (default) or the official code's ``'tan'`` (the kernels read the shift from their
    constant table). Everything after ``strategy`` is keyword-only.

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
    fsq_shift = check_fsq_shift(fsq_shift)
    stages = check_stages(stages)
    spec = get_strategy(strategy)
    group = spec.bind(params)
    check_call_tensors(z, levels, stages, spec, group, mask, active_stages)
    use_fused("triton", z)  # z on CUDA, or the Triton interpreter on: else the error says how to proceed
    if needs_reference_autodiff(z, *group):
        return rfsq_forward(z, levels, stages, strategy, eps=eps, mask=mask, active_stages=active_stages,
                            fsq_shift=fsq_shift, **params)
    # contiguous here (not only inside the op): what autograd saves for the backward is then the copy
    kernel_params = [p.kernel_form(value).contiguous() for p, value in zip(spec.params, group)]
    active_stages = _kernel_active_stages(active_stages, stages)
    return torch.ops.rfsq_kernels.rfsq_forward(z, kernel_params, mask, active_stages, levels, stages,
                                               spec.name, float(eps), fsq_shift)


def _kernel_active_stages(active_stages: Optional[Tensor], stages: int) -> Optional[Tensor]:
    """Per-sample stage counts as the kernels read them (int32), with the reference's meaning kept for
    every value: the reference compares the counts as int64 (``count > k``), so a count <= 0 runs no
    stage and one >= K runs all. Clamping to ``[0, K]`` first keeps that; a bare int32 cast would wrap
    an int64 count such as ``2**32 + 1`` to 1 (a silent wrong result). No host sync."""
    if active_stages is None:
        return None
    return active_stages.clamp(0, stages).to(torch.int32)

