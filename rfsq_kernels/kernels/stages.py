"""Per-stage building blocks shared by the forward and backward kernels.

Every kernel works on a 2-D register tile ``[BLOCK_C, BLOCK_S]``: all (padded) channels of one
image by a run of flattened spatial positions. The channel axis is padded to a power of two;
padded channels load neutral constants (``half_w = 1``, ``basis = 0``, ``w = 1``) and are never
stored. The forward and the backward replay call the *same* helpers in the same order, so the
backward sees bit-identical rounding decisions.
"""
import triton
import triton.language as tl

from .math import round_half_even, tanh_f32

# Rows of the per-channel constant table built by ``config.level_tables``.
ROW_HALF_L = tl.constexpr(0)
ROW_OFFSET = tl.constexpr(1)
ROW_SHIFT = tl.constexpr(2)
ROW_HALF_W = tl.constexpr(3)
ROW_TOP = tl.constexpr(4)


@triton.jit
def widen(v, USE_INT64: tl.constexpr):
    """Promote an index to int64 when some offset of the launch may reach 2**31."""
    if USE_INT64:
        return v.to(tl.int64)
    else:
        return v


@triton.jit
def tile_offsets(b, offs_c, offs_s, stride_b, stride_c, stride_s):
    """Element offsets of a ``[BLOCK_C, BLOCK_S]`` tile of image ``b`` (spatial dims flattened)."""
    return b * stride_b + offs_c[:, None] * stride_c + offs_s[None, :] * stride_s


@triton.jit
def load_tile(ptr, b, offs_c, offs_s, stride_b, stride_c, stride_s, mask):
    """A ``[BLOCK_C, BLOCK_S]`` tile as float32 (masked lanes read 0)."""
    offs = tile_offsets(b, offs_c, offs_s, stride_b, stride_c, stride_s)
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_tile(ptr, val, b, offs_c, offs_s, stride_b, stride_c, stride_s, mask):
    """Store a float32 tile in the pointer's element type (bf16/fp16/fp32/fp64)."""
    offs = tile_offsets(b, offs_c, offs_s, stride_b, stride_c, stride_s)
    tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def masked_row_sum(v, mask):
    """Per-channel sum over the tile's valid positions: ``[BLOCK_C, BLOCK_S] -> [BLOCK_C]``."""
    return tl.sum(tl.where(mask, v, 0.0), axis=1)


@triton.jit
def load_levels(consts_ptr, basis_ptr, offs_c, mask_c, C):
    """Per-channel FSQ constants as ``[BLOCK_C, 1]`` columns (float32; basis int64)."""
    hl = tl.load(consts_ptr + ROW_HALF_L * C + offs_c, mask=mask_c, other=0.0)[:, None]
    off = tl.load(consts_ptr + ROW_OFFSET * C + offs_c, mask=mask_c, other=0.0)[:, None]
    sh = tl.load(consts_ptr + ROW_SHIFT * C + offs_c, mask=mask_c, other=0.0)[:, None]
    hw = tl.load(consts_ptr + ROW_HALF_W * C + offs_c, mask=mask_c, other=1.0)[:, None]
    top = tl.load(consts_ptr + ROW_TOP * C + offs_c, mask=mask_c, other=0.0)[:, None]
    basis = tl.load(basis_ptr + offs_c, mask=mask_c, other=0)[:, None]
    return hl, off, sh, hw, top, basis


@triton.jit
def fsq_code(u, hl, off, sh, hw, USE_LIBDEVICE: tl.constexpr):
    """FSQ of the conditioned residual ``u``: returns ``(code, t, rounded)``.

    ``bounded = tanh(u + shift) * half_l - offset``; ``code = round(bounded) / half_w`` (the
    straight-through value equals the clean rounded integer); ``t`` is kept for the derivative.
    """
    t = tanh_f32(u + sh, USE_LIBDEVICE)
    rounded = round_half_even(t * hl - off, USE_LIBDEVICE)
    return rounded / hw, t, rounded


@triton.jit
def fsq_dcode(t, hl, hw):
    """d code / d u of :func:`fsq_code` with the straight-through round (d round = 1)."""
    return ((1.0 - t * t) * hl) / hw


@triton.jit
def pack_index(rounded, hw, top, basis):
    """Mixed-radix index of one stage, ``[BLOCK_S]`` int64, from the rounded values.

    The digit is an explicit integer ``clamp(nan->0(round + half_w), 0, L-1)``, so NaN/Inf input
    can never produce an out-of-range index.
    """
    digit = rounded + hw
    digit = tl.where(digit == digit, digit, 0.0)
    digit = tl.minimum(tl.maximum(digit, 0.0), top)
    return tl.sum(digit.to(tl.int64) * basis, axis=0)


@triton.jit
def store_index(idx_ptr, idx_row, k, rounded, hw, top, basis, mask_s, valid, n_act,
                 HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """Write stage ``k``'s packed index for the tile's positions (``idx_row = (b*S + s) * K``);
    positions the stage skips (padding, dropped stage) get the sentinel -1."""
    index = pack_index(rounded, hw, top, basis)
    if HAS_MASK or HAS_DROPOUT:
        index = tl.where(stage_keep(valid, n_act, k, HAS_DROPOUT), index, -1)
    tl.store(idx_ptr + idx_row + k, index.to(idx_ptr.dtype.element_ty), mask=mask_s)


# -- masks (padded positions) and per-sample stage counts (quantize dropout) -------------------
# Both are constexpr-gated (HAS_MASK, HAS_DROPOUT): without them the compiled code is unchanged.


@triton.jit
def load_valid(mask_ptr, b, offs_s, mask_s, S, HAS_MASK: tl.constexpr):
    """``[BLOCK_S]`` bool: position in range and, with ``HAS_MASK``, not padding (``(B, S)`` uint8)."""
    if HAS_MASK:
        m = tl.load(mask_ptr + b * S + offs_s, mask=mask_s, other=0)
        return mask_s & (m != 0)
    else:
        return mask_s


@triton.jit
def load_active(active_ptr, b, K, HAS_DROPOUT: tl.constexpr):
    """Number of stages image ``b`` runs (``(B,)`` int32), or K without dropout."""
    if HAS_DROPOUT:
        return tl.load(active_ptr + b)
    else:
        return K


@triton.jit
def stage_keep(valid, n_act, k, HAS_DROPOUT: tl.constexpr):
    """Positions that stage ``k`` quantizes: ``valid`` (any shape) and ``k < n_act``."""
    if HAS_DROPOUT:
        return valid & (k < n_act)
    else:
        return valid


@triton.jit
def keep_only(q, valid, n_act, k, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """``q`` with the positions stage ``k`` skips set to 0 (a no-op without mask/dropout);
    ``valid`` broadcasts against ``q`` (a ``[1, BLOCK_S]`` row or the tile's mask)."""
    if HAS_MASK or HAS_DROPOUT:
        return tl.where(stage_keep(valid, n_act, k, HAS_DROPOUT), q, 0.0)
    else:
        return q


@triton.jit
def stage_mask(mask, n_act, k, HAS_DROPOUT: tl.constexpr):
    """Tile positions whose ``q_k`` exists (``mask``: the tile's channels x valid positions)."""
    return stage_keep(mask, n_act, k, HAS_DROPOUT)
