"""Forward kernels: all K stages in one launch (quantized, indices and LN statistics)."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..reference.codebook import index_dtype
from . import config
from .stages import (elem_stage, keep_only, ln_params, ln_replay, ln_stage, ln_stats, load_active, load_levels,
                     load_tile, load_valid, masked_row_sum, pack_index, stage_keep, store_tile, widen)


@triton.jit
def _store_index(idx_ptr, idx_row, k, rounded, hw, top, basis, mask_s, valid, n_act,
                 HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """Write stage ``k``'s packed index for the tile's positions (``idx_row = (b*S + s) * K``);
    positions the stage skips (padding, dropped stage) get the sentinel -1."""
    index = pack_index(rounded, hw, top, basis)
    if HAS_MASK or HAS_DROPOUT:
        index = tl.where(stage_keep(valid, n_act, k, HAS_DROPOUT), index, -1)
    tl.store(idx_ptr + idx_row + k, index.to(idx_ptr.dtype.element_ty), mask=mask_s)


@triton.jit
def _ln_emit(r, acc, mu, sd, k, w_ptr, b_ptr, offs_c, mask_c, C, hl, off, sh, hw, top, basis,
             idx_ptr, idx_row, mask_s, valid, n_act, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
             USE_LIBDEVICE: tl.constexpr):
    """Quantize layernorm stage ``k`` with known statistics; returns ``(r_{k+1}, acc + q_k)``."""
    w, bb = ln_params(w_ptr, b_ptr, k, offs_c, mask_c, C)
    q, _code, _t, rounded = ln_stage(r, mu, sd, w, bb, hl, off, sh, hw, USE_LIBDEVICE)
    _store_index(idx_ptr, idx_row, k, rounded, hw, top, basis, mask_s, valid, n_act, HAS_MASK, HAS_DROPOUT)
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


@triton.jit(do_not_specialize=["C", "n_sblk", "K"])
def _fwd_elementwise_kernel(
    x_ptr, q_ptr, idx_ptr, scale_ptr, consts_ptr, basis_ptr, valid_ptr, active_ptr,
    C, S, n_sblk, sxb, sxc, sxs, sqb, sqc, sqs, K,
    HAS_SCALE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_INT64: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
):
    """``none``/``scale``: one program per (image, spatial tile), all K stages in registers.

    The stages are a runtime loop (the residual is carried, nothing is replayed), so one binary
    serves every K.
    """
    pid = tl.program_id(0)
    b = widen(pid // n_sblk, USE_INT64)
    offs_s = widen((pid % n_sblk) * BLOCK_S + tl.arange(0, BLOCK_S), USE_INT64)
    offs_c = widen(tl.arange(0, BLOCK_C), USE_INT64)
    mask_c = offs_c < C
    mask_s = offs_s < S
    mask = mask_c[:, None] & mask_s[None, :]
    valid = load_valid(valid_ptr, b, offs_s, mask_s, S, HAS_MASK)
    n_act = load_active(active_ptr, b, K, HAS_DROPOUT)
    hl, off, sh, hw, top, basis = load_levels(consts_ptr, basis_ptr, offs_c, mask_c, C)
    r = load_tile(x_ptr, b, offs_c, offs_s, sxb, sxc, sxs, mask_c[:, None] & valid[None, :])
    acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    idx_row = (b * S + offs_s) * K
    for k in range(K):
        a = 1.0
        if HAS_SCALE:
            a = tl.load(scale_ptr + k).to(tl.float32)
        q, _t, rounded = elem_stage(r, a, hl, off, sh, hw, HAS_SCALE, USE_LIBDEVICE)
        _store_index(idx_ptr, idx_row, k, rounded, hw, top, basis, mask_s, valid, n_act, HAS_MASK, HAS_DROPOUT)
        q = keep_only(q, valid[None, :], n_act, k, HAS_MASK, HAS_DROPOUT)
        acc = acc + q
        r = r - q
    store_tile(q_ptr, acc, b, offs_c, offs_s, sqb, sqc, sqs, mask)


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


def forward_outputs(
    z: torch.Tensor, levels: Sequence[int], stages: int, strategy: str
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialised ``(quantized, indices, mean, std)`` with the reference's shapes and dtypes
    (shared by the launcher and the fake/meta implementation)."""
    B, C = z.shape[0], z.shape[1]
    quantized = config.new_output(z)
    indices = z.new_empty((B, *z.shape[2:], stages), dtype=index_dtype(levels))
    if strategy == "layernorm":
        mean = z.new_empty((B, stages, C), dtype=torch.float32)
        std = z.new_empty((B, stages, C), dtype=torch.float32)
    else:
        mean = z.new_zeros((0,), dtype=torch.float32)
        std = z.new_zeros((0,), dtype=torch.float32)
    return quantized, indices, mean, std


def rfsq_forward_launch(
    z: torch.Tensor,
    levels: Sequence[int],
    stages: int,
    strategy: str,
    scale: Optional[torch.Tensor] = None,
    ln_weight: Optional[torch.Tensor] = None,
    ln_bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    mask: Optional[torch.Tensor] = None,
    active_stages: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the fused K-stage forward; returns ``(quantized, indices, mean, std)`` like
    :func:`rfsq_kernels.reference.rfsq_forward` (``mask`` ``(B, *spatial)`` bool and
    ``active_stages`` ``(B,)`` int32 included: one launch serves any mix of per-sample counts).

    ``scale`` is ``a = softplus(scale_param)`` (``(K,)``, float32) for ``strategy='scale'``;
    ``ln_weight``/``ln_bias`` are ``(K, C)`` for ``'layernorm'``. Tiles, path and ``num_warps``
    come from :func:`config.layernorm_tiles` / :func:`config.elementwise_tiles`.
    """
    quantized, indices, mean, std = forward_outputs(z, levels, stages, strategy)
    B, C = z.shape[0], z.shape[1]
    S = math.prod(z.shape[2:])
    if B == 0 or S == 0:
        return quantized.zero_(), indices.zero_(), mean.zero_(), std.zero_()
    x, (sxb, sxc, sxs) = config.strided_view(z)
    sqb, sqc, sqs = quantized.stride(0), quantized.stride(1), config.flat_spatial_stride(quantized)
    consts, basis = config.level_tables(levels, z.device)
    use_int64 = config.needs_int64(x, quantized, indices)
    valid, active = config.mask_and_counts(mask, active_stages, B, S, x)
    common = dict(HAS_MASK=mask is not None, HAS_DROPOUT=active_stages is not None,
                  USE_INT64=use_int64, USE_LIBDEVICE=config.use_libdevice(z))
    if strategy == "layernorm":
        tiles = config.layernorm_tiles(C, S, "forward", use_int64)
        _fwd_layernorm_kernel[(B,)](
            x, quantized, indices, mean, std, ln_weight, ln_bias, consts, basis, valid, active,
            C, S, sxb, sxc, sxs, sqb, sqc, sqs, float(eps),
            K=stages, BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s, SINGLE=tiles.single,
            num_warps=tiles.num_warps, **common)
    else:
        tiles = config.elementwise_tiles(C, S, sparse=mask is not None or active_stages is not None)
        n_sblk = triton.cdiv(S, tiles.block_s)
        has_scale = strategy == "scale"
        _fwd_elementwise_kernel[(B * n_sblk,)](
            x, quantized, indices, scale if has_scale else x, consts, basis, valid, active,
            C, S, n_sblk, sxb, sxc, sxs, sqb, sqc, sqs,
            K=stages, HAS_SCALE=has_scale, BLOCK_C=tiles.block_c, BLOCK_S=tiles.block_s,
            num_warps=tiles.num_warps, **common)
    return quantized, indices, mean, std
