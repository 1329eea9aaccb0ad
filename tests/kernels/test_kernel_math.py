"""The scalar math helpers shared by every kernel (rfsq_kernels/kernels/fpmath.py), probed through a
tiny kernel: round-half-to-even and overflow-free tanh, libdevice on a GPU, the fallback under the
Triton interpreter, both against torch."""
import pytest
import torch
import triton  # conftest has set TRITON_INTERPRET before any triton import
import triton.language as tl

from rfsq_kernels.kernels import config
from rfsq_kernels.kernels.fpmath import round_half_even, tanh_f32


@triton.jit
def _math_probe(x_ptr, round_ptr, tanh_ptr, n, BLOCK: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(round_ptr + offs, round_half_even(x, USE_LIBDEVICE), mask=mask)
    tl.store(tanh_ptr + offs, tanh_f32(x, USE_LIBDEVICE), mask=mask)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_math_helpers_match_torch():
    """Ties to even like torch.round (the fallback under the interpreter, libdevice.rint on GPU);
    tanh without overflow for huge and infinite arguments; NaN propagates."""
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 0.49999997, -0.49999997, 2.5000002, 7.0,
                      1e30, -1e30, float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-8, 0.3])
    if torch.cuda.is_available():
        x = x.cuda()
    rounded, tanh = torch.empty_like(x), torch.empty_like(x)
    _math_probe[(1,)](x, rounded, tanh, x.numel(), BLOCK=32, USE_LIBDEVICE=config.use_libdevice(x))
    assert torch.equal(rounded.nan_to_num(123.0), torch.round(x).nan_to_num(123.0))
    assert bool(tanh[-5].isnan())
    torch.testing.assert_close(tanh.nan_to_num(0.0), torch.tanh(x).nan_to_num(0.0), rtol=0, atol=2e-7)


def test_code_division_by_reciprocal_correction_is_ieee_division():
    """fpmath.div_small_int's GPU sequence ``q = n * inv; rem = fma(-q, d, n); fma(rem, inv, q)``
    (``inv = RN(1/d)``) equals IEEE ``n / d`` for every integer ``|n| <= d`` and every half width
    ``d <= 2**12`` (levels up to 8193), emulated exactly on the host: products of these operands
    are exact in float64, and the one float64 sum whose rounding could matter (within 1e-6 ulp of
    a float32 midpoint) is redone in rational arithmetic. A plain ``n * inv`` already fails at
    d = 6 (levels 12/13), which is why the kernels correct it."""
    from fractions import Fraction

    import numpy as np

    f32, f64 = np.float32, np.float64
    naive_ok = True
    for d in range(1, 2**12 + 1):
        n = np.arange(-d, d + 1, dtype=f64)
        inv = f32(1) / f32(d)
        q = (n * f64(inv)).astype(f32)
        rem = (n - q.astype(f64) * d).astype(f32)  # fma: the exact value, rounded once
        s = rem.astype(f64) * f64(inv) + q.astype(f64)
        got = s.astype(f32)
        want = n.astype(f32) / f32(d)
        ulp = np.spacing(np.abs(got)).astype(f64)
        near_mid = np.abs(np.abs(s - got.astype(f64)) / ulp - 0.5) < 1e-6
        for i in np.flatnonzero(near_mid):  # redo the final rounding exactly
            exact = Fraction(float(rem[i])) * Fraction(float(inv)) + Fraction(float(q[i]))
            lo, hi = sorted((got[i], np.nextafter(got[i], f32(np.inf) if exact > Fraction(float(got[i]))
                                                   else f32(-np.inf))))
            dl, dh = abs(exact - Fraction(float(lo))), abs(exact - Fraction(float(hi)))
            got[i] = lo if dl < dh or (dl == dh and not (lo.view(np.int32) & 1)) else hi
        assert np.array_equal(got, want), f"d={d}: {np.flatnonzero(got != want)}"
        naive_ok &= bool(np.array_equal((n.astype(f32) * inv), want))
    assert not naive_ok
