"""Kernels of vector-quantize-pytorch's ResidualFSQ (``rfsq_kernels.vqpytorch.ResidualFSQ``): forward
and backward kernel, launchers, constant table.

The library's quantizer does not fit the RFSQ strategy loop (``docs/kernel-design.md``,
"vector-quantize-pytorch's ResidualFSQ"): the input is soft-clamped once, every stage divides by a
fixed per-channel scale and hard-clamps onto a symmetric grid with ``floor``, and the residual is
detached, so the backward is a sum of per-stage pass-through terms rather than a chain. Math,
op for op: ``docs/semantics.md``, "vector-quantize-pytorch's ResidualFSQ".

Arithmetic contract (``docs/semantics.md``): every division is IEEE (``tl.div_rn``) on the same float32
constants the library uses (``c``, ``scales``, ``a = 2/(L-1)``), launches pass
``enable_fp_fusion=False`` (``a*d - 1`` rounds twice, like torch), the soft clamp's derivative
``1 - t*t`` rounds once (an explicit fma, like ATen's ``tanh_backward``), and tanh is libdevice
on a GPU and the project's exp-based fallback under the interpreter.
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .. import config, layouts
from ..fpmath import tanh_f32
from ..launch_settings import launch
from ..tile_io import keep_only, load_active_stages, load_tile, stage_keep, store_tile, tile_prologue, widen
from .common import bcs_strides, load_row, one_minus_square, place_values, vq_index_dtype

# Rows of the per-channel constant table built by :func:`constant_table`.
VQ_CLAMP_ROW = tl.constexpr(0)  # soft clamp value c = 1 + 1/(L-1)   (the library's buffer)
VQ_STEP_ROW = tl.constexpr(1)   # a = 2/(L-1)                         (float32, as the library computes it)
VQ_LM1_ROW = tl.constexpr(2)    # L - 1


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


@triton.jit
def group_pointers(tensors, group_strides, consts_ptr, scales_ptr, C, K, USE_INT64: tl.constexpr):
    """This program's group (grid axis 1): the three tensor pointers advanced by their group
    strides, and the constant and scale tables advanced to row ``g`` of ``(G, 3, C)`` / ``(G, K, C)``.
    Returns ``(*tensors, consts_ptr, scales_ptr)``; the group index is widened first, so with
    ``USE_INT64`` no product wraps at 2**31."""
    grp = widen(tl.program_id(1), USE_INT64)
    a_ptr, b_ptr, c_ptr = tensors
    stride_a, stride_b, stride_c = group_strides
    return (a_ptr + grp * stride_a, b_ptr + grp * stride_b, c_ptr + grp * stride_c,
            consts_ptr + grp * 3 * C, scales_ptr + grp * K * C)


@triton.heuristics(layouts.FLAGS_FROM_POINTERS)
@triton.jit(do_not_specialize=["C", "tiles_per_image", "K", "stride_xg", "stride_qg", "stride_ig"])
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
    stride_xg, stride_qg, stride_ig,  # group strides of input, output, indices (0: one group)
    BLOCK_C: tl.constexpr,            # next_pow2(C): every channel in one program
    BLOCK_S: tl.constexpr,            # positions per program
    HAS_MASK: tl.constexpr,           # derived: valid_ptr is not None
    HAS_ACTIVE_STAGES: tl.constexpr,  # derived: active_stages_ptr is not None
    USE_INT64: tl.constexpr,          # some offset may reach 2**31: index in 64 bits
    USE_LIBDEVICE: tl.constexpr,      # real GPU: libdevice tanh; interpreter: fallback
    GROUPED: tl.constexpr = False,    # several groups on grid axis 1 (else the group strides are unused)
):
    """Forward: one program per (image, tile of positions) and group (grid axis 1), the K stages a
    runtime loop with the (detached) residual in registers; the output sums the stage outputs in
    stage order. Group ``g`` reads its own ``(3, C)`` constants and ``(K, C)`` scales (rows ``g``
    of ``(G, 3, C)`` / ``(G, K, C)`` tables); mask and stage counts are shared by the groups."""
    if GROUPED:
        x_ptr, q_ptr, idx_ptr, consts_ptr, scales_ptr = group_pointers(
            (x_ptr, q_ptr, idx_ptr), (stride_xg, stride_qg, stride_ig), consts_ptr, scales_ptr, C, K, USE_INT64)
    img, (x_view, q_view), offs_c, mask_c, offs_s, mask_s, valid = tile_prologue(
        ((x_ptr, stride_xb, stride_xc, stride_xs), (q_ptr, stride_qb, stride_qc, stride_qs)),
        valid_ptr, C, S, tiles_per_image, BLOCK_C, BLOCK_S, HAS_MASK, USE_INT64)
    active_stages = load_active_stages(active_stages_ptr, img, K, HAS_ACTIVE_STAGES)
    c = load_row(consts_ptr, VQ_CLAMP_ROW, offs_c, mask_c, C, 1.0)
    a = load_row(consts_ptr, VQ_STEP_ROW, offs_c, mask_c, C, 0.0)
    lm1 = load_row(consts_ptr, VQ_LM1_ROW, offs_c, mask_c, C, 0.0)
    basis = tl.load(basis_ptr + offs_c, mask=mask_c, other=0)[:, None]
    x = load_tile(x_view, offs_c, offs_s, mask_c[:, None] & valid[None, :])
    _t, r = soft_clamp(x, c, USE_LIBDEVICE)
    acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    index_rows = (idx_ptr, (img * S + offs_s) * K, mask_s)
    for k in range(K):
        s = tl.load(scales_ptr + k * C + offs_c, mask=mask_c, other=1.0)[:, None]
        q, d, _inside = vq_stage(r, s, a, lm1)
        store_vq_index(index_rows, k, d, lm1, basis, stage_keep(valid, active_stages, k, HAS_ACTIVE_STAGES))
        q = keep_only(q, valid[None, :], active_stages, k, HAS_MASK, HAS_ACTIVE_STAGES)
        acc = acc + q
        r = r - q
    store_tile(q_view, acc, offs_c, offs_s, mask_c[:, None] & mask_s[None, :])


@triton.heuristics(layouts.FLAGS_FROM_POINTERS)
@triton.jit(do_not_specialize=["C", "tiles_per_image", "stride_xg", "stride_gg", "stride_dxg"])
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
    stride_xg, stride_gg, stride_dxg,    # group strides (0: one group)
    K: tl.constexpr,                  # stages (unrolled)
    BLOCK_C: tl.constexpr,            # next_pow2(C)
    BLOCK_S: tl.constexpr,            # positions per program
    HAS_MASK: tl.constexpr,           # derived: valid_ptr is not None
    HAS_ACTIVE_STAGES: tl.constexpr,  # derived: active_stages_ptr is not None
    USE_INT64: tl.constexpr,          # 64-bit offsets
    USE_LIBDEVICE: tl.constexpr,      # real GPU: libdevice tanh and fma; interpreter: fallbacks
    GROUPED: tl.constexpr = False,    # several groups on grid axis 1 (else the group strides are unused)
):
    """Backward: the residual is detached, so ``dL/dy = sum_k [-1 < u_k < 1] * g*s_k*a/2*(L-1)/s_k``,
    each term rounded op by op like autograd and summed from the last stage back; then the soft
    clamp: ``dx = (dy * c) * (1 - t^2) / c``. A forward replay records which stages pass. Groups
    (grid axis 1) as in the forward."""
    if GROUPED:
        x_ptr, g_ptr, dx_ptr, consts_ptr, scales_ptr = group_pointers(
            (x_ptr, g_ptr, dx_ptr), (stride_xg, stride_gg, stride_dxg), consts_ptr, scales_ptr, C, K, USE_INT64)
    img, (x_view, g_view, dx_view), offs_c, mask_c, offs_s, mask_s, valid = tile_prologue(
        ((x_ptr, stride_xb, stride_xc, stride_xs), (g_ptr, stride_gb, stride_gc, stride_gs),
         (dx_ptr, stride_dxb, stride_dxc, stride_dxs)),
        valid_ptr, C, S, tiles_per_image, BLOCK_C, BLOCK_S, HAS_MASK, USE_INT64)
    mask = mask_c[:, None] & valid[None, :]
    active_stages = load_active_stages(active_stages_ptr, img, K, HAS_ACTIVE_STAGES)
    c = load_row(consts_ptr, VQ_CLAMP_ROW, offs_c, mask_c, C, 1.0)
    a = load_row(consts_ptr, VQ_STEP_ROW, offs_c, mask_c, C, 0.0)
    lm1 = load_row(consts_ptr, VQ_LM1_ROW, offs_c, mask_c, C, 0.0)
    x = load_tile(x_view, offs_c, offs_s, mask)
    t, r = soft_clamp(x, c, USE_LIBDEVICE)
    passing = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.int32)  # bit k: stage k passes the gradient
    for k in tl.static_range(K):
        s = tl.load(scales_ptr + k * C + offs_c, mask=mask_c, other=1.0)[:, None]
        q, _d, inside = vq_stage(r, s, a, lm1)
        inside = inside & stage_keep(mask, active_stages, k, HAS_ACTIVE_STAGES)
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


def _version(t: torch.Tensor) -> Optional[int]:
    """``t``'s in-place version counter; None for an inference tensor (it has none)."""
    return None if t.is_inference() else t._version


def constant_table(levels: Sequence[int], clamp_value: torch.Tensor, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cached ``(consts, basis)``: float32 ``(3, C)`` rows ``c`` (the module's soft clamp buffer),
    ``a = 2. / (L - 1)`` and ``L - 1``, computed with the same torch ops as the library, and int64
    ``(C,)`` place values.

    Keyed by levels, device and the clamp tensor itself (identity and in-place version, never its
    values): a hit reads nothing back from the device, and a buffer changed in place
    (``load_state_dict``) or replaced is rebuilt -- on the device, without a host copy. An
    inference tensor (no version counter) rebuilds every call, still without a host copy."""
    version = _version(clamp_value)

    def build():
        lt = torch.tensor(list(levels), dtype=torch.int32)
        a = 2. / (lt - 1)
        clamp = clamp_value.detach().float().expand(len(levels)).to(device)
        consts = torch.stack([clamp, a.to(device), (lt - 1).float().to(device)])
        return weakref.ref(clamp_value), version, consts, place_values(levels, device)

    def fresh(hit) -> bool:
        return hit[0]() is clamp_value and hit[1] == version and version is not None

    hit = config.cached(("vq_rfsq", tuple(levels), str(device), id(clamp_value)), build, fresh)
    return hit[2], hit[3]


def grouped_constant_table(levels: Sequence[int], scales: Sequence[torch.Tensor], clamp_values: Sequence[torch.Tensor],
                           device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cached ``(consts (G, 3, C), scales (G, K, C) float32, basis)`` of G groups: group g's
    :func:`constant_table` of ``clamp_values[g]`` and its ``scales[g]``, stacked.

    Keyed like :func:`constant_table` by every group's tensors (identity and in-place version),
    so a hit copies nothing and a changed or replaced buffer of any group rebuilds the stack."""
    tensors = tuple(scales) + tuple(clamp_values)
    versions = tuple(_version(t) for t in tensors)

    def build():
        consts = torch.stack([constant_table(levels, c, device)[0] for c in clamp_values])
        stacked = torch.stack([s.detach().float() for s in scales]).to(device)
        return tuple(weakref.ref(t) for t in tensors), versions, consts, stacked, place_values(levels, device)

    def fresh(hit) -> bool:
        return (all(ref() is t for ref, t in zip(hit[0], tensors)) and hit[1] == versions
                and None not in versions)

    hit = config.cached(("vq_grouped_rfsq", tuple(levels), str(device), tuple(id(t) for t in tensors)), build, fresh)
    return hit[2], hit[3], hit[4]


def forward_outputs(x: torch.Tensor, levels: Sequence[int], stages: int, dropout: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised ``(quantized, indices)``: ``quantized`` like ``x`` (``(B, N, C)``, same
    strides when dense), ``indices`` ``(B, N, K)``."""
    indices = x.new_empty((x.shape[0], x.shape[1], stages), dtype=vq_index_dtype(levels, dropout))
    return torch.empty_like(x), indices


def grouped_forward_outputs(x: torch.Tensor, levels: Sequence[int], stages: int,
                            dropout: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised contiguous ``(quantized (G, B, N, C), indices (G, B, N, K))`` for ``x``
    ``(G, B, N, C)``: each group's slice is laid out as :func:`forward_outputs` lays out a dense
    ungrouped call's."""
    G, B, N, _C = x.shape
    indices = x.new_empty((G, B, N, stages), dtype=vq_index_dtype(levels, dropout))
    return x.new_empty(x.shape), indices


def _launch_forward(x, quantized, indices, levels, consts, scales, basis, valid, active_stages, group_strides) -> None:
    """One forward launch over ``(B * tiles, G)`` programs; ``x``/``quantized``/``indices`` are
    ``(G, B, N, .)`` (G = 1 with zero group strides for an ungrouped call)."""
    G, B, N, C = x.shape
    K = scales.shape[-2]
    offsets = (x, quantized, indices)
    # 64-bit offsets and several groups take the sparse (half) tiles, like masks: at full tiles
    # ptxas spills (bench/NOTES.md)
    tiles = config.elementwise_tiles(C, N, sparse=valid is not None or active_stages is not None or G > 1
                                     or layouts.needs_int64(*offsets))
    tiles_per_image = triton.cdiv(N, tiles.block_s)
    launch(_fwd_vq_rfsq_kernel, (B * tiles_per_image, G),
           (x, quantized, indices, consts, scales, basis, valid, active_stages,
            C, N, tiles_per_image, *bcs_strides(x[0]), *bcs_strides(quantized[0]), K, *group_strides),
           tiles=tiles, tensors=offsets, GROUPED=G > 1)


def forward(x: torch.Tensor, levels: Sequence[int], scales: torch.Tensor, clamp_value: torch.Tensor,
            mask: Optional[torch.Tensor] = None, active_stages: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused forward on ``x`` ``(B, N, C)``: ``(quantized, indices)``; ``active_stages`` ``(B,)`` int32
    stage counts (quantize dropout, -1 indices for dropped stages), ``mask`` ``(B, N)`` bool."""
    K = scales.shape[0]
    quantized, indices = forward_outputs(x, levels, K, active_stages is not None)
    B, N, C = x.shape
    if B * N == 0:
        return quantized.zero_(), indices.zero_()
    consts, basis = constant_table(levels, clamp_value, x.device)
    valid, active_stages = layouts.mask_and_active_stages(mask, active_stages, B, N)
    _launch_forward(x[None], quantized[None], indices[None], levels, consts, scales.float().contiguous(), basis,
                    valid, active_stages, (0, 0, 0))
    return quantized, indices


def grouped_forward(x: torch.Tensor, levels: Sequence[int], scales: Sequence[torch.Tensor],
                    clamp_values: Sequence[torch.Tensor],
                    active_stages: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused forward of G ResidualFSQs in one launch: ``x`` ``(G, B, N, C)`` (any strides), group
    g quantized with ``scales[g]`` ``(K, C)`` and ``clamp_values[g]``; ``active_stages`` ``(B,)``
    shared by the groups. Returns ``(quantized, indices)`` ``(G, B, N, C)`` / ``(G, B, N, K)``,
    each group's slice bitwise what :func:`forward` returns for it."""
    K = scales[0].shape[0]
    quantized, indices = grouped_forward_outputs(x, levels, K, active_stages is not None)
    G, B, N, C = x.shape
    if G * B * N == 0:
        return quantized.zero_(), indices.zero_()
    consts, stacked, basis = grouped_constant_table(levels, scales, clamp_values, x.device)
    _valid, active_stages = layouts.mask_and_active_stages(None, active_stages, B, N)
    _launch_forward(x, quantized, indices, levels, consts, stacked, basis, None, active_stages,
                    (x.stride(0), quantized.stride(0), indices.stride(0)))
    return quantized, indices


def _launch_backward(grad_q, x, grad_x, consts, scales, valid, active_stages, group_strides) -> None:
    """One backward launch over ``(B * tiles, G)`` programs (``(G, B, N, C)`` tensors)."""
    G, B, N, C = x.shape
    K = scales.shape[-2]
    tiles = config.elementwise_tiles(C, N, sparse=valid is not None or active_stages is not None or G > 1)
    tiles_per_image = triton.cdiv(N, tiles.block_s)
    launch(_bwd_vq_rfsq_kernel, (B * tiles_per_image, G),
           (x, grad_q, grad_x, consts, scales, valid, active_stages,
            C, N, tiles_per_image, *bcs_strides(x[0]), *bcs_strides(grad_q[0]), *bcs_strides(grad_x[0]),
            *group_strides),
           tiles=tiles, tensors=(x, grad_q, grad_x), K=K, GROUPED=G > 1)


def backward(grad_q: torch.Tensor, x: torch.Tensor, levels: Sequence[int], scales: torch.Tensor,
             clamp_value: torch.Tensor, mask: Optional[torch.Tensor] = None,
             active_stages: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fused backward: ``dL/dx`` ``(B, N, C)`` in ``x``'s dtype from ``dL/dquantized``."""
    grad_x = torch.empty_like(x)
    B, N, C = x.shape
    if B * N == 0:
        return grad_x.zero_()
    consts, _basis = constant_table(levels, clamp_value, x.device)
    valid, active_stages = layouts.mask_and_active_stages(mask, active_stages, B, N)
    _launch_backward(grad_q[None], x[None], grad_x[None], consts, scales.float().contiguous(), valid, active_stages,
                     (0, 0, 0))
    return grad_x


def grouped_backward(grad_q: torch.Tensor, x: torch.Tensor, levels: Sequence[int], scales: Sequence[torch.Tensor],
                     clamp_values: Sequence[torch.Tensor], active_stages: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fused backward of :func:`grouped_forward` in one launch: ``dL/dx`` ``(G, B, N, C)`` in
    ``x``'s dtype (``x``'s strides when dense)."""
    grad_x = torch.empty_like(x)
    G, B, N, C = x.shape
    if G * B * N == 0:
        return grad_x.zero_()
    consts, stacked, _basis = grouped_constant_table(levels, scales, clamp_values, x.device)
    _valid, active_stages = layouts.mask_and_active_stages(None, active_stages, B, N)
    _launch_backward(grad_q, x, grad_x, consts, stacked, None, active_stages,
                     (x.stride(0), grad_q.stride(0), grad_x.stride(0)))
    return grad_x
