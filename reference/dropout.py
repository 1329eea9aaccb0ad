"""Masks for padded positions and per-sample active-stage counts (quantize dropout).

``mask`` is ``(B, *spatial)`` bool, True where a position is valid (padding is False).
``active_stages`` is ``(B,)`` int32: sample ``b`` quantizes with stages ``0 .. k_b - 1`` only.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def check_mask(mask: Optional[torch.Tensor], batch: int, spatial: Sequence[int], device: torch.device) -> None:
    """Raise unless ``mask`` is None or a bool tensor of shape ``(B, *spatial)`` on ``device``."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (B, *spatial), True at valid positions; got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    want = (batch, *spatial)
    if tuple(mask.shape) != want:
        raise ValueError(f"mask must have shape (B, *spatial) = {want}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but z is on {device}")


def check_active_stages_layout(active_stages: torch.Tensor, batch: int, device: torch.device,
                               name: str = "stages as a tensor") -> None:
    """Raise unless ``active_stages`` is an integer ``(B,)`` tensor on ``device`` (no host sync)."""
    if not isinstance(active_stages, torch.Tensor) or active_stages.dtype.is_floating_point \
            or active_stages.dtype == torch.bool or active_stages.is_complex():
        raise TypeError(f"{name} must be an integer (B,) tensor of per-sample stage counts, "
                        f"got {getattr(active_stages, 'dtype', type(active_stages).__name__)}")
    if tuple(active_stages.shape) != (batch,):
        raise ValueError(f"{name} must have shape (B,) = ({batch},), got {tuple(active_stages.shape)}")
    if active_stages.device != device:
        raise ValueError(f"{name} is on {active_stages.device} but z is on {device}")


def check_active_stages(active_stages: torch.Tensor, batch: int, stages: int,
                        device: torch.device) -> torch.Tensor:
    """Validate a user-given per-sample stage count ``(B,)`` in ``[0, K]``; return it as int32.

    The range check reads the counts back (one host sync) in eager mode, to name them; under
    ``torch.compile`` it is a device-side assert instead (``validation.require``), so a compiled
    forward with ``stages=tensor`` has no host sync. The training path draws its own counts and
    skips it."""
    from .validation import require

    check_active_stages_layout(active_stages, batch, device)
    if active_stages.numel():
        lo, hi = torch.aminmax(active_stages)

        def message() -> str:
            vlo, vhi = (int(v) for v in torch.stack([lo, hi]).tolist())
            return f"per-sample stage counts must lie in [0, {stages}], got [{vlo}, {vhi}]"

        require((lo >= 0) & (hi <= stages), message, f"per-sample stage counts outside [0, {stages}]")
    return active_stages.to(torch.int32)


def draw_active_stages(
    batch: int, stages: int, cutoff_index: int = 0, multiple_of: int = 1, per_sample: bool = True,
    device: Optional[torch.device] = None, generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Random stage counts for quantize dropout, ``(B,)`` int32 on ``device`` (no host sync).

    As vector-quantize-pytorch: the last kept stage is uniform in ``[cutoff_index, K-1]``, so
    ``k_b`` is uniform in ``[cutoff_index + 1, K]``; with ``multiple_of = m`` it is rounded up to a
    multiple of ``m`` (capped at K). ``per_sample=False`` draws one count for the whole batch.
    """
    n = batch if per_sample else 1
    # (no generator argument unless one is given: randint's generator overload does not take the symbolic
    # batch size of torch.compile(dynamic=True))
    extra = {} if generator is None else {"generator": generator}
    k = torch.randint(cutoff_index + 1, stages + 1, (n,), device=device, **extra)
    if multiple_of != 1:
        k = (torch.div(k + multiple_of - 1, multiple_of, rounding_mode="floor") * multiple_of).clamp_max(stages)
    if not per_sample:
        k = k.expand(batch)
    return k.to(torch.int32)


def stage_keep(valid: Optional[torch.Tensor], active_stages: Optional[torch.Tensor], k: int,
               ndim: int) -> Optional[torch.Tensor]:
    """Bool ``(B, 1, *spatial)`` (or broadcastable) of positions that stage ``k`` quantizes, or None
    when every position does. ``valid`` is the mask as ``(B, 1, *spatial)``."""
    keep = valid
    if active_stages is not None:
        on = (active_stages.to(torch.int64) > k).view(-1, *([1] * (ndim - 1)))
        keep = on if keep is None else keep & on
    return keep


def valid_count(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Valid positions per sample, at least 1 (an all-masked sample gets mean 0, variance 0)."""
    return mask.flatten(1).sum(1).clamp_min(1).to(dtype)


