"""The split ``layernorm`` forward: images that do not fit one tile are spread over
several programs, each owning an (image, spatial slice), and the residual of a stage is
*rebuilt* from the input and the digits already stored instead of replayed through ``tanh``.

Forward, K + 1 launches (``launch`` = 0 .. K), every program of launch ``l`` works on its slice:

* launch 0 (``PHASE_FIRST``): per-program partial statistics ``(count, mean, M2)`` of ``r_0 = z``;
* launch ``l`` in 1 .. K-1 (``PHASE_MIDDLE``): merge stage ``l-1``'s partials of the image
  (:func:`merge_partials`, the same fixed order in every program, so every program gets the same
  bits), rebuild ``r_{l-1} = z - q_0 - ... - q_{l-2}`` from the stored indices and statistics
  (:func:`decode_stage`: digits and multiply-adds, no ``tanh``), quantize stage ``l-1`` (store
  its index; the image's first program stores its statistics), and store the partials of
  ``r_l = r_{l-1} - q_{l-1}``;
* launch K (``PHASE_LAST``): the same for stage K-1, then the quantized sum
  ``((q_0 + q_1) + ...) + q_{K-1}`` in the reference's order.

Why the rebuild is exact: ``q_j = (code_j - bias_j) * (sd_j / weight_j) + mu_j`` with ``code_j =
(digit_j - half_w) / half_w`` (IEEE), and ``digit_j`` is what the index stores; the stored
``mu_j``, ``sd_j`` and the ``sd_j / weight_j`` table are the very values the stage used. So the
rebuilt ``r_k`` is bitwise the forward's ``r_k`` (the same subtractions in the same order).

Statistics: a program walks its slice in tiles; each tile's ``(n, mean, M2)`` (two-pass, in
registers) is merged into the program's running partial with Chan's pairwise formula; a launch
merges the image's partials with the multi-way form of the same formula, ``M2 = sum M2_p +
sum n_p (mean_p - mean)^2``: a sum of non-negative terms, never negative or NaN. No float atomics,
no spin-waits, no grid barriers: only launch boundaries order the programs. Masks count valid
positions only; a slice without one contributes ``n_p = 0``.

Design and costs per element: ``docs/kernel-design.md``, "Split layernorm".
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import config, layouts
from .launch_settings import launch
from .fpmath import as_f32, div_small_int, recip_rn
from .layernorm import _ln_store_stats, ln_affine, ln_factors, ln_stage
from .fsq_math import load_digit_range, load_levels
from .tile_io import (image_views, keep_only, load_active_stages, load_tile, load_valid, masked_row_sum,
                      store_index, store_tile, widen)

PHASE_FIRST = tl.constexpr(0)
PHASE_MIDDLE = tl.constexpr(1)
PHASE_LAST = tl.constexpr(2)

# Rows of the radix table (:func:`radix_table`): floor(index / basis_c) and
# floor(index / (basis_c * L_c)) as ``umulhi(2 * index, m) >> l`` (Granlund-Montgomery).
ROW_M_LO = tl.constexpr(0)
ROW_L_LO = tl.constexpr(1)
ROW_M_HI = tl.constexpr(2)
ROW_L_HI = tl.constexpr(3)
ROW_RADIX = tl.constexpr(4)

def _magic(d: int, bits: int = 32) -> Tuple[int, int]:
    """``(m, l)`` with ``floor(n / d) == (n * m) >> (bits - 1 + l)`` for every ``0 <= n <
    2**(bits-1)``: ``l = ceil(log2 d)``, ``m = ceil(2**(bits-1+l) / d) < 2**bits`` (Granlund &
    Montgomery 1994, Thm 4.2 with N = bits - 1: ``m * d - 2**(N+l) < d <= 2**l``). ``m`` is returned
    as its signed ``bits``-bit pattern."""
    lg = (d - 1).bit_length()
    m = -(-(1 << (bits - 1 + lg)) // d)
    assert 0 < m < 2**bits
    return (m - 2**bits if m >= 2**(bits - 1) else m), lg


def radix_table(levels: Sequence[int], index_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Cached ``(5, C)`` rows ``m_lo, l_lo, m_hi, l_hi, L`` in the index dtype: the magic numbers
    dividing an index by ``basis_c`` and by ``basis_c * L_c`` (:func:`_magic`), so that a digit is
    two high multiplies, two shifts and a multiply-subtract (:func:`index_digit`), no division."""
    bits = 64 if index_dtype == torch.int64 else 32

    def build():
        rows = [[], [], [], [], []]
        basis = 1
        for L in levels:
            m_lo, l_lo = _magic(basis, bits)
            # basis * L beyond the index range: the quotient by it is 0 (m = 0)
            m_hi, l_hi = _magic(basis * L, bits) if basis * L < 2**(bits - 1) else (0, 0)
            for row, v in zip(rows, (m_lo, l_lo, m_hi, l_hi, L)):
                row.append(v)
            basis *= L
        return (torch.tensor(rows, dtype=index_dtype, device=device),)

    return config.cached(("ln_split_radix", tuple(levels), bits, torch.device(device)), build)[0]


def reciprocal_table(n: int, device: torch.device) -> torch.Tensor:
    """Cached float32 ``1 / max(i, 1)`` for ``i = 0 .. n`` (torch's IEEE division): the counts'
    reciprocals of the tile loop, looked up instead of divided (``div.rn``'s slow path is a
    subroutine call, and a call inside the loop made ptxas save the live tile around it)."""
    def build():
        return (1.0 / torch.arange(n + 1, dtype=torch.float32, device=device).clamp_min(1.0),)

    return config.cached(("ln_split_recip", n, torch.device(device)), build)[0]


@triton.jit
def load_radix(radix_ptr, offs_c, mask_c, C):
    """The ``(5, C)`` table of :func:`radix_table` as ``[BLOCK_C, 1]`` columns, loaded once per
    program (fewer registers than reloading them in every decode, measured on sm_90)."""
    m_lo = tl.load(radix_ptr + ROW_M_LO * C + offs_c, mask=mask_c, other=1)[:, None]
    l_lo = tl.load(radix_ptr + ROW_L_LO * C + offs_c, mask=mask_c, other=0)[:, None]
    m_hi = tl.load(radix_ptr + ROW_M_HI * C + offs_c, mask=mask_c, other=1)[:, None]
    l_hi = tl.load(radix_ptr + ROW_L_HI * C + offs_c, mask=mask_c, other=0)[:, None]
    radix_l = tl.load(radix_ptr + ROW_RADIX * C + offs_c, mask=mask_c, other=1)[:, None]
    return m_lo, l_lo, m_hi, l_hi, radix_l


@triton.jit
def index_digit(index, radix):
    """Channel digits ``floor(index / basis_c) mod L_c`` of a ``[1, BLOCK_S]`` row of packed
    indices (int32 or int64) as a float32 ``[BLOCK_C, BLOCK_S]`` tile; ``radix = (m_lo, l_lo,
    m_hi, l_hi, L)``: the ``[BLOCK_C, 1]`` columns of :func:`load_radix`. ``2 * index`` fits the
    unsigned type, and ``umulhi(2n, m) = floor(n * m / 2**(bits-1))``."""
    m_lo, l_lo, m_hi, l_hi, radix_l = radix
    udt = tl.uint64 if index.dtype == tl.int64 else tl.uint32
    twice = index.to(udt, bitcast=True) << 1
    lo = tl.umulhi(twice, m_lo.to(udt, bitcast=True)) >> l_lo.to(udt, bitcast=True)
    hi = tl.umulhi(twice, m_hi.to(udt, bitcast=True)) >> l_hi.to(udt, bitcast=True)
    return (lo - hi * radix_l.to(udt, bitcast=True)).to(index.dtype, bitcast=True).to(tl.float32)


@triton.jit
def decode_stage(index, j, stats, affine, chan, fsq, radix, USE_LIBDEVICE: tl.constexpr):
    """``q_j`` of a tile from stage ``j``'s stored indices (``[1, BLOCK_S]``) and statistics, the
    forward's operations in the forward's order (``reference._decode_layernorm``): bitwise the
    stage's value wherever it quantized (the caller zeroes the positions it skipped)."""
    mean_ptr, sdw_ptr, stat_start = stats
    _weight_ptr, bias_ptr = affine
    offs_c, mask_c, C = chan
    _half_l, _offset, _shift, half_w, inv_w = fsq
    rounded = index_digit(index, radix) - half_w
    code = div_small_int(rounded, half_w, inv_w, USE_LIBDEVICE)
    bias = tl.load(bias_ptr + j * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)[:, None]
    sd_w = tl.load(sdw_ptr + stat_start + j * C + offs_c, mask=mask_c, other=1.0)[:, None]
    mu = tl.load(mean_ptr + stat_start + j * C + offs_c, mask=mask_c, other=0.0)[:, None]
    return (code - bias) * sd_w + mu


@triton.jit
def merge_partials(parts, k, K, img, P, chan, eps, PARTS_BLOCK: tl.constexpr):
    """Stage ``k``'s ``(mu, sd)`` of image ``img`` (``[BLOCK_C]``) from its ``P`` programs'
    partials, ``parts = (count_ptr, mean_ptr, m2_ptr)``: ``n = sum n_p`` (at least 1),
    ``mu = sum(n_p * mean_p) / n``, ``M2 = sum M2_p + sum n_p * (mean_p - mu)^2`` (Chan et al.'s
    combination of all parts at once), ``sd = sqrt(M2 / n + eps)``. One fixed reduction tree,
    the same in every program of the image."""
    count_ptr, part_mean_ptr, part_m2_ptr = parts
    offs_c, mask_c, C = chan
    offs_p = tl.arange(0, PARTS_BLOCK)
    mask_p = offs_p < P
    n_p = tl.load(count_ptr + img * P + offs_p, mask=mask_p, other=0.0)
    rows = ((img * K + k) * P + offs_p)[:, None] * C + offs_c[None, :]
    mask = mask_p[:, None] & mask_c[None, :]
    mean_p = tl.load(part_mean_ptr + rows, mask=mask, other=0.0)
    m2_p = tl.load(part_m2_ptr + rows, mask=mask, other=0.0)
    inv_n = recip_rn(tl.maximum(tl.sum(n_p, axis=0), 1.0))
    mu = tl.sum(n_p[:, None] * mean_p, axis=0) * inv_n
    d = mean_p - mu[None, :]
    m2 = tl.sum(m2_p, axis=0) + tl.sum(n_p[:, None] * (d * d), axis=0)
    return mu, tl.sqrt_rn(m2 * inv_n + eps)


@triton.jit
def chan_update(run, r, mask, n_b, recip_ptr):
    """Merge one tile (``r`` with its valid ``mask`` and ``n_b`` valid positions) into the running
    partial ``run = (n, mean, M2)`` (Chan et al.): the tile's own mean and centred sum of squares
    (two-pass, in registers), then ``mean += delta * n_b / n``, ``M2 += M2_b + delta^2 * n_a * n_b / n``.
    Reciprocals of counts come from ``recip_ptr`` (:func:`reciprocal_table`)."""
    n_a, mean_a, m2_a = run
    mean_b = masked_row_sum(r, mask) * tl.load(recip_ptr + n_b.to(tl.int32))
    d = r - mean_b[:, None]
    m2_b = masked_row_sum(d * d, mask)
    n = n_a + n_b
    f = n_b * tl.load(recip_ptr + n.to(tl.int32))
    delta = mean_b - mean_a
    return n, mean_a + delta * f, m2_a + m2_b + (delta * delta) * (n_a * f)


@triton.jit
def slice_prologue(tensors, valid_ptr, active_stages_ptr, consts_ptr, mean_ptr, sdw_ptr, C, S, P, K, slice_len,
                   BLOCK_C: tl.constexpr, HAS_ACTIVE_STAGES: tl.constexpr, USE_INT64: tl.constexpr):
    """Opening of a split layernorm kernel, whose program ``pid`` owns positions ``[part *
    slice_len, (part + 1) * slice_len)`` of image ``pid // P``: ``(img, part, start, end,
    valid_row, views, stat_start, chan, fsq, active_stages, decodes)`` -- the image (int64 with
    ``USE_INT64``) and slice, the mask row, the views of ``tensors`` (:func:`.tile_io.image_views`),
    where the image's ``(B, K, C)`` rows start, ``chan = (offs_c, mask_c, C)``, the level
    constants, the image's stage count and the decode bundle ``(mean_ptr, sdw_ptr, stat_start)``.
    The statement order is the one the kernels were tuned on; with it 2 of the split binaries
    schedule two registers differently from the hand-written openings (bench/NOTES.md)."""
    pid = tl.program_id(0)
    img = widen(pid // P, USE_INT64)
    part = pid % P
    start = widen(part * slice_len, USE_INT64)
    end = tl.minimum(start + slice_len, S)
    valid_row = (valid_ptr, img * S)
    views = image_views(img, tensors)
    stat_start = img * K * C
    offs_c = widen(tl.arange(0, BLOCK_C), USE_INT64)
    mask_c = offs_c < C
    chan = (offs_c, mask_c, C)
    fsq = load_levels(consts_ptr, offs_c, mask_c, C)
    active_stages = load_active_stages(active_stages_ptr, img, K, HAS_ACTIVE_STAGES)
    decodes = (mean_ptr, sdw_ptr, stat_start)
    return img, part, start, end, valid_row, views, stat_start, chan, fsq, active_stages, decodes


@triton.heuristics(layouts.FLAGS_FROM_POINTERS)
@triton.jit(do_not_specialize=["C", "K", "P", "slice_len", "step"])
def _fwd_layernorm_split_kernel(
    x_ptr,              # input z: (B, C, S) through stride_x*, any float dtype
    q_ptr,              # out (last launch): quantized, (B, C, S) through stride_q*, z's dtype
    idx_ptr,            # out: packed indices, (B, S, K) contiguous, int32 or int64
    mean_ptr,           # out: per-image statistics, (B, K, C) float32 contiguous
    std_ptr,            # out: (B, K, C) float32
    sdw_ptr,            # scratch: (B, K, C) float32 sd / weight of each stored stage (the decodes')
    part_ptrs,          # tuple of scratch (count (B, P), mean (B, K, P, C), M2 (B, K, P, C)) float32
    param_ptrs,         # tuple (weight_ptr, bias_ptr): the strategy's (K, C) parameter group
    consts_ptr,         # (6, C) float32 level constants (config.level_tables)
    basis_ptr,          # (C,) mixed-radix place values in the index dtype
    radix_ptr,          # (5, C) division magic in the index dtype (radix_table)
    recip_ptr,          # (slice_len + 1,) float32 1 / max(i, 1) (reciprocal_table)
    valid_ptr,          # (B, S) uint8 padding mask (1 = valid), or None
    active_stages_ptr,  # (B,) int32 stages each image runs, or None
    C,                  # channels
    S,                  # flattened spatial positions per image
    P,                  # programs per image
    slice_len,          # positions per program (a multiple of BLOCK_S)
    stride_xb, stride_xc, stride_xs,  # z's strides: image, channel, flattened spatial
    stride_qb, stride_qc, stride_qs,  # quantized's strides
    eps,                # variance epsilon
    K,                  # stages
    step,               # this launch, 0 .. K (the stage it quantizes is step - 1)
    BLOCK_C: tl.constexpr,            # next_pow2(C)
    BLOCK_S: tl.constexpr,            # positions per tile
    PARTS_BLOCK: tl.constexpr,        # next_pow2(P)
    PHASE: tl.constexpr,              # PHASE_FIRST (launch 0), PHASE_MIDDLE, PHASE_LAST (launch K)
    HAS_MASK: tl.constexpr,           # derived: valid_ptr is not None
    HAS_ACTIVE_STAGES: tl.constexpr,  # derived: active_stages_ptr is not None
    USE_INT64: tl.constexpr,          # 64-bit offsets
    USE_LIBDEVICE: tl.constexpr,      # real GPU: libdevice tanh/rint; interpreter: fallbacks
):
    """One launch of the split ``layernorm`` forward (module docstring): program ``pid`` owns
    positions ``[part * slice_len, (part + 1) * slice_len)`` of image ``pid // P``."""
    img, part, start, end, valid_row, (x_view, q_view), stat_start, chan, fsq, active_stages, decodes = \
        slice_prologue(((x_ptr, stride_xb, stride_xc, stride_xs), (q_ptr, stride_qb, stride_qc, stride_qs)),
                       valid_ptr, active_stages_ptr, consts_ptr, mean_ptr, sdw_ptr, C, S, P, K, slice_len, BLOCK_C,
                       HAS_ACTIVE_STAGES, USE_INT64)
    offs_c, mask_c, _C = chan
    affine = param_ptrs
    radix = load_radix(radix_ptr, offs_c, mask_c, C)
    digits = load_digit_range(consts_ptr, basis_ptr, offs_c, mask_c, C)
    count_ptr, part_mean_ptr, part_m2_ptr = part_ptrs
    k_q = step - 1  # the stage this launch quantizes (PHASE_MIDDLE / PHASE_LAST)
    if PHASE != PHASE_FIRST:
        mu, sd = merge_partials(part_ptrs, k_q, K, img, P, chan, eps, PARTS_BLOCK)
        if part == 0:
            # The first program of the image publishes the statistics (the launches after this
            # one decode with them) and sd / weight; a dropped stage stores the neutral (0, 1).
            _ln_store_stats((mean_ptr, std_ptr, None, stat_start), k_q, chan, mu, sd, active_stages, HAS_ACTIVE_STAGES)
            weight_row = tl.load(affine[0] + k_q * C + offs_c, mask=mask_c, other=1.0).to(tl.float32)
            sd_pub = sd
            if HAS_ACTIVE_STAGES:
                sd_pub = tl.where(k_q < active_stages, sd, 1.0)
            tl.store(sdw_ptr + stat_start + k_q * C + offs_c, ln_factors(weight_row, sd_pub)[1], mask=mask_c)
        weight, bias = ln_affine(affine, k_q, chan)
        factors = ln_factors(weight, sd[:, None])
        mu_col = mu[:, None]
    run = (as_f32(0.0), tl.zeros([BLOCK_C], dtype=tl.float32), tl.zeros([BLOCK_C], dtype=tl.float32))
    for s0 in range(start, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask_s = offs_s < end
        valid = load_valid(valid_row, offs_s, mask_s, HAS_MASK)
        mask = mask_c[:, None] & valid[None, :]
        r = load_tile(x_view, offs_c, offs_s, mask)
        if PHASE == PHASE_LAST:
            acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        if PHASE != PHASE_FIRST:
            rows = (img * S + offs_s) * K
            for j in range(k_q):
                index = tl.load(idx_ptr + rows + j, mask=mask_s, other=0)[None, :]
                q = keep_only(decode_stage(index, j, decodes, affine, chan, fsq, radix, USE_LIBDEVICE),
                              valid[None, :], active_stages, j, HAS_MASK, HAS_ACTIVE_STAGES)
                r = r - q
                if PHASE == PHASE_LAST:
                    acc = acc + q
            q, _code, _t, rounded = ln_stage(r, mu_col, factors, bias, fsq, USE_LIBDEVICE)
            store_index((idx_ptr, rows, mask_s), k_q, rounded, fsq, digits, valid, active_stages, HAS_MASK,
                        HAS_ACTIVE_STAGES)
            q = keep_only(q, valid[None, :], active_stages, k_q, HAS_MASK, HAS_ACTIVE_STAGES)
            r = r - q
        if PHASE == PHASE_LAST:
            store_tile(q_view, acc + q, offs_c, offs_s, mask_c[:, None] & mask_s[None, :])
        else:
            if HAS_MASK:
                n_b = tl.sum(valid.to(tl.float32), axis=0)
            else:
                n_b = as_f32(tl.minimum(end - s0, BLOCK_S))
            run = chan_update(run, r, mask, n_b, recip_ptr)
    if PHASE != PHASE_LAST:
        k_p = step  # the stage whose input r_launch these partials describe
        n_run, mean_run, m2_run = run
        if PHASE == PHASE_FIRST:
            tl.store(count_ptr + img * P + part, n_run)
        rows_p = ((img * K + k_p) * P + part) * C + offs_c
        tl.store(part_mean_ptr + rows_p, mean_run, mask=mask_c)
        tl.store(part_m2_ptr + rows_p, m2_run, mask=mask_c)


# -- host side ---------------------------------------------------------------------------------


def split_block_s(tiles: config.Tiles) -> int:
    """Positions per tile of the split forward, from the base tile (same warps and register cap):
    half its ``BLOCK_S`` (4 elements per thread), a quarter (2 per thread) above 8 channels. The
    middle and last launches carry the residual, the decoded stage and (last) the sum through the
    decode loop; at 8 elements per thread that does not fit the 128-register cap, and with 16
    channels (whose per-channel columns -- level constants, radix rows, statistics -- also grow)
    neither does 4 per thread with 64-bit indices or offsets. The tile size is part of the
    statistics' reduction order."""
    shrink = 4 if tiles.block_c > 8 else 2
    return max(tiles.block_s // shrink, 2)


def forward(z: torch.Tensor, levels: Sequence[int], stages: int, params: Tuple[torch.Tensor, ...], eps: float,
            valid: Optional[torch.Tensor], active_stages: Optional[torch.Tensor], tiles: config.Tiles,
            outputs: Tuple[torch.Tensor, ...], fsq_shift: str = "atanh") -> Tuple[torch.Tensor, ...]:
    """The split forward's K + 1 launches into ``outputs = (quantized, indices, mean, std)``
    (``valid``/``active_stages``: the kernel views of :func:`.layouts.mask_and_active_stages`;
    ``tiles``: the base tile of :func:`.config.layernorm_tiles`). Scratch (sd / weight, partial
    statistics) is allocated here, sized by the shapes only (CUDA-graph capturable)."""
    ln_weight, ln_bias = params
    quantized, indices, mean, std = outputs
    B, C, S = z.shape[0], z.shape[1], math.prod(z.shape[2:])
    x, x_strides = layouts.strided_view(z)
    consts, basis = config.level_tables(levels, z.device, fsq_shift)
    radix = radix_table(levels, indices.dtype, z.device)
    tiles = dataclasses.replace(tiles, block_s=split_block_s(tiles))
    plan = config.layernorm_split_plan(B, S, tiles)
    dev = z.device
    sdw = torch.empty((B, stages, C), dtype=torch.float32, device=dev)
    parts = (torch.empty((B, plan.parts), dtype=torch.float32, device=dev),
             torch.empty((B, stages, plan.parts, C), dtype=torch.float32, device=dev),
             torch.empty((B, stages, plan.parts, C), dtype=torch.float32, device=dev))
    recip = reciprocal_table(plan.slice_len, dev)
    for step in range(stages + 1):
        phase = 0 if step == 0 else 2 if step == stages else 1
        launch(_fwd_layernorm_split_kernel, (B * plan.parts,),
               (x, quantized, indices, mean, std, sdw, parts, (ln_weight, ln_bias), consts, basis, radix, recip,
                valid, active_stages, C, S, plan.parts, plan.slice_len, *x_strides, *layouts.flat_strides(quantized),
                float(eps), stages, step),
               tiles=tiles, tensors=(x, quantized, indices), PARTS_BLOCK=config.next_pow2(plan.parts), PHASE=phase)
    return quantized, indices, mean, std
