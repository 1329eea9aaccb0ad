"""The channel-row none/scale kernels against the reference (values, indices, every gradient):
several tiles per image, masks and per-sample stage counts, C from 1 to 16, int64 indices, bf16
channels-last (CPU: Triton interpreter, few and large programs)."""
import functools

import pytest
import torch

from fused_helpers import compare, draw_input, run_both
from rfsq_kernels.fused import rfsq_fused
from rfsq_kernels.kernels import config
from rfsq_kernels.reference import rfsq_forward
from rfsq_kernels.testing import random_strategy_params

STRATEGIES = ("none", "scale")


@pytest.mark.parametrize("levels", [[5], [8, 8, 8, 4, 7, 6], [3] * 16, [16] * 8], ids=["C1", "C6", "C16", "int64-index"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rows_match_reference(seed, strategy, levels):
    stages = 3
    params = random_strategy_params(strategy, stages, len(levels))
    z = draw_input((2, len(levels), 5, 7), levels, stages, strategy, params)
    compare(*run_both(rfsq_fused, rfsq_forward, z, levels, stages, strategy, params, grad=torch.randn(z.shape)))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rows_several_tiles_bf16_channels_last(seed, monkeypatch, strategy):
    monkeypatch.setattr(config, "MAX_BLOCK_ELEMS", 64)  # 8-position tiles at C=5: 6 tiles per image
    levels, stages = [8, 5, 5, 5, 3], 4
    assert config.elementwise_row_tiles(5, 45).block_s == 8
    params = random_strategy_params(strategy, stages, len(levels))
    z = draw_input((2, 5, 5, 9), levels, stages, strategy, params, dtype=torch.bfloat16, channels_last=True)
    compare(*run_both(rfsq_fused, rfsq_forward, z, levels, stages, strategy, params, grad=torch.randn(z.shape)))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rows_mask_and_counts(seed, strategy):
    from fused_helpers import mask_and_counts
    from test_fused_mask_dropout import _draw
    levels, stages, shape = [8, 5, 5, 5, 3], 3, (5, 5, 6, 7)
    params = random_strategy_params(strategy, stages, len(levels))
    mask, active = mask_and_counts(shape[0], shape[2:], stages)
    z = _draw(shape, levels, stages, strategy, params, mask, active)
    fused = functools.partial(rfsq_fused, mask=mask, active_stages=active)
    ref = functools.partial(rfsq_forward, mask=mask, active_stages=active)
    compare(*run_both(fused, ref, z, levels, stages, strategy, params, grad=torch.randn(z.shape)))


@pytest.mark.parametrize("fsq_shift", ["atanh", "tan"])
def test_inverse_width_row_is_recip_rn(fsq_shift):
    """The table's last row, read by the row kernels as ``1 / half_w``, is the correctly rounded
    reciprocal of the ``half_w`` row (what ``recip_rn`` computes), and the first
    five rows are unchanged by it."""
    levels = [3, 4, 5, 7, 8, 16, 1000, 2**12 + 1]
    consts, _basis = config.level_tables(levels, torch.device("cpu"), fsq_shift)
    assert consts.shape == (6, len(levels)) and consts.dtype == torch.float32
    half_w = consts[3].double()
    assert torch.equal(consts[5], (1.0 / half_w).float())  # float64 quotient, rounded to float32
    assert torch.equal(consts[5], torch.reciprocal(consts[3]))
