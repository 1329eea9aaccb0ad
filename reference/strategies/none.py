"""``none``: plain residual FSQ, ``q_k = FSQ(r_k)`` (no parameters)."""
from __future__ import annotations

from ..fsq import fsq_quantize
from .registry import StrategyDefinition
from .table import ELEMENTWISE, ParamGroup, StageContext, Strategy


def stage_math(r, k: int, params: ParamGroup, ctx: StageContext):
    """Reference forward of stage k: ``FSQ(r_k)``."""
    codes, digits = fsq_quantize(r, ctx.levels, ctx.compute_dtype, ctx.fsq_shift)
    return codes, digits, None


def decode_math(codes, k: int, params: ParamGroup, mean, std):
    """Reference decode of stage k: the codes themselves."""
    return codes


STRATEGY = StrategyDefinition(
    row=Strategy("none", (), per_image_stats=False, kernel_family=ELEMENTWISE,
                 summary="plain residual FSQ: q_k = FSQ(r_k)"),
    stage_math=stage_math,
    decode_math=decode_math,
    kernel_stage="rfsq_kernels.kernels.elementwise:NONE_STAGE",
)
