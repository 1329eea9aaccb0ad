"""FSQ reference: values and indices against scalar Python, codebook round trips, index dtypes."""
import math

import pytest
import torch

from rfsq_kernels import FSQ
from rfsq_kernels.reference import fsq_constants, index_dtype


def scalar_fsq(x: float, level: int):
    """SPEC's FSQ of one value in plain Python floats: (code, digit, distance to a .5 boundary)."""
    half_l = (level - 1) * (1 - 1e-3) / 2
    offset = 0.5 if level % 2 == 0 else 0.0
    shift = math.atanh(offset / half_l) if level > 2 else 0.0  # L=2: no atanh shift exists
    bounded = math.tanh(x + shift) * half_l - offset
    rounded = round(bounded)  # Python's round is half-to-even, like torch.round
    half_w = level // 2
    return rounded / half_w, int(rounded + half_w), abs(abs(bounded - math.floor(bounded)) - 0.5)


@pytest.mark.parametrize("level", [2, 3, 4, 5, 6, 7, 8])
def test_fsq_matches_scalar_python_for_every_level(level, seed):
    levels = [level, 3, level]  # mix in an odd level so the per-channel constants really differ
    z = torch.randn(3, 3, 7, 5) * 2
    codes, idx = FSQ(levels)(z)
    n_checked = 0
    for b in range(z.shape[0]):
        for h in range(z.shape[2]):
            for w in range(z.shape[3]):
                expect_index, base, near = 0, 1, False
                for c, lv in enumerate(levels):
                    code, digit, margin = scalar_fsq(z[b, c, h, w].item(), lv)
                    near |= margin < 1e-5  # float32 vs float64 may legitimately round differently
                    if margin >= 1e-5:
                        assert codes[b, c, h, w].item() == pytest.approx(code, abs=1e-7)
                    expect_index += digit * base
                    base *= lv
                if not near:
                    assert idx[b, h, w].item() == expect_index
                    n_checked += 1
    assert n_checked > 0.9 * idx.numel()


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
