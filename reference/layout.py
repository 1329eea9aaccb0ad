"""Channel-first / channel-last views and ``(B, C)`` inputs, without copying.

The quantizer math works on a channel-first ``(B, C, *spatial)`` tensor. A channel-last
``(B, *spatial, C)`` input becomes one by ``movedim`` (a view: the fused kernels read it in
place through its strides), and a ``(B, C)`` input by adding a spatial dim of size 1.
"""
from __future__ import annotations

from typing import Tuple

import torch

#: Highest input rank: (B, C, T, H, W). Decoders take indices (B, *spatial, K) of the same spatial ranks.
MAX_NDIM = 5


def check_input(z: torch.Tensor, channels: int, channel_first: bool, name: str = "z") -> None:
    """Raise unless ``z`` is a real float tensor ``(B, C)`` or ``(B, C, *spatial)``
    (``channel_first``) / ``(B, *spatial, C)`` with ``C == channels``."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
    if not z.dtype.is_floating_point or z.is_complex():
        raise TypeError(f"{name} must be a real floating-point tensor (float32, bfloat16, float16 or float64), "
                        f"got dtype {z.dtype}")
    layout = "channel-first (B, C, *spatial)" if channel_first else "channel-last (B, *spatial, C)"
    if not 2 <= z.ndim <= MAX_NDIM:
        raise ValueError(f"{name} must be (B, C) or {layout} with 1 to 3 spatial dims (rank 2 to {MAX_NDIM}: the "
                         f"ranks whose indices decode), got shape {tuple(z.shape)}")
    cdim = 1 if channel_first or z.ndim == 2 else z.ndim - 1
    if z.shape[cdim] != channels:
        raise ValueError(f"{name} has {z.shape[cdim]} channels (dim {cdim} of shape {tuple(z.shape)}, {layout}) "
                         f"but the quantizer expects {channels}")


def spatial_shape(z: torch.Tensor, channel_first: bool) -> Tuple[int, ...]:
    """The ``*spatial`` part of the user's tensor (``()`` for ``(B, C)``)."""
    if z.ndim == 2:
        return ()
    return tuple(z.shape[2:]) if channel_first else tuple(z.shape[1:-1])


def to_channel_last(z: torch.Tensor, channel_first: bool) -> torch.Tensor:
    """Channel-last view ``(B, *spatial, C)`` (or ``(B, C)``) of a tensor in the user's layout."""
    return z.movedim(1, -1) if channel_first and z.ndim > 2 else z


def from_channel_last(t: torch.Tensor, channel_first: bool) -> torch.Tensor:
    """Inverse of :func:`to_channel_last`."""
    return t.movedim(-1, 1) if channel_first and t.ndim > 2 else t


def last_to_first(t: torch.Tensor) -> torch.Tensor:
    """Channel-first view ``(B, C, *spatial)`` of a channel-last tensor; ``(B, C)`` -> ``(B, C, 1)``."""
    return t.unsqueeze(-1) if t.ndim == 2 else t.movedim(-1, 1)


def first_to_last(t: torch.Tensor, flat: bool) -> torch.Tensor:
    """Inverse of :func:`last_to_first` (``flat``: the original was ``(B, C)``)."""
    return t.squeeze(-1) if flat else t.movedim(1, -1)
