"""Shared helpers of the fused-kernel tests: boundary-free random inputs, tolerant comparisons.

Rounding-boundary policy: an element whose pre-rounding value ``bounded`` (recomputed per stage
in float64 with the reference's formulas) lies within ``BOUNDARY_TOL`` of a ``.5`` boundary may
legitimately round differently in the kernel and in the float32 reference (different tanh
implementations, different summation order of the LN statistics) and, for layernorm, change the
statistics of every later stage. Instead of excluding such positions we redraw the whole input
until no element of any stage is that close, so every comparison below covers every element
with fixed, tight tolerances.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from rfsq_kernels.reference import fsq_constants

BOUNDARY_TOL = 5e-4
FP32_TOL = dict(rtol=1e-5, atol=1e-5)


def prerounding_values(z, levels, stages, strategy, params, eps=1e-5) -> List[torch.Tensor]:
    """Per-stage ``bounded`` values of the reference chain, in float64."""
    half_l, offset, shift, _ = fsq_constants(levels)
    nd = z.ndim
    view = lambda v: torch.tensor(v, dtype=torch.float64).view(-1, *([1] * (nd - 2)))  # noqa: E731
    hl, off, sh = view(half_l), view(offset), view(shift)
    hw = view([lv // 2 for lv in levels])
    r = z.detach().double()
    dims = tuple(range(2, nd))
    out = []
    for k in range(stages):
        if strategy == "none":
            u, undo = r, (lambda c: c)
        elif strategy == "scale":
            a = F.softplus(params["scale_param"][k].detach().double())
            u, undo = a * r, (lambda c, a=a: c / a)
        else:
            var, mu = torch.var_mean(r, dim=dims, correction=0, keepdim=True)
            sd = torch.sqrt(var + eps)
            w = params["ln_weight"][k].detach().double().view(1, -1, *([1] * (nd - 2)))
            b = params["ln_bias"][k].detach().double().view(1, -1, *([1] * (nd - 2)))
            u = w * (r - mu) / sd + b
            undo = lambda c, w=w, b=b, sd=sd, mu=mu: ((c - b) / w) * sd + mu  # noqa: E731
        bounded = torch.tanh(u + sh) * hl - off
        out.append(bounded)
        r = r - undo(torch.round(bounded) / hw)
    return out


def near_boundary(z, levels, stages, strategy, params, tol: float = BOUNDARY_TOL) -> bool:
    """True if any stage's ``bounded`` lies within ``tol`` of a ``.5`` rounding boundary."""
    for bounded in prerounding_values(z, levels, stages, strategy, params):
        frac = bounded - torch.floor(bounded)
        if bool(((frac - 0.5).abs() < tol).any()):
            return True
    return False


def make_params(levels: Sequence[int], stages: int, strategy: str) -> Dict[str, torch.Tensor]:
    """Random (non-default) parameters so that every parameter gradient is exercised."""
    C = len(levels)
    if strategy == "scale":
        return {"scale_param": (0.5413 + 0.3 * torch.randn(stages)).requires_grad_()}
    if strategy == "layernorm":
        return {"ln_weight": (0.6 + 0.8 * torch.rand(stages, C)).requires_grad_(),
                "ln_bias": (0.2 * torch.randn(stages, C)).requires_grad_()}
    return {}


def to_layout(z: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Copy ``z`` into contiguous or channels-last memory (rank 3: channel stride 1)."""
    if not channels_last:
        return z.contiguous()
    if z.ndim == 3:
        return z.transpose(1, 2).contiguous().transpose(1, 2)
    fmt = torch.channels_last if z.ndim == 4 else torch.channels_last_3d
    return z.contiguous(memory_format=fmt)


def draw_input(shape, levels, stages, strategy, params, dtype=torch.float32, channels_last=False,
               spread: float = 1.5, max_tries: int = 500) -> torch.Tensor:
    """A random latent (in ``dtype``, chosen layout) with no element near a rounding boundary."""
    for _ in range(max_tries):
        z = (spread * torch.randn(shape)).to(dtype)
        if not near_boundary(z, levels, stages, strategy, params):
            return to_layout(z, channels_last)
    raise RuntimeError("could not draw a boundary-free input; use a smaller shape")


def bf16_step(ref: torch.Tensor) -> torch.Tensor:
    """One bfloat16 step (ulp) at each value of ``ref`` (the interpreter truncates bf16 stores)."""
    mag = ref.detach().float().abs().clamp_min(2.0 ** -126)
    return torch.exp2(torch.floor(torch.log2(mag)) - 7)


def assert_close_values(actual: torch.Tensor, expected: torch.Tensor, name: str, scale: Optional[float] = None):
    """fp32: rtol/atol 1e-5 (relative to ``scale`` if given); bf16/fp16: one step of the dtype."""
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (name, actual.dtype, expected.dtype)
    if expected.dtype in (torch.bfloat16, torch.float16):
        a, e = actual.float(), expected.float()
        step = bf16_step(e) if expected.dtype == torch.bfloat16 else e.abs().clamp_min(2.0 ** -14) * 2.0 ** -10
        tol = step + (1e-5 if scale is None else 1e-5 * scale)
        bad = (a - e).abs() > tol
        assert not bool(bad.any()), f"{name}: {int(bad.sum())} elements off by more than one step; max {((a - e).abs() - tol).max()}"
    else:
        atol = FP32_TOL["atol"] if scale is None else FP32_TOL["atol"] * max(scale, 1e-30)
        torch.testing.assert_close(actual, expected, rtol=FP32_TOL["rtol"], atol=atol, msg=lambda m: f"{name}: {m}")


def assert_close_grads(actual: Optional[torch.Tensor], expected: Optional[torch.Tensor], name: str):
    """Gradients: rtol 1e-4 and atol 1e-4 * max|expected| (bf16: plus one bf16 step)."""
    assert (actual is None) == (expected is None), name
    if expected is None:
        return
    scale = float(expected.detach().float().abs().max()) or 1.0
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    if expected.dtype in (torch.bfloat16, torch.float16):
        assert_close_values(actual, expected, name, scale=10 * scale)
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{name}: {m}")


def run_both(fused_fn, ref_fn, z, levels, stages, strategy, params, grad=None):
    """Run fused and reference forward+backward on clones; return ``(fused, ref)`` dicts with
    the 4 outputs and the gradients of z and every parameter. ``grad=None`` uses ``out.sum()``
    (an expanded stride-0 incoming gradient)."""
    results = []
    for fn in (fused_fn, ref_fn):
        zz = z.detach().clone().requires_grad_()
        # clone preserves the layout (channels_last stays channels_last)
        ps = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        out = fn(zz, levels, stages, strategy, ps.get("scale_param"), ps.get("ln_weight"), ps.get("ln_bias"))
        loss = out[0].sum() if grad is None else (out[0].float() * grad).sum()
        loss.backward()
        grads = {"z": zz.grad, **{k: v.grad for k, v in ps.items()}}
        results.append({"out": out, "grads": grads})
    return results


def compare(fused, ref, check_grads: bool = True):
    """Compare :func:`run_both` results: indices exactly, values and gradients tightly."""
    (q, idx, mean, std), (rq, ridx, rmean, rstd) = fused["out"], ref["out"]
    assert idx.dtype == ridx.dtype and idx.shape == ridx.shape
    assert torch.equal(idx, ridx), f"{int((idx != ridx).sum())} indices differ"
    assert_close_values(q, rq, "quantized")
    assert_close_values(mean, rmean, "mean")
    assert_close_values(std, rstd, "std")
    if check_grads:
        for k in ref["grads"]:
            assert_close_grads(fused["grads"][k], ref["grads"][k], f"grad {k}")
