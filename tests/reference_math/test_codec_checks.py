"""Codec and API input checks (issue 10: 8, 9, 10): decode rejects indices outside the codebook and
wrong shapes, eps is validated, the layernorm overflow bound holds as documented, numpy levels work,
and TRITON_INTERPRET set after import gets our explanation."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rfsq_kernels.fused  # noqa: F401  (imports triton now, under conftest's TRITON_INTERPRET, like the fused tests)
from rfsq_kernels import FSQ, LFQ, RFSQ, VQEMA
from rfsq_kernels.reference import STRATEGIES, check_indices, rfsq_forward
from rfsq_kernels.reference import RFSQ as ReferenceRFSQ

ROOT = Path(__file__).resolve().parents[2]


# -- 8. decode --------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("shift,where", [(2048, "max"), (-2, "min"), (2**20, "max")])
def test_decode_rejects_indices_outside_the_codebook(seed, strategy, shift, where):
    m = RFSQ(stages=2, strategy=strategy)
    z = torch.randn(2, 4, 5, 3)
    idx, side = m.encode(z)
    bad = idx.clone()
    if shift == -2:  # (-1 is the dropped-stage / masked-position sentinel: tests/reference_math/test_reference_mask_dropout.py)
        bad[1, 2, 0, 1] = -2
    else:
        bad = bad + shift
    for call in (lambda: m.decode(bad, side), lambda: m.decode_stages(bad, side), lambda: m.indices_to_codes(bad)):
        with pytest.raises(ValueError, match=r"indices must lie in \[0, 2047\]"):
            call()
    assert torch.equal(m.decode(idx, side), m(z)[0])  # good indices still decode exactly


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_decode_and_indices_to_codes_check_the_stages_dim(strategy):
    m = RFSQ(stages=2, strategy=strategy)
    idx, side = m.encode(torch.randn(2, 4, 6, 5))
    # (idx[..., :k] is a legitimate input: the first k stages, tests/reference_math/test_reference_mask_dropout.py)
    for call in (lambda: m.indices_to_codes(idx[..., 0]), lambda: m.decode(idx[..., 0], side),
                 lambda: m.indices_to_codes(torch.cat([idx, idx], dim=-1))):
        with pytest.raises(ValueError, match=r"indices must have shape \(B, \*spatial, K=2\)"):
            call()
    assert m.indices_to_codes(idx).shape == (2, 2, 4, 6, 5)


def test_decode_checks_side_against_indices():
    m = RFSQ(stages=2, strategy="layernorm")
    idx, side = m.encode(torch.randn(3, 4, 4, 4))
    with pytest.raises(ValueError, match=r"side must be .*\(3, 2, 2, 4\).*got \(2, 2, 2, 4\)"):
        m.decode(idx, side[:2])
    with pytest.raises(TypeError, match="side must be a float tensor"):
        m.decode(idx, side.numpy())
    none = RFSQ(stages=2, strategy="none")
    idx, side = none.encode(torch.randn(3, 4, 4, 4))
    none.decode(idx, None), none.decode(idx, side)
    with pytest.raises(ValueError, match="side must be"):
        none.decode(idx, side[:1])


def test_baseline_codecs_reject_indices_outside_their_codebook():
    fsq = FSQ([8, 5, 5, 5])
    for bad in (torch.tensor([[1000]]), torch.tensor([[-1]])):
        with pytest.raises(ValueError, match=r"indices must lie in \[0, 999\]"):
            fsq.indices_to_codes(bad)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4095\]"):
        LFQ(12).indices_to_codes(torch.tensor([[4096]]))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 15\]"):
        VQEMA(16, 6).indices_to_codes(torch.tensor([[16]]))


def test_sentinel_is_rejected_now_but_the_check_can_allow_it():
    idx = torch.tensor([[[0, -1]]])
    with pytest.raises(ValueError, match=r"got values in \[-1, 0\]"):
        check_indices(idx, 2048, stages=2)
    check_indices(idx, 2048, stages=2, allow_sentinel=True)
    with pytest.raises(ValueError, match=r"\[-1, 2047\]"):
        check_indices(idx - 1, 2048, stages=2, allow_sentinel=True)
    check_indices(torch.zeros((0, 3, 2), dtype=torch.int32), 2048, stages=2)  # empty: nothing to check


# -- 9. eps and the layernorm overflow bound -----------------------------------------------------------
@pytest.mark.parametrize("cls", [RFSQ, ReferenceRFSQ])
@pytest.mark.parametrize("eps,exc", [(-1.0, ValueError), (0.0, ValueError), (float("nan"), ValueError),
                                     (float("inf"), ValueError), ("1e-5", TypeError), (True, TypeError)])
def test_bad_eps_is_refused(cls, eps, exc):
    with pytest.raises(exc, match="eps must be a finite number > 0"):
        cls(stages=2, eps=eps)


def test_numpy_eps_is_accepted():
    assert RFSQ(stages=2, eps=np.float32(1e-6)).eps == pytest.approx(1e-6)


#: README/docstring: stats are finite whenever every |z| <= 9.2e18 / sqrt(positions) (both backends);
#: the reference alone holds for every |z| <= 1.8e19 (the float32 variance stays below its max).
@pytest.mark.parametrize("positions", [(4, 4), (32, 32), (4, 4, 4)])
def test_layernorm_stats_finite_up_to_the_documented_bound(positions):
    n = math.prod(positions)
    g = torch.Generator().manual_seed(n)
    for bound in (9.2e18 / math.sqrt(n), 1.8e19):
        z = (torch.rand(2, 4, *positions, generator=g) * 2 - 1) * bound
        z[:, :, 0], z[:, :, -1] = bound, -bound  # the extremes of the allowed range
        q, idx, mean, std = rfsq_forward(z, (8, 8, 8, 4), 2, "layernorm", ln_weight=torch.ones(2, 4), ln_bias=torch.zeros(2, 4))
        assert torch.isfinite(mean).all() and torch.isfinite(std).all() and torch.isfinite(q).all()
    z[0, 0, 0] = 1e30  # beyond the bound: NaN outputs are documented, out-of-range indices never happen
    _, idx, _, _ = rfsq_forward(z, (8, 8, 8, 4), 2, "layernorm", ln_weight=torch.ones(2, 4), ln_bias=torch.zeros(2, 4))
    assert int(idx.min()) >= 0 and int(idx.max()) < 2048


def test_fused_layernorm_stats_finite_up_to_the_documented_bound():
    bound = 9.2e18 / 4  # 16 positions
    z = (torch.rand(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1) * bound
    z[:, :, 0, 0], z[:, :, -1, -1] = bound, -bound
    q, _, mean, std = RFSQ(stages=2, backend="triton").quantize(z)
    assert torch.isfinite(mean).all() and torch.isfinite(std).all() and torch.isfinite(q).all()


# -- 10. API papercuts ------------------------------------------------------------------------------
def test_numpy_levels_are_accepted():
    for levels in (np.array([8, 8, 8, 4]), [np.int64(8), np.int32(8), np.uint8(8), 4]):
        m = RFSQ(stages=2, levels=levels)
        assert m.levels == (8, 8, 8, 4) and all(type(v) is int for v in m.levels)
    assert FSQ(np.array([5, 5, 5])).codebook_size == 125
    with pytest.raises(TypeError, match=r"levels\[0\] must be an int"):
        RFSQ(stages=2, levels=np.array([8.0, 8.0, 8.0, 4.0]))
    with pytest.raises(TypeError, match=r"levels\[1\] must be an int"):
        RFSQ(stages=2, levels=[8, np.bool_(True), 8, 4])


def test_triton_interpret_set_after_import_is_explained():
    code = ("import os, torch, triton\n"
            "from rfsq_kernels import RFSQ\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "RFSQ(stages=2, backend='triton')(torch.randn(1, 4, 4, 4))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "TRITON_INTERPRET=1 was set after triton was imported" in last and "active drivers" not in r.stderr
