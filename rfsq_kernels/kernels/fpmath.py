"""Scalar math shared by every RFSQ kernel (``@triton.jit`` helpers, float32 in and out).

``USE_LIBDEVICE`` is a ``tl.constexpr`` chosen by the launcher: ``True`` on a real GPU
(``libdevice.tanh`` / ``libdevice.rint``, i.e. ties-to-even like ``torch.round``), ``False``
under the Triton interpreter, where every libdevice function returns ``None``. The interpreter
never evaluates the branch that is not taken, so both modes compile from the same source.
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def tanh_f32(x, USE_LIBDEVICE: tl.constexpr):
    """tanh without overflow: ``sign(x) * (1 - e) / (1 + e)`` with ``e = exp(-2|x|) <= 1``.

    +-inf give +-1 and NaN stays NaN, like ``torch.tanh``.
    """
    if USE_LIBDEVICE:
        return libdevice.tanh(x)
    else:
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0.0, -t, t)


@triton.jit
def round_half_even(x, USE_LIBDEVICE: tl.constexpr):
    """Round to the nearest integer, ties to even (``torch.round``); NaN stays NaN."""
    if USE_LIBDEVICE:
        return libdevice.rint(x)
    else:
        f = tl.floor(x)
        frac = x - f  # exact for |x| < 2**23, the only range FSQ ever rounds
        f_is_odd = (f - 2.0 * tl.floor(0.5 * f)) != 0.0
        up = (frac > 0.5) | ((frac == 0.5) & f_is_odd)
        return tl.where(up, f + 1.0, f)
