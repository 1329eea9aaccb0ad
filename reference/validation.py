"""Input checks shared by the reference and the fused path: every error names the argument."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import numpy as np
import torch


def check_stages(stages: int) -> int:
    """Return ``stages`` if it is an int >= 1; raise otherwise."""
    if isinstance(stages, bool) or not isinstance(stages, int):
        raise TypeError(f"stages must be an int >= 1, got {stages!r}")
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    return stages


def check_latent(z: torch.Tensor, channels: int, name: str = "z") -> None:
    """Check a channel-first latent ``(B, C, *spatial)`` with ``C == channels`` and a float dtype."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
    if not z.dtype.is_floating_point or z.is_complex():
        raise TypeError(
            f"{name} must be a real floating-point tensor (float32, bfloat16, float16 or float64), "
            f"got dtype {z.dtype}"
        )
    if z.ndim < 3:
        raise ValueError(
            f"{name} must be channel-first (B, C, *spatial) with at least one spatial dim "
            f"(rank 3, 4 or 5), got shape {tuple(z.shape)}"
        )
    if z.shape[1] != channels:
        raise ValueError(
            f"{name} has {z.shape[1]} channels (dim 1 of shape {tuple(z.shape)}) but the quantizer "
            f"expects {channels} (one per entry of levels)"
        )


def check_eps(eps: float, name: str = "eps") -> float:
    """Return ``eps`` as a float if it is a finite real number > 0; raise otherwise (a negative or zero
    layernorm epsilon turns ``sqrt(var + eps)`` into NaN for constant channels)."""
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{name} must be a finite number > 0, got {eps!r}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{name} must be a finite number > 0 (the layernorm variance epsilon), got {eps!r}")
    return float(eps)


def check_indices(
    indices: torch.Tensor,
    codebook_size: int,
    stages: Optional[int] = None,
    name: str = "indices",
    allow_sentinel: bool = False,
) -> None:
    """Check codes handed to a decoder: an integer tensor whose values lie in ``[0, codebook_size - 1]``
    and, when ``stages`` is given, of shape ``(B, *spatial, K=stages)`` with 1 to 3 spatial dims.

    ``allow_sentinel`` also accepts ``-1`` (reserved for "no code": stages dropped or positions masked).
    The range check is one fused min/max reduction, and only decoders call it (never the forward pass).
    """
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor, got {type(indices).__name__}")
    if indices.dtype.is_floating_point or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {indices.dtype}")
    if stages is not None and not (3 <= indices.ndim <= 5 and indices.shape[-1] == stages):
        raise ValueError(f"{name} must have shape (B, *spatial, K={stages}) with 1 to 3 spatial dims (as returned "
                         f"by encode/forward), got {tuple(indices.shape)}")
    if indices.numel() == 0:
        return
    low = -1 if allow_sentinel else 0
    lo, hi = torch.aminmax(indices)
    lo, hi = (int(v) for v in torch.stack([lo, hi]).tolist())
    if lo < low or hi >= codebook_size:
        sentinel = f" (or [-1, {codebook_size - 1}]: -1 marks a dropped stage / masked position)" if allow_sentinel else ""
        raise ValueError(f"{name} must lie in [0, {codebook_size - 1}]{sentinel} (codebook_size = {codebook_size} codes "
                         f"per stage), got values in [{lo}, {hi}]: corrupted or produced by another quantizer?")


def check_side(side: Optional[torch.Tensor], expected: Tuple[int, ...], required: bool) -> None:
    """Check the side information of a decode: ``None`` (allowed unless ``required``) or a float tensor
    of shape ``expected`` = ``(B, K, 2, C)`` as returned by ``encode`` (``C = 0`` when there are no
    statistics)."""
    if side is None:
        if required:
            raise ValueError(f"side must be the (B, K, 2, C) = {expected} statistics returned by encode, got None")
        return
    if not isinstance(side, torch.Tensor) or not side.dtype.is_floating_point:
        raise TypeError(f"side must be a float tensor (B, K, 2, C) = {expected} as returned by encode, got "
                        f"{getattr(side, 'dtype', type(side).__name__)}")
    if tuple(side.shape) != tuple(expected):
        raise ValueError(f"side must be the (B, K, 2, C) = {expected} statistics returned by encode (B must match "
                         f"indices), got {tuple(side.shape)}")
