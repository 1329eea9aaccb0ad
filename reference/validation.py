"""Input checks shared by the reference and the fused path: every error names the argument."""
from __future__ import annotations

import torch

STRATEGIES = ("none", "scale", "layernorm")


def check_strategy(strategy: str) -> str:
    """Return ``strategy`` if it is one of ``none``, ``scale``, ``layernorm``; raise otherwise."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return strategy


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
