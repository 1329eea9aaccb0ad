"""Kernels of the elementwise strategies (``none``, ``scale``, and any strategy of the
``elementwise`` family): forward, backward, launchers and output allocation. Positions are
independent, so one program owns one (image, spatial tile), and every channel of a position lives
in one thread (channel rows, below). The kernels are generic over the strategy: its stage arrives
as constexpr jit functions (an :class:`ElementwiseStage`, which the strategy's module declares as
its kernel stage) and its parameter group as a tuple of pointers. The launchers are called through
:mod:`.launch`, which answers problems without positions itself. Design: ``docs/kernel-design.md``,
"Channels inside a thread"."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import config, layouts
from .fpmath import recip_rn
from .launch_settings import launch
from .fsq_math import channel_digit, fsq_code, fsq_dcode, load_channel_digits, load_channel_levels
from .tile_io import keep_only, load_active_stages, load_row, row_prologue, stage_keep, store_row, store_row_index


# -- the stage contract -------------------------------------------------------------------------
# A program is ``C`` channel rows (one 1-D ``[BLOCK_S]`` vector per channel, unrolled over the
# exact ``C``) by ``BLOCK_S`` positions, warps along the positions (docs/kernel-design.md,
# "Channels inside a thread"): the index packing is thread-local and no lane runs for a padded
# channel. A strategy's stage is an :class:`ElementwiseStage` of jit functions, passed to the
# kernels as constexprs:
#   forward(r, k, param_ptrs, chan, fsq, USE_LIBDEVICE) -> (q, t, rounded, saved): stage k on one
#       row (``chan = (c, C)``, ``fsq`` that channel's scalars); the forward kernel calls it
#   params(param_ptrs, K) -> stage_params: a K-tuple of what each stage needs from the
#       parameters, computed once per program before the backward's row loop (default: the pointers)
#   params_forward(r, k, stage_params[k], chan, fsq, USE_LIBDEVICE) -> like ``forward``, the
#       backward's replay (default: ``forward`` itself, which then receives the pointers)
#   grads_init(BLOCK_S) -> the accumulator of one stage's per-position parameter-gradient terms
#       (carried through the backward's runtime channel loop: a [BLOCK_S] tensor, or a constant
#       that never changes)
#   vjp(v, r, q, dcode, saved, k) -> (dq/dr, term): the row's per-position term of the stage's
#       parameter gradients, added over the channels in the thread
#   grads_store(parts, stage_params, dparam_part_ptrs, pid, K, valid): this program's partials
#       from ``parts``, the tuple of every stage's summed terms (reduced over positions once)
# ``saved`` is what the forward computed that the vjp needs again (e.g. 1 / a); ``dcode`` is FSQ's
# straight-through derivative d code / du at the stage's input (``fsq_dcode``). Parameters are per
# stage (the terms of all channels and positions add up).


@triton.jit
def none_stage(r, k, param_ptrs, chan, fsq, USE_LIBDEVICE: tl.constexpr):
    """``none``: ``q = FSQ(r)`` (no parameters)."""
    code, t, rounded = fsq_code(r, fsq, USE_LIBDEVICE)
    return code, t, rounded, 1.0


@triton.jit
def scale_stage(r, k, param_ptrs, chan, fsq, USE_LIBDEVICE: tl.constexpr):
    """``scale``: ``q = FSQ(a * r) * (1 / a)``, ``param_ptrs = (a_ptr,)``, ``(K,)`` float32
    (``a = stage_scales(p)``); the reciprocal is rounded to nearest, as the reference's
    ``torch.reciprocal``, so no element is divided. ``saved = 1 / a``."""
    (scale_ptr,) = param_ptrs
    a = tl.load(scale_ptr + k).to(tl.float32)
    return scale_math(r, (a, recip_rn(a)), fsq, USE_LIBDEVICE)


@triton.jit
def scale_math(r, scale, fsq, USE_LIBDEVICE: tl.constexpr):
    """The scale stage on its values ``scale = (a, 1 / a)``: ``q = FSQ(a * r) * (1 / a)``."""
    a, inv_a = scale
    code, t, rounded = fsq_code(a * r, fsq, USE_LIBDEVICE)
    return code * inv_a, t, rounded, inv_a


@triton.jit
def per_stage_pointers(param_ptrs, K: tl.constexpr):
    """Default ``params``: every stage gets the parameter pointers (its ``forward`` loads)."""
    out = ()
    for k in tl.static_range(K):
        out = out + (param_ptrs,)
    return out


@triton.jit
def scale_row_params(param_ptrs, K: tl.constexpr):
    """``(a_k, 1 / a_k)`` of every stage, loaded and divided once per program: inside the unrolled
    row loop the compiler reloaded ``a_k`` and redid the ``div.rn`` per row and replayed stage,
    and the live values around those slow-path calls spilled (bench/NOTES.md)."""
    (scale_ptr,) = param_ptrs
    out = ()
    for k in tl.static_range(K):
        a = tl.load(scale_ptr + k).to(tl.float32)
        out = out + ((a, recip_rn(a)),)
    return out


@triton.jit
def scale_row_stage(r, k, scale, chan, fsq, USE_LIBDEVICE: tl.constexpr):
    """``scale_stage`` on the hoisted ``scale = (a_k, 1 / a_k)`` (``scale_row_params``)."""
    return scale_math(r, scale, fsq, USE_LIBDEVICE)


@triton.jit
def no_row_grads_init(BLOCK_S: tl.constexpr):
    """No parameters: a constant the compiler drops."""
    return 0.0


@triton.jit
def none_row_vjp(v, r, q, dcode, saved, k):
    """``dq/dr = dcode/du``; no parameter-gradient term."""
    return dcode, 0.0


@triton.jit
def no_row_grads_store(parts, stage_params, dparam_part_ptrs, pid, K: tl.constexpr, valid):
    """Nothing to store."""
    pass


@triton.jit
def scale_row_grads_init(BLOCK_S: tl.constexpr):
    """One stage's ``[BLOCK_S]`` sum of terms starts as 0 (a tensor: it is carried through the
    backward's channel loop)."""
    return tl.zeros([BLOCK_S], dtype=tl.float32)


@triton.jit
def scale_row_vjp(v, r, q, dcode, inv_a, k):
    """``dq/dr = dcode/du`` (the scale cancels); the term of ``dL/da_k = (sum v (dcode/du * r - q)) * (1 / a)``."""
    return dcode, v * (dcode * r - q)


@triton.jit
def scale_row_grads_store(parts, stage_params, dparam_part_ptrs, pid, K: tl.constexpr, valid):
    """Row ``pid`` of the ``(programs, K)`` partials of ``dL/da``: each stage's terms summed over
    the tile's valid positions, times ``1 / a_k``."""
    (dscale_part_ptr,) = dparam_part_ptrs
    for k in tl.static_range(K):
        _a, inv_a = stage_params[k]
        tl.store(dscale_part_ptr + pid * K + k, tl.sum(tl.where(valid, parts[k], 0.0), axis=0) * inv_a)


class ElementwiseStage(NamedTuple):
    """One strategy's kernel stage in the elementwise family (the contract above)."""

    forward: object      # triton.JITFunction, each of them
    grads_init: object
    vjp: object
    grads_store: object
    params: object = per_stage_pointers  # (param_ptrs, K) -> per-stage values, once per program
    params_forward: object = None        # forward on one ``params`` entry; None: ``forward``


# The built-in strategies' kernel stages; their modules (reference/strategies/none.py, scale.py)
# name them by import path, so the reference never imports the kernels.
NONE_STAGE = ElementwiseStage(none_stage, no_row_grads_init, none_row_vjp, no_row_grads_store)
SCALE_STAGE = ElementwiseStage(scale_stage, scale_row_grads_init, scale_row_vjp, scale_row_grads_store,
                               scale_row_params, scale_row_stage)


@triton.jit
def row_replay(x, stage_params, chan, fsq, valid, active_stages, NSTAGES: tl.constexpr, STAGE: tl.constexpr,
               HAS_MASK: tl.constexpr, HAS_ACTIVE_STAGES: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """Residual ``r_NSTAGES`` of one channel row recomputed from its input ``x`` (unrolled;
    positions and stages the forward skipped subtract nothing)."""
    r = x
    for j in tl.static_range(NSTAGES):
        q, _t, _rounded, _saved = STAGE(r, j, stage_params[j], chan, fsq, USE_LIBDEVICE)
        r = r - keep_only(q, valid, active_stages, j, HAS_MASK, HAS_ACTIVE_STAGES)
    return r


@triton.jit
def replace_at(items, i: tl.constexpr, value, N: tl.constexpr):
    """``items`` (an ``N``-tuple) with entry ``i`` replaced by ``value`` (constexpr positions)."""
    out = ()
    for j in tl.static_range(N):
        if j == i:
            out = out + (value,)
        else:
            out = out + (items[j],)
    return out


@triton.heuristics(layouts.FLAGS_FROM_POINTERS)
@triton.jit(do_not_specialize=["tiles_per_image", "K"])
def _fwd_elementwise_rows_kernel(
    x_ptr,              # input z: (B, C, S) through stride_x*, any float dtype
    q_ptr,              # out: quantized, (B, C, S) through stride_q*, z's dtype
    idx_ptr,            # out: packed indices, (B, S, K) contiguous, int32 or int64
    param_ptrs,         # tuple: the strategy's parameter group (table order, kernel form)
    consts_ptr,         # (6, C) float32 level constants (config.level_tables)
    basis_ptr,          # (C,) mixed-radix place values in the index dtype (int32 or int64)
    valid_ptr,          # (B, S) uint8 padding mask (1 = valid), or None
    active_stages_ptr,  # (B,) int32 stages each image runs, or None
    S,                  # flattened spatial positions per image
    tiles_per_image,    # programs per image: cdiv(S, BLOCK_S)
    stride_xb, stride_xc, stride_xs,  # z's strides: image, channel, flattened spatial
    stride_qb, stride_qc, stride_qs,  # quantized's strides
    K,                  # stages (runtime: one binary serves every K)
    STAGE: tl.constexpr,              # the strategy's stage forward (ElementwiseStage.forward)
    BLOCK_C: tl.constexpr,            # the exact channel count C: every channel in every thread
    BLOCK_S: tl.constexpr,            # spatial positions per program
    HAS_MASK: tl.constexpr,           # derived: valid_ptr is not None
    HAS_ACTIVE_STAGES: tl.constexpr,  # derived: active_stages_ptr is not None
    USE_INT64: tl.constexpr,          # some offset may reach 2**31: index in 64 bits
    USE_LIBDEVICE: tl.constexpr,      # real GPU: libdevice tanh/rint; interpreter: fallbacks
):
    """Elementwise forward: one program per (image, spatial tile), all K stages in registers (a
    runtime stage loop: the residual is carried, nothing is replayed). Every thread holds all
    ``C`` channel rows of its positions, so the index packing is thread-local."""
    img, (x_view, q_view), offs_s, mask_s, valid = row_prologue(
        ((x_ptr, stride_xb, stride_xc, stride_xs), (q_ptr, stride_qb, stride_qc, stride_qs)),
        valid_ptr, S, tiles_per_image, BLOCK_S, HAS_MASK, USE_INT64)
    active_stages = load_active_stages(active_stages_ptr, img, K, HAS_ACTIVE_STAGES)
    # Each channel's constants once, before the stage loop (scalars; the compiler would reload
    # them every stage, as it cannot prove the index stores leave them alone).
    chans = ()
    rs = ()
    accs = ()
    for c in tl.static_range(BLOCK_C):
        chans = chans + ((load_channel_levels(consts_ptr, c, BLOCK_C),
                          load_channel_digits(consts_ptr, basis_ptr, c, BLOCK_C)),)
        rs = rs + (load_row(x_view, c, offs_s, valid),)
        accs = accs + (tl.zeros([BLOCK_S], dtype=tl.float32),)
    index_rows = (idx_ptr, (img * S + offs_s) * K, mask_s)  # see store_row_index
    for k in range(K):
        new_rs = ()
        new_accs = ()
        index = 0
        for c in tl.static_range(BLOCK_C):
            fsq, digits = chans[c]
            q, _t, rounded, _saved = STAGE(rs[c], k, param_ptrs, (c, BLOCK_C), fsq, USE_LIBDEVICE)
            index = index + channel_digit(rounded, fsq, digits)
            q = keep_only(q, valid, active_stages, k, HAS_MASK, HAS_ACTIVE_STAGES)
            new_accs = new_accs + (accs[c] + q,)
            new_rs = new_rs + (rs[c] - q,)
        store_row_index(index_rows, k, index, valid, active_stages, HAS_MASK, HAS_ACTIVE_STAGES)
        rs = new_rs
        accs = new_accs
    for c in tl.static_range(BLOCK_C):
        store_row(q_view, accs[c], c, offs_s, mask_s)


@triton.heuristics(layouts.FLAGS_FROM_POINTERS)
@triton.jit(do_not_specialize=["tiles_per_image"])
def _bwd_elementwise_rows_kernel(
    x_ptr,              # input z: (B, C, S) through stride_x*
    g_ptr,              # dL/dquantized: (B, C, S) through stride_g* (may be stride 0)
    dx_ptr,             # out: dL/dz, (B, C, S) through stride_dx*, z's dtype
    param_ptrs,         # tuple: the strategy's parameter group (table order, kernel form)
    dparam_part_ptrs,   # tuple: out, per parameter a float32 (programs * K, ...) partial-sum buffer
    consts_ptr,         # (6, C) float32 level constants
    valid_ptr,          # (B, S) uint8 padding mask, or None
    active_stages_ptr,  # (B,) int32 stages each image runs, or None
    S,                  # flattened spatial positions per image
    tiles_per_image,    # programs per image
    stride_xb, stride_xc, stride_xs,     # z's strides: image, channel, flattened spatial
    stride_gb, stride_gc, stride_gs,     # dL/dquantized's strides
    stride_dxb, stride_dxc, stride_dxs,  # dL/dz's strides
    K: tl.constexpr,                  # stages (unrolled: the replay is shared between them)
    STAGE: tl.constexpr,              # the strategy's stage forward (.params_forward or .forward, replayed)
    STAGE_PARAMS: tl.constexpr,       # its per-stage values from the parameters (.params)
    STAGE_GRADS_INIT: tl.constexpr,   # its parameter-gradient term accumulator (.grads_init)
    STAGE_VJP: tl.constexpr,          # its vector-Jacobian product (.vjp)
    STAGE_GRADS_STORE: tl.constexpr,  # stores this program's parameter-gradient partials (.grads_store)
    BLOCK_C: tl.constexpr,            # the exact channel count C
    BLOCK_S: tl.constexpr,            # spatial positions per program
    HAS_MASK: tl.constexpr,           # derived: valid_ptr is not None
    HAS_ACTIVE_STAGES: tl.constexpr,  # derived: active_stages_ptr is not None
    USE_INT64: tl.constexpr,          # 64-bit offsets
    USE_LIBDEVICE: tl.constexpr,      # real GPU: libdevice; interpreter: fallbacks
):
    """Elementwise backward: J_k is diagonal, so every position and channel is independent; one
    channel row at a time.

    Per stage, in reverse: ``v_k = g - G_{k+1}`` on the positions the stage ran, ``STAGE_VJP``
    returns ``dq_k/dr_k`` and the row's parameter-gradient terms (added to the stage's
    accumulator), ``G_k = G_{k+1} + v_k dq/dr``; after the stages ``dL/dz = G_0`` of the row,
    and after every row the parameter-gradient partials are stored. The residual is replayed from
    the input for every stage; the stages are unrolled, so the compiler shares the O(K^2) replay.
    """
    pid = tl.program_id(0)  # also the row of this program's parameter-gradient partials
    img, (x_view, g_view, dx_view), offs_s, mask_s, valid = row_prologue(
        ((x_ptr, stride_xb, stride_xc, stride_xs), (g_ptr, stride_gb, stride_gc, stride_gs),
         (dx_ptr, stride_dxb, stride_dxc, stride_dxs)),
        valid_ptr, S, tiles_per_image, BLOCK_S, HAS_MASK, USE_INT64)
    active_stages = load_active_stages(active_stages_ptr, img, K, HAS_ACTIVE_STAGES)
    stage_params = STAGE_PARAMS(param_ptrs, K)
    parts = ()
    for k in tl.static_range(K):
        parts = parts + (STAGE_GRADS_INIT(BLOCK_S),)
    # A runtime channel loop, not unrolled: unrolled, the compiler deferred every row's
    # parameter-gradient terms to the end of the kernel (they are only read after the last row),
    # keeping all rows' replayed stages live at once, and spilled. A loop iteration must finish
    # its row's terms. The sum over the rows runs in the same order either way.
    for c in range(BLOCK_C):
        chan = (c, BLOCK_C)
        fsq = load_channel_levels(consts_ptr, c, BLOCK_C)
        x = load_row(x_view, c, offs_s, valid)
        g = load_row(g_view, c, offs_s, valid)
        G = tl.zeros([BLOCK_S], dtype=tl.float32)
        for k in tl.static_range(K - 1, -1, -1):
            r = row_replay(x, stage_params, chan, fsq, valid, active_stages, k, STAGE, HAS_MASK, HAS_ACTIVE_STAGES,
                           USE_LIBDEVICE)
            q, t, _rounded, saved = STAGE(r, k, stage_params[k], chan, fsq, USE_LIBDEVICE)
            dcode = fsq_dcode(t, fsq)
            v = tl.where(stage_keep(valid, active_stages, k, HAS_ACTIVE_STAGES), g - G, 0.0)
            dq_dr, term = STAGE_VJP(v, r, q, dcode, saved, k)
            parts = replace_at(parts, k, parts[k] + term, K)
            G = G + v * dq_dr
        store_row(dx_view, G, c, offs_s, mask_s)
    STAGE_GRADS_STORE(parts, stage_params, dparam_part_ptrs, pid, K, valid)


def forward_outputs(z: torch.Tensor, levels: Sequence[int], stages: int) -> Tuple[torch.Tensor, ...]:
    """Uninitialised ``(quantized, indices, mean, std)``; no statistics (empty mean/std)."""
    quantized, indices = layouts.quantized_and_indices(z, levels, stages)
    return quantized, indices, layouts.empty_output(z), layouts.empty_output(z)


def forward(z: torch.Tensor, levels: Sequence[int], stages: int, params: Tuple[torch.Tensor, ...],
            mask: Optional[torch.Tensor], active_stages: Optional[torch.Tensor], fsq_shift: str,
            stage: ElementwiseStage) -> Tuple[torch.Tensor, ...]:
    """Fused elementwise forward of the strategy whose kernel stage is ``stage`` (parameter group
    ``params`` in kernel form): ``(quantized, indices, mean, std)``, mean/std empty."""
    quantized, indices, mean, std = forward_outputs(z, levels, stages)
    B, C, S = z.shape[0], z.shape[1], math.prod(z.shape[2:])
    x, x_strides = layouts.strided_view(z)
    consts, basis = config.level_tables(levels, z.device, fsq_shift)
    valid, active_stages = layouts.mask_and_active_stages(mask, active_stages, B, S)
    sparse = valid is not None or active_stages is not None
    tiles = config.elementwise_row_tiles(C, S, sparse)
    tiles_per_image = triton.cdiv(S, tiles.block_s)
    launch(_fwd_elementwise_rows_kernel, (B * tiles_per_image,),
           (x, quantized, indices, params, consts, basis, valid, active_stages, S, tiles_per_image, *x_strides,
            *layouts.flat_strides(quantized), stages),
           tiles=tiles, tensors=(x, quantized, indices), STAGE=stage.forward)
    return quantized, indices, mean, std


def backward(grad_q: torch.Tensor, z: torch.Tensor, levels: Sequence[int], stages: int,
             params: Tuple[torch.Tensor, ...], mask: Optional[torch.Tensor], active_stages: Optional[torch.Tensor],
             fsq_shift: str, stage: ElementwiseStage) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """Fused elementwise backward of the strategy whose kernel stage is ``stage``:
    ``(grad_z, grad_params)``."""
    grad_z = layouts.new_output(z)
    B, C, S = z.shape[0], z.shape[1], math.prod(z.shape[2:])
    x, x_strides = layouts.strided_view(z)
    g, g_strides = layouts.strided_view(grad_q)
    consts, _basis = config.level_tables(levels, z.device, fsq_shift)
    valid, active_stages = layouts.mask_and_active_stages(mask, active_stages, B, S)
    sparse = valid is not None or active_stages is not None
    tiles = config.elementwise_row_tiles(C, S, sparse, "backward")
    tiles_per_image = triton.cdiv(S, tiles.block_s)
    programs = B * tiles_per_image
    # Every parameter gradient as one partial sum per (program, stage[, channel]), reduced below in
    # a fixed order (no atomics: bitwise-reproducible).
    parts = tuple(torch.empty((programs, *p.shape), dtype=torch.float32, device=z.device) for p in params)
    launch(_bwd_elementwise_rows_kernel, (programs,),
           (x, g, grad_z, params, parts, consts, valid, active_stages, S, tiles_per_image, *x_strides, *g_strides,
            *layouts.flat_strides(grad_z)),
           tiles=tiles, tensors=(x, g, grad_z), K=stages, STAGE=stage.params_forward or stage.forward,
           STAGE_PARAMS=stage.params, STAGE_GRADS_INIT=stage.grads_init, STAGE_VJP=stage.vjp,
           STAGE_GRADS_STORE=stage.grads_store)
    return grad_z, tuple(part.sum(0).to(p.dtype) for part, p in zip(parts, params))
