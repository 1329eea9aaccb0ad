"""The test suite's float64 oracle: an independent NumPy implementation of FSQ/RFSQ written from
docs/semantics.md (it imports nothing from the package), and the one rounding-boundary tolerance.

Besides codes and indices it reports how close each pre-rounding value came to a .5 rounding
boundary, so tests can tell legitimate boundary flips (float32 vs float64, kernel vs reference)
from real disagreement: :func:`draw_clear_of_boundaries` redraws inputs until every value of every
stage lies at least :data:`BOUNDARY_TOL` from a boundary, so comparisons cover every element with
fixed, tight tolerances.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

#: Distance of a pre-rounding value ``bounded = tanh(u + shift) * half_l - offset`` to the nearest
#: ``.5`` boundary below which two correct implementations may round it differently.
#:
#: Why 1e-4: the float32 chains under test (the reference; the fused kernels, with their own tanh
#: and LN summation order) differ from float64 by a few float32 ulps per operation, and the error
#: grows along the residual chain (``r_{k+1} = r_k - q_k`` cancels most of ``r_k``; ``layernorm``
#: rescales the small residual back to unit size before rounding). Measured for the float32
#: reference against float64 (levels up to L = 16, up to 8 stages, all strategies, random
#: parameters; 30 draws each): at most 5e-6, so 1e-4 leaves a factor 20. One flip changes every
#: later stage, so inputs that come closer are redrawn (or, for single FSQ values, skipped)
#: rather than compared with a looser tolerance. The same constant serves the reference, the fused
#: kernels and the two FSQ conventions of the vector-quantize-pytorch migration test.
BOUNDARY_TOL = 1e-4


def boundary_distance(bounded: np.ndarray) -> np.ndarray:
    """Elementwise distance of ``bounded`` to the nearest ``.5`` rounding boundary."""
    return np.abs(np.abs(bounded - np.floor(bounded)) - 0.5)


def fsq_np(x: np.ndarray, levels) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FSQ of channel-first ``x`` (float64). Returns (codes, digits, distance to a .5 boundary),
    all shaped like ``x``."""
    codes = np.empty_like(x)
    digits = np.empty(x.shape, dtype=np.int64)
    distance = np.empty_like(x)
    for c, level in enumerate(levels):
        half_l = (level - 1) * (1 - 1e-3) / 2
        offset = 0.5 if level % 2 == 0 else 0.0
        shift = math.atanh(offset / half_l) if offset < half_l else 0.0  # L=2: no shift (docs/semantics.md)
        half_w = level // 2
        bounded = np.tanh(x[:, c] + shift) * half_l - offset
        rounded = np.round(bounded)  # numpy rounds half to even, like torch.round
        distance[:, c] = boundary_distance(bounded)
        codes[:, c] = rounded / half_w
        digits[:, c] = (rounded + half_w).astype(np.int64)
    return codes, digits, distance


def pack_np(digits: np.ndarray, levels) -> np.ndarray:
    """Mixed-radix packing of digits (B, C, ...) -> (B, ...)."""
    out = np.zeros((digits.shape[0],) + digits.shape[2:], dtype=np.int64)
    base = 1
    for c, level in enumerate(levels):
        out += digits[:, c] * base
        base *= level
    return out


def _float64(t) -> Optional[np.ndarray]:
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return t.detach().to("cpu", torch.float64).numpy()
    return np.asarray(t, dtype=np.float64)


def _stage_none(r, k, params, levels, eps):
    codes, digits, dist = fsq_np(r[None], levels)
    return codes[0], digits, dist


def _stage_scale(r, k, params, levels, eps):
    a = np.logaddexp(0.0, params["scale_param"][k])  # softplus
    codes, digits, dist = fsq_np(a * r[None], levels)
    return codes[0] / a, digits, dist


def _stage_layernorm(r, k, params, levels, eps):
    mu = r.mean(axis=1, keepdims=True)
    sd = np.sqrt(((r - mu) ** 2).mean(axis=1, keepdims=True) + eps)
    w, b = params["ln_weight"][k][:, None], params["ln_bias"][k][:, None]
    codes, digits, dist = fsq_np((w * (r - mu) / sd + b)[None], levels)
    return (codes[0] - b) / w * sd + mu, digits, dist


#: Stage math of each strategy in float64: ``(r (C, n_valid), k, params by name (float64 arrays,
#: as stored: ``scale_param`` before the softplus), levels, eps) -> (q_k (C, n), digits (1, C, n),
#: distance to a .5 boundary)``. A new strategy adds its entry here.
ORACLE_STAGES: Dict[str, Callable] = {"none": _stage_none, "scale": _stage_scale, "layernorm": _stage_layernorm}


def rfsq_np(z, levels, stages, strategy, eps=1e-5, mask=None, active_stages=None,
            **params) -> Tuple[np.ndarray, np.ndarray, float]:
    """K-stage RFSQ in float64. Returns (quantized, indices (B, *spatial, K), margin): ``margin`` is
    the smallest distance of any pre-rounding value (valid positions, run stages) to a .5 boundary.

    ``z`` and the parameters (by the keyword names of ``rfsq_forward``, e.g. ``scale_param`` before
    the softplus, ``ln_weight``, ``ln_bias``) may be tensors or arrays; they are read in float64.
    ``mask`` (B, *spatial) bool, True = valid: padded positions are skipped (output 0, index -1) and
    the LN statistics use the valid positions only (none valid: mean 0, variance 0).
    ``active_stages`` (B,) ints: sample b runs stages k < active_stages[b] only (index -1 beyond).
    Written per sample with explicit loops over the valid positions, independent of the reference.
    """
    z = _float64(z)
    stage = ORACLE_STAGES[strategy]
    params = {name: _float64(value) for name, value in params.items() if value is not None}
    B = z.shape[0]
    spatial = z.shape[2:]
    valid = np.ones((B,) + spatial, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    k_b = np.full(B, stages) if active_stages is None else np.asarray(active_stages)
    total = np.zeros(z.shape, dtype=np.float64)
    idx = np.full((B,) + spatial + (stages,), -1, dtype=np.int64)
    margin = np.inf
    for b in range(B):
        sel = valid[b]                      # (*spatial) bool
        r = z[b][:, sel]                    # (C, n_valid): padding is never read
        out = np.zeros_like(r)
        for k in range(min(int(k_b[b]), stages)):
            if r.shape[1] == 0:
                break
            q, digits, dist = stage(r, k, params, levels, eps)
            margin = min(margin, float(dist.min()))
            out += q
            r = r - q
            idx[b][sel, k] = pack_np(digits, levels)[0]
        total[b][:, sel] = out
    return total, idx, margin


def draw_clear_of_boundaries(shape: Sequence[int], levels, stages: int, strategy: str,
                             params: Dict[str, torch.Tensor], mask: Optional[torch.Tensor] = None,
                             active_stages: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32,
                             spread: float = 1.5, tries: int = 500) -> Tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Draw ``z = spread * N(0, 1)`` (cast to ``dtype``, contiguous) until :func:`rfsq_np` finds no
    pre-rounding value within :data:`BOUNDARY_TOL` of a .5 boundary; return ``(z, quantized,
    indices)`` of the oracle for it. ``params``: the strategy's parameters by keyword name."""
    np_mask = None if mask is None else mask.numpy()
    np_active = None if active_stages is None else active_stages.numpy()
    for _ in range(tries):
        z = (spread * torch.randn(tuple(shape))).to(dtype)
        q, idx, margin = rfsq_np(z, levels, stages, strategy, **params, mask=np_mask, active_stages=np_active)
        if margin > BOUNDARY_TOL:
            return z, q, idx
    raise RuntimeError(f"no input of shape {tuple(shape)} clear of rounding boundaries in {tries} draws; "
                       "use a smaller shape or fewer stages")
