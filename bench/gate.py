"""Correctness gate: a backend is timed only if it agrees with the eager reference on the same input.

Exact backends (same semantics as the reference):
- indices: at most ``max(1, 1e-3 * P)`` token positions (P = B * spatial) may differ — a value
  within rounding error of a .5 boundary may legitimately round the other way;
- quantized: close (fp32 ``rtol=atol=1e-4``; bf16 output ``rtol=1/64, atol=1e-3``) at every position
  whose indices agree;
- fwd+bwd also: grad_z close (``atol = 1e-4 * max|ref|`` + ``rtol=1e-3``; bf16 ``1e-2``/``1/64``) at
  agreeing positions (for ``layernorm`` whole images with a flip are left out, because a flip moves
  that image's statistics), and each parameter gradient within 1e-2 relative L2 error (bf16 5e-2);
- nothing may be NaN/Inf.
The lucidrains peer has different semantics (``tan`` shift, its own per-stage scaling, no
conditioning): it is checked only for output shapes and finiteness.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from bench.cases import Case
from rfsq_kernels.reference import get_strategy


@dataclass
class GateResult:
    """``ok`` and a one-line ``detail`` (what was checked, or what disagreed)."""

    ok: bool
    detail: str


def _close(x: torch.Tensor, ref: torch.Tensor, keep: torch.Tensor, rtol: float, atol: float) -> Optional[str]:
    x, ref = x.float(), ref.float()
    if not torch.isfinite(x).all():
        return "non-finite values"
    bad = ((x - ref).abs() > atol + rtol * ref.abs()) & keep
    if bad.any():
        err = ((x - ref).abs() * keep).max().item()
        return f"{int(bad.sum())} values off (max abs err {err:.3g} at agreeing positions)"
    return None


def check_exact(case: Case, q: torch.Tensor, idx: torch.Tensor, q_ref: torch.Tensor, idx_ref: torch.Tensor,
                grads: Optional[Sequence[torch.Tensor]] = None,
                grads_ref: Optional[Sequence[torch.Tensor]] = None) -> GateResult:
    """Gate a reference-semantics backend: channel-first ``q``, ``idx`` ``(B, *spatial, K)``;
    ``grads`` = ``(grad_z, *param_grads)`` for fwd+bwd."""
    if q.shape != q_ref.shape or idx.shape != idx_ref.shape or q.dtype != q_ref.dtype:
        return GateResult(False, f"shape/dtype {tuple(q.shape)}/{q.dtype}, {tuple(idx.shape)} != "
                                 f"{tuple(q_ref.shape)}/{q_ref.dtype}, {tuple(idx_ref.shape)}")
    flipped = (idx != idx_ref).any(dim=-1)  # (B, *spatial)
    n_flip, allowed = int(flipped.sum()), max(1, int(1e-3 * flipped.numel()))
    if n_flip > allowed:
        return GateResult(False, f"{n_flip} of {flipped.numel()} positions have different indices (> {allowed})")
    keep = (~flipped).unsqueeze(1)  # broadcast over channels
    bf16 = q.dtype == torch.bfloat16
    why = _close(q, q_ref, keep, *((1 / 64, 1e-3) if bf16 else (1e-4, 1e-4)))
    if why:
        return GateResult(False, f"quantized: {why}")
    if grads is not None:
        g_keep = keep
        if get_strategy(case.strategy).per_image_stats:  # a flip moves its image's statistics
            img_flip = flipped.flatten(1).any(dim=1).view(-1, *([1] * (q.ndim - 1)))
            g_keep = keep & ~img_flip
        g, g_ref = grads[0], grads_ref[0]
        scale = g_ref.float().abs().max().item()
        why = _close(g, g_ref, g_keep, *((1 / 64, 1e-2 * scale) if bf16 else (1e-3, 1e-4 * scale)))
        if why:
            return GateResult(False, f"grad_z: {why}")
        for j, (p, p_ref) in enumerate(zip(grads[1:], grads_ref[1:])):
            rel = ((p.float() - p_ref.float()).norm() / p_ref.float().norm().clamp_min(1e-12)).item()
            if not rel <= (5e-2 if bf16 else 1e-2):
                return GateResult(False, f"param grad {j}: relative L2 error {rel:.3g}")
    return GateResult(True, f"matches reference ({n_flip} index flips of {flipped.numel()} positions)")


def check_peer(case: Case, q: torch.Tensor, idx: torch.Tensor, grad_x: Optional[torch.Tensor] = None) -> GateResult:
    """Gate the lucidrains peer (different semantics): channel-last ``(B, N, C)`` / ``(B, N, K)``
    shapes and finite outputs (and gradient) only."""
    b, c = case.shape[0], case.shape[1]
    n = case.positions // b
    if tuple(q.shape) != (b, n, c) or tuple(idx.shape) != (b, n, case.stages):
        return GateResult(False, f"shapes {tuple(q.shape)}, {tuple(idx.shape)} != {(b, n, c)}, {(b, n, case.stages)}")
    if not torch.isfinite(q).all() or (grad_x is not None and not torch.isfinite(grad_x).all()):
        return GateResult(False, "non-finite output or gradient")
    return GateResult(True, "peer with different semantics: shapes and finiteness checked only")
