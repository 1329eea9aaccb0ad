"""Scalar math shared by every RFSQ kernel (``@triton.jit`` helpers, float32 in and out).

Every float32 operation of the value path rounds like the reference's PyTorch op
(docs/semantics.md, "Arithmetic contract"): divisions are IEEE (:func:`div_rn`,
:func:`recip_rn`, :func:`div_small_int`), never Triton's ``/`` (``div.full.f32``, approximate),
and the launches turn FMA contraction off. libdevice ``tanh`` is the one exception.

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


@triton.jit
def div_small_int(n, d, inv_d, USE_LIBDEVICE: tl.constexpr):
    """``n / d`` rounded like IEEE division, for an integer-valued ``n`` with ``|n| <= d`` and
    ``d`` a positive integer (the FSQ code ``round(bounded) / half_w``); ``inv_d = 1 / d``
    rounded to nearest (:func:`recip_rn`).

    On a GPU: one multiply and Markstein's two-FMA correction (the remainder ``n - d*q`` is
    exact, the corrected quotient is the correctly rounded one; ``tests/kernels/test_kernel_math.py``
    checks every ``n`` for every ``d`` up to 2**12 exactly) -- 3 instructions instead of
    ``div.rn.f32``'s subroutine. The interpreter has no fused multiply-add (its ``tl.fma``
    rounds twice), so there it divides (NumPy's IEEE division): the same value.
    Only the sign of a zero quotient may differ (``+0`` for ``n = -0``); a sum never shows it.
    """
    if USE_LIBDEVICE:
        q = n * inv_d
        rem = tl.fma(-q, d, n)
        return tl.fma(rem, inv_d, q)
    else:
        return n / d


@triton.jit
def div_rn(x, y):
    """``x / y`` rounded to nearest (IEEE, ``div.rn.f32``), broadcasting like ``/``. The strategy
    kernels use it on per-channel or per-program values only (their per-element paths multiply by
    reciprocals, or use :func:`div_small_int`); the vector-quantize-pytorch kernels divide per
    element with ``tl.div_rn``, as the library divides."""
    x, y = tl.broadcast(x, y)
    return tl.div_rn(x, y)


@triton.jit
def recip_rn(x):
    """``1 / x`` rounded to nearest (IEEE), as ``torch.reciprocal`` computes it."""
    return tl.div_rn(tl.full(x.shape, 1.0, tl.float32), x)


@triton.jit
def as_f32(v):
    """An int (runtime or constexpr) or float as a float32 scalar tensor."""
    return tl.zeros([], tl.float32) + v
