"""Kernels of the ``layernorm`` strategy: one program per image (per-image statistics)."""
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
def ln_params(w_ptr, b_ptr, k, offs_c, mask_c, C):
    """Row ``k`` of the ``(K, C)`` LN weight and bias as float32 ``[BLOCK_C, 1]`` columns."""
    w = tl.load(w_ptr + k * C + offs_c, mask=mask_c, other=1.0).to(tl.float32)[:, None]
    bb = tl.load(b_ptr + k * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)[:, None]
    return w, bb


@triton.jit
def ln_stats(mean_ptr, std_ptr, stat_base, k, offs_c, mask_c, C):
    """Saved ``(mu, sd)`` of stage ``k`` (``(B, K, C)`` buffers, ``stat_base = b * K * C``)."""
    mu = tl.load(mean_ptr + stat_base + k * C + offs_c, mask=mask_c, other=0.0)[:, None]
    sd = tl.load(std_ptr + stat_base + k * C + offs_c, mask=mask_c, other=1.0)[:, None]
    return mu, sd


@triton.jit
def ln_stage(r, mu, sd, w, bb, hl, off, sh, hw, USE_LIBDEVICE: tl.constexpr):
    """One ``layernorm`` stage in the reference's op order; returns ``(q, code, t, rounded)``.

    ``n = w * (r - mu) / sd + b``; ``q = ((FSQ(n) - b) / w) * sd + mu``.
    """
    code, t, rounded = fsq_code(w * (r - mu) / sd + bb, hl, off, sh, hw, USE_LIBDEVICE)
    return ((code - bb) / w) * sd + mu, code, t, rounded


@triton.jit
def _ln_undo_stage(r, j, mean_ptr, std_ptr, w_ptr, b_ptr, stat_base, offs_c, mask_c, C,
                   hl, off, sh, hw, valid, n_act, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   USE_LIBDEVICE: tl.constexpr):
    """``r_{j+1} = r_j - q_j`` for layernorm stage ``j`` with its saved statistics."""
    mu, sd = ln_stats(mean_ptr, std_ptr, stat_base, j, offs_c, mask_c, C)
    w, bb = ln_params(w_ptr, b_ptr, j, offs_c, mask_c, C)
    q, _code, _t, _rnd = ln_stage(r, mu, sd, w, bb, hl, off, sh, hw, USE_LIBDEVICE)
    return r - keep_only(q, valid, n_act, j, HAS_MASK, HAS_DROPOUT)


@triton.jit
def ln_replay(x, mean_ptr, std_ptr, w_ptr, b_ptr, stat_base, offs_c, mask_c, C,
              hl, off, sh, hw, nstages, valid, n_act, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              USE_LIBDEVICE: tl.constexpr):
    """Residual ``r_nstages`` of the layernorm strategy from the input tile and saved statistics.

    A runtime loop (``nstages`` is the caller's runtime stage index): code size and compile time
    do not grow with K, and only one stage's values are live at a time.
    """
    r = x
    for j in range(nstages):
        r = _ln_undo_stage(r, j, mean_ptr, std_ptr, w_ptr, b_ptr, stat_base, offs_c, mask_c, C,
                           hl, off, sh, hw, valid, n_act, HAS_MASK, HAS_DROPOUT, USE_LIBDEVICE)
    return r


@triton.jit
def _ln_emit(r, acc, mu, sd, k, w_ptr, b_ptr, offs_c, mask_c, C, hl, off, sh, hw, top, basis,
             idx_ptr, idx_row, mask_s, valid, n_act, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
             USE_LIBDEVICE: tl.constexpr):
    """Quantize layernorm stage ``k`` with known statistics; returns ``(r_{k+1}, acc + q_k)``."""
    w, bb = ln_params(w_ptr, b_ptr, k, offs_c, mask_c, C)
    q, _code, _t, rounded = ln_stage(r, mu, sd, w, bb, hl, off, sh, hw, USE_LIBDEVICE)
    store_index(idx_ptr, idx_row, k, rounded, hw, top, basis, mask_s, valid, n_act, HAS_MASK, HAS_DROPOUT)
    q = keep_only(q, valid[None, :], n_act, k, HAS_MASK, HAS_DROPOUT)
    return r - q, acc + q


@triton.jit
def _ln_store_stats(mean_ptr, std_ptr, stat_base, k, offs_c, mask_c, C, mu, sd, n_act, HAS_DROPOUT: tl.constexpr):
    """Write stage ``k``'s statistics; a dropped stage stores the neutral ``(0, 1)``."""
    if HAS_DROPOUT:
        mu = tl.where(k < n_act, mu, 0.0)
        sd = tl.where(k < n_act, sd, 1.0)
    tl.store(mean_ptr + stat_base + k * C + offs_c, mu, mask=mask_c)
    tl.store(std_ptr + stat_base + k * C + offs_c, sd, mask=mask_c)


@triton.jit
def _ln_replay_chunk(s0, b, x_ptr, mean_ptr, std_ptr, w_ptr, b_ptr, stat_base, offs_c, mask_c, C, S,
                     sxb, sxc, sxs, hl, off, sh, hw, valid_ptr, n_act, k, BLOCK_S: tl.constexpr,
                     HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                     USE_INT64: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """Load positions ``s0 .. s0+BLOCK_S`` of image ``b`` and replay stages ``0..k-1`` on them
    (runtime loop; ``k`` is the runtime stage index): ``(mask, r_k)`` for one chunk of the
    chunked layernorm statistics passes (``mask``: the tile's valid positions)."""
    offs_s = widen(s0 + tl.arange(0, BLOCK_S), USE_INT64)
    valid = load_valid(valid_ptr, b, offs_s, offs_s < S, S, HAS_MASK)
    mask = mask_c[:, None] & valid[None, :]
    x = load_tile(x_ptr, b, offs_c, offs_s, sxb, sxc, sxs, mask)
    r = ln_replay(x, mean_ptr, std_ptr, w_ptr, b_ptr, stat_base, offs_c, mask_c, C,
                  hl, off, sh, hw, k, mask, n_act, HAS_MASK, HAS_DROPOUT, USE_LIBDEVICE)
    return mask, r


@triton.jit(do_not_specialize=["C", "K"])
def _fwd_layernorm_kernel(
    x_ptr, q_ptr, idx_ptr, mean_ptr, std_ptr, w_ptr, b_ptr, consts_ptr, basis_ptr, valid_ptr, active_ptr,
    C, S, sxb, sxc, sxs, sqb, sqc, sqs, eps,
    K, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, SINGLE: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_INT64: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
):
    """``layernorm``: one program per image (statistics reduce over all its positions).

    ``SINGLE`` (S <= BLOCK_S): the whole image stays in registers for all K stages.
    Otherwise the chunked multi-pass path: per stage, a mean pass and a centred-variance pass
    over chunks (residual recomputed from the input and the statistics already written), then
    one output pass for quantized and indices. With ``HAS_MASK`` the statistics divide by the
    number of valid positions (at least 1) and padding reads as 0; with ``HAS_DROPOUT`` stages
    ``k >= n_act`` of image b quantize nothing. Both paths loop over stages at run time (not
    unrolled): one binary serves every K, one stage's values are live at a time, and the
    chunked path's O(K^2) replay no longer makes the compile slow (over a minute at K=8 when
    unrolled) or spill registers.
    """
    b = widen(tl.program_id(0), USE_INT64)
    offs_c = widen(tl.arange(0, BLOCK_C), USE_INT64)
    mask_c = offs_c < C
    hl, off, sh, hw, top, basis = load_levels(consts_ptr, basis_ptr, offs_c, mask_c, C)
    n_act = load_active(active_ptr, b, K, HAS_DROPOUT)
    stat_base = b * K * C
    if SINGLE:
        offs_s = widen(tl.arange(0, BLOCK_S), USE_INT64)
        mask_s = offs_s < S
        valid = load_valid(valid_ptr, b, offs_s, mask_s, S, HAS_MASK)
        mask = mask_c[:, None] & valid[None, :]
        n = S
        if HAS_MASK:
            n = tl.maximum(tl.sum(valid.to(tl.float32), axis=0), 1.0)
        r = load_tile(x_ptr, b, offs_c, offs_s, sxb, sxc, sxs, mask)
        acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        idx_row = (b * S + offs_s) * K
        for k in range(K):
            mu = masked_row_sum(r, mask) / n
            d = r - mu[:, None]
            sd = tl.sqrt(masked_row_sum(d * d, mask) / n + eps)
            _ln_store_stats(mean_ptr, std_ptr, stat_base, k, offs_c, mask_c, C, mu, sd, n_act, HAS_DROPOUT)
            r, acc = _ln_emit(r, acc, mu[:, None], sd[:, None], k, w_ptr, b_ptr, offs_c, mask_c, C,
                              hl, off, sh, hw, top, basis, idx_ptr, idx_row, mask_s, valid, n_act,
                              HAS_MASK, HAS_DROPOUT, USE_LIBDEVICE)
        store_tile(q_ptr, acc, b, offs_c, offs_s, sqb, sqc, sqs, mask_c[:, None] & mask_s[None, :])
    else:
        for k in range(K):
            total = tl.zeros([BLOCK_C], dtype=tl.float32)
            count = tl.zeros([BLOCK_C], dtype=tl.float32)
            for s0 in range(0, S, BLOCK_S):
                mask, r = _ln_replay_chunk(s0, b, x_ptr, mean_ptr, std_ptr, w_ptr, b_ptr, stat_base,
                                           offs_c, mask_c, C, S, sxb, sxc, sxs, hl, off, sh, hw,
                                           valid_ptr, n_act, k, BLOCK_S, HAS_MASK, HAS_DROPOUT,
                                           USE_INT64, USE_LIBDEVICE)
                total += masked_row_sum(r, mask)
                if HAS_MASK:
                    count += tl.sum(mask.to(tl.float32), axis=1)
            n = S
            if HAS_MASK:
                n = tl.maximum(count, 1.0)
            mu = total / n
            total = tl.zeros([BLOCK_C], dtype=tl.float32)
            for s0 in range(0, S, BLOCK_S):
                mask, r = _ln_replay_chunk(s0, b, x_ptr, mean_ptr, std_ptr, w_ptr, b_ptr, stat_base,
                                           offs_c, mask_c, C, S, sxb, sxc, sxs, hl, off, sh, hw,
                                           valid_ptr, n_act, k, BLOCK_S, HAS_MASK, HAS_DROPOUT,
                                           USE_INT64, USE_LIBDEVICE)
                d = r - mu[:, None]
                total += masked_row_sum(d * d, mask)
            sd = tl.sqrt(total / n + eps)
            _ln_store_stats(mean_ptr, std_ptr, stat_base, k, offs_c, mask_c, C, mu, sd, n_act, HAS_DROPOUT)
            # Later passes re-read these statistics, possibly from other threads of the program.
            tl.debug_barrier()
        for s0 in range(0, S, BLOCK_S):
            offs_s = widen(s0 + tl.arange(0, BLOCK_S), USE_INT64)
            mask_s = offs_s < S
            valid = load_valid(valid_ptr, b, offs_s, mask_s, S, HAS_MASK)
            r = load_tile(x_ptr, b, offs_c, offs_s, sxb, sxc, sxs, mask_c[:, None] & valid[None, :])
            acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
            idx_row = (b * S + offs_s) * K
            for k in range(K):
                # New names: mu/sd above are [BLOCK_C]; a loop must not rebind them as [BLOCK_C, 1].
                mu_col, sd_col = ln_stats(mean_ptr, std_ptr, stat_base, k, offs_c, mask_c, C)
                r, acc = _ln_emit(r, acc, mu_col, sd_col, k, w_ptr, b_ptr, offs_c, mask_c, C,
                                  hl, off, sh, hw, top, basis, idx_ptr, idx_row, mask_s, valid, n_act,
                                  HAS_MASK, HAS_DROPOUT, USE_LIBDEVICE)
            store_tile(q_ptr, acc, b, offs_c, offs_s, sqb, sqc, sqs, mask_c[:, None] & mask_s[None, :])


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
    v = tl.where(stage_mask(mask, n_act, k, HAS_DROPOUT), g_minus_G, 0.0)
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


def forward_outputs(z: torch.Tensor, levels: Sequence[int], stages: int) -> Tuple[torch.Tensor, ...]:
    """Uninitialised ``(quantized, indices, mean, std)``; mean/std are float32 ``(B, K, C)``."""
    quantized, indices = config.quantized_and_indices(z, levels, stages)
    B, C = z.shape[0], z.shape[1]
    mean = z.new_empty((B, stages, C), dtype=torch.float32)
    std = z.new_empty((B, stages, C), dtype=torch.float32)
    return quantized, indices, mean, std


def forward(z: torch.Tensor, levels: Sequence[int], stages: int, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
            eps: float, mask: Optional[torch.Tensor], active_stages: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """Fused ``layernorm`` forward: ``(quantized, indices, mean, std)``."""
    quantized, indices, mean, std = forward_outputs(z, levels, stages)
    B, C, S = z.shape[0], z.shape[1], math.prod(z.shape[2:])
    if B == 0 or S == 0:
        return quantized.zero_(), indices.zero_(), mean.zero_(), std.zero_()
    x, x_strides = config.strided_view(z)
    consts, basis = config.level_tables(levels, z.device)
    valid, active = config.mask_and_counts(mask, active_stages, B, S)
    use_int64 = config.needs_int64(x, quantized, indices)
    tiles = config.layernorm_tiles(C, S, "forward", use_int64)
    _fwd_layernorm_kernel[(B,)](
        x, quantized, indices, mean, std, ln_weight, ln_bias, consts, basis, valid, active,
        C, S, *x_strides, *config.flat_strides(quantized), float(eps),
        K=stages, BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s, SINGLE=tiles.one_tile,
        HAS_MASK=mask is not None, HAS_DROPOUT=active_stages is not None,
        USE_INT64=use_int64, USE_LIBDEVICE=config.use_libdevice(z), num_warps=tiles.num_warps)
    return quantized, indices, mean, std


def backward_outputs(z: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Uninitialised ``(grad_z, grad_scale, grad_ln_weight, grad_ln_bias)``; grad_scale empty."""
    return config.new_output(z), config.empty_output(z), torch.empty_like(ln_weight), torch.empty_like(ln_bias)


def backward(grad_q: torch.Tensor, z: torch.Tensor, levels: Sequence[int], stages: int,
             ln_weight: torch.Tensor, ln_bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
             mask: Optional[torch.Tensor], active_stages: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """Fused ``layernorm`` backward: ``(grad_z, grad_scale, grad_ln_weight, grad_ln_bias)``."""
    grad_z, grad_scale, grad_w, grad_b = backward_outputs(z, ln_weight, ln_bias)
    B, C, S = z.shape[0], z.shape[1], math.prod(z.shape[2:])
    if B == 0 or S == 0:
        return grad_z.zero_(), grad_scale.zero_(), grad_w.zero_(), grad_b.zero_()
    x, x_strides = config.strided_view(z)
    g, g_strides = config.strided_view(grad_q)
    consts, basis = config.level_tables(levels, z.device)
    valid, active = config.mask_and_counts(mask, active_stages, B, S)
    tiles = config.layernorm_tiles(C, S, "backward", sparse=mask is not None or active_stages is not None)
    # G_{k+1} between the chunked path's stages; the one-tile path keeps it in registers.
    scratch = grad_z if tiles.one_tile else torch.empty((B, C, S), dtype=torch.float32, device=z.device)
    # Parameter gradients as one partial sum per (image, stage, channel), reduced below in a fixed order.
    dw_part = torch.empty((B, stages, C), dtype=torch.float32, device=z.device)
    db_part = torch.empty((B, stages, C), dtype=torch.float32, device=z.device)
    _bwd_layernorm_kernel[(B,)](
        x, g, grad_z, scratch, mean, std, ln_weight, ln_bias, dw_part, db_part, consts, basis, valid, active,
        C, S, *x_strides, *g_strides, *config.flat_strides(grad_z), C * S,
        K=stages, BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s, SINGLE=tiles.one_tile,
        HAS_MASK=mask is not None, HAS_DROPOUT=active_stages is not None,
        USE_INT64=config.needs_int64(x, g, grad_z, scratch), USE_LIBDEVICE=config.use_libdevice(z),
        num_warps=tiles.num_warps)
    grad_w.copy_(dw_part.sum(0))
    grad_b.copy_(db_part.sum(0))
    return grad_z, grad_scale, grad_w, grad_b
