"""Robust Residual FSQ, the pure-PyTorch ground truth (SPEC: "RFSQ").

Stage k conditions the residual ``r_k`` (nothing / learnable scale / invertible per-channel
normalization), rounds it with FSQ, maps the code back, and subtracts it:
``r_{k+1} = r_k - q_k``. The chain is not detached, so gradients flow through every stage.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .codebook import (
    LevelsMixin,
    check_levels,
    default_levels,
    digits_to_codes,
    digits_to_indices,
    index_dtype,
    indices_to_digits,
)
from .fsq import fsq_quantize
from .validation import check_eps, check_indices, check_latent, check_side, check_stages, check_strategy


def scale_param_init(initial_scale: float) -> float:
    """The float32 ``p`` with ``softplus(p) == initial_scale`` exactly (SPEC: ``log(expm1(s))``).

    ``log(expm1(s))`` rounded to float32 can miss ``s`` by one ulp after softplus; the nearest
    float32 neighbours are searched for one that hits it exactly.
    """
    if not (initial_scale > 0 and math.isfinite(initial_scale)):
        raise ValueError(f"initial_scale must be a positive finite number, got {initial_scale}")
    target = torch.tensor(initial_scale, dtype=torch.float32)
    p = torch.tensor(math.log(math.expm1(initial_scale)), dtype=torch.float32)
    best = p
    for _ in range(8):
        a = F.softplus(p)
        if a == target:
            return p.item()
        p = torch.nextafter(p, torch.tensor(float("inf")) if a < target else torch.tensor(float("-inf")))
    return best.item()


def _spatial_dims(ndim: int) -> Tuple[int, ...]:
    return tuple(range(2, ndim))


def _per_channel(t: torch.Tensor, k: int, ndim: int) -> torch.Tensor:
    """Row ``k`` of a ``(K, C)`` parameter as a ``(1, C, 1, ...)`` view."""
    return t[k].view(1, -1, *([1] * (ndim - 2)))


def rfsq_forward(
    z: torch.Tensor,
    levels: Sequence[int],
    stages: int,
    strategy: str,
    scale_param: Optional[torch.Tensor] = None,
    ln_weight: Optional[torch.Tensor] = None,
    ln_bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    compute_dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The K-stage RFSQ loop; returns ``(quantized, indices, mean, std)``.

    - ``quantized``: ``sum_k q_k`` in ``z``'s dtype (math in ``compute_dtype``, float32 by default);
    - ``indices``: ``(B, *spatial, K)``, int32 (int64 when ``prod(levels) >= 2**31``);
    - ``mean``/``std``: ``(B, K, C)`` float32 LN statistics (detached) for ``layernorm``, else
      empty tensors of shape ``(0,)``.

    ``scale_param`` is ``(K,)`` (``a_k = softplus(p_k)``); ``ln_weight``/``ln_bias`` are ``(K, C)``.
    """
    nd = z.ndim
    dims = _spatial_dims(nd)
    if z.shape[0] == 0 or z[0, 0].numel() == 0:
        return _empty_result(z, levels, stages, strategy)
    residual = z.to(compute_dtype)
    quantized = torch.zeros_like(residual)
    indices, means, stds = [], [], []
    for k in range(stages):
        if strategy == "none":
            codes, digits = fsq_quantize(residual, levels, compute_dtype)
            q = codes
        elif strategy == "scale":
            a = F.softplus(scale_param[k].to(compute_dtype))
            codes, digits = fsq_quantize(a * residual, levels, compute_dtype)
            q = codes / a
        elif strategy == "layernorm":
            var, mu = torch.var_mean(residual, dim=dims, correction=0, keepdim=True)
            sd = torch.sqrt(var + eps)
            w = _per_channel(ln_weight, k, nd).to(compute_dtype)
            b = _per_channel(ln_bias, k, nd).to(compute_dtype)
            normed = w * (residual - mu) / sd + b
            codes, digits = fsq_quantize(normed, levels, compute_dtype)
            q = ((codes - b) / w) * sd + mu
            means.append(mu.detach().flatten(1).float())
            stds.append(sd.detach().flatten(1).float())
        else:
            raise ValueError(f"strategy must be one of ('none', 'scale', 'layernorm'), got {strategy!r}")
        quantized = quantized + q
        residual = residual - q
        indices.append(digits_to_indices(digits, levels))
    idx = torch.stack(indices, dim=-1) if indices else z.new_zeros((0,), dtype=index_dtype(levels))
    if strategy == "layernorm":
        mean, std = torch.stack(means, dim=1), torch.stack(stds, dim=1)
    else:
        mean = std = torch.zeros((0,), dtype=torch.float32, device=z.device)
    return quantized.to(z.dtype), idx, mean, std


def _empty_result(z, levels, stages, strategy):
    """Outputs of the right shapes for a zero-size batch (or zero spatial extent)."""
    idx = torch.zeros((z.shape[0], *z.shape[2:], stages), dtype=index_dtype(levels), device=z.device)
    if strategy == "layernorm":
        mean = std = torch.zeros((z.shape[0], stages, z.shape[1]), dtype=torch.float32, device=z.device)
    else:
        mean = std = torch.zeros((0,), dtype=torch.float32, device=z.device)
    return z * 0, idx, mean, std


def rfsq_decode_stages(
    indices: torch.Tensor,
    levels: Sequence[int],
    strategy: str,
    scale_param: Optional[torch.Tensor] = None,
    ln_weight: Optional[torch.Tensor] = None,
    ln_bias: Optional[torch.Tensor] = None,
    mean: Optional[torch.Tensor] = None,
    std: Optional[torch.Tensor] = None,
) -> List[torch.Tensor]:
    """Per-stage float32 reconstructions ``q_k`` ``(B, C, *spatial)`` from indices ``(B, *spatial, K)``.

    Uses the same float32 operations in the same order as :func:`rfsq_forward`, so
    ``sum(rfsq_decode_stages(...))`` reproduces the forward output bit for bit.
    """
    stages = indices.shape[-1]
    out = []
    for k in range(stages):
        codes = digits_to_codes(indices_to_digits(indices[..., k], levels), levels)
        nd = codes.ndim
        if strategy == "none":
            q = codes
        elif strategy == "scale":
            q = codes / F.softplus(scale_param[k].float())
        else:
            shape = (codes.shape[0], codes.shape[1]) + (1,) * (nd - 2)
            mu = mean[:, k].reshape(shape)
            sd = std[:, k].reshape(shape)
            w = _per_channel(ln_weight, k, nd).float()
            b = _per_channel(ln_bias, k, nd).float()
            q = ((codes - b) / w) * sd + mu
        out.append(q)
    return out


class RFSQ(LevelsMixin, nn.Module):
    """Pure-PyTorch RFSQ module (the reference). ``forward(z) -> (quantized, indices)``.

    Args:
        stages: number of residual stages K (>= 1).
        strategy: ``'none'``, ``'scale'`` or ``'layernorm'``.
        levels: FSQ levels per channel; default ``[8,8,8,4]`` for 2 stages and ``[4,4,4,4,4]`` for 4.
        initial_scale: ``'scale'`` strategy: ``softplus(p_k)`` starts at exactly this value.
        eps: variance epsilon of the ``'layernorm'`` strategy, a finite number > 0.

    Range of the ``'layernorm'`` statistics: they are computed in float32, so the per-image, per-channel
    variance over the spatial positions overflows once it passes float32's max (3.4e38). This reference
    keeps them finite for every latent with ``|z| <= 1.8e19``; the fused kernels sum squared deviations,
    which holds for ``|z| <= 9.2e18 / sqrt(N)`` (N spatial positions per image, 2.9e17 at 32x32).
    Beyond that the channel's statistics become inf and its outputs NaN; indices stay in range.
    ``decode``/``decode_stages``/``indices_to_codes`` reject indices outside ``[0, codebook_size)``
    and a wrong stages dim with a ``ValueError``.

    Parameters: ``scale_param`` ``(K,)`` for ``'scale'``; ``ln_weight``/``ln_bias`` ``(K, C)`` for
    ``'layernorm'``; none for ``'none'``.
    """

    def __init__(
        self,
        stages: int = 2,
        strategy: str = "layernorm",
        levels: Optional[Sequence[int]] = None,
        initial_scale: float = 1.0,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.stages = check_stages(stages)
        self.strategy = check_strategy(strategy)
        self.levels = check_levels(levels) if levels is not None else default_levels(stages)
        self.initial_scale = float(initial_scale)
        self.eps = check_eps(eps)
        channels = len(self.levels)
        if strategy == "scale":
            p = scale_param_init(self.initial_scale)
            self.scale_param = nn.Parameter(torch.full((stages,), p, dtype=torch.float32))
        elif strategy == "layernorm":
            self.ln_weight = nn.Parameter(torch.ones(stages, channels))
            self.ln_bias = nn.Parameter(torch.zeros(stages, channels))

    # -- properties -------------------------------------------------------------------------
    @property
    def bits_per_token(self) -> float:
        """K * log2(prod(levels)) bits per spatial position."""
        return self.stages * math.log2(self.codebook_size)

    @property
    def scales(self) -> Optional[torch.Tensor]:
        """``a_k = softplus(p_k)`` for the ``'scale'`` strategy, else None."""
        return F.softplus(self.scale_param) if self.strategy == "scale" else None

    def _params(self):
        return (
            getattr(self, "scale_param", None),
            getattr(self, "ln_weight", None),
            getattr(self, "ln_bias", None),
        )

    # -- forward / codec --------------------------------------------------------------------
    def quantize(self, z: torch.Tensor):
        """Full result ``(quantized, indices, mean, std)``; see :func:`rfsq_forward`."""
        check_latent(z, self.num_channels)
        return rfsq_forward(z, self.levels, self.stages, self.strategy, *self._params(), eps=self.eps)

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        quantized, indices, _, _ = self.quantize(z)
        return quantized, indices

    def encode(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``z -> (indices, side)``. ``side`` is float32 ``(B, K, 2, C)`` holding the LN mean
        (``side[:, k, 0]``) and std (``side[:, k, 1]``) of every image, stage and channel — the
        ``2*C*K`` floats per image a codec must store; it is ``(B, K, 2, 0)`` (empty) otherwise."""
        with torch.no_grad():
            _, indices, mean, std = self.quantize(z)
        if self.strategy == "layernorm":
            side = torch.stack([mean, std], dim=2)
        else:
            side = torch.zeros((z.shape[0], self.stages, 2, 0), dtype=torch.float32, device=z.device)
        return indices, side

    def _check_codes(self, indices: torch.Tensor, side: Optional[torch.Tensor]) -> None:
        check_indices(indices, self.codebook_size, self.stages)
        channels = self.num_channels if self.strategy == "layernorm" else 0
        check_side(side, (indices.shape[0], self.stages, 2, channels), required=self.strategy == "layernorm")

    def decode_stages(self, indices: torch.Tensor, side: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """Per-stage float32 reconstructions ``[q_0, ..., q_{K-1}]`` from ``encode``'s output."""
        self._check_codes(indices, side)
        mean = std = None
        if self.strategy == "layernorm":
            mean, std = side[:, :, 0], side[:, :, 1]
        with torch.no_grad():
            return rfsq_decode_stages(indices, self.levels, self.strategy, *self._params(), mean=mean, std=std)

    def decode(
        self, indices: torch.Tensor, side: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """``(indices, side) -> quantized``; equals ``forward(z)[0]`` exactly (``dtype`` = z's dtype)."""
        stages = self.decode_stages(indices, side)
        total = torch.zeros_like(stages[0])
        for q in stages:
            total = total + q
        return total.to(dtype)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Normalized FSQ codes of every stage: ``(B, *spatial, K)`` -> ``(B, K, C, *spatial)``
        (the values in [-1, 1] before un-conditioning; needs no side information)."""
        check_indices(indices, self.codebook_size, self.stages)
        codes = [digits_to_codes(indices_to_digits(indices[..., k], self.levels), self.levels)
                 for k in range(indices.shape[-1])]
        return torch.stack(codes, dim=1)

    def extra_repr(self) -> str:
        return f"stages={self.stages}, strategy={self.strategy!r}, levels={list(self.levels)}"
