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
