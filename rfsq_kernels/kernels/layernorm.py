"""Kernels of the ``layernorm`` strategy (per-image statistics): the single-tile forward and
backward, the stage helpers the split kernels share, the launchers and output allocation. Each
stage's mean/std reduce over all positions of an image: an image that fits one tile is one
program (here); a larger one is spread over several programs per image in K + 1 launches each
way (:mod:`.layernorm_split`, :mod:`.layernorm_split_backward`). The launchers are called
through :mod:`.launch`, which answers problems without positions itself. Design:
``docs/kernel-design.md``.

Besides the bundles of :mod:`.tile_io` and :mod:`.fsq_math`, these helpers take ``stats = (mean_ptr, std_ptr,
factor_ptr, stat_start)`` -- the ``(B, K, C)`` saved statistics, the backward's ``(B, K, 2, C)``
factors ``(weight/sd, sd/weight)`` (None in the forward, see :func:`stage_factors`), and where the
image's rows start
(``stat_start = img * K * C``, also used for the ``(B, K, C)`` parameter-gradient partials
``dparts``) --, ``affine = (weight_ptr, bias_ptr)`` -- the strategy's ``(K, C)`` parameter group,
passed to the kernels as the tuple ``param_ptrs`` -- and ``chan = (offs_c, mask_c, C)``, the
program's channel lanes.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import config, layouts
from .fpmath import as_f32, div_rn, recip_rn
from .launch_settings import launch
from .fsq_math import fsq_code, fsq_dcode, load_digit_range, load_levels
from .tile_io import (image_prologue, keep_only, load_active_stages, load_row, load_tile, masked_row_sum, row_prologue,
                      spatial_lanes, stage_keep, store_index, store_row, store_tile)


@triton.jit
def ln_affine(affine, k, chan):
    """Row ``k`` of the LN weight and bias (``affine = (weight_ptr, bias_ptr)``, ``(K, C)``) as
    float32 ``[BLOCK_C, 1]`` columns."""
    weight_ptr, bias_ptr = affine
    offs_c, mask_c, C = chan
    weight = tl.load(weight_ptr + k * C + offs_c, mask=mask_c, other=1.0).to(tl.float32)[:, None]
    bias = tl.load(bias_ptr + k * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)[:, None]
    return weight, bias


@triton.jit
def ln_stats(stats, k, chan):
    """Saved ``(mu, sd)`` of stage ``k`` (``stats``, see the module docstring) as
    ``[BLOCK_C, 1]`` columns."""
    mean_ptr, std_ptr, _factor_ptr, stat_start = stats
    offs_c, mask_c, C = chan
    mu = tl.load(mean_ptr + stat_start + k * C + offs_c, mask=mask_c, other=0.0)[:, None]
    sd = tl.load(std_ptr + stat_start + k * C + offs_c, mask=mask_c, other=1.0)[:, None]
    return mu, sd


@triton.jit
def ln_factors(weight, sd):
    """Per-channel ``(weight / sd, sd / weight)``, IEEE divisions computed once per channel (the
    reference computes the same two quotients with torch)."""
    return div_rn(weight, sd), div_rn(sd, weight)


@triton.jit
def stage_factors(stats, k, chan, weight, sd):
    """Stage ``k``'s ``(weight / sd, sd / weight)`` columns: computed (:func:`ln_factors`) in the
    forward; loaded in the backward, whose host computed them with torch -- the same IEEE
    divisions of the same float32 values, so the stage's value is unchanged, and no ``div.rn`` (whose
    slow-path subroutine needs a stack frame) sits in the backward's stage loops."""
    _mean_ptr, _std_ptr, factor_ptr, stat_start = stats
    if factor_ptr is None:
        return ln_factors(weight, sd)
    else:
        offs_c, mask_c, C = chan
        row = factor_ptr + 2 * stat_start + 2 * k * C + offs_c
        return (tl.load(row, mask=mask_c, other=1.0)[:, None],
                tl.load(row + C, mask=mask_c, other=1.0)[:, None])


@triton.jit
def ln_stage(r, mu, factors, bias, fsq, USE_LIBDEVICE: tl.constexpr):
    """One ``layernorm`` stage in the reference's op order; returns ``(q, code, t, rounded)``.

    ``factors = (weight / sd, sd / weight)`` from :func:`ln_factors`:
    ``n = (r - mu) * (weight / sd) + bias``; ``q = (FSQ(n) - bias) * (sd / weight) + mu`` --
    no division per element.
    """
    w_sd, sd_w = factors
    code, t, rounded = fsq_code((r - mu) * w_sd + bias, fsq, USE_LIBDEVICE)
    return (code - bias) * sd_w + mu, code, t, rounded


@triton.jit
def _ln_emit(r, acc, mu, sd, k, stats, affine, chan, fsq, digits, index_rows, valid, active_stages,
             HAS_MASK: tl.constexpr, HAS_ACTIVE_STAGES: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """Quantize stage ``k`` with known statistics and store its indices; returns ``(r_{k+1}, acc + q_k)``."""
    weight, bias = ln_affine(affine, k, chan)
    q, _code, _t, rounded = ln_stage(r, mu, stage_factors(stats, k, chan, weight, sd), bias, fsq, USE_LIBDEVICE)
    store_index(index_rows, k, rounded, fsq, digits, valid, active_stages, HAS_MASK, HAS_ACTIVE_STAGES)
    q = keep_only(q, valid[None, :], active_stages, k, HAS_MASK, HAS_ACTIVE_STAGES)
    return r - q, acc + q


@triton.jit
def _ln_store_stats(stats, k, chan, mu, sd, active_stages, HAS_ACTIVE_STAGES: tl.constexpr):
    """Write stage ``k``'s ``[BLOCK_C]`` statistics; a dropped stage stores the neutral ``(0, 1)``."""
    mean_ptr, std_ptr, _factor_ptr, stat_start = stats
    offs_c, mask_c, C = chan
    if HAS_ACTIVE_STAGES:
        mu = tl.where(k < active_stages, mu, 0.0)
        sd = tl.where(k < active_stages, sd, 1.0)
    tl.store(mean_ptr + stat_start + k * C + offs_c, mu, mask=mask_c)
    tl.store(std_ptr + stat_start + k * C + offs_c, sd, mask=mask_c)


@triton.heuristics(layouts.FLAGS_FROM_POINTERS)
@triton.jit(do_not_specialize=["C", "K"])
def _fwd_layernorm_kernel(
    x_ptr,              # input z: (B, C, S) through stride_x*, any float dtype
    q_ptr,              # out: quantized, (B, C, S) through stride_q*, z's dtype
    idx_ptr,            # out: packed indices, (B, S, K) contiguous, int32 or int64
    mean_ptr,           # out: per-image statistics, (B, K, C) float32 contiguous
    std_ptr,            # out: (B, K, C) float32 contiguous
    param_ptrs,         # tuple (weight_ptr, bias_ptr): the strategy's (K, C) parameter group
    consts_ptr,         # (6, C) float32 level constants (config.level_tables)
    basis_ptr,          # (C,) mixed-radix place values in the index dtype (int32 or int64)
    valid_ptr,          # (B, S) uint8 padding mask (1 = valid), or None
    active_stages_ptr,  # (B,) int32 stages each image runs, or None
    C,                  # channels
    S,                  # flattened spatial positions per image (S <= BLOCK_S)
    stride_xb, stride_xc, stride_xs,  # z's strides: image, channel, flattened spatial
    stride_qb, stride_qc, stride_qs,  # quantized's strides
    eps,                # variance epsilon
    K,                  # stages (runtime: one binary serves every K)
    BLOCK_C: tl.constexpr,            # next_pow2(C): every channel in one program
    BLOCK_S: tl.constexpr,            # spatial positions of the tile: the whole image
    HAS_MASK: tl.constexpr,           # derived: valid_ptr is not None
    HAS_ACTIVE_STAGES: tl.constexpr,  # derived: active_stages_ptr is not None
    USE_INT64: tl.constexpr,          # some offset may reach 2**31: index in 64 bits
    USE_LIBDEVICE: tl.constexpr,      # real GPU: libdevice tanh/rint; interpreter: fallbacks
):
    """``layernorm`` forward of an image that fits one tile: one program per image, the image in
    registers for all K stages (a runtime loop). With ``HAS_MASK`` the statistics count valid
    positions only (at least 1); with ``HAS_ACTIVE_STAGES`` stages ``k >= active_stages``
    quantize nothing. Larger images: :mod:`.layernorm_split`.
    """
    img, (x_view, q_view), valid_row, stat_start, offs_c, mask_c = image_prologue(
        ((x_ptr, stride_xb, stride_xc, stride_xs), (q_ptr, stride_qb, stride_qc, stride_qs)),
        valid_ptr, C, S, K, BLOCK_C, USE_INT64)
    stats = (mean_ptr, std_ptr, None, stat_start)  # no factor table: the forward divides (stage_factors)
    affine = param_ptrs
    chan = (offs_c, mask_c, C)
    fsq = load_levels(consts_ptr, offs_c, mask_c, C)
    digits = load_digit_range(consts_ptr, basis_ptr, offs_c, mask_c, C)
    active_stages = load_active_stages(active_stages_ptr, img, K, HAS_ACTIVE_STAGES)
    offs_s, mask_s, valid = spatial_lanes(0, valid_row, S, BLOCK_S, HAS_MASK, USE_INT64)
    mask = mask_c[:, None] & valid[None, :]
    n = as_f32(S)
    if HAS_MASK:
        n = tl.maximum(tl.sum(valid.to(tl.float32), axis=0), 1.0)
    # The statistics are sums in another order than torch's anyway (not bitwise): one IEEE
    # reciprocal per program, multiplied; only the value path's w/sd and sd/w are divided.
    inv_n = recip_rn(n)
    r = load_tile(x_view, offs_c, offs_s, mask)
    acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    index_rows = (idx_ptr, (img * S + offs_s) * K, mask_s)  # see store_index
    for k in range(K):
        mu = masked_row_sum(r, mask) * inv_n
        d = r - mu[:, None]
        sd = tl.sqrt_rn(masked_row_sum(d * d, mask) * inv_n + eps)
        _ln_store_stats(stats, k, chan, mu, sd, active_stages, HAS_ACTIVE_STAGES)
        r, acc = _ln_emit(r, acc, mu[:, None], sd[:, None], k, stats, affine, chan, fsq, digits, index_rows, valid,
                          active_stages, HAS_MASK, HAS_ACTIVE_STAGES, USE_LIBDEVICE)
    store_tile(q_view, acc, offs_c, offs_s, mask_c[:, None] & mask_s[None, :])


@triton.jit
def ln_rebuild(x, nstages, rebuild, affine, chan, fsq, valid, active_stages, HAS_MASK: tl.constexpr,
               HAS_ACTIVE_STAGES: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """Residual ``r_nstages = ((x - q_0) - q_1) - ...`` of the input tile ``x``, each ``q_j``
    decoded from stage ``j``'s stored index and statistics (:func:`decode_stage`: digits and
    multiply-adds, no ``tanh``). Bitwise the forward's residual: ``q_j`` is (docs/semantics.md)
    and the subtractions are the forward's, in its order; positions a stage skipped (``valid``,
    dropped stages) subtract nothing, as in the forward.

    ``rebuild = (index_rows, decodes, radix)``: ``index_rows = (idx_ptr, rows, mask_s)`` as for
    :func:`store_index`, ``decodes = (mean_ptr, sdw_ptr, stat_start)`` (``sdw``: the ``(B, K, C)``
    ``sd / weight`` of each stage) and the columns of :func:`load_radix`.
    """
    index_rows, decodes, radix = rebuild
    idx_ptr, rows, mask_s = index_rows
    r = x
    for j in range(nstages):
        index = tl.load(idx_ptr + rows + j, mask=mask_s, other=0)[None, :]
        q = decode_stage(index, j, decodes, affine, chan, fsq, radix, USE_LIBDEVICE)
        r = r - keep_only(q, valid, active_stages, j, HAS_MASK, HAS_ACTIVE_STAGES)
    return r


@triton.jit
def ln_bwd_stage(r, g_minus_G, mask, k, stats, affine, chan, fsq, active_stages, HAS_ACTIVE_STAGES: tl.constexpr,
                 USE_LIBDEVICE: tl.constexpr):
    """Per-position quantities of stage ``k`` of a tile whose residual ``r = r_k`` is rebuilt
    (:func:`ln_rebuild`), ``g_minus_G = g - G_{k+1}``: ``(v, h, xc, qc, w_sd)`` -- ``v = dL/dq_k``
    (masked), ``h = dL/dn`` through the code (``v * sd / weight * dcode/dn``), ``xc = r - mu``,
    ``qc = q - mu`` and the column ``weight / sd``. Only stage ``k`` runs through ``tanh``."""
    mu, sd = ln_stats(stats, k, chan)
    weight, bias = ln_affine(affine, k, chan)
    w_sd, sd_w = stage_factors(stats, k, chan, weight, sd)
    q, _code, t, _rounded = ln_stage(r, mu, (w_sd, sd_w), bias, fsq, USE_LIBDEVICE)
    v = tl.where(stage_keep(mask, active_stages, k, HAS_ACTIVE_STAGES), g_minus_G, 0.0)
    h = v * sd_w * fsq_dcode(t, fsq)
    return v, h, r - mu, q - mu, w_sd


@triton.jit
def _add_four(a0, a1, a2, a3, b0, b1, b2, b3):
    """Combine function of :func:`_ln_sums`: four float32 additions, as ``tl.sum``'s."""
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3


@triton.jit
def _ln_sums(v, h, xc, qc, mask):
    """The four per-channel sums of a tile that the backward of one stage reduces:
    ``(sum v, sum h, sum v*qc, sum h*xc)`` (``= sd * (sum v*cn, sum h*xhat)``), each ``[BLOCK_C]``.
    One reduction of four operands: the same additions in the same tree as four ``tl.sum``, but
    one exchange through shared memory (one set of barriers) instead of four."""
    return tl.reduce((v, h, v * qc, tl.where(mask, h * xc, 0.0)), 1, _add_four)


@triton.jit
def _add_sums(a, b):
    """Elementwise sum of two :func:`_ln_sums` tuples."""
    return a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]


@triton.jit
def ln_bwd_grads(sums, k, stats, inv_sd_ptr, chan):
    """Stage ``k``'s four sums (:func:`_ln_sums`) as ``(dweight, dbias, coeffs)``: the image's
    ``[BLOCK_C]`` parameter gradients and the coefficients ``(weight/sd, dL/dmu, dL/dsd / sd)`` of
    ``dL/dr`` as ``[BLOCK_C, 1]`` columns (the last one multiplies ``xc = r - mu``).

    ``q = ((code - bias) / weight) * sd + mu`` with ``n = weight * xhat + bias``:
    ``dL/dweight = sum h*xhat - sd/weight * sum v*cn``, ``dL/dbias = sum h - sd/weight * sum v``,
    ``dL/dmu = sum v - weight/sd * sum h``, ``dL/dsd = sum v*cn - weight/sd * sum h*xhat``; the
    quotients are the host's (the factor table of ``stats``, ``inv_sd_ptr``), loaded."""
    sum_v, sum_h, sum_vqc, sum_hxc = sums
    _mean_ptr, _std_ptr, factor_ptr, stat_start = stats
    offs_c, mask_c, C = chan
    row = factor_ptr + 2 * stat_start + 2 * k * C + offs_c
    w_sd = tl.load(row, mask=mask_c, other=1.0)
    sd_w = tl.load(row + C, mask=mask_c, other=1.0)
    inv_sd = tl.load(inv_sd_ptr + stat_start + k * C + offs_c, mask=mask_c, other=1.0)
    sum_vc, sum_hx = sum_vqc * inv_sd, sum_hxc * inv_sd
    coeffs = (w_sd[:, None], (sum_v - w_sd * sum_h)[:, None], ((sum_vc - w_sd * sum_hx) * inv_sd)[:, None])
    return sum_hx - sd_w * sum_vc, sum_h - sd_w * sum_v, coeffs


@triton.jit
def _ln_dr(h, xc, coeffs, inv_n, mask, HAS_MASK: tl.constexpr):
    """``dL/dr_k`` through stage k: direct path plus the mean and std paths (``1 / inv_n``
    positions enter the statistics; with ``HAS_MASK`` only the valid ones, ``mask``, get the
    statistics' share); ``xc = r - mu`` and ``coeffs`` from :func:`ln_bwd_grads`."""
    w_sd, dmu, dsd_sd = coeffs
    dr = h * w_sd + (dmu + dsd_sd * xc) * inv_n
    if HAS_MASK:
        dr = tl.where(mask, dr, 0.0)
    return dr


@triton.heuristics(layouts.FLAGS_FROM_POINTERS)
@triton.jit(do_not_specialize=["K"])
def _bwd_layernorm_kernel(
    x_ptr,              # input z: (B, C, S) through stride_x*
    g_ptr,              # dL/dquantized: (B, C, S) through stride_g* (may be stride 0)
    dx_ptr,             # out: dL/dz, (B, C, S) through stride_dx*, z's dtype
    idx_ptr,            # the forward's packed indices, (B, S, K) contiguous, int32 or int64
    mean_ptr,           # the forward's means, (B, K, C) float32
    factor_ptr,         # (B, K, 2, C) float32 (weight/std, std/weight), divided by torch on the host
    inv_sd_ptr,         # (B, K, C) float32 1/std, divided by torch on the host
    inv_n_ptr,          # (B,) float32 1/n, n the positions entering each image's statistics (torch)
    param_ptrs,         # tuple (weight_ptr, bias_ptr): the strategy's (K, C) parameter group
    dparam_part_ptrs,   # tuple (dweight_part_ptr, dbias_part_ptr): out, (B, K, C) float32 partials
    consts_ptr,         # (6, C) float32 level constants
    radix_ptr,          # (5, C) division magic in the index dtype (layernorm_split.radix_table)
    valid_ptr,          # (B, S) uint8 padding mask, or None
    active_stages_ptr,  # (B,) int32 stages each image runs, or None
    S,                  # flattened spatial positions per image (S <= BLOCK_S)
    stride_xb, stride_xc, stride_xs,     # z's strides: image, channel, flattened spatial
    stride_gb, stride_gc, stride_gs,     # dL/dquantized's strides
    stride_dxb, stride_dxc, stride_dxs,  # dL/dz's strides
    K,                  # stages (runtime)
    BLOCK_C: tl.constexpr,            # the exact channel count C: every channel in every thread
    BLOCK_S: tl.constexpr,            # spatial positions of the program: the whole image
    HAS_MASK: tl.constexpr,           # derived: valid_ptr is not None
    HAS_ACTIVE_STAGES: tl.constexpr,  # derived: active_stages_ptr is not None
    USE_INT64: tl.constexpr,          # 64-bit offsets
    USE_LIBDEVICE: tl.constexpr,      # real GPU: libdevice; interpreter: fallbacks
):
    """``layernorm`` backward of an image that fits one tile: one program per image; J_k couples
    the positions of each (image, channel) through the mean and std, like a LayerNorm backward
    over the spatial axis. ``V = g - G_{k+1}`` stays in registers across the stages.

    The image is ``C`` channel rows (:mod:`.layernorm_rows`): every channel of a position in one
    thread, no padded channel. Stage ``k``'s residual is rebuilt from ``z`` and the stored
    indices of stages ``< k`` (:func:`.layernorm_rows.row_rebuild`); ``tanh`` runs once per stage
    and element. Parameter gradients go to per-image partials ``(B, K, C)``, reduced on the host.
    Larger images: :mod:`.layernorm_split_backward`.
    """
    img, (x_view, g_view, dx_view), offs_s, mask_s, valid = row_prologue(
        ((x_ptr, stride_xb, stride_xc, stride_xs), (g_ptr, stride_gb, stride_gc, stride_gs),
         (dx_ptr, stride_dxb, stride_dxc, stride_dxs)),
        valid_ptr, S, 1, BLOCK_S, HAS_MASK, USE_INT64)
    _weight_ptr, bias_ptr = param_ptrs
    rstats = (mean_ptr, factor_ptr, inv_sd_ptr, bias_ptr, img * K * BLOCK_C)
    active_stages = load_active_stages(active_stages_ptr, img, K, HAS_ACTIVE_STAGES)
    inv_n = tl.load(inv_n_ptr + img)
    # Registers hold V = g - G_{k+1} (instead of g and G) and the stage being worked on; the
    # input is re-read (from L1/L2: one image) for each stage's rebuild and g once more at the
    # end (dx = g - V).
    Vs = ()
    for c in tl.static_range(BLOCK_C):
        Vs = Vs + (load_row(g_view, c, offs_s, valid),)
    index_rows = (idx_ptr, (img * S + offs_s) * K, mask_s)
    for k_rev in range(K):
        k = K - 1 - k_rev
        rs = ()
        for c in tl.static_range(BLOCK_C):
            rs = rs + (load_row(x_view, c, offs_s, valid),)
        rs = row_rebuild(rs, k, index_rows, rstats, consts_ptr, radix_ptr, valid, active_stages, BLOCK_C, HAS_MASK,
                         HAS_ACTIVE_STAGES, USE_LIBDEVICE)
        new_Vs = ()
        for c in tl.static_range(BLOCK_C):
            # The direct path of dL/dr (row_bwd_stage) needs no reduction; the statistics'
            # share needs the row's sums. (Padding picks up that share too, but V there never
            # reaches a valid position -- v is masked -- and dx is zeroed there at the store.)
            V, xc, sums = row_bwd_stage(rs[c], Vs[c], k, c, rstats, consts_ptr, valid, active_stages, BLOCK_C,
                                        HAS_ACTIVE_STAGES, USE_LIBDEVICE)
            dmu, dsd_sd = row_coeffs(sums, k, c, rstats, dparam_part_ptrs, BLOCK_C)
            new_Vs = new_Vs + (V - (dmu + dsd_sd * xc) * inv_n,)
        Vs = new_Vs
    for c in tl.static_range(BLOCK_C):
        dx = load_row(g_view, c, offs_s, valid) - Vs[c]
        if HAS_MASK:
            dx = tl.where(valid, dx, 0.0)
        store_row(dx_view, dx, c, offs_s, mask_s)


def forward_outputs(z: torch.Tensor, levels: Sequence[int], stages: int) -> Tuple[torch.Tensor, ...]:
    """Uninitialised ``(quantized, indices, mean, std)``; mean/std are float32 ``(B, K, C)``."""
    quantized, indices = layouts.quantized_and_indices(z, levels, stages)
    B, C = z.shape[0], z.shape[1]
    mean = z.new_empty((B, stages, C), dtype=torch.float32)
    std = z.new_empty((B, stages, C), dtype=torch.float32)
    return quantized, indices, mean, std


def forward(z: torch.Tensor, levels: Sequence[int], stages: int, params: Tuple[torch.Tensor, ...],
            mask: Optional[torch.Tensor], active_stages: Optional[torch.Tensor], fsq_shift: str,
            eps: float) -> Tuple[torch.Tensor, ...]:
    """Fused ``layernorm`` forward (``params = (ln_weight, ln_bias)``): ``(quantized, indices, mean, std)``."""
    ln_weight, ln_bias = params
    quantized, indices, mean, std = forward_outputs(z, levels, stages)
    B, C, S = z.shape[0], z.shape[1], math.prod(z.shape[2:])
    x, x_strides = layouts.strided_view(z)
    consts, basis = config.level_tables(levels, z.device, fsq_shift)
    valid, active_stages = layouts.mask_and_active_stages(mask, active_stages, B, S)
    offsets = (x, quantized, indices)
    tiles = config.layernorm_tiles(C, S, "forward", layouts.needs_int64(*offsets), arch=config.target_arch(z))
    if not tiles.one_tile:
        return layernorm_split.forward(z, levels, stages, params, eps, valid, active_stages, tiles,
                                       (quantized, indices, mean, std), fsq_shift)
    launch(_fwd_layernorm_kernel, (B,),
           (x, quantized, indices, mean, std, (ln_weight, ln_bias), consts, basis, valid, active_stages,
            C, S, *x_strides, *layouts.flat_strides(quantized), float(eps), stages),
           tiles=tiles, tensors=offsets)
    return quantized, indices, mean, std


def backward(grad_q: torch.Tensor, z: torch.Tensor, levels: Sequence[int], stages: int,
             params: Tuple[torch.Tensor, ...], mask: Optional[torch.Tensor], active_stages: Optional[torch.Tensor],
             fsq_shift: str, mean: torch.Tensor, std: torch.Tensor, indices: torch.Tensor
             ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """Fused ``layernorm`` backward: ``(grad_z, (grad_ln_weight, grad_ln_bias))``. ``mean``,
    ``std`` and ``indices`` are the forward's outputs: the kernel rebuilds each stage's residual
    from ``z`` and the earlier stages' indices and statistics."""
    if indices is None:
        raise ValueError("the layernorm backward needs the forward's indices (its residuals are rebuilt from them)")
    ln_weight, ln_bias = params
    grad_z, grad_w, grad_b = layouts.new_output(z), torch.empty_like(ln_weight), torch.empty_like(ln_bias)
    B, C, S = z.shape[0], z.shape[1], math.prod(z.shape[2:])
    x, x_strides = layouts.strided_view(z)
    g, g_strides = layouts.strided_view(grad_q)
    consts, _basis = config.level_tables(levels, z.device, fsq_shift)
    valid, active_stages = layouts.mask_and_active_stages(mask, active_stages, B, S)
    tiles = config.layernorm_tiles(C, S, "backward", sparse=valid is not None or active_stages is not None,
                                   arch=config.target_arch(z))
    # Parameter gradients as one partial sum per (image, stage, channel), reduced below in a fixed order.
    dw_part = torch.empty((B, stages, C), dtype=torch.float32, device=z.device)
    db_part = torch.empty((B, stages, C), dtype=torch.float32, device=z.device)
    # Each stage's (weight/sd, sd/weight): the same IEEE divisions the forward kernel made (and
    # the reference makes), done once here instead of in every tile of every stage.
    # sd/weight also on its own (B, K, C), the layout the decodes of the rebuild read; 1/sd (IEEE,
    # the kernel's recip_rn) for the coefficients of dL/dr: no division left in the kernel's stage loop.
    w = ln_weight.float().unsqueeze(0)
    sd_w = std / w
    factors = torch.stack((w / std, sd_w), dim=2).contiguous()
    inv_sd = torch.reciprocal(std).contiguous()
    radix = radix_table(levels, indices.dtype, z.device)
    if tiles.one_tile:
        # 1/n per image (the positions entering its statistics, at least 1): counted and divided here.
        count = (torch.full((B,), float(S), dtype=torch.float32, device=z.device) if valid is None
                 else valid.sum(1, dtype=torch.float32).clamp_min(1.0))
        inv_n = torch.reciprocal(count)
        launch(_bwd_layernorm_kernel, (B,),
               (x, g, grad_z, indices.contiguous(), mean, factors, inv_sd, inv_n, (ln_weight, ln_bias),
                (dw_part, db_part), consts, radix, valid, active_stages, S, *x_strides, *g_strides,
                *layouts.flat_strides(grad_z), stages),
               tiles=config.layernorm_row_tiles(C, S, tiles), tensors=(x, g, grad_z, indices))
    else:
        layernorm_split_backward.backward(
            (x, g, grad_z, indices.contiguous()), (x_strides, g_strides, layouts.flat_strides(grad_z)),
            (mean, std, factors, sd_w, inv_sd), (ln_weight, ln_bias), (dw_part, db_part), consts, radix, valid,
            active_stages, tiles, stages)
    grad_w.copy_(dw_part.sum(0))
    grad_b.copy_(db_part.sum(0))
    return grad_z, (grad_w, grad_b)


# The split kernels and the rebuild's decode helpers (which live with the split forward) import
# this module's stage helpers: imported last, once every name they take from here exists.
from . import layernorm_split, layernorm_split_backward  # noqa: E402
from .layernorm_split import decode_stage, radix_table  # noqa: E402
from .layernorm_rows import row_bwd_stage, row_coeffs, row_rebuild  # noqa: E402
