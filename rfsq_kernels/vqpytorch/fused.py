"""Autograd / torch.compile glue around the fused vector-quantize-pytorch kernels
(:mod:`rfsq_kernels.kernels.vq`: ResidualFSQ and the standalone FSQ).

``torch.library.custom_op``s (``rfsq_kernels::vq_rfsq_forward`` / ``_backward``, their grouped
forms ``vq_grouped_rfsq_*`` for GroupedResidualFSQ, one launch for all groups, and
``vq_fsq_*``), with fake implementations, so ``torch.compile`` sees one opaque node. The op's input is the tensor after ``project_in``; the projections stay ``nn.Linear``.

Like :mod:`rfsq_kernels.fused` (:mod:`rfsq_kernels.autodiff`): forward-mode AD and ``torch.func``
transforms run the op-for-op reference (:mod:`.reference`) instead, and double backward raises one
clear error naming ``backend='reference'``. Every tensor the kernels read is checked inside the ops
(:mod:`.op_boundary`), and what autograd saves goes through :func:`~rfsq_kernels.autodiff.saveable`
(inputs made under ``torch.inference_mode()`` train).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..autodiff import forbid_double_backward, needs_reference_autodiff, saveable
from ..kernels.vq import fsq as fsq_kernels
from ..kernels.vq import residual_fsq as kernels
from . import reference as ref
from .op_boundary import check_grouped_residual_fsq_call, check_residual_fsq_call, check_vq_grad, check_vq_input

__all__ = ["fsq_fused", "grouped_residual_fsq_fused", "residual_fsq_fused"]


@torch.library.custom_op("rfsq_kernels::vq_rfsq_forward", mutates_args=())
def _forward_op(x: Tensor, scales: Tensor, clamp_value: Tensor, mask: Optional[Tensor], active: Optional[Tensor],
                levels: List[int]) -> Tuple[Tensor, Tensor]:
    check_residual_fsq_call(x, levels, scales, clamp_value, mask, active)
    return kernels.forward(x, levels, scales, clamp_value, mask, active)


@_forward_op.register_fake
def _forward_fake(x, scales, clamp_value, mask, active, levels):
    check_residual_fsq_call(x, levels, scales, clamp_value, mask, active)
    return kernels.forward_outputs(x, levels, scales.shape[0], active is not None)


@torch.library.custom_op("rfsq_kernels::vq_rfsq_backward", mutates_args=())
def _backward_op(grad_q: Tensor, x: Tensor, scales: Tensor, clamp_value: Tensor, mask: Optional[Tensor],
                 active: Optional[Tensor], levels: List[int]) -> Tensor:
    check_residual_fsq_call(x, levels, scales, clamp_value, mask, active)
    check_vq_grad(grad_q, x)
    return kernels.backward(grad_q, x, levels, scales, clamp_value, mask, active)


@_backward_op.register_fake
def _backward_fake(grad_q, x, scales, clamp_value, mask, active, levels):
    check_residual_fsq_call(x, levels, scales, clamp_value, mask, active)
    check_vq_grad(grad_q, x)
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output) -> None:
    x, scales, clamp_value, mask, active, levels = inputs
    ctx.save_for_backward(*(saveable(t) for t in (x, scales, clamp_value, mask, active)))
    ctx.levels = levels
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_q, _grad_indices):
    x, scales, clamp_value, mask, active = ctx.saved_tensors
    grad_x = torch.ops.rfsq_kernels.vq_rfsq_backward(grad_q, x, scales, clamp_value, mask, active, ctx.levels)
    return grad_x, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)
forbid_double_backward(_backward_op, "ResidualFSQ kernels", "backend='reference'")


def residual_fsq_fused(x: Tensor, levels: Sequence[int], scales: Tensor, clamp_value: Tensor,
                       num_active: Optional[int] = None, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """vector-quantize-pytorch's ResidualFSQ quantizer on ``x`` ``(B, N, C)`` (after ``project_in``),
    fused: ``(quantized in x's dtype, indices (B, N, K))``. ``num_active``: stages kept (quantize
    dropout; -1 indices and int64 after it), ``mask`` ``(B, N)`` bool (True = quantize).

    Forward-mode AD and ``torch.func`` transforms run :func:`.reference.residual_fsq_core` (the
    library's math: same values, straight-through derivatives); double backward raises."""
    if needs_reference_autodiff(x, scales, clamp_value):
        return _residual_fsq_reference(x, levels, scales, clamp_value, num_active, mask)
    active = None
    if num_active is not None:
        active = torch.full((x.shape[0],), int(num_active), dtype=torch.int32, device=x.device)
    return torch.ops.rfsq_kernels.vq_rfsq_forward(x, scales.float(), clamp_value.float(), mask, active,
                                                  [int(v) for v in levels])


@torch.library.custom_op("rfsq_kernels::vq_grouped_rfsq_forward", mutates_args=())
def _grouped_forward_op(x: Tensor, scales: List[Tensor], clamp_values: List[Tensor], active: Optional[Tensor],
                        levels: List[int]) -> Tuple[Tensor, Tensor]:
    check_grouped_residual_fsq_call(x, levels, scales, clamp_values, active)
    return kernels.grouped_forward(x, levels, scales, clamp_values, active)


@_grouped_forward_op.register_fake
def _grouped_forward_fake(x, scales, clamp_values, active, levels):
    check_grouped_residual_fsq_call(x, levels, scales, clamp_values, active)
    return kernels.grouped_forward_outputs(x, levels, scales[0].shape[0], active is not None)


@torch.library.custom_op("rfsq_kernels::vq_grouped_rfsq_backward", mutates_args=())
def _grouped_backward_op(grad_q: Tensor, x: Tensor, scales: List[Tensor], clamp_values: List[Tensor],
                         active: Optional[Tensor], levels: List[int]) -> Tensor:
    check_grouped_residual_fsq_call(x, levels, scales, clamp_values, active)
    check_vq_grad(grad_q, x)
    return kernels.grouped_backward(grad_q, x, levels, scales, clamp_values, active)


@_grouped_backward_op.register_fake
def _grouped_backward_fake(grad_q, x, scales, clamp_values, active, levels):
    check_grouped_residual_fsq_call(x, levels, scales, clamp_values, active)
    check_vq_grad(grad_q, x)
    return torch.empty_like(x)


def _grouped_setup_context(ctx, inputs, output) -> None:
    x, scales, clamp_values, active, levels = inputs
    ctx.save_for_backward(*(saveable(t) for t in (x, active, *scales, *clamp_values)))
    ctx.groups, ctx.levels = len(scales), levels
    ctx.mark_non_differentiable(output[1])


def _grouped_backward(ctx, grad_q, _grad_indices):
    x, active, *tables = ctx.saved_tensors
    scales, clamp_values = tables[:ctx.groups], tables[ctx.groups:]
    grad_x = torch.ops.rfsq_kernels.vq_grouped_rfsq_backward(grad_q, x, scales, clamp_values, active, ctx.levels)
    no_grads = [None] * ctx.groups  # the tables are buffers: no gradient, one None per list entry
    return grad_x, no_grads, list(no_grads), None, None


_grouped_forward_op.register_autograd(_grouped_backward, setup_context=_grouped_setup_context)
forbid_double_backward(_grouped_backward_op, "GroupedResidualFSQ kernels", "backend='reference'")


def grouped_residual_fsq_fused(x: Tensor, levels: Sequence[int], scales: Sequence[Tensor],
                               clamp_values: Sequence[Tensor], num_active: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """G ResidualFSQ quantizers of one configuration in one launch per direction: ``x``
    ``(G, B, N, C)`` (group g's input after its ``project_in``; any strides), group g with its own
    ``scales[g]`` and ``clamp_values[g]``; ``num_active`` as in :func:`residual_fsq_fused`, shared
    by the groups. Returns ``(quantized (G, B, N, C) in x's dtype, indices (G, B, N, K))``, group
    g's slices bitwise :func:`residual_fsq_fused` of ``x[g]``.

    Forward-mode AD and ``torch.func`` transforms run the reference per group."""
    if needs_reference_autodiff(x, *scales, *clamp_values):
        outs = [_residual_fsq_reference(xg, levels, s, c, num_active, None)
                for xg, s, c in zip(x.unbind(0), scales, clamp_values)]
        return torch.stack([q for q, _ in outs]), torch.stack([i for _, i in outs])
    active = None
    if num_active is not None:
        active = torch.full((x.shape[1],), int(num_active), dtype=torch.int32, device=x.device)
    return torch.ops.rfsq_kernels.vq_grouped_rfsq_forward(x, [s.float() for s in scales],
                                                          [c.float() for c in clamp_values], active,
                                                          [int(v) for v in levels])


@torch.library.custom_op("rfsq_kernels::vq_fsq_forward", mutates_args=())
def _fsq_forward_op(x: Tensor, levels: List[int]) -> Tuple[Tensor, Tensor]:
    check_vq_input(x, levels)
    return fsq_kernels.forward(x, levels)


@_fsq_forward_op.register_fake
def _fsq_forward_fake(x, levels):
    check_vq_input(x, levels)
    return fsq_kernels.forward_outputs(x, levels)


@torch.library.custom_op("rfsq_kernels::vq_fsq_backward", mutates_args=())
def _fsq_backward_op(grad: Tensor, x: Tensor, levels: List[int]) -> Tensor:
    check_vq_input(x, levels)
    check_vq_grad(grad, x, name="grad")
    return fsq_kernels.backward(grad, x, levels)


@_fsq_backward_op.register_fake
def _fsq_backward_fake(grad, x, levels):
    check_vq_input(x, levels)
    check_vq_grad(grad, x, name="grad")
    return torch.empty_like(x)


def _fsq_setup_context(ctx, inputs, output) -> None:
    x, levels = inputs
    ctx.save_for_backward(saveable(x))
    ctx.levels = levels
    ctx.mark_non_differentiable(output[1])


def _fsq_backward(ctx, grad, _grad_indices):
    (x,) = ctx.saved_tensors
    return torch.ops.rfsq_kernels.vq_fsq_backward(grad, x, ctx.levels), None


_fsq_forward_op.register_autograd(_fsq_backward, setup_context=_fsq_setup_context)
forbid_double_backward(_fsq_backward_op, "FSQ kernels", "backend='reference'")


def fsq_fused(z: Tensor, levels: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """The standalone FSQ's default bound (tanh, ``1.001``, atanh shift, round half to even) on
    ``z`` ``(B, N, c, d)``, fused: ``(codes in z's dtype, indices (B, N, c))``. Forward-mode AD and
    ``torch.func`` transforms run :func:`.reference.tanh_bound` (in float32, like the fused path);
    double backward raises."""
    if needs_reference_autodiff(z):
        codes, digits = ref.tanh_bound(z.float(), ref.levels_tensor(levels, z.device), hard_clamp=False)
        return codes.to(z.dtype), ref.pack_digits(digits, levels)
    if not isinstance(z, Tensor) or z.dim() != 4:
        raise ValueError(f"z must be a (B, N, codebooks, C) tensor, got shape {tuple(getattr(z, 'shape', ()))}")
    B, N, c, d = z.shape
    codes, indices = torch.ops.rfsq_kernels.vq_fsq_forward(z.reshape(B, N * c, d), [int(v) for v in levels])
    return codes.reshape(B, N, c, d), indices.reshape(B, N, c)


def _residual_fsq_reference(x: Tensor, levels: Sequence[int], scales: Tensor, clamp_value: Tensor,
                            num_active: Optional[int], mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """:func:`residual_fsq_fused`'s outputs from the reference: ``quantized`` in ``x``'s dtype,
    masked positions (``mask`` False) quantized to 0 with -1 indices, as the kernels write them."""
    quantized, indices = ref.residual_fsq_core(x, levels, scales, clamp_value, num_active)
    quantized = quantized.to(x.dtype)
    if mask is not None:
        quantized = torch.where(mask[..., None], quantized, 0.)
        indices = torch.where(mask[..., None], indices, ref.SENTINEL)
    return quantized, indices
