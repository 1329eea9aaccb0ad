"""``@triton.jit`` FSQ math shared by the kernel families (design: ``docs/kernel-design.md``).

What one stage computes from a channel's level constants, whatever the program's shape:

* the rows of the per-channel constant table (``ROW_*``, built by :func:`.config.level_tables`);
* the level constants ``fsq = (half_l, offset, shift, half_w, inv_w)`` (:func:`load_levels` for a
  tile's channel lanes, :func:`load_channel_levels` for one channel) and the index digits'
  range ``digits = (top, basis)`` (:func:`load_digit_range`, :func:`load_channel_digits`; index
  packing, forward only);
* FSQ of a conditioned residual (:func:`fsq_code`), its straight-through derivative
  (:func:`fsq_dcode`), and the mixed-radix index of one stage (:func:`pack_index`, or per
  channel :func:`channel_digit`).

Padded channels load neutral constants (``half_w = 1``, ``basis = 0``). The forward and the
backward replay call the same helpers in the same order, so the backward sees bit-identical
rounding decisions. Where the tiles come from and go to: :mod:`.tile_io`.
"""
import triton
import triton.language as tl

from .fpmath import div_small_int, recip_rn, round_half_even, tanh_f32

# Rows of the per-channel constant table built by ``config.level_tables``: ``(6, C)`` float32.
ROW_HALF_L = tl.constexpr(0)
ROW_OFFSET = tl.constexpr(1)
ROW_SHIFT = tl.constexpr(2)
ROW_HALF_W = tl.constexpr(3)
ROW_TOP = tl.constexpr(4)
ROW_INV_W = tl.constexpr(5)


# -- a tile's channel lanes: [BLOCK_C, 1] columns ---------------------------------------------


@triton.jit
def _load_level_columns(consts_ptr, offs_c, mask_c, C):
    """``(half_l, offset, shift, half_w)`` as float32 ``[BLOCK_C, 1]`` columns (padded channels:
    ``half_w = 1``, the rest 0): the four rows both ways of getting ``inv_w`` share."""
    half_l = tl.load(consts_ptr + ROW_HALF_L * C + offs_c, mask=mask_c, other=0.0)[:, None]
    offset = tl.load(consts_ptr + ROW_OFFSET * C + offs_c, mask=mask_c, other=0.0)[:, None]
    shift = tl.load(consts_ptr + ROW_SHIFT * C + offs_c, mask=mask_c, other=0.0)[:, None]
    half_w = tl.load(consts_ptr + ROW_HALF_W * C + offs_c, mask=mask_c, other=1.0)[:, None]
    return half_l, offset, shift, half_w


@triton.jit
def load_levels(consts_ptr, offs_c, mask_c, C):
    """``fsq = (half_l, offset, shift, half_w, inv_w)``: per-channel FSQ constants as float32
    ``[BLOCK_C, 1]`` columns (padded channels: ``half_w = 1``, the rest 0); ``inv_w = 1 / half_w``
    rounded to nearest, for :func:`~.fpmath.div_small_int`."""
    half_l, offset, shift, half_w = _load_level_columns(consts_ptr, offs_c, mask_c, C)
    return half_l, offset, shift, half_w, recip_rn(half_w)


@triton.jit
def load_levels_tabled(consts_ptr, offs_c, mask_c, C):
    """:func:`load_levels` with ``inv_w`` read from the table's host-computed ``1 / half_w`` row
    (the same bits as ``recip_rn(half_w)``): no ``div.rn`` subroutine in the program."""
    half_l, offset, shift, half_w = _load_level_columns(consts_ptr, offs_c, mask_c, C)
    inv_w = tl.load(consts_ptr + ROW_INV_W * C + offs_c, mask=mask_c, other=1.0)[:, None]
    return half_l, offset, shift, half_w, inv_w


@triton.jit
def load_digit_range(consts_ptr, basis_ptr, offs_c, mask_c, C):
    """``digits = (top, basis)``: largest digit ``L - 1`` (float32) and mixed-radix place value
    (the index dtype, :func:`.config.level_tables`) per channel, as ``[BLOCK_C, 1]`` columns; only the forward packs indices."""
    top = tl.load(consts_ptr + ROW_TOP * C + offs_c, mask=mask_c, other=0.0)[:, None]
    basis = tl.load(basis_ptr + offs_c, mask=mask_c, other=0)[:, None]
    return top, basis


@triton.jit
def fsq_code(u, fsq, USE_LIBDEVICE: tl.constexpr):
    """FSQ of the conditioned residual ``u``: returns ``(code, t, rounded)``.

    ``bounded = tanh(u + shift) * half_l - offset``; ``code = round(bounded) / half_w`` (the
    straight-through value equals the clean rounded integer; the division is IEEE, see
    :func:`~.fpmath.div_small_int`); ``t`` is kept for the derivative.
    """
    half_l, offset, shift, half_w, inv_w = fsq
    t = tanh_f32(u + shift, USE_LIBDEVICE)
    rounded = round_half_even(t * half_l - offset, USE_LIBDEVICE)
    return div_small_int(rounded, half_w, inv_w, USE_LIBDEVICE), t, rounded


@triton.jit
def fsq_dcode(t, fsq):
    """d code / d u of :func:`fsq_code` with the straight-through round (d round = 1)."""
    half_l, _offset, _shift, _half_w, inv_w = fsq
    return ((1.0 - t * t) * half_l) * inv_w


@triton.jit
def pack_index(rounded, fsq, digits):
    """Mixed-radix index of one stage, ``[BLOCK_S]`` in the index dtype (the basis's: int32
    unless the codebook needs int64), from the rounded values.

    The digit is an explicit integer ``clamp(round + half_w, 0, L-1)`` with NaN -> 0, so NaN/Inf
    input can never produce an out-of-range index: ``tl.maximum`` is IEEE maxNum (``max.f32`` on
    a GPU, ``np.fmax`` in the interpreter), which returns the number when the other operand is NaN.
    """
    _half_l, _offset, _shift, half_w, _inv_w = fsq
    top, basis = digits
    digit = tl.minimum(tl.maximum(rounded + half_w, 0.0), top)
    return tl.sum(digit.to(basis.dtype) * basis, axis=0)


# -- one channel (the channel-row kernels): scalars --------------------------------------------


@triton.jit
def load_channel_levels(consts_ptr, c, C: tl.constexpr):
    """Channel ``c``'s ``fsq = (half_l, offset, shift, half_w, inv_w)`` as float32 scalars
    (:func:`load_levels` for one channel); ``inv_w`` is the table's host-computed ``1 / half_w``
    row (the same bits as ``recip_rn(half_w)``), so no program runs a ``div.rn`` for it."""
    half_l = tl.load(consts_ptr + ROW_HALF_L * C + c)
    offset = tl.load(consts_ptr + ROW_OFFSET * C + c)
    shift = tl.load(consts_ptr + ROW_SHIFT * C + c)
    half_w = tl.load(consts_ptr + ROW_HALF_W * C + c)
    return half_l, offset, shift, half_w, tl.load(consts_ptr + ROW_INV_W * C + c)


@triton.jit
def load_channel_digits(consts_ptr, basis_ptr, c: tl.constexpr, C: tl.constexpr):
    """Channel ``c``'s ``digits = (top, basis)`` as scalars (:func:`load_digit_range` for one channel)."""
    return tl.load(consts_ptr + ROW_TOP * C + c), tl.load(basis_ptr + c)


@triton.jit
def channel_digit(rounded, fsq, digits):
    """One channel's term of the packed index, ``digit * basis`` in the index dtype (the
    basis's), for a row of rounded values: :func:`pack_index` for one channel (same clamp, same
    NaN -> 0); the kernel adds the ``C`` terms in the thread."""
    _half_l, _offset, _shift, half_w, _inv_w = fsq
    top, basis = digits
    digit = tl.minimum(tl.maximum(rounded + half_w, 0.0), top)
    return digit.to(basis.dtype) * basis
