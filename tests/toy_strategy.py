"""A toy conditioning strategy, registered at run time: proof that a strategy is one module.

``toy_offset`` has one parameter with a role the built-in table does not have, a per-stage
``offset`` ``o_k`` ``(K,)`` added before FSQ and removed after::

    q_k = FSQ(r_k + o_k) - o_k,    dq_k/dr_k = dcode/du,    dL/do_k = sum v_k (dcode/du - 1)

:data:`STRATEGY` declares all of it (row, role with its test distribution, stage math, decode
math, kernel stage); ``tests/kernels/test_toy_strategy.py`` registers it for a test with
``registered_strategy(STRATEGY)`` and ``python -m rfsq_kernels.gpucheck --plugin
tests/toy_strategy.py --strategy toy_offset --quick`` registers it in its workers. The oracle's
float64 stage (:func:`oracle_stage`) goes into ``numpy_rfsq.ORACLE_STAGES``, which lives in the
tests, so the test registers it itself.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rfsq_kernels.kernels.elementwise import ElementwiseStage
from rfsq_kernels.kernels.fsq_math import fsq_code
from rfsq_kernels.reference import ParamRole, ParamSpec, Strategy, StrategyDefinition
from rfsq_kernels.reference.fsq import fsq_quantize
from rfsq_kernels.reference.strategies import ELEMENTWISE

NAME = "toy_offset"
OFFSET = "offset"  # the new parameter role: added before FSQ, removed after; starts at 0



def stage_math(r, k, params, ctx):
    """Reference forward of stage k (``reference.strategies.table.StageMath`` contract)."""
    (offset,) = params
    o = offset[k].to(ctx.compute_dtype)
    codes, digits = fsq_quantize(r + o, ctx.levels, ctx.compute_dtype)
    return codes - o, digits, None


def decode_math(codes, k, params, mean, std):
    """Reference decode of stage k: the same float32 operations as :func:`stage_math`."""
    (offset,) = params
    return codes - offset[k].float()


def oracle_stage(r, k, params, levels, eps):
    """Float64 oracle of stage k (``numpy_rfsq.ORACLE_STAGES`` contract), written from the
    formula, independent of the package."""
    from numpy_rfsq import fsq_np
    o = float(params["offset"][k])
    codes, digits, dist = fsq_np((r + o)[None], levels)
    return codes[0] - o, digits, dist


@triton.jit
def offset_stage(r, k, param_ptrs, chan, fsq, USE_LIBDEVICE: tl.constexpr):
    """Kernel forward of stage k (``elementwise.ElementwiseStage.forward`` contract)."""
    (offset_ptr,) = param_ptrs
    o = tl.load(offset_ptr + k).to(tl.float32)
    code, t, rounded = fsq_code(r + o, fsq, USE_LIBDEVICE)
    return code - o, t, rounded, o


@triton.jit
def offset_grads_init(BLOCK_S: tl.constexpr):
    """One stage's ``[BLOCK_S]`` sum of ``dL/do`` terms starts as 0."""
    return tl.zeros([BLOCK_S], dtype=tl.float32)


@triton.jit
def offset_vjp(v, r, q, dcode, o, k):
    """Kernel backward of stage k: ``dq/dr = dcode/du``; the term of ``dL/do_k = sum v (dcode/du - 1)``."""
    return dcode, v * (dcode - 1.0)


@triton.jit
def offset_grads_store(parts, stage_params, dparam_part_ptrs, pid, K: tl.constexpr, valid):
    """Row ``pid`` of the ``(programs, K)`` partials of ``dL/do``."""
    (doffset_part_ptr,) = dparam_part_ptrs
    for k in tl.static_range(K):
        tl.store(doffset_part_ptr + pid * K + k, tl.sum(tl.where(valid, parts[k], 0.0), axis=0))


STRATEGY = StrategyDefinition(
    row=Strategy(NAME, (ParamSpec("offset", False, OFFSET),), per_image_stats=False, kernel_family=ELEMENTWISE,
                 summary="per-stage offset: q_k = FSQ(r_k + o_k) - o_k"),
    stage_math=stage_math,
    decode_math=decode_math,
    roles={OFFSET: ParamRole(initial=lambda _initial_scale: 0.0,
                             draw=lambda base, gen: base + 0.3 * torch.randn(base.shape, generator=gen))},
    kernel_stage=ElementwiseStage(offset_stage, offset_grads_init, offset_vjp, offset_grads_store),
)
