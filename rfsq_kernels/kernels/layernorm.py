"""Kernels of the ``layernorm`` strategy (per-image statistics): forward, backward, launchers and
output allocation. Each stage's mean/std reduce over all positions of an image, so one program
owns one image. The launchers are called through :mod:`.launch`, which answers
problems without positions itself. Design: ``docs/kernel-design.md``.

Besides the bundles of :mod:`.stages`, these helpers take ``ln = (mean_ptr, std_ptr, weight_ptr,
bias_ptr, stat_start)`` -- the ``(B, K, C)`` saved statistics, where the image's rows start
(``stat_start = img * K * C``, also used for the ``(B, K, C)`` parameter-gradient partials
``dparts``) and the ``(K, C)`` parameters -- and ``chan = (offs_c, mask_c, C)``, the program's
channel lanes.
"""
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
def ln_params(ln, k, chan):
    """Row ``k`` of the LN weight and bias as float32 ``[BLOCK_C, 1]`` columns."""
    _mean_ptr, _std_ptr, weight_ptr, bias_ptr, _stat_start = ln
    offs_c, mask_c, C = chan
    weight = tl.load(weight_ptr + k * C + offs_c, mask=mask_c, other=1.0).to(tl.float32)[:, None]
    bias = tl.load(bias_ptr + k * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)[:, None]
    return weight, bias


@triton.jit
def ln_stats(ln, k, chan):
    """Saved ``(mu, sd)`` of stage ``k`` as ``[BLOCK_C, 1]`` columns."""
    mean_ptr, std_ptr, _weight_ptr, _bias_ptr, stat_start = ln
    offs_c, mask_c, C = chan
    mu = tl.load(mean_ptr + stat_start + k * C + offs_c, mask=mask_c, other=0.0)[:, None]
    sd = tl.load(std_ptr + stat_start + k * C + offs_c, mask=mask_c, other=1.0)[:, None]
    return mu, sd


@triton.jit
def ln_stage(r, mu, sd, weight, bias, fsq, USE_LIBDEVICE: tl.constexpr):
    """One ``layernorm`` stage in the reference's op order; returns ``(q, code, t, rounded)``.

    ``n = weight * (r - mu) / sd + bias``; ``q = ((FSQ(n) - bias) / weight) * sd + mu``.
    """
    code, t, rounded = fsq_code(weight * (r - mu) / sd + bias, fsq, USE_LIBDEVICE)
    return ((code - bias) / weight) * sd + mu, code, t, rounded


@triton.jit
def ln_replay(x, ln, chan, fsq, nstages, valid, n_act, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              USE_LIBDEVICE: tl.constexpr):
    """Residual ``r_nstages`` from the input tile ``x`` and the saved statistics.

    A runtime loop (``nstages`` is the caller's runtime stage index): code size and compile time
    do not grow with K, and only one stage's values are live at a time.
    """
    r = x
    for j in range(nstages):
        mu, sd = ln_stats(ln, j, chan)
        weight, bias = ln_params(ln, j, chan)
        q, _code, _t, _rounded = ln_stage(r, mu, sd, weight, bias, fsq, USE_LIBDEVICE)
        r = r - keep_only(q, valid, n_act, j, HAS_MASK, HAS_DROPOUT)
    return r


@triton.jit
def _ln_emit(r, acc, mu, sd, k, ln, chan, fsq, digits, index_rows, valid, n_act,
             HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """Quantize stage ``k`` with known statistics and store its indices; returns ``(r_{k+1}, acc + q_k)``."""
    weight, bias = ln_params(ln, k, chan)
    q, _code, _t, rounded = ln_stage(r, mu, sd, weight, bias, fsq, USE_LIBDEVICE)
    store_index(index_rows, k, rounded, fsq, digits, valid, n_act, HAS_MASK, HAS_DROPOUT)
    q = keep_only(q, valid[None, :], n_act, k, HAS_MASK, HAS_DROPOUT)
    return r - q, acc + q


@triton.jit
def _ln_store_stats(ln, k, chan, mu, sd, n_act, HAS_DROPOUT: tl.constexpr):
    """Write stage ``k``'s ``[BLOCK_C]`` statistics; a dropped stage stores the neutral ``(0, 1)``."""
    mean_ptr, std_ptr, _weight_ptr, _bias_ptr, stat_start = ln
    offs_c, mask_c, C = chan
    if HAS_DROPOUT:
        mu = tl.where(k < n_act, mu, 0.0)
        sd = tl.where(k < n_act, sd, 1.0)
    tl.store(mean_ptr + stat_start + k * C + offs_c, mu, mask=mask_c)
    tl.store(std_ptr + stat_start + k * C + offs_c, sd, mask=mask_c)


@triton.jit(do_not_specialize=["C", "K"])
def _fwd_layernorm_kernel(
    x_ptr, q_ptr, idx_ptr, mean_ptr, std_ptr, weight_ptr, bias_ptr, consts_ptr, basis_ptr, valid_ptr, active_ptr,
    C, S, stride_xb, stride_xc, stride_xs, stride_qb, stride_qc, stride_qs, eps,
    K, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ONE_TILE: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_INT64: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
):
    """``layernorm`` forward: one program per image, stages as a runtime loop.

    ``ONE_TILE`` (S <= BLOCK_S): the image stays in registers for all K stages. Otherwise, per
    stage, a mean sweep and a centred-variance sweep over chunks (residual replayed from the
    input and the statistics already written), then one output pass. With ``HAS_MASK`` the
    statistics count valid positions only (at least 1); with ``HAS_DROPOUT`` stages
    ``k >= n_act`` quantize nothing.

    stride_<tensor><dim>: x = input, q = quantized; dims b = image, c = channel, s = flattened
    spatial. ``valid_ptr`` / ``active_ptr`` are None unless HAS_MASK / HAS_DROPOUT.
    """
    img = widen(tl.program_id(0), USE_INT64)
    # Where this image starts in each tensor, computed once (docs/kernel-design.md, "Arguments").
    valid_row = (valid_ptr, img * S)
    x_view = (x_ptr, img * stride_xb, stride_xc, stride_xs)
    q_view = (q_ptr, img * stride_qb, stride_qc, stride_qs)
    ln = (mean_ptr, std_ptr, weight_ptr, bias_ptr, img * K * C)
    offs_c = widen(tl.arange(0, BLOCK_C), USE_INT64)
    mask_c = offs_c < C
    chan = (offs_c, mask_c, C)
    fsq = load_levels(consts_ptr, offs_c, mask_c, C)
    digits = load_digit_range(consts_ptr, basis_ptr, offs_c, mask_c, C)
    n_act = load_active(active_ptr, img, K, HAS_DROPOUT)
    if ONE_TILE:
        offs_s, mask_s, valid = spatial_lanes(0, valid_row, S, BLOCK_S, HAS_MASK, USE_INT64)
        mask = mask_c[:, None] & valid[None, :]
        n = S
        if HAS_MASK:
            n = tl.maximum(tl.sum(valid.to(tl.float32), axis=0), 1.0)
        r = load_tile(x_view, offs_c, offs_s, mask)
        acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        index_rows = (idx_ptr, (img * S + offs_s) * K, mask_s)  # see store_index
        for k in range(K):
            mu = masked_row_sum(r, mask) / n
            d = r - mu[:, None]
            sd = tl.sqrt(masked_row_sum(d * d, mask) / n + eps)
            _ln_store_stats(ln, k, chan, mu, sd, n_act, HAS_DROPOUT)
            r, acc = _ln_emit(r, acc, mu[:, None], sd[:, None], k, ln, chan, fsq, digits, index_rows, valid,
                              n_act, HAS_MASK, HAS_DROPOUT, USE_LIBDEVICE)
        store_tile(q_view, acc, offs_c, offs_s, mask_c[:, None] & mask_s[None, :])
    else:
        for k in range(K):
            # Sweep 0 sums the replayed residual r_k over the image's chunks (mean); sweep 1 sums
            # its centred squares (variance). One chunk loop, unrolled twice.
            for sweep in tl.static_range(2):
                total = tl.zeros([BLOCK_C], dtype=tl.float32)
                count = tl.zeros([BLOCK_C], dtype=tl.float32)
                for s0 in range(0, S, BLOCK_S):
                    offs_s, _mask_s, valid = spatial_lanes(s0, valid_row, S, BLOCK_S, HAS_MASK, USE_INT64)
                    mask = mask_c[:, None] & valid[None, :]
                    r = ln_replay(load_tile(x_view, offs_c, offs_s, mask), ln, chan, fsq, k, mask, n_act,
                                  HAS_MASK, HAS_DROPOUT, USE_LIBDEVICE)
                    if sweep == 0:
                        total += masked_row_sum(r, mask)
                        if HAS_MASK:
                            count += tl.sum(mask.to(tl.float32), axis=1)
                    else:
                        d = r - mu[:, None]
                        total += masked_row_sum(d * d, mask)
                if sweep == 0:
                    n = S
                    if HAS_MASK:
                        n = tl.maximum(count, 1.0)
                    mu = total / n
            sd = tl.sqrt(total / n + eps)
            _ln_store_stats(ln, k, chan, mu, sd, n_act, HAS_DROPOUT)
            # Later passes re-read these statistics, possibly from other threads of the program.
            tl.debug_barrier()
        for s0 in range(0, S, BLOCK_S):
            offs_s, mask_s, valid = spatial_lanes(s0, valid_row, S, BLOCK_S, HAS_MASK, USE_INT64)
            r = load_tile(x_view, offs_c, offs_s, mask_c[:, None] & valid[None, :])
            acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
            index_rows = (idx_ptr, (img * S + offs_s) * K, mask_s)  # see store_index
            for k in range(K):
                # New names: mu/sd above are [BLOCK_C]; a loop must not rebind them as [BLOCK_C, 1].
                mu_col, sd_col = ln_stats(ln, k, chan)
                r, acc = _ln_emit(r, acc, mu_col, sd_col, k, ln, chan, fsq, digits, index_rows, valid,
                                  n_act, HAS_MASK, HAS_DROPOUT, USE_LIBDEVICE)
            store_tile(q_view, acc, offs_c, offs_s, mask_c[:, None] & mask_s[None, :])


@triton.jit
def _ln_bwd_tile(x, g_minus_G, mask, k, ln, chan, fsq, n_act, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                 USE_LIBDEVICE: tl.constexpr):
    """Per-position quantities of stage ``k`` (runtime index) for one tile, ``g_minus_G = g - G_{k+1}``.

    Returns ``(v, h, xhat, cn)``: ``v = dL/dq_k`` (masked), ``h = dL/dn`` through the code
    (``v * sd / weight * dcode/dn``), ``xhat = (r - mu) / sd`` and ``cn = (code - bias) / weight``.
    """
    r = ln_replay(x, ln, chan, fsq, k, mask, n_act, HAS_MASK, HAS_DROPOUT, USE_LIBDEVICE)
    mu, sd = ln_stats(ln, k, chan)
    weight, bias = ln_params(ln, k, chan)
    _q, code, t, _rounded = ln_stage(r, mu, sd, weight, bias, fsq, USE_LIBDEVICE)
    v = tl.where(stage_keep(mask, n_act, k, HAS_DROPOUT), g_minus_G, 0.0)
    h = v * (sd / weight) * fsq_dcode(t, fsq)
    return v, h, (r - mu) / sd, (code - bias) / weight


@triton.jit
def _ln_sums(v, h, xhat, cn, mask):
    """The four per-channel sums of a tile that the backward of one stage reduces:
    ``(sum v, sum h, sum v*cn, sum h*xhat)``, each ``[BLOCK_C]``."""
    return tl.sum(v, axis=1), tl.sum(h, axis=1), tl.sum(v * cn, axis=1), masked_row_sum(h * xhat, mask)


@triton.jit
def _add_sums(a, b):
    """Elementwise sum of two :func:`_ln_sums` tuples."""
    return a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]


@triton.jit
def _ln_bwd_coeffs(sums, k, ln, dparts, chan):
    """Turn stage ``k``'s four sums into parameter-gradient partials (stored through ``dparts =
    (dweight_part_ptr, dbias_part_ptr)``, the image's ``(K, C)`` rows) and the coefficients
    ``(weight/sd, dL/dmu, dL/dsd)`` of ``dL/dr``, as ``[BLOCK_C, 1]`` columns.

    ``q = ((code - bias) / weight) * sd + mu`` with ``n = weight * xhat + bias``:
    ``dL/dweight = sum h*xhat - sd/weight * sum v*cn``, ``dL/dbias = sum h - sd/weight * sum v``,
    ``dL/dmu = sum v - weight/sd * sum h``, ``dL/dsd = sum v*cn - weight/sd * sum h*xhat``.
    """
    sum_v, sum_h, sum_vc, sum_hx = sums
    _mean_ptr, std_ptr, weight_ptr, _bias_ptr, stat_start = ln
    dweight_part_ptr, dbias_part_ptr = dparts
    offs_c, mask_c, C = chan
    sd = tl.load(std_ptr + stat_start + k * C + offs_c, mask=mask_c, other=1.0)
    weight = tl.load(weight_ptr + k * C + offs_c, mask=mask_c, other=1.0).to(tl.float32)
    tl.store(dweight_part_ptr + stat_start + k * C + offs_c, sum_hx - (sd / weight) * sum_vc, mask=mask_c)
    tl.store(dbias_part_ptr + stat_start + k * C + offs_c, sum_h - (sd / weight) * sum_v, mask=mask_c)
    w_sd = weight / sd
    return w_sd[:, None], (sum_v - w_sd * sum_h)[:, None], (sum_vc - w_sd * sum_hx)[:, None]


@triton.jit
def _ln_dr(h, xhat, coeffs, n, mask, HAS_MASK: tl.constexpr):
    """``dL/dr_k`` through stage k: direct path plus the mean and std paths (``n`` positions enter
    the statistics; with ``HAS_MASK`` only the valid ones, ``mask``, get the statistics' share)."""
    w_sd, dmu, dsd = coeffs
    dr = h * w_sd + (dmu + dsd * xhat) / n
    if HAS_MASK:
        dr = tl.where(mask, dr, 0.0)
    return dr


@triton.jit
def _valid_count(valid_row, S, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr, USE_INT64: tl.constexpr):
    """Positions entering the image's statistics: S, or its valid ones (at least 1)."""
    if HAS_MASK:
        count = 0.0
        for s0 in range(0, S, BLOCK_S):
            _offs_s, _mask_s, valid = spatial_lanes(s0, valid_row, S, BLOCK_S, HAS_MASK, USE_INT64)
            count += tl.sum(valid.to(tl.float32), axis=0)
        return tl.maximum(count, 1.0)
    else:
        return S


@triton.jit(do_not_specialize=["C", "K"])
def _bwd_layernorm_kernel(
    x_ptr, g_ptr, dx_ptr, scratch_ptr, mean_ptr, std_ptr, weight_ptr, bias_ptr, dweight_part_ptr, dbias_part_ptr,
    consts_ptr, valid_ptr, active_ptr,
    C, S, stride_xb, stride_xc, stride_xs, stride_gb, stride_gc, stride_gs, stride_dxb, stride_dxc, stride_dxs,
    stride_scratch_b, K, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ONE_TILE: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_INT64: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
):
    """``layernorm`` backward: one program per image; J_k couples the positions of each
    (image, channel) through the mean and std, like a LayerNorm backward over the spatial axis.

    ``ONE_TILE``: one tile holds the image; ``V = g - G_{k+1}`` stays in registers across the
    stages. Otherwise two chunked sweeps per stage (sums, then ``G_k``) with ``G_{k+1}`` in the
    float32 ``(B, C, S)`` scratch between stages. Parameter gradients go to per-image partials
    ``(B, K, C)``, reduced on the host.

    stride_<tensor><dim>: x = input, g = grad of quantized, dx = grad of input; dims b = image,
    c = channel, s = flattened spatial; ``stride_scratch_b = C * S`` (the scratch is contiguous).
    ``scratch_ptr`` is None with ONE_TILE; ``valid_ptr`` / ``active_ptr`` are None unless
    HAS_MASK / HAS_DROPOUT.
    """
    img = widen(tl.program_id(0), USE_INT64)
    # Where this image starts in each tensor, computed once (docs/kernel-design.md, "Arguments").
    valid_row = (valid_ptr, img * S)
    x_view = (x_ptr, img * stride_xb, stride_xc, stride_xs)
    g_view = (g_ptr, img * stride_gb, stride_gc, stride_gs)
    dx_view = (dx_ptr, img * stride_dxb, stride_dxc, stride_dxs)
    ln = (mean_ptr, std_ptr, weight_ptr, bias_ptr, img * K * C)
    dparts = (dweight_part_ptr, dbias_part_ptr)
    offs_c = widen(tl.arange(0, BLOCK_C), USE_INT64)
    mask_c = offs_c < C
    chan = (offs_c, mask_c, C)
    fsq = load_levels(consts_ptr, offs_c, mask_c, C)
    n_act = load_active(active_ptr, img, K, HAS_DROPOUT)
    n = _valid_count(valid_row, S, BLOCK_S, HAS_MASK, USE_INT64)
    if ONE_TILE:
        offs_s, mask_s, valid = spatial_lanes(0, valid_row, S, BLOCK_S, HAS_MASK, USE_INT64)
        mask = mask_c[:, None] & valid[None, :]
        # Registers hold V = g - G_{k+1} (instead of g and G) and the stage being worked on; the
        # input is re-read (from L1/L2: one image) for each stage's replay and g once more at
        # the end (dx = g - V). Keeping x and g live too spilled on sm_80 (64 registers/thread
        # at 32 warps).
        V = load_tile(g_view, offs_c, offs_s, mask)
        for k_rev in range(K):
            k = K - 1 - k_rev
            x = load_tile(x_view, offs_c, offs_s, mask)
            v, h, xhat, cn = _ln_bwd_tile(x, V, mask, k, ln, chan, fsq, n_act, HAS_MASK, HAS_DROPOUT, USE_LIBDEVICE)
            sums = _ln_sums(v, h, xhat, cn, mask)
            # The direct path of dL/dr needs no reduction: apply it now, so that only x, V and
            # xhat stay live across the reductions' barriers.
            weight, _bias = ln_params(ln, k, chan)
            _mu, sd = ln_stats(ln, k, chan)
            V = V - h * (weight / sd)
            _w_sd, dmu, dsd = _ln_bwd_coeffs(sums, k, ln, dparts, chan)
            # (Padding picks up the statistics' share here too, but V there never reaches a valid
            # position -- v is masked -- and dx is zeroed there at the store.)
            V = V - (dmu + dsd * xhat) / n
        dx = load_tile(g_view, offs_c, offs_s, mask) - V
        if HAS_MASK:
            dx = tl.where(mask, dx, 0.0)
        store_tile(dx_view, dx, offs_c, offs_s, mask_c[:, None] & mask_s[None, :])
    else:
        scratch_view = (scratch_ptr, img * stride_scratch_b, S, 1)
        for k_rev in range(K):
            k = K - 1 - k_rev
            # Sweep 0 reduces the four per-channel sums of stage k over the image's chunks;
            # sweep 1 applies dL/dr_k and stores G_k. One chunk loop, unrolled twice.
            coeffs = None  # (weight/sd, dL/dmu, dL/dsd), set at the end of sweep 0
            for sweep in tl.static_range(2):
                sums = (tl.zeros([BLOCK_C], dtype=tl.float32), tl.zeros([BLOCK_C], dtype=tl.float32),
                        tl.zeros([BLOCK_C], dtype=tl.float32), tl.zeros([BLOCK_C], dtype=tl.float32))
                for s0 in range(0, S, BLOCK_S):
                    offs_s, mask_s, valid = spatial_lanes(s0, valid_row, S, BLOCK_S, HAS_MASK, USE_INT64)
                    mask = mask_c[:, None] & valid[None, :]
                    x = load_tile(x_view, offs_c, offs_s, mask)
                    g = load_tile(g_view, offs_c, offs_s, mask)
                    G = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
                    if k < K - 1:
                        G = load_tile(scratch_view, offs_c, offs_s, mask)
                    v, h, xhat, cn = _ln_bwd_tile(x, g - G, mask, k, ln, chan, fsq, n_act,
                                                  HAS_MASK, HAS_DROPOUT, USE_LIBDEVICE)
                    if sweep == 0:
                        sums = _add_sums(sums, _ln_sums(v, h, xhat, cn, mask))
                    else:
                        G = G + _ln_dr(h, xhat, coeffs, n, mask, HAS_MASK)
                        inside = mask_c[:, None] & mask_s[None, :]
                        if k == 0:
                            store_tile(dx_view, G, offs_c, offs_s, inside)
                        else:
                            store_tile(scratch_view, G, offs_c, offs_s, inside)
                if sweep == 0:
                    coeffs = _ln_bwd_coeffs(sums, k, ln, dparts, chan)
            # The next stage reads G_k back, possibly from other threads of the program.
            tl.debug_barrier()


def forward_outputs(z: torch.Tensor, levels: Sequence[int], stages: int) -> Tuple[torch.Tensor, ...]:
    """Uninitialised ``(quantized, indices, mean, std)``; mean/std are float32 ``(B, K, C)``."""
    quantized, indices = config.quantized_and_indices(z, levels, stages)
    B, C = z.shape[0], z.shape[1]
    mean = z.new_empty((B, stages, C), dtype=torch.float32)
    std = z.new_empty((B, stages, C), dtype=torch.float32)
    return quantized, indices, mean, std


def forward(z: torch.Tensor, levels: Sequence[int], stages: int, strategy: str, params: Tuple[torch.Tensor, ...],
            eps: float, mask: Optional[torch.Tensor],
            active_stages: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """Fused ``layernorm`` forward (``params = (ln_weight, ln_bias)``): ``(quantized, indices, mean, std)``."""
    ln_weight, ln_bias = params
    quantized, indices, mean, std = forward_outputs(z, levels, stages)
    B, C, S = z.shape[0], z.shape[1], math.prod(z.shape[2:])
    x, x_strides = config.strided_view(z)
    consts, basis = config.level_tables(levels, z.device)
    valid, active = config.mask_and_counts(mask, active_stages, B, S)
    use_int64 = config.needs_int64(x, quantized, indices)
    tiles = config.layernorm_tiles(C, S, "forward", use_int64)
    _fwd_layernorm_kernel[(B,)](
        x, quantized, indices, mean, std, ln_weight, ln_bias, consts, basis, valid, active,
        C, S, *x_strides, *config.flat_strides(quantized), float(eps),
        K=stages, BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s, ONE_TILE=tiles.one_tile,
        HAS_MASK=mask is not None, HAS_DROPOUT=active_stages is not None,
        USE_INT64=use_int64, USE_LIBDEVICE=config.use_libdevice(z), num_warps=tiles.num_warps,
        enable_fp_fusion=config.FP_FUSION)
    return quantized, indices, mean, std


def backward(grad_q: torch.Tensor, z: torch.Tensor, levels: Sequence[int], stages: int, strategy: str,
             params: Tuple[torch.Tensor, ...], mean: torch.Tensor, std: torch.Tensor,
             mask: Optional[torch.Tensor], active_stages: Optional[torch.Tensor]):
    """Fused ``layernorm`` backward: ``(grad_z, (grad_ln_weight, grad_ln_bias))``."""
    ln_weight, ln_bias = params
    grad_z, grad_w, grad_b = config.new_output(z), torch.empty_like(ln_weight), torch.empty_like(ln_bias)
    B, C, S = z.shape[0], z.shape[1], math.prod(z.shape[2:])
    x, x_strides = config.strided_view(z)
    g, g_strides = config.strided_view(grad_q)
    consts, _basis = config.level_tables(levels, z.device)
    valid, active = config.mask_and_counts(mask, active_stages, B, S)
    tiles = config.layernorm_tiles(C, S, "backward", sparse=mask is not None or active_stages is not None)
    # G_{k+1} between the chunked path's stages; the one-tile path keeps it in registers.
    scratch = None if tiles.one_tile else torch.empty((B, C, S), dtype=torch.float32, device=z.device)
    # Parameter gradients as one partial sum per (image, stage, channel), reduced below in a fixed order.
    dw_part = torch.empty((B, stages, C), dtype=torch.float32, device=z.device)
    db_part = torch.empty((B, stages, C), dtype=torch.float32, device=z.device)
    _bwd_layernorm_kernel[(B,)](
        x, g, grad_z, scratch, mean, std, ln_weight, ln_bias, dw_part, db_part, consts, valid, active,
        C, S, *x_strides, *g_strides, *config.flat_strides(grad_z), C * S,
        K=stages, BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s, ONE_TILE=tiles.one_tile,
        HAS_MASK=mask is not None, HAS_DROPOUT=active_stages is not None,
        USE_INT64=config.needs_int64(x, g, grad_z, scratch), USE_LIBDEVICE=config.use_libdevice(z),
        num_warps=tiles.num_warps, enable_fp_fusion=config.FP_FUSION)
    grad_w.copy_(dw_part.sum(0))
    grad_b.copy_(db_part.sum(0))
    return grad_z, (grad_w, grad_b)
