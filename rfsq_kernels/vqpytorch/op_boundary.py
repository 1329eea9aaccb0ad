"""The boundary of the fused vector-quantize-pytorch ops (:mod:`.fused`): every tensor a kernel
reads is checked here, inside the custom ops and their fake implementations, whoever calls them.

Shapes, dtypes and devices only (no host sync), so real and traced calls run the same checks. The
kernels read ``x`` and the incoming gradient through their strides and copy the small tensors they
index directly (``scales``, the clamp, the mask, the stage counts) into contiguous form, so a check
here is what stands between a wrong argument and a read of memory the caller does not own.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from ..reference import check_levels
from ..reference.dropout import check_active_stages_layout, check_mask

__all__ = ["check_vq_input", "check_vq_grad", "check_residual_fsq_call", "check_grouped_residual_fsq_call"]


def check_vq_input(x: Tensor, levels: Sequence[int], name: str = "x") -> None:
    """``x`` must be a float ``(B, N, C)`` tensor with ``C = len(levels)`` (the kernels' channels-last
    layout, after ``project_in``); ``levels`` valid (:func:`~rfsq_kernels.reference.check_levels`)."""
    levels = check_levels(levels)
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float (B, N, C) tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 3 or x.shape[2] != len(levels):
        raise ValueError(f"{name} must have shape (B, N, C) with C = len(levels) = {len(levels)} (levels="
                         f"{list(levels)}), got {tuple(x.shape)}")


def check_vq_grad(grad: Tensor, x: Tensor, name: str = "grad_q") -> None:
    """The backward's incoming gradient: a float tensor of ``x``'s shape on ``x``'s device (any
    strides: the kernels read it through them)."""
    if not isinstance(grad, Tensor) or not grad.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor of x's shape {tuple(x.shape)}, got "
                        f"{getattr(grad, 'dtype', type(grad).__name__)}")
    if tuple(grad.shape) != tuple(x.shape) or grad.device != x.device:
        raise ValueError(f"{name} must have x's shape {tuple(x.shape)} on {x.device}, got {tuple(grad.shape)} on "
                         f"{grad.device}")


def check_residual_fsq_call(x: Tensor, levels: Sequence[int], scales: Tensor, clamp_value: Tensor,
                            mask: Optional[Tensor], active: Optional[Tensor]) -> None:
    """The tensors one fused ResidualFSQ call reads: ``x`` as :func:`check_vq_input`; ``scales`` the
    module's float ``(K, C)`` per-stage scales, ``clamp_value`` a float scalar or ``(C,)`` soft-clamp
    value, ``mask`` None or bool ``(B, N)``, ``active`` None or integer ``(B,)`` stage counts, all on
    ``x``'s device."""
    check_vq_input(x, levels)
    B, N, C = x.shape
    if not isinstance(scales, Tensor) or not scales.dtype.is_floating_point:
        raise TypeError(f"scales must be a float (K, C) tensor, got {getattr(scales, 'dtype', type(scales).__name__)}")
    if scales.dim() != 2 or scales.shape[0] < 1 or scales.shape[1] != C:
        raise ValueError(f"scales must have shape (K, C) = (num_quantizers, {C}) with K >= 1, got "
                         f"{tuple(scales.shape)}")
    if not isinstance(clamp_value, Tensor) or not clamp_value.dtype.is_floating_point:
        raise TypeError(f"clamp_value must be a float tensor (a scalar or (C,) = ({C},)), got "
                        f"{getattr(clamp_value, 'dtype', type(clamp_value).__name__)}")
    if clamp_value.numel() not in (1, C) or clamp_value.dim() > 1:
        raise ValueError(f"clamp_value must be a scalar or of shape (C,) = ({C},), got {tuple(clamp_value.shape)}")
    for name, t in (("scales", scales), ("clamp_value", clamp_value)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: move the module to x's device")
    check_mask(mask, B, (N,), x.device)
    if active is not None:
        check_active_stages_layout(active, B, x.device, name="active")


def check_grouped_residual_fsq_call(x: Tensor, levels: Sequence[int], scales: Sequence[Tensor],
                                    clamp_values: Sequence[Tensor], active: Optional[Tensor]) -> None:
    """The tensors one fused GroupedResidualFSQ call reads: ``x`` a float ``(G, B, N, C)`` tensor,
    G = ``len(scales)`` = ``len(clamp_values)`` >= 1, and group g's ``x[g]``, ``scales[g]``,
    ``clamp_values[g]`` as :func:`check_residual_fsq_call` (no mask); every group's ``scales``
    of one shape (the groups share a configuration); ``active`` None or integer ``(B,)``."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a (G, B, N, C) tensor, got shape {tuple(getattr(x, 'shape', ()))}")
    G = x.shape[0]
    if G < 1 or len(scales) != G or len(clamp_values) != G:
        raise ValueError(f"x has {G} groups: scales and clamp_values need one tensor per group, got "
                         f"{len(scales)} and {len(clamp_values)}")
    for g in range(G):
        check_residual_fsq_call(x[g], levels, scales[g], clamp_values[g], None, active)
        if tuple(scales[g].shape) != tuple(scales[0].shape):
            raise ValueError(f"every group's scales must have one shape, got {tuple(scales[0].shape)} (group 0) and "
                             f"{tuple(scales[g].shape)} (group {g})")
