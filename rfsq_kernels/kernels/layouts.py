"""Host-side tensor layouts the kernels address: strides, output allocation, 64-bit offsets.

Every kernel addresses an image of a ``(B, C, *spatial)`` tensor as ``(B, C, S)`` through three
strides ``(stride_b, stride_c, stride_s)`` (:func:`strided_view`), so contiguous,
channels_last and channels_last_3d inputs need no copy, and allocates its outputs in the input's
layout (:func:`new_output`, shared with the fake (meta) functions). :func:`needs_int64` decides
when a launch needs 64-bit offsets; :func:`mask_and_active_stages` gives the kernel views of the
optional inputs, from whose pointers every kernel derives its feature flags
(:data:`FLAGS_FROM_POINTERS`). Tiles, switches and the constant tables: :mod:`.config`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..reference.codebook import index_dtype


def flat_spatial_stride(t: torch.Tensor) -> Optional[int]:
    """The single stride of the flattened spatial dims of ``t`` (B, C, *spatial), or None when the
    spatial dims cannot be addressed as one index ``s * stride``. Size-1 dims are ignored."""
    dims = [(n, st) for n, st in zip(t.shape[2:], t.stride()[2:]) if n != 1]
    if not dims:
        return 1
    for (n0, st0), (n1, st1) in zip(dims, dims[1:]):
        if st0 != st1 * n1:
            return None
    return dims[-1][1]


def strided_view(t: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """``(t', (stride_b, stride_c, stride_s))`` with flattenable spatial dims; ``t' is t`` unless
    the spatial dims are not flattenable, in which case it is one explicit contiguous copy."""
    st = flat_spatial_stride(t)
    if st is None:
        t = t.contiguous()
        st = flat_spatial_stride(t)
    return t, (t.stride(0), t.stride(1), st)


def flat_strides(t: torch.Tensor) -> Tuple[int, int, int]:
    """``(stride_b, stride_c, stride_s)`` of a tensor made by :func:`new_output`."""
    return t.stride(0), t.stride(1), flat_spatial_stride(t)


def new_output(z: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Uninitialised tensor shaped like ``z`` in ``z``'s memory format when that layout has
    flattenable spatial dims (contiguous, channels_last, channels_last_3d), else contiguous.
    Used by the real kernels and the fake (meta) functions alike, so their strides agree."""
    out = torch.empty_like(z, dtype=dtype)
    if flat_spatial_stride(out) is None:
        out = torch.empty(z.shape, dtype=out.dtype, device=z.device)
    return out


def max_offset(t: torch.Tensor) -> int:
    """Largest element offset reachable in ``t`` from its data pointer."""
    return sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()) if n > 0)


def needs_int64(*tensors: Optional[torch.Tensor]) -> bool:
    """True when some element offset of these tensors (None: absent) may not fit in int32."""
    return any(t is not None and max_offset(t) >= 2**31 - 1 for t in tensors)


def mask_and_active_stages(mask: Optional[torch.Tensor], active_stages: Optional[torch.Tensor], batch: int,
                           spatial: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Kernel views of the optional padding mask ``(B, *spatial)`` bool -> ``(B, S)`` uint8 (no copy
    when contiguous) and per-sample stage counts ``(B,)`` -> int32. An absent one stays ``None``:
    Triton passes ``None`` as a constexpr, and the kernels derive HAS_MASK / HAS_ACTIVE_STAGES
    from it (:data:`FLAGS_FROM_POINTERS`)."""
    valid = None if mask is None else mask.reshape(batch, spatial).contiguous().view(torch.uint8)
    active_stages = None if active_stages is None else active_stages.to(torch.int32).contiguous()
    return valid, active_stages


#: The feature flags every kernel derives from its optional pointers (``@triton.heuristics``), so
#: no launch site sets them: ``valid_ptr`` (padding mask) and ``active_stages_ptr`` (per-sample
#: stage counts) are None when absent.
FLAGS_FROM_POINTERS = {
    "HAS_MASK": lambda args: args["valid_ptr"] is not None,
    "HAS_ACTIVE_STAGES": lambda args: args["active_stages_ptr"] is not None,
}


def quantized_and_indices(z: torch.Tensor, levels: Sequence[int], stages: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised ``quantized`` (``z``'s shape, dtype and layout) and ``indices``
    ``(B, *spatial, K)`` of the levels' index dtype: the forward outputs every family returns."""
    indices = z.new_empty((z.shape[0], *z.shape[2:], stages), dtype=index_dtype(levels))
    return new_output(z), indices


def empty_output(z: torch.Tensor) -> torch.Tensor:
    """A fresh empty float32 ``(0,)`` tensor: an output the strategy does not have (one per
    output: custom-op outputs must not alias)."""
    return z.new_zeros((0,), dtype=torch.float32)
