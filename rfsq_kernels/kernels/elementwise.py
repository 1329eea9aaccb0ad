"""Kernels of the elementwise strategies (``none``, and ``scale`` with ``HAS_SCALE``): forward,
backward, launchers and output allocation. Positions are independent, so one program owns one
(image, spatial tile). The launchers are called through :mod:`.launch`, which answers problems
without positions itself. Design: ``docs/kernel-design.md``."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import config
from .stages import (fsq_code, fsq_dcode, keep_only, load_active, load_digit_range, load_levels, load_tile,
                     masked_row_sum, spatial_lanes, stage_keep, store_index, store_tile, widen)


@triton.jit
def stage_scale(scale_ptr, k, HAS_SCALE: tl.constexpr):
    """``a_k`` as float32 (``scale_ptr``: ``(K,)``), or 1.0 without ``HAS_SCALE``."""
    if HAS_SCALE:
        return tl.load(scale_ptr + k).to(tl.float32)
    else:
        return 1.0


@triton.jit
def elem_stage(r, a, fsq, HAS_SCALE: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """One ``none``/``scale`` stage: ``q = FSQ(a * r) / a`` (``q = FSQ(r)`` without scale).

    Returns ``(q, t, rounded)``.
    """
    if HAS_SCALE:
        code, t, rounded = fsq_code(a * r, fsq, USE_LIBDEVICE)
        return code / a, t, rounded
    else:
        code, t, rounded = fsq_code(r, fsq, USE_LIBDEVICE)
        return code, t, rounded


@triton.jit
def elem_replay(x, scale_ptr, fsq, valid, n_act, NSTAGES: tl.constexpr, HAS_SCALE: tl.constexpr,
                HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """Residual ``r_NSTAGES`` recomputed from the input tile ``x`` (unrolled; positions and
    stages the forward skipped subtract nothing)."""
    r = x
    for j in tl.static_range(NSTAGES):
        a = stage_scale(scale_ptr, j, HAS_SCALE)
        q, _t, _rounded = elem_stage(r, a, fsq, HAS_SCALE, USE_LIBDEVICE)
        r = r - keep_only(q, valid, n_act, j, HAS_MASK, HAS_DROPOUT)
    return r


@triton.jit(do_not_specialize=["C", "tiles_per_image", "K"])
def _fwd_elementwise_kernel(
    x_ptr, q_ptr, idx_ptr, scale_ptr, consts_ptr, basis_ptr, valid_ptr, active_ptr,
    C, S, tiles_per_image, stride_xb, stride_xc, stride_xs, stride_qb, stride_qc, stride_qs, K,
    HAS_SCALE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_INT64: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
):
    """``none``/``scale`` forward: one program per (image, spatial tile), all K stages in
    registers (a runtime stage loop: the residual is carried, nothing is replayed).

    stride_<tensor><dim>: x = input, q = quantized; dims b = image, c = channel, s = flattened
    spatial. ``scale_ptr`` / ``valid_ptr`` / ``active_ptr`` are None unless HAS_SCALE / HAS_MASK /
    HAS_DROPOUT.
    """
    pid = tl.program_id(0)
    img = widen(pid // tiles_per_image, USE_INT64)
    # Where this image starts in each tensor, computed once (docs/kernel-design.md, "Arguments").
    valid_row = (valid_ptr, img * S)
    x_view = (x_ptr, img * stride_xb, stride_xc, stride_xs)
    q_view = (q_ptr, img * stride_qb, stride_qc, stride_qs)
    offs_s, mask_s, valid = spatial_lanes((pid % tiles_per_image) * BLOCK_S, valid_row, S, BLOCK_S,
                                          HAS_MASK, USE_INT64)
    offs_c = widen(tl.arange(0, BLOCK_C), USE_INT64)
    mask_c = offs_c < C
    n_act = load_active(active_ptr, img, K, HAS_DROPOUT)
    fsq = load_levels(consts_ptr, offs_c, mask_c, C)
    digits = load_digit_range(consts_ptr, basis_ptr, offs_c, mask_c, C)
    r = load_tile(x_view, offs_c, offs_s, mask_c[:, None] & valid[None, :])
    acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    index_rows = (idx_ptr, (img * S + offs_s) * K, mask_s)  # see store_index
    for k in range(K):
        a = stage_scale(scale_ptr, k, HAS_SCALE)
        q, _t, rounded = elem_stage(r, a, fsq, HAS_SCALE, USE_LIBDEVICE)
        store_index(index_rows, k, rounded, fsq, digits, valid, n_act, HAS_MASK, HAS_DROPOUT)
        q = keep_only(q, valid[None, :], n_act, k, HAS_MASK, HAS_DROPOUT)
        acc = acc + q
        r = r - q
    store_tile(q_view, acc, offs_c, offs_s, mask_c[:, None] & mask_s[None, :])


@triton.jit(do_not_specialize=["C", "tiles_per_image"])
def _bwd_elementwise_kernel(
    x_ptr, g_ptr, dx_ptr, scale_ptr, dscale_part_ptr, consts_ptr, valid_ptr, active_ptr,
    C, S, tiles_per_image, stride_xb, stride_xc, stride_xs, stride_gb, stride_gc, stride_gs,
    stride_dxb, stride_dxc, stride_dxs,
    K: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_INT64: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
):
    """``none``/``scale`` backward: J_k is diagonal, so every position is independent.

    ``dq/dr = dcode/du`` (the scale cancels) and, for ``scale``,
    ``dL/da_k = sum v_k * (dcode/du * r_k - q_k) / a_k`` (one partial per program and stage in
    ``dscale_part_ptr``, ``(programs, K)``). The residual is replayed from the input for every
    stage; the stages are unrolled, so the compiler shares the O(K^2) replay.

    stride_<tensor><dim>: x = input, g = grad of quantized, dx = grad of input; dims b = image,
    c = channel, s = flattened spatial. ``scale_ptr``, ``dscale_part_ptr`` / ``valid_ptr`` /
    ``active_ptr`` are None unless HAS_SCALE / HAS_MASK / HAS_DROPOUT.
    """
    pid = tl.program_id(0)
    img = widen(pid // tiles_per_image, USE_INT64)
    # Where this image starts in each tensor, computed once (docs/kernel-design.md, "Arguments").
    valid_row = (valid_ptr, img * S)
    x_view = (x_ptr, img * stride_xb, stride_xc, stride_xs)
    g_view = (g_ptr, img * stride_gb, stride_gc, stride_gs)
    dx_view = (dx_ptr, img * stride_dxb, stride_dxc, stride_dxs)
    offs_s, mask_s, valid = spatial_lanes((pid % tiles_per_image) * BLOCK_S, valid_row, S, BLOCK_S,
                                          HAS_MASK, USE_INT64)
    offs_c = widen(tl.arange(0, BLOCK_C), USE_INT64)
    mask_c = offs_c < C
    inside = mask_c[:, None] & mask_s[None, :]
    n_act = load_active(active_ptr, img, K, HAS_DROPOUT)
    mask = mask_c[:, None] & valid[None, :]
    fsq = load_levels(consts_ptr, offs_c, mask_c, C)
    x = load_tile(x_view, offs_c, offs_s, mask)
    g = load_tile(g_view, offs_c, offs_s, mask)
    G = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    for k in tl.static_range(K - 1, -1, -1):
        r = elem_replay(x, scale_ptr, fsq, mask, n_act, k, HAS_SCALE, HAS_MASK, HAS_DROPOUT, USE_LIBDEVICE)
        a = stage_scale(scale_ptr, k, HAS_SCALE)
        q, t, _rounded = elem_stage(r, a, fsq, HAS_SCALE, USE_LIBDEVICE)
        J = fsq_dcode(t, fsq)
        v = tl.where(stage_keep(mask, n_act, k, HAS_DROPOUT), g - G, 0.0)
        if HAS_SCALE:
            part = tl.sum(masked_row_sum(v * (J * r - q), mask), axis=0) / a
            tl.store(dscale_part_ptr + pid * K + k, part)
        G = G + v * J
    store_tile(dx_view, G, offs_c, offs_s, inside)


def forward_outputs(z: torch.Tensor, levels: Sequence[int], stages: int) -> Tuple[torch.Tensor, ...]:
    """Uninitialised ``(quantized, indices, mean, std)``; no statistics (empty mean/std)."""
    quantized, indices = config.quantized_and_indices(z, levels, stages)
    return quantized, indices, config.empty_output(z), config.empty_output(z)


def forward(z: torch.Tensor, levels: Sequence[int], stages: int, strategy: str, params: Tuple[torch.Tensor, ...],
            eps: float, mask: Optional[torch.Tensor], active_stages: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """Fused elementwise forward of ``strategy`` (parameter group ``params``, kernel form):
    ``(quantized, indices, mean, std)``; ``eps`` is unused (no statistics)."""
    scale = params[0] if params else None
    quantized, indices, mean, std = forward_outputs(z, levels, stages)
    B, C, S = z.shape[0], z.shape[1], math.prod(z.shape[2:])
    x, x_strides = config.strided_view(z)
    consts, basis = config.level_tables(levels, z.device)
    valid, active = config.mask_and_counts(mask, active_stages, B, S)
    tiles = config.elementwise_tiles(C, S, sparse=mask is not None or active_stages is not None)
    tiles_per_image = triton.cdiv(S, tiles.block_s)
    _fwd_elementwise_kernel[(B * tiles_per_image,)](
        x, quantized, indices, scale, consts, basis, valid, active,
        C, S, tiles_per_image, *x_strides, *config.flat_strides(quantized),
        K=stages, HAS_SCALE=scale is not None, BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s,
        HAS_MASK=mask is not None, HAS_DROPOUT=active_stages is not None,
        USE_INT64=config.needs_int64(x, quantized, indices), USE_LIBDEVICE=config.use_libdevice(z),
        num_warps=tiles.num_warps, enable_fp_fusion=config.FP_FUSION)
    return quantized, indices, mean, std


def backward(grad_q: torch.Tensor, z: torch.Tensor, levels: Sequence[int], stages: int, strategy: str,
             params: Tuple[torch.Tensor, ...], mean: Optional[torch.Tensor], std: Optional[torch.Tensor],
             mask: Optional[torch.Tensor], active_stages: Optional[torch.Tensor]):
    """Fused elementwise backward: ``(grad_z, grad_params)`` (``mean``/``std`` unused)."""
    scale = params[0] if params else None
    grad_z = config.new_output(z)
    B, C, S = z.shape[0], z.shape[1], math.prod(z.shape[2:])
    x, x_strides = config.strided_view(z)
    g, g_strides = config.strided_view(grad_q)
    consts, _basis = config.level_tables(levels, z.device)
    valid, active = config.mask_and_counts(mask, active_stages, B, S)
    tiles = config.elementwise_tiles(C, S, sparse=mask is not None or active_stages is not None)
    tiles_per_image = triton.cdiv(S, tiles.block_s)
    # dL/da_k as one partial sum per (program, stage), reduced below in a fixed order.
    part = None if scale is None else torch.empty((B * tiles_per_image, stages), dtype=torch.float32, device=z.device)
    _bwd_elementwise_kernel[(B * tiles_per_image,)](
        x, g, grad_z, scale, part, consts, valid, active,
        C, S, tiles_per_image, *x_strides, *g_strides, *config.flat_strides(grad_z),
        K=stages, HAS_SCALE=scale is not None, BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s,
        HAS_MASK=mask is not None, HAS_DROPOUT=active_stages is not None,
        USE_INT64=config.needs_int64(x, g, grad_z), USE_LIBDEVICE=config.use_libdevice(z),
        num_warps=tiles.num_warps, enable_fp_fusion=config.FP_FUSION)
    grad_params = () if part is None else (part.sum(0).to(scale.dtype),)
    return grad_z, grad_params
