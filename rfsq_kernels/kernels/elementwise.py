"""Kernels of the elementwise strategies (``none``/``scale``): positions are independent."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import config
from .stages import (fsq_code, fsq_dcode, keep_only, load_active, load_levels, load_tile, load_valid,
                     masked_row_sum, stage_mask, store_index, store_tile, widen)


@triton.jit
def elem_stage(r, a, hl, off, sh, hw, HAS_SCALE: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """One ``none``/``scale`` stage: ``q = FSQ(a * r) / a`` (``q = FSQ(r)`` without scale).

    Returns ``(q, t, rounded)``.
    """
    if HAS_SCALE:
        code, t, rounded = fsq_code(a * r, hl, off, sh, hw, USE_LIBDEVICE)
        return code / a, t, rounded
    else:
        code, t, rounded = fsq_code(r, hl, off, sh, hw, USE_LIBDEVICE)
        return code, t, rounded


@triton.jit
def elem_replay(x, scale_ptr, hl, off, sh, hw, valid, n_act, NSTAGES: tl.constexpr, HAS_SCALE: tl.constexpr,
                HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """Residual ``r_NSTAGES`` of an elementwise strategy, recomputed from the input tile ``x``
    (positions/stages the forward skipped subtract nothing)."""
    r = x
    for j in tl.static_range(NSTAGES):
        a = 1.0
        if HAS_SCALE:
            a = tl.load(scale_ptr + j).to(tl.float32)
        q, _t, _rnd = elem_stage(r, a, hl, off, sh, hw, HAS_SCALE, USE_LIBDEVICE)
        r = r - keep_only(q, valid, n_act, j, HAS_MASK, HAS_DROPOUT)
    return r


@triton.jit(do_not_specialize=["C", "n_sblk", "K"])
def _fwd_elementwise_kernel(
    x_ptr, q_ptr, idx_ptr, scale_ptr, consts_ptr, basis_ptr, valid_ptr, active_ptr,
    C, S, n_sblk, sxb, sxc, sxs, sqb, sqc, sqs, K,
    HAS_SCALE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_INT64: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
):
    """``none``/``scale``: one program per (image, spatial tile), all K stages in registers.

    The stages are a runtime loop (the residual is carried, nothing is replayed), so one binary
    serves every K.
    """
    pid = tl.program_id(0)
    b = widen(pid // n_sblk, USE_INT64)
    offs_s = widen((pid % n_sblk) * BLOCK_S + tl.arange(0, BLOCK_S), USE_INT64)
    offs_c = widen(tl.arange(0, BLOCK_C), USE_INT64)
    mask_c = offs_c < C
    mask_s = offs_s < S
    mask = mask_c[:, None] & mask_s[None, :]
    valid = load_valid(valid_ptr, b, offs_s, mask_s, S, HAS_MASK)
    n_act = load_active(active_ptr, b, K, HAS_DROPOUT)
    hl, off, sh, hw, top, basis = load_levels(consts_ptr, basis_ptr, offs_c, mask_c, C)
    r = load_tile(x_ptr, b, offs_c, offs_s, sxb, sxc, sxs, mask_c[:, None] & valid[None, :])
    acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    idx_row = (b * S + offs_s) * K
    for k in range(K):
        a = 1.0
        if HAS_SCALE:
            a = tl.load(scale_ptr + k).to(tl.float32)
        q, _t, rounded = elem_stage(r, a, hl, off, sh, hw, HAS_SCALE, USE_LIBDEVICE)
        store_index(idx_ptr, idx_row, k, rounded, hw, top, basis, mask_s, valid, n_act, HAS_MASK, HAS_DROPOUT)
        q = keep_only(q, valid[None, :], n_act, k, HAS_MASK, HAS_DROPOUT)
        acc = acc + q
        r = r - q
    store_tile(q_ptr, acc, b, offs_c, offs_s, sqb, sqc, sqs, mask)


@triton.jit(do_not_specialize=["C", "n_sblk"])
def _bwd_elementwise_kernel(
    x_ptr, g_ptr, dx_ptr, scale_ptr, dscale_part_ptr, consts_ptr, basis_ptr, valid_ptr, active_ptr,
    C, S, n_sblk, sxb, sxc, sxs, sgb, sgc, sgs, sdb, sdc, sds,
    K: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_INT64: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
):
    """``none``/``scale``: J_k is diagonal, so every position is independent.

    ``dq/dr = dcode/du`` (the scale cancels) and, for ``scale``,
    ``dL/da_k = sum v_k * (dcode/du * r_k - q_k) / a_k`` (one partial per program and stage).
    The residual is replayed from the input for every stage: O(K^2) cheap math, no extra memory.
    """
    pid = tl.program_id(0)
    b = widen(pid // n_sblk, USE_INT64)
    offs_s = widen((pid % n_sblk) * BLOCK_S + tl.arange(0, BLOCK_S), USE_INT64)
    offs_c = widen(tl.arange(0, BLOCK_C), USE_INT64)
    mask_c = offs_c < C
    mask_s = offs_s < S
    inside = mask_c[:, None] & mask_s[None, :]
    valid = load_valid(valid_ptr, b, offs_s, mask_s, S, HAS_MASK)
    n_act = load_active(active_ptr, b, K, HAS_DROPOUT)
    mask = mask_c[:, None] & valid[None, :]
    hl, off, sh, hw, _top, _basis = load_levels(consts_ptr, basis_ptr, offs_c, mask_c, C)
    x = load_tile(x_ptr, b, offs_c, offs_s, sxb, sxc, sxs, mask)
    g = load_tile(g_ptr, b, offs_c, offs_s, sgb, sgc, sgs, mask)
    G = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    for k in tl.static_range(K - 1, -1, -1):
        r = elem_replay(x, scale_ptr, hl, off, sh, hw, mask, n_act, k, HAS_SCALE, HAS_MASK, HAS_DROPOUT,
                        USE_LIBDEVICE)
        a = 1.0
        if HAS_SCALE:
            a = tl.load(scale_ptr + k).to(tl.float32)
        q, t, _rnd = elem_stage(r, a, hl, off, sh, hw, HAS_SCALE, USE_LIBDEVICE)
        J = fsq_dcode(t, hl, hw)
        v = tl.where(stage_mask(mask, n_act, k, HAS_DROPOUT), g - G, 0.0)
        if HAS_SCALE:
            part = tl.sum(masked_row_sum(v * (J * r - q), mask), axis=0) / a
            tl.store(dscale_part_ptr + pid * K + k, part)
        G = G + v * J
    store_tile(dx_ptr, G, b, offs_c, offs_s, sdb, sdc, sds, inside)


def forward_outputs(z: torch.Tensor, levels: Sequence[int], stages: int) -> Tuple[torch.Tensor, ...]:
    """Uninitialised ``(quantized, indices, mean, std)``; no statistics (empty mean/std)."""
    quantized, indices = config.quantized_and_indices(z, levels, stages)
    return quantized, indices, config.empty_output(z), config.empty_output(z)


def forward(z: torch.Tensor, levels: Sequence[int], stages: int, scale: Optional[torch.Tensor],
            mask: Optional[torch.Tensor], active_stages: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """Fused ``none`` (``scale is None``) or ``scale`` forward: ``(quantized, indices, mean, std)``."""
    quantized, indices, mean, std = forward_outputs(z, levels, stages)
    B, C, S = z.shape[0], z.shape[1], math.prod(z.shape[2:])
    if B == 0 or S == 0:
        return quantized.zero_(), indices.zero_(), mean.zero_(), std.zero_()
    x, x_strides = config.strided_view(z)
    consts, basis = config.level_tables(levels, z.device)
    valid, active = config.mask_and_counts(mask, active_stages, B, S)
    tiles = config.elementwise_tiles(C, S, sparse=mask is not None or active_stages is not None)
    n_sblk = triton.cdiv(S, tiles.block_s)
    _fwd_elementwise_kernel[(B * n_sblk,)](
        x, quantized, indices, scale, consts, basis, valid, active,
        C, S, n_sblk, *x_strides, *config.flat_strides(quantized),
        K=stages, HAS_SCALE=scale is not None, BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s,
        HAS_MASK=mask is not None, HAS_DROPOUT=active_stages is not None,
        USE_INT64=config.needs_int64(x, quantized, indices), USE_LIBDEVICE=config.use_libdevice(z),
        num_warps=tiles.num_warps)
    return quantized, indices, mean, std


def backward_outputs(z: torch.Tensor, scale: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """Uninitialised ``(grad_z, grad_scale, grad_ln_weight, grad_ln_bias)``; absent gradients empty."""
    grad_scale = config.empty_output(z) if scale is None else torch.empty_like(scale)
    return config.new_output(z), grad_scale, config.empty_output(z), config.empty_output(z)


def backward(grad_q: torch.Tensor, z: torch.Tensor, levels: Sequence[int], stages: int,
             scale: Optional[torch.Tensor], mask: Optional[torch.Tensor],
             active_stages: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """Fused ``none``/``scale`` backward: ``(grad_z, grad_scale, grad_ln_weight, grad_ln_bias)``."""
    grad_z, grad_scale, grad_w, grad_b = backward_outputs(z, scale)
    B, C, S = z.shape[0], z.shape[1], math.prod(z.shape[2:])
    if B == 0 or S == 0:
        return grad_z.zero_(), grad_scale.zero_(), grad_w.zero_(), grad_b.zero_()
    x, x_strides = config.strided_view(z)
    g, g_strides = config.strided_view(grad_q)
    consts, basis = config.level_tables(levels, z.device)
    valid, active = config.mask_and_counts(mask, active_stages, B, S)
    tiles = config.elementwise_tiles(C, S, sparse=mask is not None or active_stages is not None)
    n_sblk = triton.cdiv(S, tiles.block_s)
    # dL/da_k as one partial sum per (program, stage), reduced below in a fixed order.
    part = None if scale is None else torch.empty((B * n_sblk, stages), dtype=torch.float32, device=z.device)
    _bwd_elementwise_kernel[(B * n_sblk,)](
        x, g, grad_z, scale, part, consts, basis, valid, active,
        C, S, n_sblk, *x_strides, *g_strides, *config.flat_strides(grad_z),
        K=stages, HAS_SCALE=scale is not None, BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s,
        HAS_MASK=mask is not None, HAS_DROPOUT=active_stages is not None,
        USE_INT64=config.needs_int64(x, g, grad_z), USE_LIBDEVICE=config.use_libdevice(z),
        num_warps=tiles.num_warps)
    if part is not None:
        grad_scale.copy_(part.sum(0))
    return grad_z, grad_scale, grad_w, grad_b
