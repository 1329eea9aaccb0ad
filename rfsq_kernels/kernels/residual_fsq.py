"""Kernels of vector-quantize-pytorch's ResidualFSQ (its own family: ``rfsq_kernels.vqpytorch``).

The library's quantizer does not fit the RFSQ strategy loop (``docs/kernel-design.md``,
"vector-quantize-pytorch's ResidualFSQ"): the input is soft-clamped once, every stage divides by a
fixed per-channel scale and hard-clamps onto a symmetric grid with ``floor``, and the residual is
detached, so the backward is a sum of per-stage pass-through terms rather than a chain. Math,
op for op: ``docs/semantics.md``, "vector-quantize-pytorch's ResidualFSQ".

Arithmetic contract (issue #17): every division is IEEE (``tl.div_rn``) on the same float32
constants the library uses (``c``, ``scales``, ``a = 2/(L-1)``), launches pass
``enable_fp_fusion=False`` (``a*d - 1`` rounds twice, like torch), the soft clamp's derivative
``1 - t*t`` rounds once (an explicit fma, like ATen's ``tanh_backward``), and tanh is libdevice
on a GPU and the project's exp-based fallback under the interpreter.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import config
from .fpmath import round_half_even, tanh_f32
from ..vqpytorch.reference import basis_list
from .stages import keep_only, load_active_stages, load_tile, spatial_lanes, stage_keep, store_tile, widen

# Rows of the per-channel constant table built by :func:`constant_table`.
ROW_CLAMP = tl.constexpr(0)    # soft clamp value c = 1 + 1/(L-1)   (the library's buffer)
ROW_STEP = tl.constexpr(1)     # a = 2/(L-1)                         (float32, as the library computes it)
ROW_LM1 = tl.constexpr(2)      # L - 1

_TABLES: Dict[Tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


@triton.jit
def one_minus_square(t, USE_LIBDEVICE: tl.constexpr):
    """``1 - t*t`` rounded once (ATen's tanh_backward contracts it into an fma). The interpreter's
    ``tl.fma`` rounds twice, so there it is computed in float64 (exact for ``|t| >= 1/8``)."""
    if USE_LIBDEVICE:
        return tl.fma(-t, t, 1.0)
    else:
        t64 = t.to(tl.float64)
        return (1.0 - t64 * t64).to(tl.float32)


@triton.jit
def load_row(consts_ptr, row, offs_c, mask_c, C, other):
    """Row ``row`` of the ``(rows, C)`` constant table as a ``[BLOCK_C, 1]`` float32 column."""
    return tl.load(consts_ptr + row * C + offs_c, mask=mask_c, other=other)[:, None]


@triton.jit
def soft_clamp(x, c, USE_LIBDEVICE: tl.constexpr):
    """``(t, y)``: ``t = tanh(x / c)``, ``y = t * c``."""
    t = tanh_f32(tl.div_rn(x, c), USE_LIBDEVICE)
    return t, t * c


@triton.jit
def vq_stage(r, s, a, lm1):
    """One stage on the residual ``r`` with scale ``s``: ``(q, digit, inside)``.

    ``u = r / s``; ``v = clamp(u, -1, 1)``; ``d = floor((L-1)(v+1)/2 + 0.5)``; ``q = (a*d - 1) * s``;
    ``inside``: ``-1 < u < 1`` (where the clamp passes the gradient). NaN propagates like torch."""
    u = tl.div_rn(r, s)
    v = tl.minimum(tl.maximum(u, -1.0, propagate_nan=tl.PropagateNan.ALL), 1.0, propagate_nan=tl.PropagateNan.ALL)
    d = tl.floor(lm1 * (v + 1.0) * 0.5 + 0.5)
    q = (a * d - 1.0) * s
    return q, d, (u > -1.0) & (u < 1.0)


@triton.jit
def store_vq_index(index_rows, k, d, lm1, basis, keep):
    """Stage ``k``'s exact mixed-radix index (digits clamped to ``[0, L-1]``, NaN -> 0); -1 where
    ``keep`` (``[BLOCK_S]``) is false."""
    idx_ptr, rows, mask_s = index_rows
    digit = tl.where(d == d, d, 0.0)
    digit = tl.minimum(tl.maximum(digit, 0.0), lm1)
    index = tl.sum(digit.to(tl.int64) * basis, axis=0)
    index = tl.where(keep, index, -1)
    tl.store(idx_ptr + rows + k, index.to(idx_ptr.dtype.element_ty), mask=mask_s)


@triton.heuristics(config.FLAGS_FROM_POINTERS)
@triton.jit(do_not_specialize=["C", "tiles_per_image", "K"])
def _fwd_vq_rfsq_kernel(
    x_ptr,            # input after project_in, (B, C, S) through strides, any float dtype
    q_ptr,            # quantized output, (B, C, S) through strides, the input's dtype
    idx_ptr,          # indices, (B, S, K) contiguous, int32 or int64
    consts_ptr,       # (3, C) float32: soft clamp c, a = 2/(L-1), L-1
    scales_ptr,       # (K, C) float32: the library's ``scales`` buffer, L**-k
    basis_ptr,        # (C,) int64: mixed-radix place values
    valid_ptr,        # (B, S) uint8 padding mask (1 = valid), or None
    active_stages_ptr,  # (B,) int32 stages kept per sample (quantize dropout), or None
    C,                # channels (codebook dim)
    S,                # flattened positions per image
    tiles_per_image,  # programs per image: cdiv(S, BLOCK_S)
    stride_xb, stride_xc, stride_xs,  # input strides: image, channel, position
    stride_qb, stride_qc, stride_qs,  # output strides
    K,                # stages (runtime: one binary serves every K)
    BLOCK_C: tl.constexpr,            # next_pow2(C): every channel in one program
    BLOCK_S: tl.constexpr,            # positions per program
    HAS_MASK: tl.constexpr,           # derived: valid_ptr is not None
    HAS_ACTIVE_STAGES: tl.constexpr,  # derived: active_stages_ptr is not None
    USE_INT64: tl.constexpr,          # some offset may reach 2**31: index in 64 bits
    USE_LIBDEVICE: tl.constexpr,      # real GPU: libdevice tanh; interpreter: fallback
):
    """Forward: one program per (image, tile of positions), the K stages a runtime loop with the
    (detached) residual in registers; the output sums the stage outputs in stage order."""
    pid = tl.program_id(0)
    img = widen(pid // tiles_per_image, USE_INT64)
    valid_row = (valid_ptr, img * S)
    x_view = (x_ptr, img * stride_xb, stride_xc, stride_xs)
    q_view = (q_ptr, img * stride_qb, stride_qc, stride_qs)
    offs_s, mask_s, valid = spatial_lanes((pid % tiles_per_image) * BLOCK_S, valid_row, S, BLOCK_S,
                                          HAS_MASK, USE_INT64)
    offs_c = widen(tl.arange(0, BLOCK_C), USE_INT64)
    mask_c = offs_c < C
    n_act = load_active_stages(active_stages_ptr, img, K, HAS_ACTIVE_STAGES)
    c = load_row(consts_ptr, ROW_CLAMP, offs_c, mask_c, C, 1.0)
    a = load_row(consts_ptr, ROW_STEP, offs_c, mask_c, C, 0.0)
    lm1 = load_row(consts_ptr, ROW_LM1, offs_c, mask_c, C, 0.0)
    basis = tl.load(basis_ptr + offs_c, mask=mask_c, other=0)[:, None]
    x = load_tile(x_view, offs_c, offs_s, mask_c[:, None] & valid[None, :])
    _t, r = soft_clamp(x, c, USE_LIBDEVICE)
    acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    index_rows = (idx_ptr, (img * S + offs_s) * K, mask_s)
    for k in range(K):
        s = tl.load(scales_ptr + k * C + offs_c, mask=mask_c, other=1.0)[:, None]
        q, d, _inside = vq_stage(r, s, a, lm1)
        store_vq_index(index_rows, k, d, lm1, basis, stage_keep(valid, n_act, k, HAS_ACTIVE_STAGES))
        q = keep_only(q, valid[None, :], n_act, k, HAS_MASK, HAS_ACTIVE_STAGES)
        acc = acc + q
        r = r - q
    store_tile(q_view, acc, offs_c, offs_s, mask_c[:, None] & mask_s[None, :])


@triton.heuristics(config.FLAGS_FROM_POINTERS)
@triton.jit(do_not_specialize=["C", "tiles_per_image"])
def _bwd_vq_rfsq_kernel(
    x_ptr,            # input after project_in, (B, C, S) through strides
    g_ptr,            # gradient of the quantized output, (B, C, S) through strides
    dx_ptr,           # gradient of the input, (B, C, S) through strides, the input's dtype
    consts_ptr,       # (3, C) float32: soft clamp c, a = 2/(L-1), L-1
    scales_ptr,       # (K, C) float32 stage scales
    valid_ptr,        # (B, S) uint8 padding mask (1 = valid), or None
    active_stages_ptr,  # (B,) int32 stages kept per sample, or None
    C,                # channels
    S,                # positions per image
    tiles_per_image,  # programs per image
    stride_xb, stride_xc, stride_xs,     # input strides: image, channel, position
    stride_gb, stride_gc, stride_gs,     # incoming gradient strides (may be 0: expanded)
    stride_dxb, stride_dxc, stride_dxs,  # input-gradient strides
    K: tl.constexpr,                  # stages (unrolled)
    BLOCK_C: tl.constexpr,            # next_pow2(C)
    BLOCK_S: tl.constexpr,            # positions per program
    HAS_MASK: tl.constexpr,           # derived: valid_ptr is not None
    HAS_ACTIVE_STAGES: tl.constexpr,  # derived: active_stages_ptr is not None
    USE_INT64: tl.constexpr,          # 64-bit offsets
    USE_LIBDEVICE: tl.constexpr,      # real GPU: libdevice tanh and fma; interpreter: fallbacks
):
    """Backward: the residual is detached, so ``dL/dy = sum_k [-1 < u_k < 1] * g*s_k*a/2*(L-1)/s_k``,
    each term rounded op by op like autograd and summed from the last stage back; then the soft
    clamp: ``dx = (dy * c) * (1 - t^2) / c``. A forward replay records which stages pass."""
    pid = tl.program_id(0)
    img = widen(pid // tiles_per_image, USE_INT64)
    valid_row = (valid_ptr, img * S)
    x_view = (x_ptr, img * stride_xb, stride_xc, stride_xs)
    g_view = (g_ptr, img * stride_gb, stride_gc, stride_gs)
    dx_view = (dx_ptr, img * stride_dxb, stride_dxc, stride_dxs)
    offs_s, mask_s, valid = spatial_lanes((pid % tiles_per_image) * BLOCK_S, valid_row, S, BLOCK_S,
                                          HAS_MASK, USE_INT64)
    offs_c = widen(tl.arange(0, BLOCK_C), USE_INT64)
    mask_c = offs_c < C
    mask = mask_c[:, None] & valid[None, :]
    n_act = load_active_stages(active_stages_ptr, img, K, HAS_ACTIVE_STAGES)
    c = load_row(consts_ptr, ROW_CLAMP, offs_c, mask_c, C, 1.0)
    a = load_row(consts_ptr, ROW_STEP, offs_c, mask_c, C, 0.0)
    lm1 = load_row(consts_ptr, ROW_LM1, offs_c, mask_c, C, 0.0)
    x = load_tile(x_view, offs_c, offs_s, mask)
    t, r = soft_clamp(x, c, USE_LIBDEVICE)
    passing = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.int32)  # bit k: stage k passes the gradient
    for k in tl.static_range(K):
        s = tl.load(scales_ptr + k * C + offs_c, mask=mask_c, other=1.0)[:, None]
        q, _d, inside = vq_stage(r, s, a, lm1)
        inside = inside & stage_keep(mask, n_act, k, HAS_ACTIVE_STAGES)
        passing = passing | (inside.to(tl.int32) << k)
        r = r - q
    g = load_tile(g_view, offs_c, offs_s, mask)
    for k in tl.static_range(K - 1, -1, -1):
        s = tl.load(scales_ptr + k * C + offs_c, mask=mask_c, other=1.0)[:, None]
        term = tl.div_rn((((g * s) * a) * 0.5) * lm1, s)
        term = tl.where(((passing >> k) & 1) != 0, term, 0.0)
        if k == K - 1:
            G = term  # autograd's first arrival is not added to a zero
        else:
            G = G + term
    dx = tl.div_rn((G * c) * one_minus_square(t, USE_LIBDEVICE), c)
    store_tile(dx_view, dx, offs_c, offs_s, mask_c[:, None] & mask_s[None, :])


# -- host side ---------------------------------------------------------------------------------


def _basis(levels: Sequence[int], device) -> torch.Tensor:
    """int64 ``(C,)`` mixed-radix place values ``cumprod([1] + levels[:-1])``, exact."""
    return torch.tensor(basis_list(levels), dtype=torch.int64, device=device)


def constant_table(levels: Sequence[int], clamp_value: torch.Tensor, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cached ``(consts, basis)``: float32 ``(3, C)`` rows ``c`` (the module's soft clamp buffer),
    ``a = 2. / (L - 1)`` and ``L - 1``, computed with the same torch ops as the library, and int64
    ``(C,)`` place values. Keyed by levels, clamp values and device (no copies after the first)."""
    key = (tuple(levels), tuple(clamp_value.tolist()) if not clamp_value.is_meta else None, str(device))
    hit = _TABLES.get(key)
    if hit is None:
        lt = torch.tensor(list(levels), dtype=torch.int32)
        a = 2. / (lt - 1)
        clamp = clamp_value.float().cpu() if not clamp_value.is_meta else torch.ones(len(levels))
        consts = torch.stack([clamp.expand(len(levels)), a, (lt - 1).float()]).to(device)
        hit = _TABLES[key] = (consts, _basis(levels, device))
    return hit


def _index_dtype(levels: Sequence[int], dropout: bool) -> torch.dtype:
    size = math.prod(int(v) for v in levels)
    return torch.int64 if dropout or size > 2**31 - 1 else torch.int32


def forward_outputs(x: torch.Tensor, levels: Sequence[int], stages: int, dropout: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised ``(quantized, indices)``: ``quantized`` like ``x`` (``(B, N, C)``, same
    strides when dense), ``indices`` ``(B, N, K)``."""
    indices = x.new_empty((x.shape[0], x.shape[1], stages), dtype=_index_dtype(levels, dropout))
    return torch.empty_like(x), indices


def _bcs(t: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """``(B, N, C)`` as the kernels' ``(B, C, S)``: strides ``(b, c, s)``."""
    return t, (t.stride(0), t.stride(2), t.stride(1))


def forward(x: torch.Tensor, levels: Sequence[int], scales: torch.Tensor, clamp_value: torch.Tensor,
            mask: Optional[torch.Tensor] = None, active: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused forward on ``x`` ``(B, N, C)``: ``(quantized, indices)``; ``active`` ``(B,)`` int32
    stage counts (quantize dropout, -1 indices for dropped stages), ``mask`` ``(B, N)`` bool."""
    K = scales.shape[0]
    quantized, indices = forward_outputs(x, levels, K, active is not None)
    B, N, C = x.shape
    if B * N == 0:
        return quantized.zero_(), indices.zero_()
    consts, basis = constant_table(levels, clamp_value, x.device)
    valid, counts = config.mask_and_active_stages(mask, active, B, N)
    int64 = config.needs_int64(x, quantized, indices)
    # 64-bit offsets spilled 8 B/thread on sm_90 (16-bit inputs, 8 channels) at 8 per thread: half tiles
    tiles = config.elementwise_tiles(C, N, sparse=mask is not None or active is not None or int64)
    tiles_per_image = triton.cdiv(N, tiles.block_s)
    _fwd_vq_rfsq_kernel[(B * tiles_per_image,)](
        x, quantized, indices, consts, scales.float().contiguous(), basis, valid, counts,
        C, N, tiles_per_image, *_bcs(x)[1], *_bcs(quantized)[1], K,
        BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s,
        USE_INT64=int64, USE_LIBDEVICE=config.use_libdevice(x),
        num_warps=tiles.num_warps, enable_fp_fusion=config.FP_FUSION)
    return quantized, indices


def backward(grad_q: torch.Tensor, x: torch.Tensor, levels: Sequence[int], scales: torch.Tensor,
             clamp_value: torch.Tensor, mask: Optional[torch.Tensor] = None,
             active: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fused backward: ``dL/dx`` ``(B, N, C)`` in ``x``'s dtype from ``dL/dquantized``."""
    K = scales.shape[0]
    grad_x = torch.empty_like(x)
    B, N, C = x.shape
    if B * N == 0:
        return grad_x.zero_()
    consts, _basis = constant_table(levels, clamp_value, x.device)
    valid, counts = config.mask_and_active_stages(mask, active, B, N)
    tiles = config.elementwise_tiles(C, N, sparse=mask is not None or active is not None)
    tiles_per_image = triton.cdiv(N, tiles.block_s)
    _bwd_vq_rfsq_kernel[(B * tiles_per_image,)](
        x, grad_q, grad_x, consts, scales.float().contiguous(), valid, counts,
        C, N, tiles_per_image, *_bcs(x)[1], *_bcs(grad_q)[1], *_bcs(grad_x)[1],
        K=K, BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s,
        USE_INT64=config.needs_int64(x, grad_q, grad_x), USE_LIBDEVICE=config.use_libdevice(x),
        num_warps=tiles.num_warps, enable_fp_fusion=config.FP_FUSION)
    return grad_x


# -- the standalone FSQ (vector-quantize-pytorch's default bound) ---------------------------------

# Rows of the standalone FSQ's constant table (:func:`fsq_table`).
ROW_HALF_L = tl.constexpr(0)   # ((L-1) * 1.001) / 2
ROW_OFFSET = tl.constexpr(1)   # 0.5 for even L, else 0
ROW_SHIFT = tl.constexpr(2)    # atanh(offset / half_l)
ROW_HALF_W = tl.constexpr(3)   # L // 2
ROW_TOP = tl.constexpr(4)      # L - 1


@triton.jit(do_not_specialize=["C", "tiles_per_image"])
def _fwd_vq_fsq_kernel(
    x_ptr,            # input, (B, C, S) through strides, any float dtype
    q_ptr,            # codes, (B, C, S) through strides, the input's dtype
    idx_ptr,          # indices, (B, S) contiguous, int32 or int64
    consts_ptr,       # (5, C) float32: half_l, offset, shift, L//2, L-1
    basis_ptr,        # (C,) int64 place values
    C, S, tiles_per_image,
    stride_xb, stride_xc, stride_xs,
    stride_qb, stride_qc, stride_qs,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, USE_INT64: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
):
    """FSQ forward: ``t = tanh(z + shift)``, ``b = t * half_l - offset``, ``code = rint(b) / (L//2)``
    (IEEE division), index packed exactly from ``rint(b) + L//2``."""
    pid = tl.program_id(0)
    img = widen(pid // tiles_per_image, USE_INT64)
    x_view = (x_ptr, img * stride_xb, stride_xc, stride_xs)
    q_view = (q_ptr, img * stride_qb, stride_qc, stride_qs)
    offs_s, mask_s, valid = spatial_lanes((pid % tiles_per_image) * BLOCK_S, (None, 0), S, BLOCK_S,
                                          False, USE_INT64)
    offs_c = widen(tl.arange(0, BLOCK_C), USE_INT64)
    mask_c = offs_c < C
    half_l = load_row(consts_ptr, ROW_HALF_L, offs_c, mask_c, C, 0.0)
    offset = load_row(consts_ptr, ROW_OFFSET, offs_c, mask_c, C, 0.0)
    shift = load_row(consts_ptr, ROW_SHIFT, offs_c, mask_c, C, 0.0)
    half_w = load_row(consts_ptr, ROW_HALF_W, offs_c, mask_c, C, 1.0)
    top = load_row(consts_ptr, ROW_TOP, offs_c, mask_c, C, 0.0)
    basis = tl.load(basis_ptr + offs_c, mask=mask_c, other=0)[:, None]
    inside = mask_c[:, None] & mask_s[None, :]
    z = load_tile(x_view, offs_c, offs_s, inside)
    t = tanh_f32(z + shift, USE_LIBDEVICE)
    rounded = round_half_even(t * half_l - offset, USE_LIBDEVICE)
    store_tile(q_view, tl.div_rn(rounded, half_w), offs_c, offs_s, inside)
    digit = rounded + half_w
    digit = tl.where(digit == digit, digit, 0.0)
    digit = tl.minimum(tl.maximum(digit, 0.0), top)
    index = tl.sum(digit.to(tl.int64) * basis, axis=0)
    tl.store(idx_ptr + img * S + offs_s, index.to(idx_ptr.dtype.element_ty), mask=mask_s)


@triton.jit(do_not_specialize=["C", "tiles_per_image"])
def _bwd_vq_fsq_kernel(
    x_ptr,            # input, (B, C, S) through strides
    g_ptr,            # gradient of the codes, (B, C, S) through strides
    dx_ptr,           # gradient of the input, (B, C, S) through strides, the input's dtype
    consts_ptr,       # (5, C) float32: half_l, offset, shift, L//2, L-1
    C, S, tiles_per_image,
    stride_xb, stride_xc, stride_xs,
    stride_gb, stride_gc, stride_gs,
    stride_dxb, stride_dxc, stride_dxs,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, USE_INT64: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
):
    """FSQ backward (straight-through round): ``dz = ((g / (L//2)) * half_l) * (1 - t^2)``."""
    pid = tl.program_id(0)
    img = widen(pid // tiles_per_image, USE_INT64)
    x_view = (x_ptr, img * stride_xb, stride_xc, stride_xs)
    g_view = (g_ptr, img * stride_gb, stride_gc, stride_gs)
    dx_view = (dx_ptr, img * stride_dxb, stride_dxc, stride_dxs)
    offs_s, mask_s, valid = spatial_lanes((pid % tiles_per_image) * BLOCK_S, (None, 0), S, BLOCK_S,
                                          False, USE_INT64)
    offs_c = widen(tl.arange(0, BLOCK_C), USE_INT64)
    mask_c = offs_c < C
    half_l = load_row(consts_ptr, ROW_HALF_L, offs_c, mask_c, C, 0.0)
    shift = load_row(consts_ptr, ROW_SHIFT, offs_c, mask_c, C, 0.0)
    half_w = load_row(consts_ptr, ROW_HALF_W, offs_c, mask_c, C, 1.0)
    inside = mask_c[:, None] & mask_s[None, :]
    z = load_tile(x_view, offs_c, offs_s, inside)
    g = load_tile(g_view, offs_c, offs_s, inside)
    t = tanh_f32(z + shift, USE_LIBDEVICE)
    dz = (tl.div_rn(g, half_w) * half_l) * one_minus_square(t, USE_LIBDEVICE)
    store_tile(dx_view, dz, offs_c, offs_s, inside)


def fsq_table(levels: Sequence[int], device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cached ``(consts, basis)`` of the standalone FSQ: float32 ``(5, C)`` rows built with the
    library's torch ops (``half_l = (L-1) * (1 + 1e-3) / 2``, ``offset``, ``shift = atanh(offset /
    half_l)``, ``L // 2``, ``L - 1``) and int64 ``(C,)`` place values."""
    key = ("fsq", tuple(levels), str(device))
    hit = _TABLES.get(key)
    if hit is None:
        lt = torch.tensor(list(levels), dtype=torch.int32)
        half_l = (lt - 1) * (1 + 1e-3) / 2
        offset = torch.where(lt % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        consts = torch.stack([half_l, offset, shift, (lt // 2).float(), (lt - 1).float()]).to(device)
        hit = _TABLES[key] = (consts, _basis(levels, device))
    return hit


def fsq_forward(x: torch.Tensor, levels: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused standalone FSQ on ``x`` ``(B, N, C)``: ``(codes like x, indices (B, N))``."""
    codes = torch.empty_like(x)
    indices = x.new_empty(x.shape[:2], dtype=_index_dtype(levels, False))
    B, N, C = x.shape
    if B * N == 0:
        return codes.zero_(), indices.zero_()
    consts, basis = fsq_table(levels, x.device)
    tiles = config.elementwise_tiles(C, N)
    tiles_per_image = triton.cdiv(N, tiles.block_s)
    _fwd_vq_fsq_kernel[(B * tiles_per_image,)](
        x, codes, indices, consts, basis, C, N, tiles_per_image, *_bcs(x)[1], *_bcs(codes)[1],
        BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s, USE_INT64=config.needs_int64(x, codes, indices),
        USE_LIBDEVICE=config.use_libdevice(x), num_warps=tiles.num_warps, enable_fp_fusion=config.FP_FUSION)
    return codes, indices


def fsq_backward(grad: torch.Tensor, x: torch.Tensor, levels: Sequence[int]) -> torch.Tensor:
    """Fused standalone FSQ backward: ``dL/dx`` ``(B, N, C)`` in ``x``'s dtype."""
    grad_x = torch.empty_like(x)
    B, N, C = x.shape
    if B * N == 0:
        return grad_x.zero_()
    consts, _basis = fsq_table(levels, x.device)
    tiles = config.elementwise_tiles(C, N)
    tiles_per_image = triton.cdiv(N, tiles.block_s)
    _bwd_vq_fsq_kernel[(B * tiles_per_image,)](
        x, grad, grad_x, consts, C, N, tiles_per_image, *_bcs(x)[1], *_bcs(grad)[1], *_bcs(grad_x)[1],
        BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s, USE_INT64=config.needs_int64(x, grad, grad_x),
        USE_LIBDEVICE=config.use_libdevice(x), num_warps=tiles.num_warps, enable_fp_fusion=config.FP_FUSION)
    return grad_x
