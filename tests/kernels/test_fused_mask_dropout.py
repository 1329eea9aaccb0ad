"""Fused kernels with masks (padded positions) and per-sample stage counts (quantize dropout)
against the reference: quantized, indices (incl. the -1 sentinel), LN statistics and every
gradient; one tile and several tiles per image (the split layernorm path), odd sizes, all-masked
and one-valid samples (CPU: Triton interpreter, few and large programs)."""
import functools

import pytest
import torch

from fused_helpers import compare, mask_and_counts, run_both, to_layout
from numpy_rfsq import draw_clear_of_boundaries
from rfsq_kernels import RFSQ
from rfsq_kernels.fused import rfsq_fused
from rfsq_kernels.kernels import config
from rfsq_kernels.reference import SENTINEL, STRATEGIES, rfsq_forward
from rfsq_kernels.testing import random_strategy_params


def _draw(shape, levels, stages, strategy, params, mask, active, dtype=torch.float32, channels_last=False):
    """Input whose valid, active pre-rounding values all lie clear of .5 boundaries (the float64
    oracle's ``BOUNDARY_TOL``); padding is NaN (it must never be read)."""
    z = draw_clear_of_boundaries(shape, levels, stages, strategy, params, mask=mask, active_stages=active, dtype=dtype)[0]
    return to_layout(z.masked_fill(~mask.unsqueeze(1), float("nan")), channels_last)


def _both(mask, active):
    fused = functools.partial(rfsq_fused, mask=mask, active_stages=active)
    ref = functools.partial(rfsq_forward, mask=mask, active_stages=active)
    return fused, ref


@pytest.mark.parametrize("path", ["single", "tiled"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mask_and_counts_match_reference(seed, monkeypatch, strategy, path):
    if path == "tiled":  # several spatial tiles (none/scale), the split layernorm (S=45, base tile 16)
        monkeypatch.setattr(config, "MAX_BLOCK_ELEMS", 64)
    levels, stages = [8, 5, 3, 4], 3
    shape = (5, 4, 5, 9)
    params = random_strategy_params(strategy, stages, len(levels))
    mask, active = mask_and_counts(shape[0], shape[2:], stages)
    z = _draw(shape, levels, stages, strategy, params, mask, active)
    fused, ref = run_both(*_both(mask, active), z, levels, stages, strategy, params, grad=torch.randn(shape))
    compare(fused, ref)
    q, idx, mean, std = fused["out"]
    assert (idx[0] == SENTINEL).all() and (q[0] == 0).all() and (fused["grads"]["z"][0] == 0).all()
    assert ((idx == SENTINEL) == (~mask[..., None] | (torch.arange(stages) >= active.view(-1, 1, 1, 1)))).all()
    assert torch.isfinite(fused["grads"]["z"]).all()
    if strategy == "layernorm":
        assert torch.isfinite(mean).all() and torch.isfinite(std).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rank3_bf16_channels_last_mask_only(seed, strategy):
    levels, stages = [7, 2, 16], 2
    shape = (3, 3, 37)
    params = random_strategy_params(strategy, stages, len(levels))
    mask, _ = mask_and_counts(3, (37,), stages)
    active = torch.full((3,), stages, dtype=torch.int32)
    z = _draw(shape, levels, stages, strategy, params, mask, active, dtype=torch.bfloat16, channels_last=True)
    compare(*run_both(*_both(mask, None), z, levels, stages, strategy, params, grad=torch.randn(shape)))


@pytest.mark.parametrize("strategy", ["scale", "layernorm"])
def test_counts_only_with_stride0_grad(seed, strategy):
    levels, stages = [4, 4, 4, 4, 4], 4
    shape = (4, 5, 6, 5)
    params = random_strategy_params(strategy, stages, len(levels))
    active = torch.tensor([1, 4, 0, 2], dtype=torch.int32)
    mask = torch.ones(4, 6, 5, dtype=torch.bool)
    z = _draw(shape, levels, stages, strategy, params, mask, active)
    fused, ref = run_both(*_both(None, active), z, levels, stages, strategy, params, grad=None)
    compare(fused, ref)
    if strategy == "layernorm":  # dropped stages store (0, 1)
        assert torch.equal(fused["out"][2][2], torch.zeros(4, 5)) and torch.equal(fused["out"][3][2], torch.ones(4, 5))


def test_module_dropout_and_mask_through_triton(seed):
    m = RFSQ(stages=4, strategy="layernorm", backend="triton", quantize_dropout=True).train()
    ref = RFSQ(stages=4, strategy="layernorm", backend="reference")
    ref.load_state_dict(m.state_dict())
    z = torch.randn(3, 5, 16, requires_grad=True)
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask[1, 9:] = False
    q, idx = m(z, mask=mask)
    kept = (idx[:, 0] != SENTINEL).sum(-1)
    rq, ridx = ref(z, mask=mask, stages=kept)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(q, rq, rtol=1e-5, atol=1e-5)
