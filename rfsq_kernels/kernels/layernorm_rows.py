"""``@triton.jit`` helpers of the single-tile ``layernorm`` backward in channel rows
(``layernorm._bwd_layernorm_kernel``): the image as ``C`` 1-D ``[BLOCK_S]`` rows, one per
channel (unrolled over the exact ``C``, a constexpr), every channel of a position in one thread.
No lane runs for a padded channel, a stored index is split into all its channel digits in the
thread, and each channel's per-stage values are scalars. The arithmetic of every element is the
tile helpers' (:mod:`.layernorm`, :mod:`.layernorm_split`), operation for operation. Design:
``docs/kernel-design.md``, "Backward".

Bundles: ``rstats = (mean_ptr, factor_ptr, inv_sd_ptr, bias_ptr, stat_start)`` -- the
``(B, K, C)`` means, the ``(B, K, 2, C)`` factors ``(weight/sd, sd/weight)``, the ``(B, K, C)``
``1/sd`` (host quotients), the ``(K, C)`` LN bias and where the image's rows start. The
per-channel constants (``consts_ptr``: :func:`.fsq_math.load_channel_levels`; ``radix_ptr``:
:func:`load_row_radix`) are loaded where they are used, not once per program: held for the whole
program they are 8 scalars per channel in every thread, and at 7-16 channels the compile check
found spills; reloaded, they cost a few scalar loads per stage, shared by the thread's positions.
"""
import triton
import triton.language as tl

from .fpmath import div_small_int
from .fsq_math import fsq_dcode, load_channel_levels
from .layernorm import _add_four, ln_stage
from .layernorm_split import ROW_L_LO, ROW_M_LO, ROW_RADIX
from .tile_io import keep_only, stage_keep


@triton.jit
def load_row_radix(radix_ptr, C: tl.constexpr):
    """Every channel's ``(m_lo, l_lo, L)`` of :func:`.layernorm_split.radix_table`, a ``C``-tuple:
    the magic number dividing an index by the channel's place value, and its radix."""
    out = ()
    for c in tl.static_range(C):
        out = out + ((tl.load(radix_ptr + ROW_M_LO * C + c), tl.load(radix_ptr + ROW_L_LO * C + c),
                      tl.load(radix_ptr + ROW_RADIX * C + c)),)
    return out


@triton.jit
def row_digits(index, radix, C: tl.constexpr):
    """Every channel digit ``floor(index / basis_c) mod L_c`` of a ``[BLOCK_S]`` row of packed
    indices, a ``C``-tuple of float32 rows: the integers of :func:`.layernorm_split.index_digit`.
    ``floor(index / basis_{c+1})`` is channel ``c``'s upper quotient and channel ``c+1``'s lower
    one, so each quotient is computed once (``basis_0 = 1``: the index itself), and the last
    channel's upper quotient is 0 (an index is below ``prod L``; a skipped position's ``-1``
    decodes to a value the caller discards)."""
    udt = tl.uint64 if index.dtype == tl.int64 else tl.uint32
    twice = index.to(udt, bitcast=True) << 1
    lo = index.to(udt, bitcast=True)
    out = ()
    for c in tl.static_range(C):
        _m, _l, radix_l = radix[c]
        if c + 1 < C:
            m_hi, l_hi, _L = radix[c + 1]
            hi = tl.umulhi(twice, m_hi.to(udt, bitcast=True)) >> l_hi.to(udt, bitcast=True)
            digit = lo - hi * radix_l.to(udt, bitcast=True)
        else:
            hi = lo
            digit = lo
        out = out + (digit.to(index.dtype, bitcast=True).to(tl.float32),)
        lo = hi
    return out


@triton.jit
def row_decode(digit, j, c, rstats, fsq, C: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """``q_j`` of channel ``c``'s row from its digit: :func:`.layernorm_split.decode_stage`'s
    operations in its order (the forward's: ``reference._decode_layernorm``)."""
    mean_ptr, factor_ptr, _inv_sd_ptr, bias_ptr, stat_start = rstats
    _half_l, _offset, _shift, half_w, inv_w = fsq
    code = div_small_int(digit - half_w, half_w, inv_w, USE_LIBDEVICE)
    bias = tl.load(bias_ptr + j * C + c).to(tl.float32)
    sd_w = tl.load(factor_ptr + 2 * stat_start + 2 * j * C + C + c)
    mu = tl.load(mean_ptr + stat_start + j * C + c)
    return (code - bias) * sd_w + mu


@triton.jit
def row_rebuild(rs, nstages, index_rows, rstats, consts_ptr, radix_ptr, valid, active_stages, C: tl.constexpr,
                HAS_MASK: tl.constexpr, HAS_ACTIVE_STAGES: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """Residual rows ``r_nstages`` from the input rows ``rs`` (a ``C``-tuple): :func:`.layernorm.ln_rebuild`
    per row, each stored index read once and split into all channel digits (:func:`row_digits`)."""
    idx_ptr, rows, mask_s = index_rows
    for j in range(nstages):
        index = tl.load(idx_ptr + rows + j, mask=mask_s, other=0)
        digits = row_digits(index, load_row_radix(radix_ptr, C), C)
        out = ()
        for c in tl.static_range(C):
            q = row_decode(digits[c], j, c, rstats, load_channel_levels(consts_ptr, c, C), C, USE_LIBDEVICE)
            out = out + (rs[c] - keep_only(q, valid, active_stages, j, HAS_MASK, HAS_ACTIVE_STAGES),)
        rs = out
    return rs


@triton.jit
def row_bwd_stage(r, V, k, c, rstats, consts_ptr, valid, active_stages, C: tl.constexpr,
                  HAS_ACTIVE_STAGES: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    """Stage ``k`` of channel ``c``'s row ``r = r_k`` with ``V = g - G_{k+1}``: the tile kernel's
    ``ln_bwd_stage`` and four sums on one row. Returns ``(V - h * weight/sd, xc, sums)``,
    ``xc = r - mu`` and ``sums = (sum v, sum h, sum v*qc, sum h*xc)`` (scalars)."""
    mean_ptr, factor_ptr, _inv_sd_ptr, bias_ptr, stat_start = rstats
    fsq = load_channel_levels(consts_ptr, c, C)
    mu = tl.load(mean_ptr + stat_start + k * C + c)
    bias = tl.load(bias_ptr + k * C + c).to(tl.float32)
    w_sd = tl.load(factor_ptr + 2 * stat_start + 2 * k * C + c)
    sd_w = tl.load(factor_ptr + 2 * stat_start + 2 * k * C + C + c)
    q, _code, t, _rounded = ln_stage(r, mu, (w_sd, sd_w), bias, fsq, USE_LIBDEVICE)
    v = tl.where(stage_keep(valid, active_stages, k, HAS_ACTIVE_STAGES), V, 0.0)
    h = v * sd_w * fsq_dcode(t, fsq)
    xc = r - mu
    qc = q - mu
    sums = tl.reduce((v, h, v * qc, tl.where(valid, h * xc, 0.0)), 0, _add_four)
    return V - h * w_sd, xc, sums


@triton.jit
def row_coeffs(sums, k, c, rstats, dparts, C: tl.constexpr):
    """Channel ``c``'s stage-``k`` parameter-gradient partials (stored through ``dparts``) and the
    ``(dL/dmu, dL/dsd / sd)`` scalars of ``dL/dr``: :func:`.layernorm.ln_bwd_grads` on scalars."""
    sum_v, sum_h, sum_vqc, sum_hxc = sums
    _mean_ptr, factor_ptr, inv_sd_ptr, _bias_ptr, stat_start = rstats
    dweight_part_ptr, dbias_part_ptr = dparts
    w_sd = tl.load(factor_ptr + 2 * stat_start + 2 * k * C + c)
    sd_w = tl.load(factor_ptr + 2 * stat_start + 2 * k * C + C + c)
    inv_sd = tl.load(inv_sd_ptr + stat_start + k * C + c)
    sum_vc, sum_hx = sum_vqc * inv_sd, sum_hxc * inv_sd
    tl.store(dweight_part_ptr + stat_start + k * C + c, sum_hx - sd_w * sum_vc)
    tl.store(dbias_part_ptr + stat_start + k * C + c, sum_h - sd_w * sum_v)
    return sum_v - w_sd * sum_h, (sum_vc - w_sd * sum_hx) * inv_sd
