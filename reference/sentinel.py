"""The index sentinel: ``-1`` marks a stage that did not quantize a position.

Two things write it: **quantize dropout** (sample ``b`` uses only its first ``k_b`` stages, so stages
``k >= k_b`` of all its positions are ``-1``) and **masks** (a padded position is ``-1`` in every
stage). Per position the sentinels therefore always form a suffix along the stage axis. Decoding
treats a ``-1`` as "this stage contributes nothing" (zero), exactly as the forward pass did.

This is the one place that interprets the sentinel; every decoder goes through
:func:`split_sentinel`, and range checks of real indices run on its ``clean`` output.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .validation import index_values, require

#: Index written for a dropped stage or a masked (padded) position (as vector-quantize-pytorch does).
SENTINEL = -1


def split_sentinel(indices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(present, clean)``: ``present`` is True where ``indices != SENTINEL``; ``clean`` has the
    sentinel replaced by 0 (a valid index whose decoded value the caller zeroes with ``present``).
    ``clean`` is int64 (``index_values``): any integer dtype is read exactly, uint8 255 included."""
    indices = index_values(indices)
    present = indices != SENTINEL
    return present, torch.where(present, indices, torch.zeros_like(indices))


def check_sentinel_layout(indices: torch.Tensor, name: str = "indices") -> None:
    """Raise unless the sentinel appears only where it is meaningful: per position, once a stage is
    ``-1`` every later stage is ``-1`` too (dropped stages are a suffix; a masked position is ``-1``
    in all stages). Other negative values are left to the range check of real indices. ``indices``
    should already be int64 (``check_indices``): a narrower unsigned dtype would wrap the -1."""
    if indices.numel() == 0 or indices.shape[-1] < 2:
        return
    present = indices != SENTINEL
    bad = present[..., 1:] & ~present[..., :-1]

    def message() -> str:
        where = tuple(int(v) for v in bad.nonzero()[0].tolist())
        pos, stage = where[:-1], where[-1] + 1
        return (f"{name}: the sentinel -1 (dropped stage / masked position) is followed by a real index at "
                f"position {pos}, stage {stage}; a stage can only be dropped together with all later stages")

    require(~bad.any(), message, f"{name}: the sentinel -1 is followed by a real index (dropped stages must be a suffix)")
