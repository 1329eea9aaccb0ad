"""Level bookkeeping shared by every FSQ-style quantizer: defaults, constants, index packing.

Nothing here ever materialises the implicit codebook: indices are packed and unpacked
digit by digit, so ``levels=[4]*16`` costs 16 integers, not 4**16 codes.
"""
from __future__ import annotations

import math
import numbers
from typing import List, Sequence, Tuple

import torch

#: FSQ shrinks the tanh range by this factor so that the outermost level is reachable
#: without sitting exactly on the tanh asymptote.
FSQ_EPS = 1e-3

DEFAULT_LEVELS = {2: (8, 8, 8, 4), 4: (4, 4, 4, 4, 4)}

#: Largest level count: digits (and the rounding that produces them) are float32, exact up to 2**24.
MAX_LEVEL = 2**24
#: Largest codebook (prod(levels)): indices are packed into int64, so the largest index 2**63 - 1 must fit.
MAX_CODEBOOK_SIZE = 2**63


def default_levels(stages: int) -> Tuple[int, ...]:
    """Levels of the official configurations: 2 stages -> [8,8,8,4], 4 stages -> [4,4,4,4,4]."""
    if stages not in DEFAULT_LEVELS:
        raise ValueError(
            f"stages={stages} has no default levels (defaults exist for stages=2 -> [8,8,8,4] "
            f"and stages=4 -> [4,4,4,4,4]); pass levels=[...] explicitly"
        )
    return DEFAULT_LEVELS[stages]


def check_levels(levels: Sequence[int]) -> Tuple[int, ...]:
    """Validate a levels sequence (list, tuple, numpy array or tensor of ints) and return it as a tuple
    of Python ints: every level in ``[2, 2**24]`` and ``prod(levels) <= 2**63``, the configurations whose
    digits (float32) and packed indices (int64) are exact."""
    if isinstance(levels, torch.Tensor):
        levels = levels.tolist()
    try:
        out = tuple(levels)
    except TypeError:
        raise TypeError(f"levels must be a sequence of ints, got {type(levels).__name__}") from None
    if len(out) == 0:
        raise ValueError("levels must not be empty: give one level count per channel, e.g. [8, 8, 8, 4]")
    for i, level in enumerate(out):
        if isinstance(level, bool) or not isinstance(level, numbers.Integral):  # numpy ints are Integral
            raise TypeError(f"levels[{i}] must be an int, got {level!r}")
        if level < 2:
            raise ValueError(f"levels[{i}]={level}: every level count must be >= 2")
        if level > MAX_LEVEL:
            raise ValueError(f"levels[{i}]={level}: every level count must be <= 2**24 = {MAX_LEVEL} (the digits are "
                             f"computed in float32, which holds integers exactly only up to 2**24)")
    ints = tuple([int(v) for v in out])
    size = math.prod(ints)
    if size > MAX_CODEBOOK_SIZE:
        raise ValueError(f"levels={list(out)}: prod(levels) = 2**{math.log2(size):.1f} codes, more than the 2**63 that "
                         f"int64 indices can number (an index packs one digit per channel); use fewer channels or "
                         f"levels, or more stages")
    return ints


def codebook_size(levels: Sequence[int]) -> int:
    """Number of codes of one FSQ stage: the product of the level counts."""
    return math.prod(levels)


def index_dtype(levels: Sequence[int]) -> torch.dtype:
    """int32 when every index fits (prod(levels) < 2**31), else int64."""
    return torch.int32 if codebook_size(levels) < 2**31 else torch.int64


def index_basis(levels: Sequence[int]) -> List[int]:
    """Mixed-radix place values: ``cumprod([1] + levels[:-1])``."""
    basis, acc = [], 1
    for level in levels:
        basis.append(acc)
        acc *= level
    return basis


#: The two FSQ shifts: ``atanh`` (this package's default, the exact inverse of the tanh that
#: follows) and ``tan`` (the official RFSQ code's, for models trained with it).
FSQ_SHIFTS = ("atanh", "tan")


def check_fsq_shift(fsq_shift: str) -> str:
    """``fsq_shift`` if it is one of :data:`FSQ_SHIFTS`, else a ValueError naming it."""
    if fsq_shift not in FSQ_SHIFTS:
        raise ValueError(f"fsq_shift must be one of {FSQ_SHIFTS} ('atanh': this package's default; 'tan': the "
                         f"official RFSQ code's), got {fsq_shift!r}")
    return fsq_shift


def fsq_constants(levels: Sequence[int], fsq_shift: str = "atanh"
                  ) -> Tuple[List[float], List[float], List[float], List[int]]:
    """Per-channel ``(half_l, offset, shift, half_w)`` exactly as docs/semantics.md defines them.

    ``shift = atanh(offset / half_l)`` by default (the official code uses ``tan``, which is off by
    up to 3.2e-4 for L=4; ``atanh`` is the exact inverse of the tanh that follows);
    ``fsq_shift='tan'`` gives the official ``tan(offset / half_l)``. The values are computed in
    float64 and are rounded to float32 where they are used.

    L=2 is the one level count with no atanh shift (``offset / half_l = 0.5/0.4995 > 1``): there
    the shift is 0, which puts the single decision threshold at z=0 (the official ``tan`` puts it
    at z=-1.56, and ``fsq_shift='tan'`` reproduces that).
    """
    check_fsq_shift(fsq_shift)
    half_l, offset, shift, half_w = [], [], [], []
    for level in levels:
        hl = (level - 1) * (1 - FSQ_EPS) / 2
        off = 0.5 if level % 2 == 0 else 0.0
        half_l.append(hl)
        offset.append(off)
        if fsq_shift == "tan":
            shift.append(math.tan(off / hl))
        else:
            shift.append(math.atanh(off / hl) if off < hl else 0.0)
        half_w.append(level // 2)
    return half_l, offset, shift, half_w


def channel_view(values: Sequence[float], ndim: int, device, dtype=torch.float32) -> torch.Tensor:
    """A ``(C, 1, ..., 1)`` tensor that broadcasts over a channel-first ``(B, C, *spatial)`` tensor."""
    return torch.tensor(values, dtype=dtype, device=device).view(-1, *([1] * (ndim - 2)))


def digits_to_indices(digits: torch.Tensor, levels: Sequence[int]) -> torch.Tensor:
    """Pack integer digits ``(B, C, *spatial)`` into indices ``(B, *spatial)``."""
    dtype = index_dtype(levels)
    basis = channel_view(index_basis(levels), digits.ndim, digits.device, torch.int64)
    return (digits.to(torch.int64) * basis).sum(dim=1).to(dtype)


def indices_to_digits(indices: torch.Tensor, levels: Sequence[int]) -> torch.Tensor:
    """Unpack indices ``(B, *spatial)`` into integer digits ``(B, C, *spatial)`` (int64)."""
    if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.is_complex():
        raise TypeError(f"indices must be an integer tensor, got dtype {indices.dtype}")
    idx = indices.to(torch.int64).unsqueeze(1)
    basis = channel_view(index_basis(levels), idx.ndim, idx.device, torch.int64)
    lv = channel_view(list(levels), idx.ndim, idx.device, torch.int64)
    return torch.div(idx, basis, rounding_mode="floor") % lv


def digits_to_codes(digits: torch.Tensor, levels: Sequence[int]) -> torch.Tensor:
    """Integer digits ``(B, C, ...)`` to normalized FSQ codes ``(d - half_w) / half_w`` (float32)."""
    _, _, _, half_w = fsq_constants(levels)
    hw = channel_view(half_w, digits.ndim, digits.device)
    return (digits.to(torch.float32) - hw) / hw


class LevelsMixin:
    """``num_channels`` and ``codebook_size`` for any module that stores ``self.levels``."""

    levels: Tuple[int, ...]

    @property
    def num_channels(self) -> int:
        """C: one channel per entry of ``levels``."""
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        """Codes of one stage: prod(levels)."""
        return codebook_size(self.levels)
