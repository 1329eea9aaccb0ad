"""rfsq_kernels.testing: the random-parameter factory every test and bench/ draws from."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import rfsq_kernels.reference.strategies as strategies
from rfsq_kernels import RFSQ
from rfsq_kernels.reference import STRATEGIES, get_strategy
from rfsq_kernels.testing import random_strategy_params, randomize_


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_params_follow_the_table_and_their_roles(strategy, dtype, seed):
    params = random_strategy_params(strategy, 3, 5, dtype=dtype, requires_grad=True)
    specs = get_strategy(strategy).params
    assert list(params) == [s.name for s in specs]
    for spec in specs:
        p = params[spec.name]
        assert p.shape == spec.shape(3, 5) and p.dtype == dtype and p.requires_grad and p.is_leaf
        if spec.role == strategies.GAIN:
            assert ((p >= 0.6) & (p <= 1.4)).all()
        if spec.role == strategies.SOFTPLUS_SCALE:
            assert (F.softplus(p) > 0).all()
        assert not torch.equal(p, torch.full_like(p, spec.initial_value(1.0))), "drawn away from the init"


def test_a_generator_makes_draws_reproducible_and_dtype_only_casts():
    a = random_strategy_params("layernorm", 2, 4, generator=torch.Generator().manual_seed(7))
    b = random_strategy_params("layernorm", 2, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for name in a:
        assert torch.equal(a[name].double(), b[name])


def test_randomize_moves_only_strategy_parameters(seed):
    m = RFSQ(stages=2, strategy="layernorm", levels=[8, 5, 5], dim=16)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    assert randomize_(m) is m
    for name, p in m.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (name in ("ln_weight", "ln_bias")), name
    assert randomize_(RFSQ(stages=2, strategy="none")).strategy_parameters() == {}


def test_an_unknown_role_is_a_clear_error(monkeypatch):
    row = strategies.STRATEGY_TABLE["scale"]
    odd = dataclasses.replace(row, params=(strategies.ParamSpec("scale_param", False, "exponent"),))
    monkeypatch.setitem(strategies.STRATEGY_TABLE, "scale", odd)
    with pytest.raises(ValueError, match="no random distribution for parameter role 'exponent'"):
        random_strategy_params("scale", 2, 3)
