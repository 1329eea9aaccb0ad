"""Kernels of vector-quantize-pytorch's standalone FSQ with its default bound (``rfsq_kernels.vqpytorch.FSQ``):
forward and backward kernel, launchers, constant table.

``t = tanh(z + atanh(offset / half_l))``, ``code = round(t * half_l - offset) / (L // 2)`` with the
library's ``half_l = (L-1) * 1.001 / 2`` (this package's own FSQ shrinks by 0.999: another table,
:func:`..config.level_tables`); round half to even, straight-through backward. Math:
``docs/semantics.md``, "vector-quantize-pytorch". Every division is IEEE (``tl.div_rn``), launches
pass ``enable_fp_fusion=False``, ``1 - t*t`` rounds once like ATen's ``tanh_backward``.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import triton
import triton.language as tl

from .. import config
from ..fpmath import round_half_even, tanh_f32
from ..launch_settings import launch
from ..tile_io import load_tile, store_tile, tile_prologue
from .common import bcs_strides, load_row, one_minus_square, place_values, vq_index_dtype

# Rows of the standalone FSQ's constant table (:func:`constant_table`).
VQ_HALF_L_ROW = tl.constexpr(0)   # ((L-1) * 1.001) / 2
VQ_OFFSET_ROW = tl.constexpr(1)   # 0.5 for even L, else 0
VQ_SHIFT_ROW = tl.constexpr(2)    # atanh(offset / half_l)
VQ_HALF_W_ROW = tl.constexpr(3)   # L // 2
VQ_TOP_ROW = tl.constexpr(4)      # L - 1


@triton.jit(do_not_specialize=["C", "tiles_per_image"])
def _fwd_vq_fsq_kernel(
    x_ptr,            # input, (B, C, S) through strides, any float dtype
    q_ptr,            # codes, (B, C, S) through strides, the input's dtype
    idx_ptr,          # indices, (B, S) contiguous, int32 or int64
    consts_ptr,       # (5, C) float32: half_l, offset, shift, L//2, L-1
    basis_ptr,        # (C,) int64 place values
    C, S, tiles_per_image,
    stride_xb, stride_xc, stride_xs,
    stride_qb, stride_qc, stride_qs,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, USE_INT64: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
):
    """FSQ forward: ``t = tanh(z + shift)``, ``b = t * half_l - offset``, ``code = rint(b) / (L//2)``
    (IEEE division), index packed exactly from ``rint(b) + L//2``."""
    img, (x_view, q_view), offs_c, mask_c, offs_s, mask_s, _valid = tile_prologue(
        ((x_ptr, stride_xb, stride_xc, stride_xs), (q_ptr, stride_qb, stride_qc, stride_qs)),
        None, C, S, tiles_per_image, BLOCK_C, BLOCK_S, False, USE_INT64)  # no padding mask
    half_l = load_row(consts_ptr, VQ_HALF_L_ROW, offs_c, mask_c, C, 0.0)
    offset = load_row(consts_ptr, VQ_OFFSET_ROW, offs_c, mask_c, C, 0.0)
    shift = load_row(consts_ptr, VQ_SHIFT_ROW, offs_c, mask_c, C, 0.0)
    half_w = load_row(consts_ptr, VQ_HALF_W_ROW, offs_c, mask_c, C, 1.0)
    top = load_row(consts_ptr, VQ_TOP_ROW, offs_c, mask_c, C, 0.0)
    basis = tl.load(basis_ptr + offs_c, mask=mask_c, other=0)[:, None]
    inside = mask_c[:, None] & mask_s[None, :]
    z = load_tile(x_view, offs_c, offs_s, inside)
    t = tanh_f32(z + shift, USE_LIBDEVICE)
    rounded = round_half_even(t * half_l - offset, USE_LIBDEVICE)
    store_tile(q_view, tl.div_rn(rounded, half_w), offs_c, offs_s, inside)
    digit = rounded + half_w
    digit = tl.where(digit == digit, digit, 0.0)
    digit = tl.minimum(tl.maximum(digit, 0.0), top)
    index = tl.sum(digit.to(tl.int64) * basis, axis=0)
    tl.store(idx_ptr + img * S + offs_s, index.to(idx_ptr.dtype.element_ty), mask=mask_s)


@triton.jit(do_not_specialize=["C", "tiles_per_image"])
def _bwd_vq_fsq_kernel(
    x_ptr,            # input, (B, C, S) through strides
    g_ptr,            # gradient of the codes, (B, C, S) through strides
    dx_ptr,           # gradient of the input, (B, C, S) through strides, the input's dtype
    consts_ptr,       # (5, C) float32: half_l, offset, shift, L//2, L-1
    C, S, tiles_per_image,
    stride_xb, stride_xc, stride_xs,
    stride_gb, stride_gc, stride_gs,
    stride_dxb, stride_dxc, stride_dxs,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, USE_INT64: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
):
    """FSQ backward (straight-through round): ``dz = ((g / (L//2)) * half_l) * (1 - t^2)``."""
    img, (x_view, g_view, dx_view), offs_c, mask_c, offs_s, mask_s, _valid = tile_prologue(
        ((x_ptr, stride_xb, stride_xc, stride_xs), (g_ptr, stride_gb, stride_gc, stride_gs),
         (dx_ptr, stride_dxb, stride_dxc, stride_dxs)),
        None, C, S, tiles_per_image, BLOCK_C, BLOCK_S, False, USE_INT64)  # no padding mask
    half_l = load_row(consts_ptr, VQ_HALF_L_ROW, offs_c, mask_c, C, 0.0)
    shift = load_row(consts_ptr, VQ_SHIFT_ROW, offs_c, mask_c, C, 0.0)
    half_w = load_row(consts_ptr, VQ_HALF_W_ROW, offs_c, mask_c, C, 1.0)
    inside = mask_c[:, None] & mask_s[None, :]
    z = load_tile(x_view, offs_c, offs_s, inside)
    g = load_tile(g_view, offs_c, offs_s, inside)
    t = tanh_f32(z + shift, USE_LIBDEVICE)
    dz = (tl.div_rn(g, half_w) * half_l) * one_minus_square(t, USE_LIBDEVICE)
    store_tile(dx_view, dz, offs_c, offs_s, inside)


def constant_table(levels: Sequence[int], device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cached ``(consts, basis)`` of the standalone FSQ: float32 ``(5, C)`` rows built with the
    library's torch ops (``half_l = (L-1) * (1 + 1e-3) / 2``, ``offset``, ``shift = atanh(offset /
    half_l)``, ``L // 2``, ``L - 1``) and int64 ``(C,)`` place values."""
    def build() -> Tuple[torch.Tensor, torch.Tensor]:
        lt = torch.tensor(list(levels), dtype=torch.int32)
        half_l = (lt - 1) * (1 + 1e-3) / 2
        offset = torch.where(lt % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        consts = torch.stack([half_l, offset, shift, (lt // 2).float(), (lt - 1).float()]).to(device)
        return consts, place_values(levels, device)
    return config.cached(("vq_fsq", tuple(levels), str(device)), build)


def forward_outputs(x: torch.Tensor, levels: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised ``(codes like x, indices (B, N))`` (shared with the fake implementation)."""
    return torch.empty_like(x), x.new_empty(x.shape[:2], dtype=vq_index_dtype(levels, False))


def forward(x: torch.Tensor, levels: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused standalone FSQ on ``x`` ``(B, N, C)``: ``(codes like x, indices (B, N))``."""
    codes, indices = forward_outputs(x, levels)
    B, N, C = x.shape
    if B * N == 0:
        return codes.zero_(), indices.zero_()
    consts, basis = constant_table(levels, x.device)
    tiles = config.elementwise_tiles(C, N)
    tiles_per_image = triton.cdiv(N, tiles.block_s)
    launch(_fwd_vq_fsq_kernel, (B * tiles_per_image,),
           (x, codes, indices, consts, basis, C, N, tiles_per_image, *bcs_strides(x), *bcs_strides(codes)),
           tiles=tiles, tensors=(x, codes, indices))
    return codes, indices


def backward(grad: torch.Tensor, x: torch.Tensor, levels: Sequence[int]) -> torch.Tensor:
    """Fused standalone FSQ backward: ``dL/dx`` ``(B, N, C)`` in ``x``'s dtype."""
    grad_x = torch.empty_like(x)
    B, N, C = x.shape
    if B * N == 0:
        return grad_x.zero_()
    consts, _basis = constant_table(levels, x.device)
    tiles = config.elementwise_tiles(C, N)
    tiles_per_image = triton.cdiv(N, tiles.block_s)
    launch(_bwd_vq_fsq_kernel, (B * tiles_per_image,),
           (x, grad, grad_x, consts, C, N, tiles_per_image, *bcs_strides(x), *bcs_strides(grad), *bcs_strides(grad_x)),
           tiles=tiles, tensors=(x, grad, grad_x))
    return grad_x
