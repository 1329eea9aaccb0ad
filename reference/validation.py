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
    if not 3 <= z.ndim <= 5:
        raise ValueError(
            f"{name} must be channel-first (B, C, *spatial) with 1 to 3 spatial dims "
            f"(rank 3, 4 or 5), got shape {tuple(z.shape)}"
        )
    if z.shape[1] != channels:
        raise ValueError(
            f"{name} has {z.shape[1]} channels (dim 1 of shape {tuple(z.shape)}) but the quantizer "
            f"expects {channels} (one per entry of levels)"
        )


#: The float32 range in which a positive constant is usable: normal numbers only (a subnormal or an
#: underflow to 0 would be flushed / divide by zero on the device; above the max it is inf).
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # 1.1754944e-38
FLOAT32_MAX = float(np.finfo(np.float32).max)  # 3.4028235e+38
#: Smallest ``initial_scale``. Un-conditioning multiplies by ``1/a`` (docs/semantics.md, "Arithmetic
#: contract"), whose derivative ``-1/a**2`` overflows float32 below about 5e-20: the scale's gradient
#: would be inf, or NaN where every code is 0. 1e-18 keeps ``1/a**2 <= 1e36``.
MIN_INITIAL_SCALE = 1e-18


def check_positive_float32(value: float, name: str, meaning: str, low: float = FLOAT32_TINY) -> float:
    """Return ``value`` as a float if it is a real number in ``[low, FLOAT32_MAX]`` (by default the normal
    positive float32 numbers, about [1.2e-38, 3.4e38]); raise naming ``name``, what it is (``meaning``)
    and the range otherwise. ``1e-50`` is > 0 in Python but 0 in float32, in which the math runs."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number > 0, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0 ({meaning}), got {value!r}")
    if not low <= v <= FLOAT32_MAX:
        with np.errstate(over="ignore", under="ignore"):
            as32 = float(np.float32(v))
        raise ValueError(f"{name}={value!r} must lie in [{low:.8g}, {FLOAT32_MAX:.8g}] ({meaning}): it is used in "
                         f"float32, where it would be {as32!r}" + (" (a subnormal)" if 0 < as32 < FLOAT32_TINY else ""))
    return v


def check_eps(eps: float, name: str = "eps") -> float:
    """Return ``eps`` as a float if it is a number > 0 that float32 holds as a normal number; raise
    otherwise (a negative or zero layernorm epsilon turns ``sqrt(var + eps)`` into NaN for constant
    channels)."""
    return check_positive_float32(eps, name, "the layernorm variance epsilon")


def check_initial_scale(initial_scale: float, name: str = "initial_scale") -> float:
    """Return ``initial_scale`` as a float if ``a = softplus(p)`` can start at it in float32 (a normal
    positive float32 number); raise naming the range otherwise."""
    return check_positive_float32(initial_scale, name, "the 'scale' strategy's starting a_k = softplus(p_k)",
                                  low=MIN_INITIAL_SCALE)


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


def check_side_values(side: torch.Tensor) -> None:
    """Reject layernorm side information ``(B, K, 2, C)`` that no encoder produces: a non-finite mean or
    std, or a std <= 0 (``encode`` gives ``std = sqrt(var + eps) > 0``), as a corrupted bitstream would
    (one reduction and one host sync, on the decode path only)."""
    if side.numel() == 0:
        return
    mean, std = side[:, :, 0], side[:, :, 1]
    ok = torch.stack([torch.isfinite(mean).all(), torch.isfinite(std).all(), ~(std <= 0).any()]).tolist()
    if not all(ok):
        what = [w for w, good in zip(("a non-finite mean (side[:, :, 0])", "a non-finite std (side[:, :, 1])",
                                      "a std <= 0 (side[:, :, 1])"), ok) if not good]
        raise ValueError(f"side holds {' and '.join(what)}: encode always gives a finite mean and a std > 0, so "
                         f"this side information is corrupted (or comes from a diverged model whose statistics "
                         f"overflowed float32)")
