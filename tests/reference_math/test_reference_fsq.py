"""FSQ reference: values and indices against the float64 oracle, codebook round trips, index dtypes."""
import math

import numpy as np
import pytest
import torch

from numpy_rfsq import BOUNDARY_TOL, fsq_np, pack_np
from rfsq_kernels import FSQ
from rfsq_kernels.reference import fsq_constants, index_dtype


@pytest.mark.parametrize("level", [2, 3, 4, 5, 6, 7, 8])
def test_fsq_matches_the_float64_oracle_for_every_level(level, seed):
    levels = [level, 3, level]  # mix in an odd level so the per-channel constants really differ
    z = torch.randn(3, 3, 7, 5) * 2
    codes, idx = FSQ(levels)(z)
    expect_codes, digits, distance = fsq_np(z.double().numpy(), levels)
    # float32 vs float64 may legitimately round a value within BOUNDARY_TOL of .5 differently:
    # such a value's code is not compared, nor the index of its position
    clear = distance >= BOUNDARY_TOL
    got, expect = codes.double().numpy()[clear], expect_codes[clear]
    assert (np.abs(got - expect) <= np.maximum(1e-6 * np.abs(expect), 1e-7)).all()  # pytest.approx(abs=1e-7)
    clear_positions = clear.all(axis=1)
    np.testing.assert_array_equal(idx.numpy()[clear_positions], pack_np(digits, levels)[clear_positions])
    assert clear_positions.sum() > 0.9 * idx.numel()


@pytest.mark.parametrize("levels", [[2], [3], [8, 5, 5, 5], [7, 6, 2], [8, 8, 8, 4], [4, 4, 4, 4, 4]])
def test_every_code_round_trips_through_its_index(levels):
    fsq = FSQ(levels)
    n = fsq.codebook_size
    all_idx = torch.arange(n, dtype=torch.int32).view(1, n, 1)  # (B=1, spatial=(n, 1))
    codes = fsq.indices_to_codes(all_idx)
    assert codes.shape == (1, len(levels), n, 1)
    assert codes.min() >= -1 and codes.max() <= 1
    assert torch.equal(fsq.codes_to_indices(codes), all_idx)
    # every code is a fixed point of the quantizer up to the tanh squash: quantizing the
    # un-squashed code value gives the same index back
    half_l, offset, shift, half_w = fsq_constants(levels)
    pre = torch.empty_like(codes)
    for c in range(len(levels)):
        # the outermost codes are reached only by rounding (tanh never gets to +-1): aim inside
        target = ((codes[:, c].double() * half_w[c] + offset[c]) / half_l[c]).clamp(-0.9999, 0.9999)
        pre[:, c] = (torch.atanh(target) - shift[c]).float()
    _, idx = fsq(pre)
    assert torch.equal(idx, all_idx)
    assert len(torch.unique(codes.flatten(2).transpose(1, 2)[0], dim=0)) == n


def test_index_dtype_is_int32_until_the_codebook_overflows_it():
    assert index_dtype([8] * 10) == torch.int32          # 2**30 codes
    assert index_dtype([2] * 31) == torch.int64          # 2**31 codes
    fsq = FSQ([8] * 11)                                  # 2**33 codes, never materialised
    z = torch.randn(2, 11, 5) * 3
    _, idx = fsq(z)
    assert idx.dtype == torch.int64
    assert idx.min() >= 0 and idx.max() < fsq.codebook_size
    assert torch.equal(fsq.codes_to_indices(fsq.indices_to_codes(idx)), idx)


def test_non_finite_inputs_give_valid_indices():
    levels = [8, 5, 4]
    z = torch.tensor([float("nan"), float("inf"), float("-inf"), 1e30, -1e30, 0.0]).view(1, 1, 6).repeat(2, 3, 1)
    z[1] = z[1].flip(-1)
    q, idx = FSQ(levels)(z)
    assert idx.min() >= 0 and idx.max() < math.prod(levels)
    assert torch.isfinite(q[0, :, 1:]).all() and torch.isfinite(q[1, :, :-1]).all()  # only NaN stays NaN


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_fsq_computes_in_float32_and_returns_input_dtype(dtype, seed):
    z = torch.randn(2, 4, 6, 6)
    fsq = FSQ([8, 8, 8, 4])
    q, idx = fsq(z.to(dtype))
    q32, idx32 = fsq(z.to(dtype).float())
    assert q.dtype == dtype
    assert torch.equal(idx, idx32)
    assert torch.equal(q, q32.to(dtype))


def test_fsq_properties():
    fsq = FSQ([8, 8, 8, 8])
    assert fsq.codebook_size == 4096 and fsq.bits_per_token == 12.0
