"""Launchers of the fused kernels: output allocation, tiles, and one launch per direction."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import triton

from ..reference.codebook import index_dtype
from . import config
from .elementwise import _bwd_elementwise_kernel, _fwd_elementwise_kernel
from .layernorm import _bwd_layernorm_kernel, _fwd_layernorm_kernel


def forward_outputs(
    z: torch.Tensor, levels: Sequence[int], stages: int, strategy: str
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialised ``(quantized, indices, mean, std)`` with the reference's shapes and dtypes
    (shared by the launcher and the fake/meta implementation)."""
    B, C = z.shape[0], z.shape[1]
    quantized = config.new_output(z)
    indices = z.new_empty((B, *z.shape[2:], stages), dtype=index_dtype(levels))
    if strategy == "layernorm":
        mean = z.new_empty((B, stages, C), dtype=torch.float32)
        std = z.new_empty((B, stages, C), dtype=torch.float32)
    else:
        mean = z.new_zeros((0,), dtype=torch.float32)
        std = z.new_zeros((0,), dtype=torch.float32)
    return quantized, indices, mean, std


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
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the fused K-stage forward; returns ``(quantized, indices, mean, std)`` like
    :func:`rfsq_kernels.reference.rfsq_forward` (``mask`` ``(B, *spatial)`` bool and
    ``active_stages`` ``(B,)`` int32 included: one launch serves any mix of per-sample counts).

    ``scale`` is ``a = softplus(scale_param)`` (``(K,)``, float32) for ``strategy='scale'``;
    ``ln_weight``/``ln_bias`` are ``(K, C)`` for ``'layernorm'``. Tiles, path and ``num_warps``
    come from :func:`config.layernorm_tiles` / :func:`config.elementwise_tiles`.
    """
    quantized, indices, mean, std = forward_outputs(z, levels, stages, strategy)
    B, C = z.shape[0], z.shape[1]
    S = math.prod(z.shape[2:])
    if B == 0 or S == 0:
        return quantized.zero_(), indices.zero_(), mean.zero_(), std.zero_()
    x, (sxb, sxc, sxs) = config.strided_view(z)
    sqb, sqc, sqs = quantized.stride(0), quantized.stride(1), config.flat_spatial_stride(quantized)
    consts, basis = config.level_tables(levels, z.device)
    use_int64 = config.needs_int64(x, quantized, indices)
    valid, active = config.mask_and_counts(mask, active_stages, B, S, x)
    common = dict(HAS_MASK=mask is not None, HAS_DROPOUT=active_stages is not None,
                  USE_INT64=use_int64, USE_LIBDEVICE=config.use_libdevice(z))
    if strategy == "layernorm":
        tiles = config.layernorm_tiles(C, S, "forward", use_int64)
        _fwd_layernorm_kernel[(B,)](
            x, quantized, indices, mean, std, ln_weight, ln_bias, consts, basis, valid, active,
            C, S, sxb, sxc, sxs, sqb, sqc, sqs, float(eps),
            K=stages, BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s, SINGLE=tiles.single,
            num_warps=tiles.num_warps, **common)
    else:
        tiles = config.elementwise_tiles(C, S, sparse=mask is not None or active_stages is not None)
        n_sblk = triton.cdiv(S, tiles.block_s)
        has_scale = strategy == "scale"
        _fwd_elementwise_kernel[(B * n_sblk,)](
            x, quantized, indices, scale if has_scale else x, consts, basis, valid, active,
            C, S, n_sblk, sxb, sxc, sxs, sqb, sqc, sqs,
            K=stages, HAS_SCALE=has_scale, BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s,
            num_warps=tiles.num_warps, **common)
    return quantized, indices, mean, std


def backward_outputs(
    z: torch.Tensor, stages: int, strategy: str,
    scale: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shapes/dtypes of ``(grad_z, grad_scale, grad_ln_weight, grad_ln_bias)``; unused
    parameter gradients are empty ``(0,)`` tensors. Shared with the fake implementation."""
    def empty() -> torch.Tensor:  # a fresh one per output: custom-op outputs must not alias
        return z.new_zeros((0,), dtype=torch.float32)

    grad_scale = torch.empty_like(scale) if strategy == "scale" else empty()
    if strategy == "layernorm":
        return config.new_output(z), grad_scale, torch.empty_like(ln_weight), torch.empty_like(ln_bias)
    return config.new_output(z), grad_scale, empty(), empty()


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
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(grad_z, grad_scale, grad_ln_weight, grad_ln_bias)`` of ``sum(grad_q * quantized)``.

    ``scale`` is ``a = softplus(scale_param)`` (the gradient returned is d/da; autograd applies
    the softplus derivative); ``mean``/``std`` are the forward's saved LN statistics.
    ``grad_q`` may have any strides (an expanded stride-0 gradient is read in place).
    """
    grad_z, grad_scale, grad_w, grad_b = backward_outputs(z, stages, strategy, scale, ln_weight, ln_bias)
    B, C = z.shape[0], z.shape[1]
    S = math.prod(z.shape[2:])
    if B == 0 or S == 0:
        return grad_z.zero_(), grad_scale.zero_(), grad_w.zero_(), grad_b.zero_()
    x, (sxb, sxc, sxs) = config.strided_view(z)
    g, (sgb, sgc, sgs) = config.strided_view(grad_q)
    sdb, sdc, sds = grad_z.stride(0), grad_z.stride(1), config.flat_spatial_stride(grad_z)
    consts, basis = config.level_tables(levels, z.device)
    use_int64 = config.needs_int64(x, g, grad_z)
    use_libdevice = config.use_libdevice(z)
    valid, active = config.mask_and_counts(mask, active_stages, B, S, x)
    sparse = dict(HAS_MASK=mask is not None, HAS_DROPOUT=active_stages is not None)
    if strategy == "layernorm":
        tiles = config.layernorm_tiles(C, S, "backward", sparse=mask is not None or active_stages is not None)
        scratch = grad_z if tiles.single else torch.empty((B, C, S), dtype=torch.float32, device=z.device)
        use_int64 = use_int64 or config.needs_int64(scratch)
        dw_part = torch.empty((B, stages, C), dtype=torch.float32, device=z.device)
        db_part = torch.empty((B, stages, C), dtype=torch.float32, device=z.device)
        _bwd_layernorm_kernel[(B,)](
            x, g, grad_z, scratch, mean, std, ln_weight, ln_bias, dw_part, db_part, consts, basis, valid, active,
            C, S, sxb, sxc, sxs, sgb, sgc, sgs, sdb, sdc, sds, C * S,
            K=stages, BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s, SINGLE=tiles.single,
            USE_INT64=use_int64, USE_LIBDEVICE=use_libdevice, num_warps=tiles.num_warps, **sparse)
        grad_w.copy_(dw_part.sum(0))
        grad_b.copy_(db_part.sum(0))
    else:
        tiles = config.elementwise_tiles(C, S, sparse=mask is not None or active_stages is not None)
        n_sblk = triton.cdiv(S, tiles.block_s)
        has_scale = strategy == "scale"
        part = torch.empty((B * n_sblk, stages) if has_scale else (1,), dtype=torch.float32, device=z.device)
        _bwd_elementwise_kernel[(B * n_sblk,)](
            x, g, grad_z, scale if has_scale else x, part, consts, basis, valid, active,
            C, S, n_sblk, sxb, sxc, sxs, sgb, sgc, sgs, sdb, sdc, sds,
            K=stages, HAS_SCALE=has_scale, BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s,
            USE_INT64=use_int64, USE_LIBDEVICE=use_libdevice, num_warps=tiles.num_warps, **sparse)
        if has_scale:
            grad_scale.copy_(part.sum(0))
    return grad_z, grad_scale, grad_w, grad_b
