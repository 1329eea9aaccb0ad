"""Backward kernels: exact gradient of the reference graph, recomputing the forward chain.

Nothing per-stage is saved by the forward: the residual ``r_k`` is recomputed from the input
(and, for layernorm, the saved per-(b, k, c) mean/std) while the stages are walked backwards.
With ``v_k = dL/dq_k = g - G_{k+1}`` (``g = dL/dquantized``, ``G_k = dL/dr_k``, ``G_K = 0``),
``G_k = G_{k+1} + J_k^T v_k`` where ``J_k = dq_k/dr_k``. Parameter gradients are written as
per-program partial sums and reduced on the host in a fixed order (no float atomics), so two
backward passes on the same input are bitwise identical.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import config
from .stages import (elem_replay, elem_stage, fsq_dcode, ln_params, ln_replay, ln_stage, ln_stats, load_active,
                     load_levels, load_tile, load_valid, masked_row_sum, stage_keep, store_tile, widen)


@triton.jit
def _stage_mask(mask, n_act, k, HAS_DROPOUT: tl.constexpr):
    """Tile positions whose ``q_k`` exists (``mask``: the tile's channels x valid positions)."""
    return stage_keep(mask, n_act, k, HAS_DROPOUT)


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
        v = tl.where(_stage_mask(mask, n_act, k, HAS_DROPOUT), g - G, 0.0)
        if HAS_SCALE:
            part = tl.sum(masked_row_sum(v * (J * r - q), mask), axis=0) / a
            tl.store(dscale_part_ptr + pid * K + k, part)
        G = G + v * J
    store_tile(dx_ptr, G, b, offs_c, offs_s, sdb, sdc, sds, inside)


@triton.jit
def _ln_bwd_tile(x, g_minus_G, mask, k, mean_ptr, std_ptr, w_ptr, b_ptr, stat_base, offs_c, mask_c, C,
                 hl, off, sh, hw, n_act, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                 USE_LIBDEVICE: tl.constexpr):
    """Per-position quantities of layernorm stage ``k`` (runtime index) for one tile.

    ``g_minus_G = g - G_{k+1}``. Returns ``(v, h, xhat, cn)`` with ``v = dL/dq_k`` (masked),
    ``h = dL/dn`` through the code (``v * sd / w * dcode/dn``), ``xhat = (r - mu) / sd`` and ``cn = (code - b) / w``.
    """
    r = ln_replay(x, mean_ptr, std_ptr, w_ptr, b_ptr, stat_base, offs_c, mask_c, C,
                  hl, off, sh, hw, k, mask, n_act, HAS_MASK, HAS_DROPOUT, USE_LIBDEVICE)
    mu, sd = ln_stats(mean_ptr, std_ptr, stat_base, k, offs_c, mask_c, C)
    w, bb = ln_params(w_ptr, b_ptr, k, offs_c, mask_c, C)
    _q, code, t, _rnd = ln_stage(r, mu, sd, w, bb, hl, off, sh, hw, USE_LIBDEVICE)
    v = tl.where(_stage_mask(mask, n_act, k, HAS_DROPOUT), g_minus_G, 0.0)
    h = v * (sd / w) * fsq_dcode(t, hl, hw)
    return v, h, (r - mu) / sd, (code - bb) / w


@triton.jit
def _ln_bwd_coeffs(sum_v, sum_h, sum_vc, sum_hx, k, w_ptr, std_ptr, dw_part_ptr,
                   db_part_ptr, stat_base, offs_c, mask_c, C):
    """Turn the four per-channel sums of stage ``k`` into parameter-gradient partials (stored)
    and the coefficients ``(w/sd, dL/dmu, dL/dsd)`` of ``dL/dr``, as ``[BLOCK_C, 1]`` columns.

    ``q = ((code - b) / w) * sd + mu`` with ``n = w * xhat + b``:
    ``dL/dw = sum h*xhat - sd/w * sum v*cn``, ``dL/db = sum h - sd/w * sum v``,
    ``dL/dmu = sum v - w/sd * sum h``, ``dL/dsd = sum v*cn - w/sd * sum h*xhat``.
    """
    sd = tl.load(std_ptr + stat_base + k * C + offs_c, mask=mask_c, other=1.0)
    w = tl.load(w_ptr + k * C + offs_c, mask=mask_c, other=1.0).to(tl.float32)
    tl.store(dw_part_ptr + stat_base + k * C + offs_c, sum_hx - (sd / w) * sum_vc, mask=mask_c)
    tl.store(db_part_ptr + stat_base + k * C + offs_c, sum_h - (sd / w) * sum_v, mask=mask_c)
    w_sd = w / sd
    return w_sd[:, None], (sum_v - w_sd * sum_h)[:, None], (sum_vc - w_sd * sum_hx)[:, None]


@triton.jit
def _ln_dr(h, xhat, w_sd, dmu, dsd, n, mask, HAS_MASK: tl.constexpr):
    """``dL/dr_k`` through stage k: direct path plus the mean and std paths (``n`` positions enter
    the statistics; with ``HAS_MASK`` only the valid ones, ``mask``, get the statistics' share)."""
    dr = h * w_sd + (dmu + dsd * xhat) / n
    if HAS_MASK:
        dr = tl.where(mask, dr, 0.0)
    return dr


@triton.jit
def _valid_count(valid_ptr, b, S, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr, USE_INT64: tl.constexpr):
    """Positions entering image ``b``'s statistics: S, or its valid ones (at least 1)."""
    if HAS_MASK:
        count = 0.0
        for s0 in range(0, S, BLOCK_S):
            offs_s = widen(s0 + tl.arange(0, BLOCK_S), USE_INT64)
            valid = load_valid(valid_ptr, b, offs_s, offs_s < S, S, HAS_MASK)
            count += tl.sum(valid.to(tl.float32), axis=0)
        return tl.maximum(count, 1.0)
    else:
        return S


@triton.jit
def _ln_bwd_chunk(s0, k, b, x_ptr, g_ptr, scratch_ptr, mean_ptr, std_ptr, w_ptr, b_ptr, stat_base,
                  offs_c, mask_c, C, S, sxb, sxc, sxs, sgb, sgc, sgs, ssb, hl, off, sh, hw, valid_ptr, n_act,
                  K, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr,
                  HAS_DROPOUT: tl.constexpr, USE_INT64: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """One chunk of the chunked layernorm backward: load x, g and ``G_{k+1}`` (scratch) for
    positions ``s0 .. s0+BLOCK_S`` and replay stage k on them (shared by both passes; ``k`` is
    the runtime stage index). ``mask``: the tile's valid positions; ``inside``: its in-range ones."""
    offs_s = widen(s0 + tl.arange(0, BLOCK_S), USE_INT64)
    mask_s = offs_s < S
    inside = mask_c[:, None] & mask_s[None, :]
    valid = load_valid(valid_ptr, b, offs_s, mask_s, S, HAS_MASK)
    mask = mask_c[:, None] & valid[None, :]
    x = load_tile(x_ptr, b, offs_c, offs_s, sxb, sxc, sxs, mask)
    g = load_tile(g_ptr, b, offs_c, offs_s, sgb, sgc, sgs, mask)
    G = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    if k < K - 1:
        G = load_tile(scratch_ptr, b, offs_c, offs_s, ssb, S, 1, mask)
    v, h, xhat, cn = _ln_bwd_tile(x, g - G, mask, k, mean_ptr, std_ptr, w_ptr, b_ptr,
                                  stat_base, offs_c, mask_c, C, hl, off, sh, hw, n_act,
                                  HAS_MASK, HAS_DROPOUT, USE_LIBDEVICE)
    return offs_s, mask, inside, G, v, h, xhat, cn


@triton.jit(do_not_specialize=["C", "K"])
def _bwd_layernorm_kernel(
    x_ptr, g_ptr, dx_ptr, scratch_ptr, mean_ptr, std_ptr, w_ptr, b_ptr, dw_part_ptr, db_part_ptr,
    consts_ptr, basis_ptr, valid_ptr, active_ptr,
    C, S, sxb, sxc, sxs, sgb, sgc, sgs, sdb, sdc, sds, ssb,
    K, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, SINGLE: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_INT64: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
):
    """``layernorm``: one program per image; J_k couples the positions of each (b, c) through
    the mean and std, like a LayerNorm backward over the spatial axis.

    ``SINGLE``: one tile holds the image; ``g - G`` stays in registers across the stages.
    Otherwise two chunked passes per stage (sums, then ``G_k``); ``G_{k+1}`` lives in a float32
    scratch buffer ``(B, C, S)`` between stages. Stages and replay are runtime loops (see the
    forward kernel).
    """
    b = widen(tl.program_id(0), USE_INT64)
    offs_c = widen(tl.arange(0, BLOCK_C), USE_INT64)
    mask_c = offs_c < C
    hl, off, sh, hw, _top, _basis = load_levels(consts_ptr, basis_ptr, offs_c, mask_c, C)
    n_act = load_active(active_ptr, b, K, HAS_DROPOUT)
    n = _valid_count(valid_ptr, b, S, BLOCK_S, HAS_MASK, USE_INT64)
    stat_base = b * K * C
    if SINGLE:
        offs_s = widen(tl.arange(0, BLOCK_S), USE_INT64)
        mask = mask_c[:, None] & load_valid(valid_ptr, b, offs_s, offs_s < S, S, HAS_MASK)[None, :]
        # Registers hold V = g - G_{k+1} (instead of g and G) and the stage being worked on; the
        # input is re-read (from L1/L2: one image) for each stage's replay and g once more at
        # the end (dx = g - V). Keeping x and g live too spilled on sm_80 (64 registers/thread
        # at 32 warps).
        V = load_tile(g_ptr, b, offs_c, offs_s, sgb, sgc, sgs, mask)
        for k_rev in range(K):
            k = K - 1 - k_rev
            x = load_tile(x_ptr, b, offs_c, offs_s, sxb, sxc, sxs, mask)
            v, h, xhat, cn = _ln_bwd_tile(x, V, mask, k, mean_ptr, std_ptr, w_ptr, b_ptr, stat_base,
                                          offs_c, mask_c, C, hl, off, sh, hw, n_act,
                                          HAS_MASK, HAS_DROPOUT, USE_LIBDEVICE)
            sum_v, sum_h = tl.sum(v, axis=1), tl.sum(h, axis=1)
            sum_vc, sum_hx = tl.sum(v * cn, axis=1), masked_row_sum(h * xhat, mask)
            # The direct path of dL/dr needs no reduction: apply it now, so that only x, V and
            # xhat stay live across the reductions' barriers.
            w, _bb = ln_params(w_ptr, b_ptr, k, offs_c, mask_c, C)
            _mu, sd = ln_stats(mean_ptr, std_ptr, stat_base, k, offs_c, mask_c, C)
            V = V - h * (w / sd)
            _w_sd, dmu, dsd = _ln_bwd_coeffs(sum_v, sum_h, sum_vc, sum_hx, k, w_ptr, std_ptr,
                                             dw_part_ptr, db_part_ptr, stat_base, offs_c, mask_c, C)
            # (Padding picks up the statistics' share here too, but V there never reaches a valid
            # position -- v is masked -- and dx is zeroed there at the store.)
            V = V - (dmu + dsd * xhat) / n
        g = load_tile(g_ptr, b, offs_c, offs_s, sgb, sgc, sgs, mask)
        dx = g - V
        if HAS_MASK:
            dx = tl.where(mask, dx, 0.0)
        store_tile(dx_ptr, dx, b, offs_c, offs_s, sdb, sdc, sds, mask_c[:, None] & (offs_s < S)[None, :])
    else:
        # scratch is a contiguous float32 (B, C, S) buffer (image stride ssb = C * S).
        for k_rev in range(K):
            k = K - 1 - k_rev
            sum_v = tl.zeros([BLOCK_C], dtype=tl.float32)
            sum_h = tl.zeros([BLOCK_C], dtype=tl.float32)
            sum_vc = tl.zeros([BLOCK_C], dtype=tl.float32)
            sum_hx = tl.zeros([BLOCK_C], dtype=tl.float32)
            for s0 in range(0, S, BLOCK_S):
                offs_s, mask, inside, G, v, h, xhat, cn = _ln_bwd_chunk(
                    s0, k, b, x_ptr, g_ptr, scratch_ptr, mean_ptr, std_ptr, w_ptr, b_ptr, stat_base,
                    offs_c, mask_c, C, S, sxb, sxc, sxs, sgb, sgc, sgs, ssb, hl, off, sh, hw, valid_ptr, n_act,
                    K, BLOCK_C, BLOCK_S, HAS_MASK, HAS_DROPOUT, USE_INT64, USE_LIBDEVICE)
                sum_v += tl.sum(v, axis=1)
                sum_h += tl.sum(h, axis=1)
                sum_vc += tl.sum(v * cn, axis=1)
                sum_hx += masked_row_sum(h * xhat, mask)
            w_sd, dmu, dsd = _ln_bwd_coeffs(sum_v, sum_h, sum_vc, sum_hx, k, w_ptr,
                                            std_ptr, dw_part_ptr, db_part_ptr, stat_base, offs_c, mask_c, C)
            for s0 in range(0, S, BLOCK_S):
                offs_s, mask, inside, G, v, h, xhat, cn = _ln_bwd_chunk(
                    s0, k, b, x_ptr, g_ptr, scratch_ptr, mean_ptr, std_ptr, w_ptr, b_ptr, stat_base,
                    offs_c, mask_c, C, S, sxb, sxc, sxs, sgb, sgc, sgs, ssb, hl, off, sh, hw, valid_ptr, n_act,
                    K, BLOCK_C, BLOCK_S, HAS_MASK, HAS_DROPOUT, USE_INT64, USE_LIBDEVICE)
                G = G + _ln_dr(h, xhat, w_sd, dmu, dsd, n, mask, HAS_MASK)
                if k == 0:
                    store_tile(dx_ptr, G, b, offs_c, offs_s, sdb, sdc, sds, inside)
                else:
                    store_tile(scratch_ptr, G, b, offs_c, offs_s, ssb, S, 1, inside)
            # The next stage reads G_k back, possibly from other threads of the program.
            tl.debug_barrier()


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
