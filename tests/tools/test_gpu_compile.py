"""The GPU path, checked without a GPU: every kernel specialization the launchers can produce is
compiled by Triton's real compiler for sm_80 and sm_90 (and sm_100 when the triton wheel
bundles its ptxas) and must compile, without register spills, without approximate math outside
libdevice tanh and with FP fusion off (issue 17).

It runs in a subprocess because this test session imported triton under ``TRITON_INTERPRET=1``
(see conftest.py), and interpreted ``@triton.jit`` functions cannot be compiled. Compiled
binaries land in Triton's cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``), so a rerun
only re-inspects them. Details: ``python -m rfsq_kernels.gpucheck --help``.
"""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton.backends.nvidia.compiler")


def test_every_specialization_compiles_for_real_gpus():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "rfsq_kernels.gpucheck"], env=env,
                          capture_output=True, text=True, timeout=1800)
    report = proc.stdout + proc.stderr
    print(report)
    assert proc.returncode == 0, report[-20000:]


def test_coverage_expects_only_the_kernels_a_strategy_filter_reaches():
    """``--strategy layernorm`` compiles no vq or elementwise case, so the coverage check must not
    ask for those kernels; without a filter it asks for every kernel, the split forward included."""
    from rfsq_kernels.gpucheck.check import check
    filtered = "\n".join(check([], [], [90], strategies=["layernorm"]))
    assert "_fwd_layernorm_split_kernel" in filtered and "_bwd_layernorm_kernel" in filtered
    assert "vq" not in filtered and "elementwise" not in filtered
    everything = "\n".join(check([], [], [90]))
    for kernel in ("_fwd_layernorm_split_kernel", "_fwd_elementwise", "_bwd_vq_fsq_kernel"):
        assert kernel in everything


def test_default_grid_reaches_the_split_layernorm_paths():
    """The default check compiles the split layernorm forward and backward wherever a user's
    shape would reach them: its cases larger than one tile (by the launchers' own tile policy)
    cover every channel tile, both index widths, every dtype and both sparse flags, in both
    directions, and the structural grid (sm_100's) has such cases too."""
    import math

    from rfsq_kernels.gpucheck import sweep
    from rfsq_kernels.kernels import config
    from rfsq_kernels.reference import index_dtype

    def split(case):
        c, s = len(case.levels), math.prod(case.shape[2:])
        int64 = case.shape[0] * c * s >= 2**31
        return (case.strategy == "layernorm" and
                not config.layernorm_tiles(c, s, case.direction, int64, case.mask or case.active_stages).one_tile)

    for direction in sweep.DIRECTIONS:
        cases = [c for c in sweep.default_cases() if c.direction == direction and split(c)]
        assert {config.next_pow2(len(c.levels)) for c in cases} == {1, 2, 4, 8, 16}, direction
        assert {index_dtype(c.levels) for c in cases} == {torch.int32, torch.int64}, direction
        assert {c.dtype for c in cases} == {torch.float32, torch.bfloat16, torch.float16}, direction
        assert {(c.mask, c.active_stages) for c in cases} == {(True, True), (True, False), (False, True),
                                                              (False, False)}, direction
        assert any(split(c) for c in sweep.structure_cases() if c.direction == direction), direction
def test_default_grid_holds_the_grouped_vq_launch():
    """GroupedResidualFSQ's one launch reads channel slices (position stride G*C, another
    specialization than an ungrouped call's): the default and the structural grids compile it in
    both directions, with and without per-sample stage counts."""
    from rfsq_kernels.gpucheck import sweep
    grouped = [c for c in sweep.default_cases() if c.groups > 1]
    assert {c.direction for c in grouped} == {"forward", "backward"}
    assert all(c.strategy == sweep.VQ_RFSQ and not c.mask for c in grouped)
    assert {c.active_stages for c in grouped} == {True, False}
    assert any(c.groups > 1 for c in sweep.structure_cases())


def test_quick_grid_holds_grouped_vq_launches():
    """``--quick --strategy vq_rfsq`` compiles the grouped launch too, so the vq kernels' GROUPED
    takes both values there (the quick check asks every boolean constexpr for both); grids
    without the vq family get no grouped case."""
    from rfsq_kernels.gpucheck import sweep
    cases = sweep.quick_cases([sweep.VQ_RFSQ])
    grouped = [c for c in cases if c.groups > 1]
    assert {c.direction for c in grouped} == {"forward", "backward"}
    assert any(c.groups == 1 for c in cases) and not any(c.mask for c in grouped)
    assert {c.active_stages for c in grouped} == {True, False} and {c.dtype for c in grouped} > {torch.float32}
    assert not any(c.groups > 1 for c in sweep.quick_cases())
