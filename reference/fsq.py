"""Finite Scalar Quantization, the pure-PyTorch ground truth (docs/semantics.md, "FSQ")."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .codebook import (
    LevelsMixin,
    channel_view,
    check_levels,
    digits_to_codes,
    digits_to_indices,
    fsq_constants,
    indices_to_digits,
)
from .layout import check_input, first_to_last, from_channel_last, last_to_first, to_channel_last
from .state import ConfigStateMixin
from .validation import POSITION_RANKS, check_indices


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even with a straight-through gradient (d round / dx := 1).

    ``x + (round(x) - x)`` equals ``round(x)`` exactly in floating point (the difference is
    exactly representable), so the value is the clean integer.
    """
    return x + (torch.round(x) - x).detach()


def fsq_quantize(
    z: torch.Tensor, levels: Sequence[int], compute_dtype: torch.dtype = torch.float32, fsq_shift: str = "atanh"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize channel-first ``z`` per channel; return ``(codes, digits)``.

    ``codes`` (``compute_dtype``) are ``round_ste(tanh(z + shift) * half_l - offset) / half_w`` in
    [-1, 1]; ``digits`` (int64, same shape) are the integer levels in ``[0, L-1]``, computed from the
    explicit round and clamped so that NaN/Inf inputs still give valid digits. ``fsq_shift``:
    ``'atanh'`` (default) or the official code's ``'tan'`` (:func:`~.codebook.fsq_constants`).
    """
    levels = check_levels(levels)
    half_l, offset, shift, half_w = fsq_constants(levels, fsq_shift)
    dev, nd = z.device, z.ndim
    zc = z.to(compute_dtype)
    hl = channel_view(half_l, nd, dev, compute_dtype)
    off = channel_view(offset, nd, dev, compute_dtype)
    sh = channel_view(shift, nd, dev, compute_dtype)
    hw = channel_view(half_w, nd, dev, compute_dtype)
    bounded = torch.tanh(zc + sh) * hl - off
    codes = round_ste(bounded) / hw
    with torch.no_grad():
        top = channel_view([lv - 1 for lv in levels], nd, dev, compute_dtype)
        digits = torch.nan_to_num(torch.round(bounded) + hw, nan=0.0)
        digits = torch.minimum(torch.clamp(digits, min=0.0), top).to(torch.int64)
    return codes, digits


class FSQ(ConfigStateMixin, LevelsMixin, nn.Module):
    """Single-stage FSQ over a latent with ``C == len(levels)`` channels.

    ``z`` is channel-first ``(B, C, *spatial)`` (default), channel-last ``(B, *spatial, C)`` with
    ``channel_first=False``, or ``(B, C)``. ``forward(z) -> (quantized, indices)``: ``quantized``
    has ``z``'s shape and dtype (math in float32), ``indices`` has shape ``(B, *spatial)`` (int32,
    or int64 for codebooks >= 2**31). ``levels`` is stored in (and checked against) the state_dict.
    """

    def __init__(self, levels: Sequence[int], *, channel_first: bool = True):
        super().__init__()
        self.levels = check_levels(levels)
        self.channel_first = bool(channel_first)

    @property
    def bits_per_token(self) -> float:
        """log2(codebook_size)."""
        return math.log2(self.codebook_size)

    def config(self) -> dict:
        """Stored in the state_dict; loading a checkpoint with other levels raises."""
        return {"levels": list(self.levels)}

    def _to_first(self, z: torch.Tensor, name: str = "z") -> torch.Tensor:
        check_input(z, self.num_channels, self.channel_first, name)
        return last_to_first(to_channel_last(z, self.channel_first))

    def _from_first(self, t: torch.Tensor, flat: bool) -> torch.Tensor:
        return from_channel_last(first_to_last(t, flat), self.channel_first)

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        codes, digits = fsq_quantize(self._to_first(z), self.levels)
        indices = digits_to_indices(digits, self.levels)
        flat = z.ndim == 2
        return self._from_first(codes.to(z.dtype), flat), indices.squeeze(-1) if flat else indices

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Normalized codes (as returned by forward, in the module's layout) -> indices ``(B, *spatial)``."""
        flat = codes.ndim == 2
        codes = self._to_first(codes, "codes")
        _, _, _, half_w = fsq_constants(self.levels)
        hw = channel_view(half_w, codes.ndim, codes.device)
        top = channel_view([lv - 1 for lv in self.levels], codes.ndim, codes.device)
        digits = torch.round(torch.nan_to_num(codes.float(), nan=0.0) * hw + hw)
        digits = torch.minimum(torch.clamp(digits, min=0.0), top).to(torch.int64)
        indices = digits_to_indices(digits, self.levels)
        return indices.squeeze(-1) if flat else indices

    def indices_to_codes(self, indices: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Indices ``(B, *spatial)`` -> normalized codes in the module's layout (float32 unless ``dtype``);
        ``(B,)`` -> ``(B, C)``. Indices outside ``[0, codebook_size)`` raise (FSQ has no sentinel), and so
        do ranks outside 1 to 4 (the indices of a ``(B, C)`` to ``(B, C, T, H, W)`` input); any integer
        dtype is read exactly."""
        indices = check_indices(indices, self.codebook_size, ranks=POSITION_RANKS)
        flat = indices.ndim == 1
        codes = digits_to_codes(indices_to_digits(indices.unsqueeze(-1) if flat else indices, self.levels), self.levels)
        codes = self._from_first(codes, flat)
        return codes if dtype is None else codes.to(dtype)

    def extra_repr(self) -> str:
        return f"levels={list(self.levels)}" + ("" if self.channel_first else ", channel_first=False")
