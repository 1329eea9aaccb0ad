"""RFSQ reference against an independent NumPy loop; codec round trip; parameters; dtypes."""
import math

import numpy as np
import pytest
import torch

from numpy_rfsq import draw_clear_of_boundaries
from rfsq_kernels import RFSQ
from rfsq_kernels.reference import RFSQ as ReferenceRFSQ
from rfsq_kernels.reference import STRATEGIES
from rfsq_kernels.testing import randomize_

SHAPES = {3: (2, 5, 33), 4: (2, 5, 7, 9), 5: (2, 5, 3, 5, 4)}


@pytest.mark.parametrize("rank", [3, 4, 5])
@pytest.mark.parametrize("stages", [1, 2, 4])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rfsq_matches_independent_numpy_loop(strategy, stages, rank, seed):
    m = randomize_(RFSQ(stages=stages, strategy=strategy, levels=[8, 5, 4, 3, 2]))
    z, expect_q, expect_idx = draw_clear_of_boundaries(SHAPES[rank], m.levels, stages, strategy, m.strategy_parameters())
    q, idx = m(z)
    assert idx.shape == (*z.shape[:1], *z.shape[2:], stages) and idx.dtype == torch.int32
    np.testing.assert_array_equal(idx.numpy(), expect_idx)
    np.testing.assert_allclose(q.detach().double().numpy(), expect_q, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_encode_decode_reproduces_forward_exactly(strategy, dtype, seed):
    m = randomize_(RFSQ(stages=4, strategy=strategy))
    z = (torch.randn(3, 5, 6, 7) * 2).to(dtype)
    q, idx = m(z)
    indices, side = m.encode(z)
    assert torch.equal(indices, idx)
    assert torch.equal(m.decode(indices, side, dtype=dtype), q)
    assert q.dtype == dtype
    if strategy == "layernorm":
        assert side.shape == (3, 4, 2, 5) and side.dtype == torch.float32
        zf = z.float()
        assert torch.allclose(side[:, 0, 0], zf.mean(dim=(2, 3)), atol=1e-6)
        assert torch.allclose(side[:, 0, 1], torch.sqrt(zf.var(dim=(2, 3), unbiased=False) + 1e-5), atol=1e-6)
    else:
        assert side.numel() == 0


def test_decode_stages_are_the_residual_decomposition(seed):
    m = RFSQ(stages=4, strategy="layernorm")
    z = torch.randn(2, 5, 8, 8)
    q, _ = m(z)
    parts = m.decode_stages(*m.encode(z))
    assert len(parts) == 4
    rms = [torch.sqrt(((z - sum(parts[: k + 1])) ** 2).mean()).item() for k in range(4)]
    assert rms == sorted(rms, reverse=True), "residual magnitude should decay stage by stage"
    assert torch.equal(sum(parts[1:], parts[0]), q)


def test_indices_to_codes_gives_normalized_stage_codes(seed):
    m = RFSQ(stages=2, strategy="none")
    z = torch.randn(2, 4, 5, 5)
    q, idx = m(z)
    codes = m.indices_to_codes(idx)
    assert codes.shape == (2, 2, 4, 5, 5)
    assert torch.equal(codes.sum(1), q)  # for 'none' the codes are the stage outputs


@pytest.mark.parametrize("initial_scale", [1.0, 0.25, 0.693, 2.0, 7.5, 30.0])
def test_scale_is_initialised_to_exactly_initial_scale(initial_scale):
    m = RFSQ(stages=3, strategy="scale", levels=[5, 5], initial_scale=initial_scale)
    assert torch.equal(m.scales, torch.full((3,), initial_scale, dtype=torch.float32))


def test_defaults_and_properties():
    m2, m4 = RFSQ(), RFSQ(stages=4)
    assert m2.levels == (8, 8, 8, 4) and m2.strategy == "layernorm" and m2.stages == 2
    assert m4.levels == (4, 4, 4, 4, 4)
    assert (m2.codebook_size, m2.bits_per_token) == (2048, 22.0)
    assert (m4.codebook_size, m4.bits_per_token) == (1024, 40.0)
    assert torch.equal(m2.ln_weight, torch.ones(2, 4)) and torch.equal(m2.ln_bias, torch.zeros(2, 4))


@pytest.mark.parametrize("strategy,keys", [
    ("none", []), ("scale", ["scale_param"]), ("layernorm", ["ln_weight", "ln_bias"])], ids=["none", "scale", "layernorm"])
def test_state_dict_keys_are_the_same_for_every_backend(strategy, keys):
    dicts = [RFSQ(stages=2, strategy=strategy, backend=b).state_dict() for b in ("auto", "triton", "reference")]
    for sd in dicts:
        assert sorted(sd) == sorted(keys + ["_extra_state"])
        assert sd["_extra_state"] == {"format": 1, "levels": [8, 8, 8, 4], "stages": 2, "strategy": strategy, "dim": 4, "fsq_shift": "atanh"}
    ref = ReferenceRFSQ(stages=2, strategy=strategy)
    RFSQ(stages=2, strategy=strategy, backend="triton").load_state_dict(ref.state_dict())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_zero_size_batch_returns_empty_outputs(strategy):
    m = RFSQ(stages=2, strategy=strategy)
    q, idx = m(torch.randn(0, 4, 8, 8))
    assert q.shape == (0, 4, 8, 8) and idx.shape == (0, 8, 8, 2)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_non_finite_inputs_never_give_out_of_range_indices(strategy):
    m = RFSQ(stages=4, strategy=strategy)
    z = torch.randn(3, 5, 4, 4)
    z[0, 0, 0, 0] = float("nan")
    z[1, 2, 1, 1] = float("inf")
    z[2, 3, 2, 2] = float("-inf")
    z[2, 4] = 1e38
    _, idx = m(z)
    assert idx.min() >= 0 and idx.max() < m.codebook_size


def test_residual_chain_is_not_detached(seed):
    # Every stage contributes to the input gradient: with the chain detached the LN statistics
    # of later stages would not see z, and the gradient would differ from the full graph.
    m = RFSQ(stages=2, strategy="layernorm")
    z = torch.randn(2, 4, 6, 6, requires_grad=True)
    (m(z)[0] * torch.randn(2, 4, 6, 6)).sum().backward()
    assert z.grad is not None and m.ln_weight.grad.abs().sum() > 0 and m.ln_bias.grad[1].abs().sum() > 0
    assert math.isfinite(z.grad.sum().item())
