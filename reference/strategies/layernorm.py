"""``layernorm``: an invertible per-image, per-channel normalization over space with a learnable
affine ``(w_k, b_k)`` per stage and channel; its ``(B, K, C)`` mean/std are the side information."""
from __future__ import annotations

import torch

from ..fsq import fsq_quantize
from .registry import StrategyDefinition
from .table import LAYERNORM, ParamGroup, ParamRole, ParamSpec, StageContext, Strategy

GAIN = "gain"    # multiplies the normalized residual; starts at 1, must stay away from 0
SHIFT = "shift"  # added to the normalized residual; starts at 0


def _per_channel(t: torch.Tensor, k: int, ndim: int) -> torch.Tensor:
    """Row ``k`` of a ``(K, C)`` parameter as a ``(1, C, 1, ...)`` view."""
    return t[k].view(1, -1, *([1] * (ndim - 2)))


def stage_math(r, k: int, params: ParamGroup, ctx: StageContext):
    """Reference forward of stage k: normalize over space, affine, FSQ, and back."""
    ln_weight, ln_bias = params
    cdt, nd = ctx.compute_dtype, r.ndim
    if ctx.valid is None:
        var, mu = torch.var_mean(r, dim=ctx.dims, correction=0, keepdim=True)
    else:  # statistics over the valid positions only (the residual is 0 elsewhere)
        mu = r.sum(dim=ctx.dims, keepdim=True) / ctx.count
        centred = torch.where(ctx.valid, r - mu, torch.zeros((), dtype=cdt, device=r.device))
        var = (centred * centred).sum(dim=ctx.dims, keepdim=True) / ctx.count
    sd = torch.sqrt(var + ctx.eps)
    w = _per_channel(ln_weight, k, nd).to(cdt)
    b = _per_channel(ln_bias, k, nd).to(cdt)
    # Per-(image, channel) factors, divided once; every element is multiplied (docs/semantics.md,
    # "Arithmetic contract": the fused kernels and decode compute exactly these operations).
    w_sd, sd_w = w / sd, sd / w
    codes, digits = fsq_quantize((r - mu) * w_sd + b, ctx.levels, cdt, ctx.fsq_shift)
    q = (codes - b) * sd_w + mu
    return q, digits, (mu.detach().flatten(1).float(), sd.detach().flatten(1).float())


def decode_math(codes, k: int, params: ParamGroup, mean, std):
    """Reference decode of stage k from the stored statistics: the forward's float32 operations."""
    nd = codes.ndim
    shape = (codes.shape[0], codes.shape[1]) + (1,) * (nd - 2)
    mu, sd = mean[:, k].reshape(shape), std[:, k].reshape(shape)
    ln_weight, ln_bias = params
    w = _per_channel(ln_weight, k, nd).float()
    b = _per_channel(ln_bias, k, nd).float()
    return (codes - b) * (sd / w) + mu


STRATEGY = StrategyDefinition(
    row=Strategy("layernorm", (ParamSpec("ln_weight", True, GAIN), ParamSpec("ln_bias", True, SHIFT)),
                 per_image_stats=True, kernel_family=LAYERNORM,
                 summary="invertible per-image, per-channel normalization with affine (w_k, b_k)"),
    stage_math=stage_math,
    decode_math=decode_math,
    roles={
        # w * U(0.6, 1.4): bounded away from 0 (the inverse transform divides by it), sign kept
        GAIN: ParamRole(lambda _initial_scale: 1.0,
                        draw=lambda base, gen: base * (0.6 + 0.8 * torch.rand(base.shape, generator=gen))),
        SHIFT: ParamRole(lambda _initial_scale: 0.0,
                         draw=lambda base, gen: base + 0.2 * torch.randn(base.shape, generator=gen)),
    },
)
