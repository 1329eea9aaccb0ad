"""The split layernorm path (issue 28: programs own (image, spatial slice), statistics from
merged per-program partials, residuals rebuilt from the stored digits) against the reference,
at today's tolerances (CPU: Triton interpreter). ``MAX_BLOCK_ELEMS = 64`` makes 16-position
tiles, and ``SPLIT_PROGRAMS_PER_IMAGE`` forces 1, 2, 3 or many programs per image (with more
programs than tiles, the trailing slices are empty)."""
import functools

import pytest
import torch

from fused_helpers import MustNotLaunch, compare, draw_input, masked_slice_case, run_both, to_layout
from numpy_rfsq import draw_clear_of_boundaries
from rfsq_kernels.fused import rfsq_fused
from rfsq_kernels.kernels import config, layernorm, layernorm_split
from rfsq_kernels.reference import SENTINEL, rfsq_forward
from rfsq_kernels.testing import random_strategy_params

LEVELS = [8, 5, 3, 4]


@pytest.fixture
def split(monkeypatch):
    """16-position tiles (every test shape is larger than one tile), and the single-tile forward
    made unreachable."""
    monkeypatch.setattr(config, "MAX_BLOCK_ELEMS", 64)
    monkeypatch.setattr(layernorm, "_fwd_layernorm_kernel", MustNotLaunch("forward"))
    return lambda parts: monkeypatch.setattr(config, "SPLIT_PROGRAMS_PER_IMAGE", parts)


def test_plan_counts_programs():
    tiles = config.Tiles(8, 256, 8, False)
    # large 64x8x128x128 / audio 32x8x16384 / video 8x6x8x64x64 fill at least 2 x 132 programs
    for batch, spatial in ((64, 128 * 128), (32, 16384), (8, 8 * 64 * 64)):
        plan = config.layernorm_split_plan(batch, spatial, tiles)
        assert batch * plan.parts >= config.SPLIT_MIN_PROGRAMS
        assert plan.slice_len % 256 == 0 and plan.parts * plan.slice_len >= spatial
        assert (plan.parts - 1) * plan.slice_len < spatial  # no empty slice unless forced


@pytest.mark.parametrize("parts", [None, 1, 2, 3, 5])
def test_programs_per_image(seed, split, parts):
    """S = 45 in 16-position tiles: slices that do not divide S; 5 programs leave 2 empty."""
    split(parts)
    stages = 3
    params = random_strategy_params("layernorm", stages, len(LEVELS))
    z = draw_input((2, 4, 5, 9), LEVELS, stages, "layernorm", params)
    compare(*run_both(rfsq_fused, rfsq_forward, z, LEVELS, stages, "layernorm", params, grad=torch.randn(z.shape)))


@pytest.mark.parametrize("stages", [1, 2, 5, 8])
def test_stage_counts(seed, split, stages):
    split(4)
    levels = [4, 4, 4, 4, 4] if stages < 8 else [3, 5]
    params = random_strategy_params("layernorm", stages, len(levels))
    z = draw_input((2, len(levels), 7, 7), levels, stages, "layernorm", params)
    compare(*run_both(rfsq_fused, rfsq_forward, z, levels, stages, "layernorm", params), check_grads=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_channels_last(seed, split, dtype):
    split(3)
    stages = 2
    params = random_strategy_params("layernorm", stages, len(LEVELS))
    z = draw_input((2, 4, 5, 9), LEVELS, stages, "layernorm", params, dtype=dtype, channels_last=True)
    fused, ref = run_both(rfsq_fused, rfsq_forward, z, LEVELS, stages, "layernorm", params, grad=None)
    compare(fused, ref)
    assert fused["out"][0].stride() == z.stride()


def test_mask_with_empty_slice_and_counts(seed, split):
    """A masked slice (positions 16..31 of every image) and trailing empty slices; sample 0 all
    padding, sample 1 one valid position; per-sample stage counts (quantize dropout)."""
    split(4)
    stages, shape = 3, (4, 4, 5, 9)
    params = random_strategy_params("layernorm", stages, len(LEVELS))
    mask, active = masked_slice_case(shape, stages, slice(16, 32), one_valid=True)
    z = draw_clear_of_boundaries(shape, LEVELS, stages, "layernorm", params, mask=mask, active_stages=active)[0]
    z = z.masked_fill(~mask.unsqueeze(1), float("nan"))  # padding must never be read
    fused_fn = functools.partial(rfsq_fused, mask=mask, active_stages=active)
    ref_fn = functools.partial(rfsq_forward, mask=mask, active_stages=active)
    fused, ref = run_both(fused_fn, ref_fn, z, LEVELS, stages, "layernorm", params, grad=torch.randn(shape))
    compare(fused, ref)
    q, idx, mean, std = fused["out"]
    assert (idx[0] == SENTINEL).all() and (q[0] == 0).all()
    assert torch.isfinite(mean).all() and torch.isfinite(std).all()
    assert torch.equal(mean[3], torch.zeros(3, 4)) and torch.equal(std[3], torch.ones(3, 4))  # dropped stages


def test_near_zero_variance_channel(seed, split):
    """A channel that is one large constant plus tiny noise: the merged variance stays >= 0 and
    the statistics match the reference's."""
    split(3)
    stages = 2
    params = random_strategy_params("layernorm", stages, len(LEVELS))
    z = draw_input((2, 4, 5, 9), LEVELS, stages, "layernorm", params)
    z[:, 2] = 40.0 + 1e-6 * torch.randn(2, 5, 9)
    fused = rfsq_fused(z, LEVELS, stages, "layernorm", **params)
    ref = rfsq_forward(z, LEVELS, stages, "layernorm", **params)
    assert torch.isfinite(fused[3]).all() and (fused[3] ** 2 >= 1e-5 * (1 - 1e-6)).all()
    torch.testing.assert_close(fused[2], ref[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[3], ref[3], rtol=1e-5, atol=1e-5)


def test_int64_indices(seed, split):
    """prod(levels) >= 2**31: the digits come from int64 division instead of the int32 magic."""
    split(2)
    levels, stages = [8] * 11, 2
    params = random_strategy_params("layernorm", stages, len(levels))
    z = draw_input((1, 11, 3, 5), levels, stages, "layernorm", params)
    fused = rfsq_fused(z, levels, stages, "layernorm", **params)
    assert fused[1].dtype == torch.int64
    compare({"out": fused, "grads": {}}, {"out": rfsq_forward(z, levels, stages, "layernorm", **params),
                                           "grads": {}})


def test_reruns_are_bitwise_equal(seed, split):
    split(3)
    stages = 3
    params = random_strategy_params("layernorm", stages, len(LEVELS))
    z = torch.randn(2, 4, 6, 7)
    first, second = (rfsq_fused(z, LEVELS, stages, "layernorm", **params) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_magic_division_is_exact():
    """The int32 digit extraction's magic numbers divide every index exactly (spot-checked at
    the ends of the range and at random) for every place value of a few codebooks."""
    n = torch.cat([torch.arange(0, 4096), torch.randint(0, 2**31 - 1, (20000,)),
                   torch.arange(2**31 - 4096, 2**31)]).to(torch.int64)
    for d in [1, 2, 3, 5, 7, 8, 96, 3**19, 2**30, 2**31 - 1]:
        m, lg = layernorm_split._magic(d)
        m &= 2**32 - 1
        assert torch.equal((n * m) >> (31 + lg), n // d), d
