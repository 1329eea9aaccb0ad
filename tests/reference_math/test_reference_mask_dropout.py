"""Masks for padded positions and quantize dropout (per-sample stage counts) in the reference.

Checked against the independent per-sample NumPy loop (tests/numpy_rfsq.py), by padding
invariance, by frozen-rounding gradcheck, and through the module API (draws, eval, decode).
"""
import math

import numpy as np
import pytest
import torch

from frozen_rounding import freeze_rounding, unfreeze_rounding
from numpy_rfsq import draw_clear_of_boundaries
from rfsq_kernels import RFSQ
from rfsq_kernels.reference import SENTINEL, STRATEGIES, draw_active_stages, rfsq_forward
from rfsq_kernels.testing import random_strategy_params, randomize_

LEVELS = (8, 5, 4, 3)


def _mask(batch, spatial):
    """Random mask with one all-masked sample, one single-valid sample, one all-valid sample."""
    mask = torch.rand(batch, *spatial) > 0.4
    mask[0] = False
    mask[1] = False
    mask[1].view(-1)[3] = True
    mask[2] = True
    return mask


@pytest.mark.parametrize("shape", [(5, 4, 13), (5, 4, 3, 5)], ids=["rank3", "rank4"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mask_and_stage_counts_match_independent_numpy(strategy, shape, seed):
    stages = 3
    p = random_strategy_params(strategy, stages, len(LEVELS))
    mask = _mask(shape[0], shape[2:])
    active = torch.tensor([3, 1, 2, 0, 3], dtype=torch.int32)
    z, expect_q, expect_idx = draw_clear_of_boundaries(shape, LEVELS, stages, strategy, p, mask=mask, active_stages=active)
    z[~mask.unsqueeze(1).expand_as(z)] = float("nan")  # padding is never read
    q, idx, mean, std = rfsq_forward(z, LEVELS, stages, strategy, **p, mask=mask, active_stages=active)
    np.testing.assert_array_equal(idx.numpy(), expect_idx)
    assert (idx == SENTINEL).sum() == (expect_idx == -1).sum() > 0
    np.testing.assert_allclose(q.double().numpy(), expect_q, rtol=1e-5, atol=1e-5)
    if strategy == "layernorm":
        # all-masked sample 0: mean 0, std sqrt(eps); dropped stages: (0, 1); no NaN anywhere
        assert torch.equal(mean[0, :, :], torch.zeros(3, 4))
        assert torch.allclose(std[0], torch.full((3, 4), math.sqrt(1e-5)))
        assert torch.equal(mean[3], torch.zeros(3, 4)) and torch.equal(std[3], torch.ones(3, 4))
        assert torch.isfinite(mean).all() and torch.isfinite(std).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_padding_does_not_change_a_sample(strategy, seed):
    """The same clip padded by different amounts (padding = garbage) gives the same result on its
    valid positions: identical indices, the same values and LN statistics (float32 summation order
    is the only difference)."""
    m = randomize_(RFSQ(stages=4, strategy=strategy, levels=list(LEVELS)))
    clip = draw_clear_of_boundaries((1, 4, 21), LEVELS, 4, strategy, m.strategy_parameters())[0]
    ref_q, ref_idx = m(clip)
    ref_side = m.encode(clip)[1]
    for pad, garbage in ((3, float("nan")), (40, 1e6), (0, 0.0)):
        z = torch.cat([clip, torch.full((1, 4, pad), garbage)], dim=-1)
        z = torch.cat([z, torch.randn_like(z) * 5], dim=0)  # a neighbour in the batch
        mask = torch.zeros(2, 21 + pad, dtype=torch.bool)
        mask[0, :21] = True
        mask[1] = True
        q, idx = m(z, mask=mask)
        assert torch.equal(idx[:1, :21], ref_idx)
        assert (idx[0, 21:] == SENTINEL).all() and (q[0, :, 21:] == 0).all()
        torch.testing.assert_close(q[:1, :, :21], ref_q, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(m.encode(z, mask=mask)[1][:1], ref_side, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradcheck_with_mask_and_stage_counts(strategy, seed, monkeypatch):
    """Frozen-rounding gradcheck (see test_reference_grad.py) with a mask and per-sample counts."""
    stages, levels = 3, (5, 4, 3)
    z = (torch.randn(4, 3, 7, dtype=torch.float64) * 1.5).requires_grad_()
    params = random_strategy_params(strategy, stages, len(levels), dtype=torch.float64, requires_grad=True)
    mask = torch.rand(4, 7) > 0.3
    mask[0, :] = False
    mask[1, :] = False
    mask[1, 2] = True
    mask[3, :2] = True
    active = torch.tensor([3, 2, 1, 2])  # stage 2 runs only for sample 0, which is all padding

    def forward(z, **p):
        return rfsq_forward(z, levels, stages, strategy, **p, compute_dtype=torch.float64, mask=mask,
                            active_stages=active)[0]

    frozen, _offsets = freeze_rounding(monkeypatch, forward, z, params)
    assert torch.autograd.gradcheck(frozen, (z, *params.values()), eps=1e-6, atol=1e-6, rtol=1e-5)
    unfreeze_rounding(monkeypatch)
    out = forward(z, **params)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (z, *params.values()))
    assert torch.equal(grads[0] * ~mask.unsqueeze(1), torch.zeros_like(z)), "padded positions get no gradient"
    assert all(torch.isfinite(t).all() for t in grads)
    for name, grad in zip(params, grads[1:]):
        assert torch.equal(grad[2], torch.zeros_like(grad[2])), f"{name}: a stage with no valid position gets no gradient"


def test_dropout_draws():
    g = torch.Generator().manual_seed(0)
    k = draw_active_stages(4000, 6, cutoff_index=2, device="cpu", generator=g)
    assert k.dtype == torch.int32 and set(k.tolist()) == {3, 4, 5, 6}
    k = draw_active_stages(4000, 6, multiple_of=4, device="cpu", generator=g)
    assert set(k.tolist()) == {4, 6}
    k = draw_active_stages(64, 6, per_sample=False, device="cpu", generator=g)
    assert len(set(k.tolist())) == 1


@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_quantize_dropout_in_training_only(strategy, per_sample, seed):
    m = RFSQ(stages=4, strategy=strategy, quantize_dropout=True, quantize_dropout_cutoff_index=1,
             quantize_dropout_per_sample=per_sample)
    z = torch.randn(16, 5, 6, requires_grad=True)
    m.train()
    q, idx = m(z)
    kept = (idx != SENTINEL).sum(-1)  # (B, S): same count at every position of a sample
    assert (kept == kept[:, :1]).all() and kept.min() >= 2 and kept.max() <= 4
    assert (len(set(kept[:, 0].tolist())) == 1) or per_sample
    # the training output is the reference with those counts, and decodes from its -1 indices
    q_ref, idx_ref = m(z, stages=kept[:, 0])
    assert torch.equal(idx, idx_ref) and torch.equal(q, q_ref)
    q.sum().backward()
    assert torch.isfinite(z.grad).all()
    with torch.no_grad():  # lucidrains: no dropout without grad, nor in eval
        assert (m(z)[1] != SENTINEL).all()
    m.eval()
    assert (m(z)[1] != SENTINEL).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_k_stage_forward_equals_decoding_the_first_k_indices(strategy, seed):
    m = RFSQ(stages=4, strategy=strategy)
    z = torch.randn(3, 5, 4, 5)
    indices, side = m.encode(z)
    for k in (1, 2, 4):
        q, idx = m(z, stages=k)
        assert idx.shape == (3, 4, 5, k) and torch.equal(idx, indices[..., :k])
        assert torch.equal(m.decode(indices[..., :k], side[:, :k]), q)
        # the same through per-sample counts: -1 beyond k decodes to the same k-stage result
        qk, idxk = m(z, stages=torch.full((3,), k))
        assert torch.equal(qk, q) and (idxk[..., k:] == SENTINEL).all()
        assert torch.equal(m.decode(idxk, side), q)


def test_decode_accepts_the_sentinel_only_as_a_suffix():
    m = RFSQ(stages=4, strategy="none")
    idx = m.encode(torch.randn(2, 5, 3))[0]
    ok = idx.clone()
    ok[0, :, 2:] = SENTINEL
    ok[1, 1, :] = SENTINEL
    parts = m.decode_stages(ok)
    assert (parts[2][0] == 0).all() and (parts[0][1, :, 1] == 0).all()
    bad = idx.clone()
    bad[0, 1, 1] = SENTINEL
    with pytest.raises(ValueError, match=r"sentinel -1 .* followed by a real index at position \(0, 1\), stage 2"):
        m.decode(bad)
