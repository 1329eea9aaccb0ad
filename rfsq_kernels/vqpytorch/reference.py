"""vector-quantize-pytorch's FSQ / ResidualFSQ math in plain PyTorch, op for op (1.26.0 - 1.32.0).

Every function here issues the same torch operations, on the same float32 constants, in the same
order as ``vector_quantize_pytorch`` 1.32.0, so values *and* autograd gradients are bitwise equal
to the library's on the same device (``docs/semantics.md``, "vector-quantize-pytorch"). What
differs, on purpose: indices are packed from the integer digits (the library packs in float32 and
is wrong above 2**24), and the implicit codebook is never built.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..reference.codebook import codebook_size, index_basis, index_dtype
from ..reference.fsq import round_ste
from ..reference.sentinel import SENTINEL

# codebook_size, index_dtype, round_ste and SENTINEL are the package's own (imported above, used
# as ``ref.<name>`` by the modules): the library's definitions agree with them.


def levels_tensor(levels: Sequence[int], device=None) -> Tensor:
    """The library's ``_levels`` buffer: int32 ``(C,)``."""
    return torch.tensor(list(levels), dtype=torch.int32, device=device)


def stage_scales(levels: Sequence[int], num_quantizers: int) -> Tensor:
    """The ``scales`` buffer ``(K, C)``: ``tensor(levels).float() ** -k``, as the library computes it."""
    lt = torch.tensor(list(levels))
    return torch.stack([lt.float() ** -k for k in range(num_quantizers)])


def default_soft_clamp(levels: Sequence[int]) -> Tensor:
    """``1 + 1 / (levels - 1)`` (float32 ``(C,)``): the soft clamp used with ``bound_hard_clamp``."""
    return 1 + (1 / (torch.tensor(list(levels)) - 1))


def soft_clamp(x: Tensor, clamp_value: Tensor) -> Tensor:
    """``tanh(x / c) * c`` (a bf16/fp16 ``x`` is promoted to float32 by the division, as in the library)."""
    return (x / clamp_value).tanh() * clamp_value


def floor_ste(z: Tensor) -> Tensor:
    """floor with a straight-through gradient, written like the library's."""
    return z + (z.floor() - z).detach()


def symmetric_bound(z: Tensor, levels_t: Tensor, hard_clamp: bool) -> Tuple[Tensor, Tensor]:
    """The library's ``symmetry_preserving_bound``: returns ``(codes, digits)``; ``digits`` is the
    floored bracket (float, detached) from which the index is packed exactly."""
    v = torch.clamp(z, min=-1., max=1.) if hard_clamp else torch.tanh(z)
    levels_minus_1 = levels_t - 1
    scale = 2. / levels_minus_1
    bracket = (levels_minus_1 * (v + 1) / 2.) + 0.5
    bracket = floor_ste(bracket)
    return scale * bracket - 1., bracket.detach()


def tanh_bound(z: Tensor, levels_t: Tensor, hard_clamp: bool, eps: float = 1e-3) -> Tuple[Tensor, Tensor]:
    """The library's default ``bound`` (standalone FSQ): returns ``(codes, digits)``."""
    half_l = (levels_t - 1) * (1 + eps) / 2
    offset = torch.where(levels_t % 2 == 0, 0.5, 0.0)
    ratio = offset / half_l
    if hard_clamp:  # the library's identity "atanh" and clamp "tanh"
        bounded = torch.clamp(z + ratio, min=-1., max=1.) * half_l - offset
    else:
        bounded = torch.tanh(z + torch.atanh(ratio)) * half_l - offset
    half_width = levels_t // 2
    rounded = round_ste(bounded)
    return rounded / half_width, (rounded.detach() + half_width)


def pack_digits(digits: Tensor, levels: Sequence[int]) -> Tensor:
    """Exact mixed-radix index of ``digits`` ``(..., C)`` (float or int): digits are clamped to
    ``[0, L-1]`` (NaN -> 0) so an index is never out of range; int32 when it fits, else int64."""
    top = torch.tensor([level - 1 for level in levels], device=digits.device)
    d = digits.nan_to_num(0.0) if digits.is_floating_point() else digits
    d = torch.minimum(torch.maximum(d.to(torch.int64), torch.zeros_like(top)), top)
    basis = torch.tensor(index_basis(levels), dtype=torch.int64, device=digits.device)
    return (d * basis).sum(-1).to(index_dtype(levels))


def unpack_indices(indices: Tensor, levels: Sequence[int]) -> Tensor:
    """Digits ``(..., C)`` int64 of packed ``indices`` (the library's ``indices_to_level_indices``,
    exact in int64)."""
    basis = torch.tensor(index_basis(levels), dtype=torch.int64, device=indices.device)
    lt = torch.tensor(list(levels), dtype=torch.int64, device=indices.device)
    return (indices.to(torch.int64)[..., None] // basis) % lt


def symmetric_codes_from_digits(digits: Tensor, levels_t: Tensor) -> Tensor:
    """``digit * (2 / (L - 1)) - 1`` in float32, the library's ``_scale_and_shift_inverse``
    (``preserve_symmetry``): equal to the forward's codes bit for bit."""
    return digits * (2. / (levels_t - 1)) - 1.


def tanh_codes_from_digits(digits: Tensor, levels_t: Tensor) -> Tensor:
    """``(digit - L//2) / (L//2)``, the library's default ``_scale_and_shift_inverse``."""
    half_width = levels_t // 2
    return (digits - half_width) / half_width


def residual_fsq_core(
    x: Tensor,
    levels: Sequence[int],
    scales: Tensor,
    clamp_value: Optional[Tensor],
    num_active: Optional[int] = None,
    hard_clamp: bool = True,
    noise: Optional[callable] = None,
    allowed_dtypes: Tuple[torch.dtype, ...] = (torch.float32, torch.float64),
    force_quantization_f32: bool = True,
) -> Tuple[Tensor, Tensor]:
    """ResidualFSQ's quantizer on ``x`` ``(B, N, C)`` (after ``project_in``): returns
    ``(quantized, indices)``, ``quantized`` float32 (promoted like the library) and ``indices``
    ``(B, N, K)`` with -1 for the stages at or after ``num_active`` (quantize dropout).

    ``noise(codes) -> codes`` applies the stage quantizer's noise dropout (training only);
    ``allowed_dtypes`` / ``force_quantization_f32`` are the stage FSQ's (they matter only when the
    module was cast, e.g. to bf16)."""
    levels_t = levels_tensor(levels, x.device)
    if clamp_value is not None:
        x = soft_clamp(x, clamp_value)
    quantized_out = 0.
    residual = x
    all_indices = []
    K = scales.shape[0]
    idx_dtype = index_dtype(levels) if num_active is None else torch.int64
    for k in range(K):
        if num_active is not None and k >= num_active:
            all_indices.append(torch.full(x.shape[:-1], SENTINEL, dtype=idx_dtype, device=x.device))
            continue
        scale = scales[k]
        z = residual / scale
        orig_dtype = z.dtype  # a cast module (bf16 buffers): the stage FSQ quantizes in float32
        if force_quantization_f32 and orig_dtype not in allowed_dtypes:
            z = z.float()
        codes, digits = symmetric_bound(z, levels_t, hard_clamp)
        all_indices.append(pack_digits(digits, levels).to(idx_dtype))
        if noise is not None:
            codes = noise(codes)
        quantized = codes.to(orig_dtype) * scale
        residual = residual - quantized.detach()
        quantized_out = quantized_out + quantized
    return quantized_out, torch.stack(all_indices, dim=-1)


def noise_dropout(codes: Tensor, p: float) -> Tensor:
    """The library's ``maybe_apply_noise`` (training): with probability ``p`` per element add
    ``U(-0.5, 0.5)``, then clamp to ``[-1, 1]``."""
    offset_mask = torch.full_like(codes, p).bernoulli_().bool()
    offset = torch.rand_like(codes) - 0.5
    return torch.where(offset_mask, codes + offset, codes).clamp(-1., 1.)


def codes_from_indices(indices: Tensor, levels: Sequence[int], scales: Tensor) -> Tensor:
    """Per-stage codes ``(K, *batch, C)`` float32 from ``indices`` ``(*batch, K)`` (-1: zeros),
    each ``codebook[index] * scales[k]`` as the library computes it, without the codebook."""
    levels_t = levels_tensor(levels, indices.device)
    mask = indices == SENTINEL
    digits = unpack_indices(indices.masked_fill(mask, 0), levels)          # (*batch, K, C)
    codes = symmetric_codes_from_digits(digits, levels_t)
    codes = codes.masked_fill(mask[..., None], 0.)
    codes = codes.movedim(-2, 0)                                           # (K, *batch, C)
    return codes * scales.reshape(scales.shape[0], *([1] * (codes.ndim - 2)), scales.shape[1])


def sum_stages(codes: Tensor) -> Tensor:
    """Sum ``(K, ...)`` codes in stage order, exactly as the forward does (``0. + q_0 + q_1 ...``)."""
    out = 0.
    for k in range(codes.shape[0]):
        out = out + codes[k]
    return out
