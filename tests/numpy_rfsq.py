"""An independent float64 NumPy implementation of FSQ/RFSQ written from SPEC.md, for tests only.

It also reports how close each pre-rounding value came to a .5 rounding boundary, so tests can
tell legitimate boundary flips (float32 vs float64) from real disagreement.
"""
from __future__ import annotations

import math

import numpy as np


def fsq_np(x: np.ndarray, levels):
    """FSQ of channel-first ``x`` (float64). Returns (codes, digits, min distance to a .5 boundary)."""
    codes = np.empty_like(x)
    digits = np.empty(x.shape, dtype=np.int64)
    margin = np.inf
    for c, level in enumerate(levels):
        half_l = (level - 1) * (1 - 1e-3) / 2
        offset = 0.5 if level % 2 == 0 else 0.0
        shift = math.atanh(offset / half_l) if offset < half_l else 0.0  # L=2: SPEC has no shift
        half_w = level // 2
        bounded = np.tanh(x[:, c] + shift) * half_l - offset
        rounded = np.round(bounded)  # numpy rounds half to even, like torch.round
        if bounded.size:
            margin = min(margin, float(np.min(np.abs(np.abs(bounded - np.floor(bounded)) - 0.5))))
        codes[:, c] = rounded / half_w
        digits[:, c] = (rounded + half_w).astype(np.int64)
    return codes, digits, margin


def pack_np(digits: np.ndarray, levels) -> np.ndarray:
    """Mixed-radix packing of digits (B, C, ...) -> (B, ...)."""
    out = np.zeros((digits.shape[0],) + digits.shape[2:], dtype=np.int64)
    base = 1
    for c, level in enumerate(levels):
        out += digits[:, c] * base
        base *= level
    return out


def rfsq_np(z: np.ndarray, levels, stages, strategy, scales=None, ln_w=None, ln_b=None, eps=1e-5):
    """K-stage RFSQ in float64. Returns (quantized, indices (B, *spatial, K), margin)."""
    r = z.astype(np.float64)
    total = np.zeros_like(r)
    idx, margin = [], np.inf
    axes = tuple(range(2, z.ndim))
    bshape = (1, -1) + (1,) * (z.ndim - 2)
    for k in range(stages):
        if strategy == "none":
            codes, digits, m = fsq_np(r, levels)
            q = codes
        elif strategy == "scale":
            a = scales[k]
            codes, digits, m = fsq_np(a * r, levels)
            q = codes / a
        else:
            mu = r.mean(axis=axes, keepdims=True)
            sd = np.sqrt(((r - mu) ** 2).mean(axis=axes, keepdims=True) + eps)
            w, b = ln_w[k].reshape(bshape), ln_b[k].reshape(bshape)
            codes, digits, m = fsq_np(w * (r - mu) / sd + b, levels)
            q = (codes - b) / w * sd + mu
        margin = min(margin, m)
        total += q
        r = r - q
        idx.append(pack_np(digits, levels))
    return total, np.stack(idx, axis=-1), margin
