"""Gradients of the reference: gradcheck in float64 with the straight-through rounding frozen.

Rounding is piecewise constant, so a finite difference of the real function sees 0 where the
straight-through estimator says 1. Freezing each stage's rounding offset ``round(x) - x`` at the
base point turns the forward into the smooth function whose exact derivative *is* the STE
gradient; gradcheck then verifies autograd through tanh, the scales, the LN mean/std and the
non-detached residual chain, for the input and every parameter.
"""
import pytest
import torch

from frozen_rounding import freeze_rounding, unfreeze_rounding
from numpy_rfsq import draw_clear_of_boundaries
from rfsq_kernels import RFSQ
from rfsq_kernels.reference import STRATEGIES, rfsq_forward
from rfsq_kernels.testing import random_strategy_params, randomize_


@pytest.mark.parametrize("stages", [1, 3])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradcheck_with_frozen_rounding(strategy, stages, seed, monkeypatch):
    levels = (5, 4, 3)
    z = (torch.randn(2, 3, 4, 3, dtype=torch.float64) * 1.5).requires_grad_()
    params = random_strategy_params(strategy, stages, len(levels), dtype=torch.float64, requires_grad=True)

    def forward(z, **p):
        return rfsq_forward(z, levels, stages, strategy, **p, compute_dtype=torch.float64)[0]

    frozen, offsets = freeze_rounding(monkeypatch, forward, z, params)
    assert len(offsets) == stages

    assert torch.autograd.gradcheck(frozen, (z, *params.values()), eps=1e-6, atol=1e-6, rtol=1e-5)

    # The real (unfrozen) forward has exactly this gradient at the base point.
    g = torch.randn(z.shape, dtype=torch.float64)
    expect = torch.autograd.grad((frozen(z, *params.values()) * g).sum(), (z, *params.values()))
    unfreeze_rounding(monkeypatch)
    out = forward(z, **params)
    got = torch.autograd.grad((out * g).sum(), (z, *params.values()))
    for a, b in zip(got, expect):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_float32_module_gradients_match_float64(strategy, seed):
    """The module's float32 gradients agree with the float64 computation on the same graph."""
    m = randomize_(RFSQ(stages=2, strategy=strategy, levels=[5, 4, 3]))
    z = draw_clear_of_boundaries((2, 3, 5, 4), m.levels, 2, strategy, m.strategy_parameters())[0]
    g = torch.randn_like(z)
    params = list(m.parameters())
    z32 = z.clone().requires_grad_()
    grads32 = torch.autograd.grad((m(z32)[0] * g).sum(), [z32, *params])
    z64 = z.double().requires_grad_()
    p64 = {n: p.detach().double().requires_grad_() for n, p in m.named_parameters()}
    out64 = rfsq_forward(z64, m.levels, 2, strategy, **p64, compute_dtype=torch.float64)[0]
    grads64 = torch.autograd.grad((out64 * g.double()).sum(), [z64, *p64.values()])
    for a, b in zip(grads32, grads64):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * (1 + b.abs().max().item()))
