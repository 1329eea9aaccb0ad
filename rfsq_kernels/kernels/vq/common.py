"""What the vector-quantize-pytorch kernel families (:mod:`.residual_fsq`, :mod:`.fsq`) share:
``@triton.jit`` helpers and the host side of their launches (index dtype, strides, place values).

Both families take ``x`` ``(B, N, C)`` channel-last (the tensor after ``project_in``) and address
it as the kernels' ``(B, C, S)`` through strides. Their per-channel constant tables are built with
the library's own torch ops (not :func:`..config.level_tables`: the library's FSQ constants are
not this package's) and cached through :func:`..config.cached`.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import triton
import triton.language as tl

from ...reference.codebook import index_basis, index_dtype


@triton.jit
def one_minus_square(t, USE_LIBDEVICE: tl.constexpr):
    """``1 - t*t`` rounded once (ATen's tanh_backward contracts it into an fma). The interpreter's
    ``tl.fma`` rounds twice, so there it is computed in float64 (exact for ``|t| >= 1/8``)."""
    if USE_LIBDEVICE:
        return tl.fma(-t, t, 1.0)
    else:
        t64 = t.to(tl.float64)
        return (1.0 - t64 * t64).to(tl.float32)


@triton.jit
def load_row(consts_ptr, row, offs_c, mask_c, C, other):
    """Row ``row`` of a ``(rows, C)`` constant table as a ``[BLOCK_C, 1]`` float32 column."""
    return tl.load(consts_ptr + row * C + offs_c, mask=mask_c, other=other)[:, None]


def place_values(levels: Sequence[int], device) -> torch.Tensor:
    """int64 ``(C,)`` mixed-radix place values ``cumprod([1] + levels[:-1])``, exact."""
    return torch.tensor(index_basis(levels), dtype=torch.int64, device=device)


def vq_index_dtype(levels: Sequence[int], dropout: bool) -> torch.dtype:
    """The library's index dtype: the codebook's (:func:`~rfsq_kernels.reference.index_dtype`),
    int64 while quantize dropout is active (its -1 sentinel stages)."""
    return torch.int64 if dropout else index_dtype(levels)


def bcs_strides(t: torch.Tensor) -> Tuple[int, int, int]:
    """Strides ``(b, c, s)`` of a ``(B, N, C)`` tensor addressed as the kernels' ``(B, C, S)``."""
    return t.stride(0), t.stride(2), t.stride(1)
