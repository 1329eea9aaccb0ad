"""Host-side launch configuration: memory layout, per-level constant tables, block sizes.

Block-size / num_warps heuristic (one 2-D tile ``[BLOCK_C, BLOCK_S]`` per program):

* ``BLOCK_C = next_pow2(C)`` (all channels of a position live in one program, because the
  index of a position packs every channel's digit);
* ``BLOCK_S = min(next_pow2(S), MAX_BLOCK_ELEMS // BLOCK_C)``, so a tile holds at most
  ``MAX_BLOCK_ELEMS`` (4096) elements: enough work per program to amortise the per-stage
  constants, small enough that the backward's ~8 live float32 tiles stay in registers;
* ``num_warps = clamp(BLOCK_C * BLOCK_S / 512, 1, 8)`` (about 16 elements per thread per tile).

``none``/``scale`` launch one program per (image, spatial tile). ``layernorm`` launches one program
per image: its statistics reduce over all positions of an image, and a stage's statistics depend on
every earlier stage. When ``S > BLOCK_S`` the program loops over chunks of ``BLOCK_S`` positions
(the chunked multi-pass path: two reduction passes per stage, then one output pass; the residual is
recomputed from the input and the saved statistics in every pass instead of being stored).

``MAX_BLOCK_ELEMS`` is the knob that tests lower to force the chunked path.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from ..backend import interpreter_enabled
from ..reference.codebook import fsq_constants, index_basis

#: Upper bound on the elements of one program's ``[BLOCK_C, BLOCK_S]`` tile.
MAX_BLOCK_ELEMS = 4096

_TABLES: Dict[Tuple[Tuple[int, ...], torch.device], Tuple[torch.Tensor, torch.Tensor]] = {}


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def block_config(channels: int, spatial: int, max_elems: Optional[int] = None) -> Tuple[int, int, int]:
    """``(BLOCK_C, BLOCK_S, num_warps)`` for ``channels`` x ``spatial`` (see module docstring)."""
    max_elems = MAX_BLOCK_ELEMS if max_elems is None else int(max_elems)
    block_c = next_pow2(channels)
    block_s = max(min(next_pow2(spatial), max_elems // block_c), 2)
    num_warps = min(max((block_c * block_s) // 512, 1), 8)
    return block_c, block_s, num_warps


def use_libdevice(t: torch.Tensor) -> bool:
    """libdevice (exact tanh, ties-to-even rint) on a real GPU; exp/floor fallbacks otherwise."""
    return t.is_cuda and not interpreter_enabled()


def level_tables(levels: Sequence[int], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cached ``(consts, basis)``: float32 ``(5, C)`` rows half_l, offset, shift, half_w, L-1
    (float64 values rounded to float32, exactly as the reference builds them) and int64 ``(C,)``
    mixed-radix place values. Built once per (levels, device), so later calls (and CUDA-graph
    capture) do no host-to-device copies."""
    key = (tuple(levels), torch.device(device))
    hit = _TABLES.get(key)
    if hit is None:
        half_l, offset, shift, half_w = fsq_constants(levels)
        rows = [half_l, offset, shift, [float(v) for v in half_w], [float(v - 1) for v in levels]]
        consts = torch.tensor(rows, dtype=torch.float32, device=device)
        basis = torch.tensor(index_basis(levels), dtype=torch.int64, device=device)
        hit = _TABLES[key] = (consts, basis)
    return hit


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


def needs_int64(*tensors: torch.Tensor) -> bool:
    """True when some element offset of these tensors may not fit in int32."""
    return any(max_offset(t) >= 2**31 - 1 for t in tensors)
