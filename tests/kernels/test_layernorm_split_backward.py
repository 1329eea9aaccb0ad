"""The split layernorm backward (programs own (image, spatial slice), the four per-channel sums
of each stage merged from per-program partials) against the reference at today's tolerances.
CPU: Triton interpreter. ``MAX_BLOCK_ELEMS = 64`` gives the backward's base tile 8 positions at
4 channels and the split kernel 4-position tiles (S = 21: 6 tiles, the last one short);
``SPLIT_PROGRAMS_PER_IMAGE`` forces the programs per image (7 leaves a slice empty)."""
import functools

import pytest
import torch

from fused_helpers import MustNotLaunch, compare, draw_input, masked_slice_case, run_both
from numpy_rfsq import draw_clear_of_boundaries
from rfsq_kernels.fused import rfsq_fused
from rfsq_kernels.kernels import config, layernorm
from rfsq_kernels.reference import rfsq_forward
from rfsq_kernels.testing import random_strategy_params

LEVELS = [8, 5, 3, 4]
SHAPE = (2, 4, 3, 7)


@pytest.fixture
def split(monkeypatch):
    """Small tiles (every test shape is larger than one tile) and the single-tile backward made
    unreachable; returns a setter of the programs per image."""
    monkeypatch.setattr(config, "MAX_BLOCK_ELEMS", 64)
    monkeypatch.setattr(layernorm, "_bwd_layernorm_kernel", MustNotLaunch("backward"))
    return lambda parts: monkeypatch.setattr(config, "SPLIT_PROGRAMS_PER_IMAGE", parts)


def _masked_case(shape, stages):
    """Positions 8..15 (one whole slice at 3 programs per image) padding in every image: see
    ``fused_helpers.masked_slice_case``."""
    return masked_slice_case(shape, stages, slice(8, 16))


@pytest.mark.parametrize("parts", [None, 1, 2, 3, 7])
def test_programs_per_image(seed, split, parts):
    split(parts)
    stages = 3
    params = random_strategy_params("layernorm", stages, len(LEVELS))
    z = draw_input(SHAPE, LEVELS, stages, "layernorm", params)
    compare(*run_both(rfsq_fused, rfsq_forward, z, LEVELS, stages, "layernorm", params, grad=torch.randn(z.shape)))


@pytest.mark.parametrize("stages", [1, 2])
def test_stage_counts(seed, split, stages):
    split(2)
    params = random_strategy_params("layernorm", stages, len(LEVELS))
    z = draw_input(SHAPE, LEVELS, stages, "layernorm", params)
    compare(*run_both(rfsq_fused, rfsq_forward, z, LEVELS, stages, "layernorm", params, grad=torch.randn(z.shape)))


def test_bf16_channels_last_stride0_grad(seed, split):
    """bf16 input in channels_last; ``grad=None``: the incoming gradient is an expanded stride-0 tensor."""
    split(3)
    stages = 2
    params = random_strategy_params("layernorm", stages, len(LEVELS))
    z = draw_input(SHAPE, LEVELS, stages, "layernorm", params, dtype=torch.bfloat16, channels_last=True)
    fused, ref = run_both(rfsq_fused, rfsq_forward, z, LEVELS, stages, "layernorm", params, grad=None)
    compare(fused, ref)
    assert fused["grads"]["z"].stride() == z.stride()


def test_mask_with_masked_slice_and_counts(seed, split):
    split(3)
    stages, shape = 3, (4, 4, 3, 7)
    params = random_strategy_params("layernorm", stages, len(LEVELS))
    mask, active = _masked_case(shape, stages)
    z = draw_clear_of_boundaries(shape, LEVELS, stages, "layernorm", params, mask=mask, active_stages=active)[0]
    z = z.masked_fill(~mask.unsqueeze(1), float("nan"))  # padding must never be read
    fused_fn = functools.partial(rfsq_fused, mask=mask, active_stages=active)
    ref_fn = functools.partial(rfsq_forward, mask=mask, active_stages=active)
    fused, ref = run_both(fused_fn, ref_fn, z, LEVELS, stages, "layernorm", params, grad=torch.randn(shape))
    compare(fused, ref)
    dz = fused["grads"]["z"]
    assert torch.isfinite(dz).all() and (dz.masked_select(~mask.unsqueeze(1).expand_as(dz)) == 0).all()


def test_int64_indices_above_8_channels_take_a_quarter_tile(seed, split, monkeypatch):
    """64-bit indices at C = 11 (8**11 codes: int64) take a quarter of the base tile (register
    budget, :func:`layernorm_split_backward.split_block_s`) and still match the reference."""
    from rfsq_kernels.kernels import layernorm_split_backward
    from rfsq_kernels.reference import index_dtype
    monkeypatch.setattr(config, "MAX_BLOCK_ELEMS", 256)  # base tile: 16 positions; split: 4 (int64), 8 (int32)
    levels, stages, shape = [8] * 11, 2, (2, 11, 3, 7)
    assert index_dtype(levels) == torch.int64
    tiles = config.layernorm_tiles(11, 21, "backward")
    assert not tiles.one_tile
    assert layernorm_split_backward.split_block_s(tiles, torch.int64) == tiles.block_s // 4
    assert layernorm_split_backward.split_block_s(tiles, torch.int32) == tiles.block_s // 2
    split(3)
    params = random_strategy_params("layernorm", stages, len(levels))
    z = draw_input(shape, levels, stages, "layernorm", params)
    compare(*run_both(rfsq_fused, rfsq_forward, z, levels, stages, "layernorm", params, grad=torch.randn(shape)))


def _grads(fn, z, stages, params, grad):
    zz = z.detach().clone().requires_grad_()
    ps = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    (fn(zz, LEVELS, stages, "layernorm", **ps)[0].float() * grad).sum().backward()
    return [zz.grad] + [p.grad for p in ps.values()]


def test_reruns_are_bitwise_equal(seed, split):
    split(3)
    stages = 3
    params = random_strategy_params("layernorm", stages, len(LEVELS))
    z = torch.randn(SHAPE)
    grad = torch.randn(SHAPE)
    first, second = (_grads(rfsq_fused, z, stages, params, grad) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
