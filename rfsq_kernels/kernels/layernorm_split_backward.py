"""The split ``layernorm`` backward: images that do not fit one tile are spread over several
programs, each owning an (image, spatial slice) as in the split forward
(:mod:`.layernorm_split`), in K + 1 launches (``step`` = 0 .. K). The stages run backwards; in
launch ``step`` stage ``a = K - step`` gets its ``dL/dr`` applied and stage ``b = a - 1`` its
four per-channel sums reduced:

* launch 0 (``PHASE_FIRST``): rebuild ``r_{K-1}`` (:func:`.layernorm.ln_rebuild`), evaluate
  stage K-1 on ``v = g``, store the program's partial sums of stage K-1;
* launch ``step`` in 1 .. K-1 (``PHASE_MIDDLE``): merge stage ``a``'s partial sums of the image
  in one fixed order (every program gets the same bits) into its coefficients, rebuild ``r_b``
  and ``r_a = r_b - q_b``, evaluate stage ``a`` on ``g - G_{a+1}`` (``G`` read from the float32
  scratch, 0 for ``a = K-1``), ``G_a = G_{a+1} + dL/dr_a``, evaluate stage ``b`` on ``g - G_a``,
  store its partial sums and ``G_a``;
* launch K (``PHASE_LAST``): stage 0 likewise, ``dL/dz = G_0``.

Per element it uses the single-tile backward's helpers (:mod:`.layernorm`: the same rebuild and
stage evaluation); ``G_a = G_{a+1} + dL/dr_a`` accumulates in a float32 scratch (the single-tile
kernel folds the terms into ``V = g - G`` in registers instead: the same additions in another
order). The per-channel sums are reduced per tile, accumulated per program, then the programs'
partials summed in one fixed order (the tile is half the base tile of
:func:`.config.layernorm_tiles` or less, :func:`split_block_s`). Stage ``a``'s ``tanh`` runs
twice (its sums in one launch, its ``dL/dr`` in the next); the residual between the launches is
rebuilt from the forward's indices.

The parameter gradients of stage ``a`` follow from the merged sums: the image's first program
stores them into the ``(B, K, C)`` partials that the host reduces, as for the single-tile path. No
float atomics, no spin-waits, no grid barriers: only launch boundaries order the programs.
Design and costs per element: ``docs/kernel-design.md``, "Split backward".
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import config, layouts
from .fpmath import as_f32, recip_rn
from .launch_settings import launch
from .layernorm import _add_sums, _ln_dr, _ln_sums, ln_bwd_grads, ln_bwd_stage, ln_rebuild
from .layernorm_split import PHASE_FIRST, PHASE_LAST, PHASE_MIDDLE, decode_stage, load_radix, slice_prologue
from .tile_io import keep_only, load_tile, spatial_lanes, store_tile

#: The four per-channel sums of a stage (:func:`.layernorm._ln_sums`), rows of the partials table.
SUMS = tl.constexpr(4)


@triton.jit
def merge_sums(sums_ptr, k, K, img, P, chan, PARTS_BLOCK: tl.constexpr):
    """Stage ``k``'s four ``[BLOCK_C]`` sums of image ``img`` from its ``P`` programs' partials
    (``sums_ptr``: ``(B, K, 4, P, C)`` float32), each one ``tl.sum`` over the programs: one fixed
    reduction tree, the same in every program of the image."""
    offs_c, mask_c, C = chan
    offs_p = tl.arange(0, PARTS_BLOCK)
    mask = (offs_p < P)[:, None] & mask_c[None, :]
    base = (img * K + k) * SUMS
    rows = offs_p[:, None] * C + offs_c[None, :]
    s0 = tl.sum(tl.load(sums_ptr + ((base + 0) * P) * C + rows, mask=mask, other=0.0), axis=0)
    s1 = tl.sum(tl.load(sums_ptr + ((base + 1) * P) * C + rows, mask=mask, other=0.0), axis=0)
    s2 = tl.sum(tl.load(sums_ptr + ((base + 2) * P) * C + rows, mask=mask, other=0.0), axis=0)
    s3 = tl.sum(tl.load(sums_ptr + ((base + 3) * P) * C + rows, mask=mask, other=0.0), axis=0)
    return s0, s1, s2, s3


@triton.jit
def store_sums(sums_ptr, sums, k, K, img, P, part, chan):
    """Store this program's four ``[BLOCK_C]`` partial sums of stage ``k`` (layout of :func:`merge_sums`)."""
    offs_c, mask_c, C = chan
    base = (img * K + k) * SUMS
    for i in tl.static_range(SUMS):
        tl.store(sums_ptr + ((base + i) * P + part) * C + offs_c, sums[i], mask=mask_c)


@triton.jit
def image_count(count_ptr, img, P, HAS_MASK: tl.constexpr, S, PARTS_BLOCK: tl.constexpr):
    """Positions entering the image's statistics (float32, as :func:`.layernorm._valid_count`):
    S, or the sum of its programs' valid counts (whole numbers: any order gives the same), at least 1."""
    if HAS_MASK:
        offs_p = tl.arange(0, PARTS_BLOCK)
        n_p = tl.load(count_ptr + img * P + offs_p, mask=offs_p < P, other=0.0)
        return tl.maximum(tl.sum(n_p, axis=0), 1.0)
    else:
        return as_f32(S)


@triton.heuristics(layouts.FLAGS_FROM_POINTERS)
@triton.jit(do_not_specialize=["C", "K", "P", "slice_len", "step"])
def _bwd_layernorm_split_kernel(
    x_ptr,              # input z: (B, C, S) through stride_x*
    g_ptr,              # dL/dquantized: (B, C, S) through stride_g* (may be stride 0)
    dx_ptr,             # out (last launch): dL/dz, (B, C, S) through stride_dx*, z's dtype
    scratch_ptr,        # float32 (B, C, S) G_a between launches (written and read in place)
    idx_ptr,            # the forward's packed indices, (B, S, K) contiguous, int32 or int64
    mean_ptr,           # the forward's statistics, (B, K, C) float32
    std_ptr,            # (B, K, C) float32
    factor_ptr,         # (B, K, 2, C) float32 (weight/std, std/weight), divided by torch on the host
    sdw_ptr,            # (B, K, C) float32 std/weight, for the decodes
    inv_sd_ptr,         # (B, K, C) float32 1/std, divided by torch on the host
    param_ptrs,         # tuple (weight_ptr, bias_ptr): the strategy's (K, C) parameter group
    dparam_part_ptrs,   # tuple (dweight_part_ptr, dbias_part_ptr): out, (B, K, C) float32 per image
    count_ptr,          # scratch (B, P) float32 valid positions per program (with HAS_MASK)
    sums_ptr,           # scratch (B, K, 4, P, C) float32 partial sums per (program, stage)
    consts_ptr,         # (5, C) float32 level constants
    radix_ptr,          # (5, C) division magic in the index dtype (layernorm_split.radix_table)
    valid_ptr,          # (B, S) uint8 padding mask, or None
    active_stages_ptr,  # (B,) int32 stages each image runs, or None
    C,                  # channels
    S,                  # flattened spatial positions per image
    P,                  # programs per image
    slice_len,          # positions per program (a multiple of BLOCK_S)
    stride_xb, stride_xc, stride_xs,     # z's strides: image, channel, flattened spatial
    stride_gb, stride_gc, stride_gs,     # dL/dquantized's strides
    stride_dxb, stride_dxc, stride_dxs,  # dL/dz's strides
    stride_scratch_b,   # the scratch's image stride, C * S (contiguous)
    K,                  # stages (runtime)
    step,               # this launch, 0 .. K: stage K - step gets dL/dr, stage K - 1 - step its sums
    BLOCK_C: tl.constexpr,            # next_pow2(C)
    BLOCK_S: tl.constexpr,            # positions per tile
    PARTS_BLOCK: tl.constexpr,        # next_pow2(P)
    PHASE: tl.constexpr,              # PHASE_FIRST (launch 0), PHASE_MIDDLE, PHASE_LAST (launch K)
    HAS_MASK: tl.constexpr,           # derived: valid_ptr is not None
    HAS_ACTIVE_STAGES: tl.constexpr,  # derived: active_stages_ptr is not None
    USE_INT64: tl.constexpr,          # 64-bit offsets
    USE_LIBDEVICE: tl.constexpr,      # real GPU: libdevice; interpreter: fallbacks
):
    """One launch of the split ``layernorm`` backward (module docstring): program ``pid`` owns
    positions ``[part * slice_len, (part + 1) * slice_len)`` of image ``pid // P``."""
    img, part, start, end, valid_row, (x_view, g_view, dx_view, scratch_view), stat_start, chan, fsq, active_stages, \
        decodes = slice_prologue(((x_ptr, stride_xb, stride_xc, stride_xs), (g_ptr, stride_gb, stride_gc, stride_gs),
                                  (dx_ptr, stride_dxb, stride_dxc, stride_dxs), (scratch_ptr, stride_scratch_b, S, 1)),
                                 valid_ptr, active_stages_ptr, consts_ptr, mean_ptr, sdw_ptr, C, S, P, K, slice_len,
                                 BLOCK_C, HAS_ACTIVE_STAGES, USE_INT64)
    offs_c, mask_c, _C = chan
    stats = (mean_ptr, std_ptr, factor_ptr, stat_start)
    affine = param_ptrs
    a = K - step  # the stage whose dL/dr this launch applies (PHASE_MIDDLE / PHASE_LAST)
    b = a - 1     # the stage whose sums this launch reduces (PHASE_FIRST / PHASE_MIDDLE)
    if PHASE != PHASE_FIRST:
        inv_n = recip_rn(image_count(count_ptr, img, P, HAS_MASK, S, PARTS_BLOCK))
        dweight, dbias, coeffs = ln_bwd_grads(merge_sums(sums_ptr, a, K, img, P, chan, PARTS_BLOCK), a, stats,
                                              inv_sd_ptr, chan)
        if part == 0:
            dweight_part_ptr, dbias_part_ptr = dparam_part_ptrs
            tl.store(dweight_part_ptr + stat_start + a * C + offs_c, dweight, mask=mask_c)
            tl.store(dbias_part_ptr + stat_start + a * C + offs_c, dbias, mask=mask_c)
    sums = (tl.zeros([BLOCK_C], dtype=tl.float32), tl.zeros([BLOCK_C], dtype=tl.float32),
            tl.zeros([BLOCK_C], dtype=tl.float32), tl.zeros([BLOCK_C], dtype=tl.float32))
    count = 0.0
    for s0 in range(start, end, BLOCK_S):
        offs_s, mask_s, valid = spatial_lanes(s0, valid_row, S, BLOCK_S, HAS_MASK, USE_INT64)
        mask = mask_c[:, None] & valid[None, :]
        x = load_tile(x_view, offs_c, offs_s, mask)
        g = load_tile(g_view, offs_c, offs_s, mask)
        G = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
        if a < K - 1:
            G = load_tile(scratch_view, offs_c, offs_s, mask)
        radix = load_radix(radix_ptr, offs_c, mask_c, C)
        index_rows = (idx_ptr, (img * S + offs_s) * K, mask_s)
        inside = mask_c[:, None] & mask_s[None, :]
        if PHASE == PHASE_LAST:
            v, h, xc, _qc, _w_sd = ln_bwd_stage(x, g - G, mask, a, stats, affine, chan, fsq, active_stages,
                                                HAS_ACTIVE_STAGES, USE_LIBDEVICE)
            G = G + _ln_dr(h, xc, coeffs, inv_n, mask, HAS_MASK)
            store_tile(dx_view, G, offs_c, offs_s, inside)
        else:
            # r_b, then (from one more decode, the rebuild's own step) r_a = r_b - q_b.
            r_b = ln_rebuild(x, b, (index_rows, decodes, radix), affine, chan, fsq, mask, active_stages, HAS_MASK,
                             HAS_ACTIVE_STAGES, USE_LIBDEVICE)
            if PHASE == PHASE_MIDDLE:
                index = tl.load(idx_ptr + index_rows[1] + b, mask=mask_s, other=0)[None, :]
                q_b = decode_stage(index, b, decodes, affine, chan, fsq, radix, USE_LIBDEVICE)
                r_a = r_b - keep_only(q_b, mask, active_stages, b, HAS_MASK, HAS_ACTIVE_STAGES)
                v, h, xc, _qc, _w_sd = ln_bwd_stage(r_a, g - G, mask, a, stats, affine, chan, fsq, active_stages,
                                                    HAS_ACTIVE_STAGES, USE_LIBDEVICE)
                G = G + _ln_dr(h, xc, coeffs, inv_n, mask, HAS_MASK)
                store_tile(scratch_view, G, offs_c, offs_s, inside)
            v, h, xc, qc, _w_sd = ln_bwd_stage(r_b, g - G, mask, b, stats, affine, chan, fsq, active_stages,
                                               HAS_ACTIVE_STAGES, USE_LIBDEVICE)
            sums = _add_sums(sums, _ln_sums(v, h, xc, qc, mask))
            if PHASE == PHASE_FIRST and HAS_MASK:
                count += tl.sum(valid.to(tl.float32), axis=0)
    if PHASE != PHASE_LAST:
        store_sums(sums_ptr, sums, b, K, img, P, part, chan)
        if PHASE == PHASE_FIRST and HAS_MASK:
            tl.store(count_ptr + img * P + part, count)


# -- host side ---------------------------------------------------------------------------------


def split_block_s(tiles: config.Tiles, index_dtype: torch.dtype) -> int:
    """Positions per tile of the split backward: half the base tile's ``BLOCK_S`` at the
    same warps and register cap (2 elements per thread), a quarter (1 per thread) with 64-bit
    indices above 8 channels. The middle launch keeps ``z``, ``g``, ``G``, two residuals and a
    stage's ``h`` and ``r - mu`` live per element through the second stage evaluation; at the
    base tile's 4 per thread that spills, and 64-bit index rows and radix columns at 16
    channels do not fit beside 2 per thread. The tile size is part of the sums' reduction order
    (the same tile gives the same bits)."""
    shrink = 4 if index_dtype == torch.int64 and tiles.block_c > 8 else 2
    return max(tiles.block_s // shrink, 2)


def backward(tensors: Tuple[torch.Tensor, ...], strides: Tuple[Tuple[int, int, int], ...], stage_tables: Tuple,
         params: Tuple[torch.Tensor, ...], dparts: Tuple[torch.Tensor, torch.Tensor], consts: torch.Tensor,
         radix: torch.Tensor, valid: Optional[torch.Tensor], active_stages: Optional[torch.Tensor],
         tiles: config.Tiles, stages: int) -> None:
    """The split backward's K + 1 launches. ``tensors = (x, g, grad_z, indices)`` (``x``/``g``
    flattenable views, ``indices`` contiguous) with ``strides`` of the first three;
    ``stage_tables = (mean, std, factors, sd_w, inv_sd)`` as :func:`.layernorm.backward` builds them;
    ``dparts``: the ``(B, K, C)`` per-image parameter-gradient partials it reduces;
    ``tiles``: the backward's base tile (:func:`.config.layernorm_tiles`), of which the split one
    takes a half or a quarter (:func:`split_block_s`).
    Scratch is allocated here, sized by the shapes only."""
    x, g, grad_z, indices = tensors
    mean, std, factors, sd_w, inv_sd = stage_tables
    B, C, S = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    tiles = dataclasses.replace(tiles, block_s=split_block_s(tiles, indices.dtype))
    plan = config.layernorm_split_plan(B, S, tiles)
    dev = x.device
    scratch = torch.empty((B, C, S), dtype=torch.float32, device=dev)
    counts = torch.empty((B, plan.parts), dtype=torch.float32, device=dev)
    sums = torch.empty((B, stages, SUMS.value, plan.parts, C), dtype=torch.float32, device=dev)
    for step in range(stages + 1):
        phase = 0 if step == 0 else 2 if step == stages else 1
        launch(_bwd_layernorm_split_kernel, (B * plan.parts,),
               (x, g, grad_z, scratch, indices, mean, std, factors, sd_w, inv_sd, params, dparts, counts, sums, consts,
                radix, valid, active_stages, C, S, plan.parts, plan.slice_len, *strides[0], *strides[1],
                *strides[2], C * S, stages, step),
               tiles=tiles, tensors=(x, g, grad_z, scratch, indices, sums),
               PARTS_BLOCK=config.next_pow2(plan.parts), PHASE=phase)
