"""Shared helpers of the fused-kernel tests: boundary-free random inputs, tolerant comparisons.

Rounding-boundary policy (tests/numpy_rfsq.py, ``BOUNDARY_TOL``): an element whose pre-rounding
value lies too close to a ``.5`` boundary may legitimately round differently in the kernel and in
the float32 reference and, for layernorm, change the statistics of every later stage. Instead of
excluding such positions we redraw the whole input until the float64 oracle finds no element of
any stage that close, so every comparison below covers every element with fixed, tight tolerances.
Random parameters come from :mod:`rfsq_kernels.testing`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from numpy_rfsq import draw_clear_of_boundaries

FP32_TOL = dict(rtol=1e-5, atol=1e-5)


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
    z = draw_clear_of_boundaries(shape, levels, stages, strategy, params, dtype=dtype, spread=spread,
                                 tries=max_tries)[0]
    return to_layout(z, channels_last)


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
        out = fn(zz, levels, stages, strategy, **ps)
        loss = out[0].sum() if grad is None else (out[0].float() * grad).sum()
        loss.backward()
        grads = {"z": zz.grad, **{k: v.grad for k, v in ps.items()}}
        results.append({"out": out, "grads": grads})
    return results


def assert_values_match(q: torch.Tensor, rq: torch.Tensor, mean: torch.Tensor):
    """Quantized values. Without per-image statistics (``mean`` empty: none/scale) they are a
    function of the indices alone, computed with the same IEEE operations on both sides
    (docs/semantics.md, "Arithmetic contract"), so float32 outputs with equal indices are equal
    bit for bit; layernorm's depend on statistics reduced in another order (tolerance), and the
    interpreter truncates bf16 stores (one step)."""
    if mean.numel() == 0 and q.dtype == torch.float32:
        assert torch.equal(q, rq), f"quantized: {int((q != rq).sum())} values differ (expected bitwise)"
    else:
        assert_close_values(q, rq, "quantized")


def compare(fused, ref, check_grads: bool = True):
    """Compare :func:`run_both` results: indices exactly, values and gradients tightly."""
    (q, idx, mean, std), (rq, ridx, rmean, rstd) = fused["out"], ref["out"]
    assert idx.dtype == ridx.dtype and idx.shape == ridx.shape
    assert torch.equal(idx, ridx), f"{int((idx != ridx).sum())} indices differ"
    assert_values_match(q, rq, mean)
    assert_close_values(mean, rmean, "mean")
    assert_close_values(std, rstd, "std")
    if check_grads:
        for k in ref["grads"]:
            assert_close_grads(fused["grads"][k], ref["grads"][k], f"grad {k}")


class MustNotLaunch:
    """Stands in for a single-tile layernorm kernel (``direction``: ``"forward"`` or
    ``"backward"``) that the shape under test must not reach: a launch fails the test -- how the
    split tests prove the split path ran."""

    def __init__(self, direction: str):
        self.direction = direction

    def __getitem__(self, grid):
        raise AssertionError(f"the single-tile layernorm {self.direction} ran where the split path should")


def mask_and_counts(batch, spatial, stages):
    """Sample 0 all padding, sample 1 one valid position, the rest random; counts 0..K."""
    mask = torch.rand(batch, *spatial) > 0.35
    mask[0] = False
    mask[1] = False
    mask[1].view(-1)[-1] = True
    active = torch.randint(0, stages + 1, (batch,), dtype=torch.int32)
    active[2] = stages
    active[-1] = 0 if batch > 3 else active[-1]
    return mask, active


def masked_slice_case(shape: Sequence[int], stages: int, masked: slice,
                      one_valid: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """The split layernorm tests' mask and stage counts for an input ``shape`` ``(B, C, *spatial)``:
    about 30% random padding, the flat positions ``masked`` padding in every image (chosen by the
    caller to be one whole slice of the split kernels), sample 0 all padding and, with
    ``one_valid``, sample 1 only its last position valid; per-sample stage counts
    ``[stages, 1, stages, 0][:B]`` (quantize dropout). Returns ``(mask, active_stages)``."""
    mask = torch.rand(shape[0], *shape[2:]) > 0.3
    mask.view(shape[0], -1)[:, masked] = False
    mask[0] = False
    if one_valid:
        mask[1] = False
        mask[1].view(-1)[-1] = True
    active = torch.tensor([stages, 1, stages, 0][:shape[0]], dtype=torch.int32)
    return mask, active


def store_like_kernel(total: torch.Tensor, dtype: torch.dtype, interpreted: bool) -> torch.Tensor:
    """The float32 sum in the output dtype as the kernel stores it: round to nearest on a GPU;
    the Triton interpreter truncates bfloat16 stores (SPEC, interpreter facts)."""
    if dtype == torch.bfloat16 and interpreted:
        return (total.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    return total.to(dtype)
