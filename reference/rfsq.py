"""Robust Residual FSQ, the pure-PyTorch ground truth (docs/semantics.md): the functional core.

Stage k conditions the residual ``r_k`` (its strategy's stage math, ``reference/strategies/``),
rounds it with FSQ, maps the code back, and subtracts it:
``r_{k+1} = r_k - q_k``. The chain is not detached, so gradients flow through every stage.
:func:`rfsq_forward` runs the K stages, :func:`rfsq_decode_stages` maps stored indices back; the
``nn.Module`` around them is :mod:`.rfsq_module`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .codebook import (
    check_fsq_shift,
    check_levels,
    digits_to_codes,
    digits_to_indices,
    index_dtype,
    indices_to_digits,
)
from .dropout import stage_keep, valid_count
from .sentinel import SENTINEL, split_sentinel
# The per-strategy pieces come from the strategy modules' registration (reference/strategies/);
# STAGE_MATH, DECODE_MATH and StageContext are importable from here too.
from .strategies import DECODE_MATH, STAGE_MATH, ParamGroup, StageContext, get_strategy  # noqa: F401
from .validation import check_call_tensors, check_eps, check_stages


def _spatial_dims(ndim: int) -> Tuple[int, ...]:
    return tuple(range(2, ndim))


def rfsq_forward(
    z: torch.Tensor,
    levels: Sequence[int],
    stages: int,
    strategy: str,
    *,
    eps: float = 1e-5,
    compute_dtype: torch.dtype = torch.float32,
    mask: Optional[torch.Tensor] = None,
    active_stages: Optional[torch.Tensor] = None,
    fsq_shift: str = "atanh",
    **params: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The K-stage RFSQ loop; returns ``(quantized, indices, mean, std)``.

    - ``quantized``: ``sum_k q_k`` in ``z``'s dtype (math in ``compute_dtype``, float32 by default);
    - ``indices``: ``(B, *spatial, K)``, int32 (int64 when ``prod(levels) >= 2**31``);
    - ``mean``/``std``: ``(B, K, C)`` float32 LN statistics (detached) for ``layernorm``, else
      empty tensors of shape ``(0,)``.

    ``params``: the strategy's parameters by name (its table row, e.g. ``RFSQ.strategy_parameters()``):
    ``scale_param`` ``(K,)`` (``a_k = softplus(p_k)``) for ``'scale'``; ``ln_weight``/``ln_bias``
    ``(K, C)`` for ``'layernorm'``. Everything after ``strategy`` is keyword-only.

    ``mask`` (optional, ``(B, *spatial)`` bool, True = valid): padded positions are ignored — their
    input is never read into the math (NaN padding is harmless), their output is 0, their index
    is the sentinel -1 in every stage and their gradient is 0; the layernorm statistics are taken
    over the valid positions only (biased variance over ``n_b`` valid positions), so a sample's
    result does not depend on its padding. An all-masked sample has mean 0 and ``std = sqrt(eps)``.

    ``active_stages`` (optional, ``(B,)`` integer): sample ``b`` runs stages ``k < k_b`` only
    (quantize dropout); for ``k >= k_b`` its ``q_k`` is 0, its indices are -1, its residual is
    unchanged and its layernorm side information is ``(mean 0, std 1)``.

    ``fsq_shift``: the FSQ shift, ``'atanh'`` (default) or ``'tan'`` (the official RFSQ code's).
    """
    levels, eps = check_levels(levels), check_eps(eps)
    fsq_shift = check_fsq_shift(fsq_shift)
    spec = get_strategy(strategy)
    group = spec.bind(params)
    check_call_tensors(z, levels, check_stages(stages), spec, group, mask, active_stages)
    nd = z.ndim
    dims = _spatial_dims(nd)
    if z.shape[0] == 0 or z[0, 0].numel() == 0:
        return _empty_result(z, levels, stages, strategy)
    residual = z.to(compute_dtype)
    valid = count = None
    if mask is not None:
        valid = mask.unsqueeze(1)
        residual = torch.where(valid, residual, torch.zeros((), dtype=compute_dtype, device=z.device))
        count = valid_count(mask, compute_dtype).view(-1, *([1] * (nd - 1)))
    quantized = torch.zeros_like(residual)
    stage_math = STAGE_MATH[spec.name]
    ctx = StageContext(levels, compute_dtype, eps, dims, valid, count, fsq_shift)
    indices, means, stds = [], [], []
    for k in range(stages):
        keep = stage_keep(valid, active_stages, k, nd)
        q, digits, stats = stage_math(residual, k, group, ctx)
        if spec.per_image_stats:
            mu, sd = stats
            if active_stages is not None:  # a dropped stage stores the neutral (0, 1)
                on = (active_stages.to(torch.int64) > k).view(-1, 1)
                mu, sd = torch.where(on, mu, 0.0), torch.where(on, sd, 1.0)
            means.append(mu)
            stds.append(sd)
        index = digits_to_indices(digits, levels)
        if keep is not None:
            q = torch.where(keep, q, torch.zeros((), dtype=q.dtype, device=q.device))
            index = torch.where(keep.squeeze(1), index, torch.full((), SENTINEL, dtype=index.dtype, device=index.device))
        quantized = quantized + q
        residual = residual - q
        indices.append(index)
    idx = torch.stack(indices, dim=-1) if indices else z.new_zeros((0,), dtype=index_dtype(levels))
    if spec.per_image_stats:
        mean, std = torch.stack(means, dim=1), torch.stack(stds, dim=1)
    else:
        mean = std = torch.zeros((0,), dtype=torch.float32, device=z.device)
    return quantized.to(z.dtype), idx, mean, std


def _empty_result(z, levels, stages, strategy):
    """Outputs of the right shapes for a zero-size batch (or zero spatial extent)."""
    idx = torch.zeros((z.shape[0], *z.shape[2:], stages), dtype=index_dtype(levels), device=z.device)
    if get_strategy(strategy).per_image_stats:
        mean = std = torch.zeros((z.shape[0], stages, z.shape[1]), dtype=torch.float32, device=z.device)
    else:
        mean = std = torch.zeros((0,), dtype=torch.float32, device=z.device)
    return z * 0, idx, mean, std


def rfsq_decode_stages(
    indices: torch.Tensor,
    levels: Sequence[int],
    strategy: str,
    *,
    mean: Optional[torch.Tensor] = None,
    std: Optional[torch.Tensor] = None,
    **params: torch.Tensor,
) -> List[torch.Tensor]:
    """Per-stage float32 reconstructions ``q_k`` ``(B, C, *spatial)`` from indices ``(B, *spatial, K)``.

    Uses the same float32 operations in the same order as :func:`rfsq_forward`, so
    ``sum(rfsq_decode_stages(...))`` reproduces the forward output bit for bit.

    ``indices`` may hold the first ``K' <= K`` stages only (``indices[..., :k]``, with
    ``mean[:, :k]``/``std[:, :k]``): that decodes the k-stage reconstruction. The sentinel -1
    (dropped stage, masked position) decodes to 0 (see :mod:`.sentinel`). ``params``: the
    strategy's parameters by name, as for :func:`rfsq_forward`. ``mean``/``std`` must be float32
    (as the forward returns them): other dtypes would change the arithmetic, so they are refused.
    Indices of any integer dtype are read exactly (:func:`.sentinel.split_sentinel`).
    """
    levels = check_levels(levels)
    for name, t in (("mean", mean), ("std", std)):
        if t is not None and t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, the forward's statistics, got {t.dtype}: decode reproduces the "
                            f"forward only in float32 (RFSQ.decode accepts a lossless float64 side)")
    stages = indices.shape[-1]
    spec = get_strategy(strategy)
    decode = DECODE_MATH[spec.name]
    group = spec.bind(params)
    out = []
    for k in range(stages):
        present, clean = split_sentinel(indices[..., k])
        codes = digits_to_codes(indices_to_digits(clean, levels), levels)
        q = decode(codes, k, group, mean, std)
        out.append(torch.where(present.unsqueeze(1), q, torch.zeros((), dtype=q.dtype, device=q.device)))
    return out
