"""``scale``: a learnable scale per stage, ``q_k = FSQ(a_k r_k) / a_k`` with ``a_k = softplus(p_k)``."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..fsq import fsq_quantize
from .registry import StrategyDefinition
from .table import ELEMENTWISE, ParamGroup, ParamRole, ParamSpec, StageContext, Strategy

#: ``p_k`` with ``a_k = softplus(p_k) > 0``; starts at ``softplus^-1(initial_scale)``.
SOFTPLUS_SCALE = "softplus_scale"


def stage_scales(scale_param: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``a_k = softplus(p_k)`` for every stage, as the reference, decode and the fused op all
    compute it: in float64, rounded once to ``dtype``.

    softplus is a transcendental that PyTorch rounds differently on different paths (on the CPU
    its vectorized and scalar loops disagree in the last float32 bit for about 1 value in 8;
    CUDA's differs again). In float64 those differences sit about 2**-29 float32 steps apart,
    so the rounded ``a_k`` agrees on every path and device unless the float64 value falls that
    close to a float32 rounding midpoint (about 1 parameter value in 2**28; docs/semantics.md,
    "Arithmetic contract")."""
    return F.softplus(scale_param.double()).to(dtype)


def scale_param_init(initial_scale: float) -> float:
    """The float32 ``p`` with ``softplus(p) == initial_scale`` exactly (docs/semantics.md: ``log(expm1(s))``).

    ``log(expm1(s))`` rounded to float32 can miss ``s`` by one ulp after softplus; the nearest
    float32 neighbours are searched for one that hits it exactly.
    """
    if not (initial_scale > 0 and math.isfinite(initial_scale)):
        raise ValueError(f"initial_scale must be a positive finite number, got {initial_scale}")
    target = torch.tensor(initial_scale, dtype=torch.float32)
    # log(expm1(s)) = s + log1p(-exp(-s)) for large s: the same value without expm1's overflow past s = 709
    s = initial_scale
    first = torch.tensor(math.log(math.expm1(s)) if s < 20 else s + math.log1p(-math.exp(-s)), dtype=torch.float32)
    p = first
    for _ in range(8):
        a = stage_scales(p)
        if a == target:
            return p.item()
        p = torch.nextafter(p, torch.tensor(float("inf")) if a < target else torch.tensor(float("-inf")))
    return first.item()  # no float32 within 8 ulp hits it exactly: the rounded formula


def stage_math(r, k: int, params: ParamGroup, ctx: StageContext):
    """Reference forward of stage k: ``FSQ(a_k r_k) * (1 / a_k)``."""
    (scale_param,) = params
    a = stage_scales(scale_param, ctx.compute_dtype)[k]
    codes, digits = fsq_quantize(a * r, ctx.levels, ctx.compute_dtype, ctx.fsq_shift)
    # Un-conditioning multiplies by the reciprocal (one IEEE division per stage, not per element):
    # the fused kernels compute exactly this (docs/semantics.md, "Arithmetic contract").
    return codes * torch.reciprocal(a), digits, None


def decode_math(codes, k: int, params: ParamGroup, mean, std):
    """Reference decode of stage k: the same float32 operations as :func:`stage_math`."""
    (scale_param,) = params
    return codes * torch.reciprocal(stage_scales(scale_param)[k])


STRATEGY = StrategyDefinition(
    row=Strategy("scale", (ParamSpec("scale_param", False, SOFTPLUS_SCALE),), per_image_stats=False,
                 kernel_family=ELEMENTWISE,
                 summary="learnable scale per stage: q_k = FSQ(a_k r_k) / a_k, a_k = softplus(p_k)"),
    stage_math=stage_math,
    decode_math=decode_math,
    # a_k stays positive by construction; around the default p = softplus^-1(1) it lies within
    # about [0.6, 1.5] at one sigma
    roles={SOFTPLUS_SCALE: ParamRole(lambda initial_scale: scale_param_init(initial_scale), lambda p: stage_scales(p),
                                     draw=lambda base, gen: base + 0.3 * torch.randn(base.shape, generator=gen))},
    kernel_stage="rfsq_kernels.kernels.elementwise:SCALE_STAGE",
)
