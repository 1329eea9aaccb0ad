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


def rfsq_np(z: np.ndarray, levels, stages, strategy, scales=None, ln_w=None, ln_b=None, eps=1e-5,
            mask=None, active=None):
    """K-stage RFSQ in float64. Returns (quantized, indices (B, *spatial, K), margin).

    ``mask`` (B, *spatial) bool, True = valid: padded positions are skipped (output 0, index -1) and
    the LN statistics use the valid positions only (none valid: mean 0, variance 0).
    ``active`` (B,) ints: sample b runs stages k < active[b] only (index -1 beyond).
    Written per sample with explicit loops over the valid positions, independent of the reference.
    """
    B = z.shape[0]
    spatial = z.shape[2:]
    valid = np.ones((B,) + spatial, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    k_b = np.full(B, stages) if active is None else np.asarray(active)
    total = np.zeros(z.shape, dtype=np.float64)
    idx = np.full((B,) + spatial + (stages,), -1, dtype=np.int64)
    margin = np.inf
    for b in range(B):
        sel = valid[b]                      # (*spatial) bool
        r = z[b][:, sel].astype(np.float64)  # (C, n_valid): padding is never read
        out = np.zeros_like(r)
        for k in range(min(int(k_b[b]), stages)):
            if r.shape[1] == 0:
                break
            x = r[None]
            if strategy == "none":
                codes, digits, m = fsq_np(x, levels)
                q = codes[0]
            elif strategy == "scale":
                codes, digits, m = fsq_np(scales[k] * x, levels)
                q = codes[0] / scales[k]
            else:
                mu = r.mean(axis=1, keepdims=True)
                sd = np.sqrt(((r - mu) ** 2).mean(axis=1, keepdims=True) + eps)
                w, bb = ln_w[k][:, None], ln_b[k][:, None]
                codes, digits, m = fsq_np((w * (r - mu) / sd + bb)[None], levels)
                q = (codes[0] - bb) / w * sd + mu
            margin = min(margin, m)
            out += q
            r = r - q
            idx[b][sel, k] = pack_np(digits, levels)[0]
        total[b][:, sel] = out
    return total, idx, margin
