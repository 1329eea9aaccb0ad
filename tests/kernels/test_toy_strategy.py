"""A strategy lives in one place: the toy ``toy_offset`` (tests/toy_strategy.py, a parameter role the
built-in table does not have) is registered at run time and runs through the module, the fused
path (interpreter), ``torch.library.opcheck`` and the real-compiler sweep, with no edit to the
custom ops, the launchers or the tools. One registration (``registered_strategy``) fills every
table, and is undone after each test."""
import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

import numpy_rfsq
import toy_strategy
from fused_helpers import compare, run_both
from numpy_rfsq import draw_clear_of_boundaries
from rfsq_kernels import RFSQ
from rfsq_kernels.fused import rfsq_fused
from rfsq_kernels.reference import PARAM_ROLES, STRATEGY_TABLE, get_strategy, registered_strategy, rfsq_forward
from rfsq_kernels.testing import DISTRIBUTIONS, random_strategy_params, randomize_

NAME = toy_strategy.NAME
LEVELS = [8, 5, 5, 4]
REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def _registered() -> Iterator[str]:
    """The toy strategy (one registration) and its float64 oracle stage, undone afterwards."""
    with registered_strategy(toy_strategy.STRATEGY) as name, pytest.MonkeyPatch.context() as mp:
        mp.setitem(numpy_rfsq.ORACLE_STAGES, name, toy_strategy.oracle_stage)
        yield name


@pytest.fixture
def toy():
    with _registered() as name:
        yield name


def test_module_matches_the_float64_oracle_and_decodes_exactly(seed, toy):
    m = randomize_(RFSQ(stages=3, strategy=toy, levels=LEVELS, backend="reference"))
    assert [n for n, _ in m.named_parameters()] == ["offset"] and m.offset.shape == (3,)
    assert "offset" in m.state_dict()
    z, expect_q, expect_idx = draw_clear_of_boundaries((2, 4, 5, 6), LEVELS, 3, toy, m.strategy_parameters())
    q, idx = m(z)
    assert torch.equal(idx, torch.from_numpy(expect_idx).to(idx.dtype))
    np.testing.assert_allclose(q.detach().double().numpy(), expect_q, rtol=1e-5, atol=1e-5)
    indices, side = m.encode(z)
    assert torch.equal(m.decode(indices, side), q.detach())
    q.sum().backward()
    assert m.offset.grad is not None and m.offset.grad.abs().sum() > 0


@pytest.mark.parametrize("sparse", [False, True], ids=["plain", "mask+counts"])
def test_fused_matches_reference(seed, toy, sparse):
    """The backward gives the toy stage its parameter pointers (the default ``params`` /
    ``params_forward``)."""
    stages = 3
    params = random_strategy_params(toy, stages, len(LEVELS))
    mask = active_stages = None
    if sparse:
        mask, active_stages = torch.rand(3, 5, 7) > 0.3, torch.tensor([3, 1, 0], dtype=torch.int32)
    z = draw_clear_of_boundaries((3, 4, 5, 7), LEVELS, stages, toy, params, mask=mask,
                                 active_stages=active_stages)[0]

    def fused(*args, **kwargs):
        return rfsq_fused(*args, mask=mask, active_stages=active_stages, **kwargs)

    def reference(*args, **kwargs):
        return rfsq_forward(*args, mask=mask, active_stages=active_stages, **kwargs)

    compare(*run_both(fused, reference, z, LEVELS, stages, toy, params, grad=torch.randn(z.shape)))


def test_module_fused_backend(seed, toy):
    ref = randomize_(RFSQ(stages=2, strategy=toy, levels=LEVELS, backend="reference"))
    fused = RFSQ(stages=2, strategy=toy, levels=LEVELS, backend="triton")
    fused.load_state_dict(ref.state_dict())
    z = draw_clear_of_boundaries((2, 4, 6, 3), LEVELS, 2, toy, ref.strategy_parameters())[0]
    (q, idx), (rq, ridx) = fused(z), ref(z)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(q, rq, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sparse", [False, True], ids=["plain", "mask+counts"])
def test_opcheck(seed, toy, sparse):
    stages = 2
    params = random_strategy_params(toy, stages, len(LEVELS))
    group = [p.kernel_form(params[p.name]).requires_grad_() for p in get_strategy(toy).params]
    z = draw_clear_of_boundaries((2, 4, 3, 5), LEVELS, stages, toy, params)[0].requires_grad_()
    mask = active_stages = None
    if sparse:
        mask, active_stages = torch.rand(2, 3, 5) > 0.3, torch.tensor([1, 2], dtype=torch.int32)
    torch.library.opcheck(torch.ops.rfsq_kernels.rfsq_forward.default,
                          (z, group, mask, active_stages, LEVELS, stages, toy, 1e-5, "atanh"))


def test_registration_is_undone():
    with _registered():
        assert NAME in STRATEGY_TABLE and "offset" in PARAM_ROLES and "offset" in DISTRIBUTIONS
    assert NAME not in STRATEGY_TABLE and NAME not in numpy_rfsq.ORACLE_STAGES
    assert "offset" not in PARAM_ROLES and "offset" not in DISTRIBUTIONS
    with pytest.raises(ValueError, match="strategy must be one of"):
        get_strategy(NAME)


def test_real_compiler_sweep():
    """The quick grid of the offline compile check for sm_80/sm_90: compiles, no spills, every flag
    both ways (a subprocess: this session runs Triton in the interpreter)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "rfsq_kernels.gpucheck", "--arch", "80", "90", "--quick",
           "--strategy", NAME, "--plugin", str(REPO / "tests" / "toy_strategy.py")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=REPO)
    report = proc.stdout + proc.stderr
    print(report)
    assert proc.returncode == 0, report[-20000:]
    assert "_fwd_elementwise_rows_kernel" in report and "_bwd_elementwise_rows_kernel" in report  # it compiled something
