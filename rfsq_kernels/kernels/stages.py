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
def elem_stage(r, a, hl, off, sh, hw, HAS_SCALE: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """One ``none``/``scale`` stage: ``q = FSQ(a * r) / a`` (``q = FSQ(r)`` without scale).

    Returns ``(q, t, rounded)``.
    """
    if HAS_SCALE:
        code, t, rounded = fsq_code(a * r, hl, off, sh, hw, USE_LIBDEVICE)
        return code / a, t, rounded
    else:
        code, t, rounded = fsq_code(r, hl, off, sh, hw, USE_LIBDEVICE)
        return code, t, rounded


@triton.jit
def elem_replay(x, scale_ptr, hl, off, sh, hw, valid, n_act, NSTAGES: tl.constexpr, HAS_SCALE: tl.constexpr,
                HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """Residual ``r_NSTAGES`` of an elementwise strategy, recomputed from the input tile ``x``
    (positions/stages the forward skipped subtract nothing)."""
    r = x
    for j in tl.static_range(NSTAGES):
        a = 1.0
        if HAS_SCALE:
            a = tl.load(scale_ptr + j).to(tl.float32)
        q, _t, _rnd = elem_stage(r, a, hl, off, sh, hw, HAS_SCALE, USE_LIBDEVICE)
        r = r - keep_only(q, valid, n_act, j, HAS_MASK, HAS_DROPOUT)
    return r


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
