"""Decode is exact by construction (issue 17, docs/semantics.md "Arithmetic contract"): the
reference's ``decode`` of the fused path's indices and side information equals the fused
forward's quantized output bit for bit -- every strategy, odd and even level counts (odd half
widths: the code division is not a power of two), float32 and bfloat16, padding masks and
dropped stages. Decode has no tanh, so nothing in it may differ between devices; where a GPU
exists the CPU decode of the GPU's indices is checked too.

No boundary avoidance is needed: whatever digit the fused path chose, decode must reproduce the
value it added for it.
"""
import pytest
import torch

from fused_helpers import store_like_kernel
from rfsq_kernels.fused import rfsq_fused
from rfsq_kernels.reference import STRATEGIES, get_strategy, rfsq_decode_stages
from rfsq_kernels.testing import random_strategy_params

#: Odd and even counts; 13 has half width 6, whose reciprocal times the digit is not the quotient.
LEVELS = {"odd-even": [8, 5, 3, 4], "wide-odd": [13, 7, 6]}


def _decoded(idx, mean, std, levels, strategy, params, device="cpu"):
    stats = get_strategy(strategy).per_image_stats
    on = {k: v.to(device) for k, v in params.items()}
    parts = rfsq_decode_stages(idx.to(device), levels, strategy, **on, mean=mean.to(device) if stats else None,
                               std=std.to(device) if stats else None)
    total = torch.zeros_like(parts[0])
    for q in parts:
        total = total + q
    return total


@pytest.mark.parametrize("sparse", ["dense", "mask", "dropout", "mask+dropout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("levels", LEVELS.values(), ids=LEVELS.keys())
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_decode_of_fused_indices_equals_fused_forward_bitwise(seed, strategy, levels, dtype, sparse):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stages, B = 3, 3
    params = {k: v.to(device) for k, v in random_strategy_params(strategy, stages, len(levels)).items()}
    z = (1.5 * torch.randn(B, len(levels), 6, 7)).to(device=device, dtype=dtype)
    mask = active = None
    if "mask" in sparse:
        mask = torch.rand(B, 6, 7, device=device) > 0.3
    if "dropout" in sparse:
        active = torch.tensor([stages, 1, 2], device=device)
    with torch.no_grad():
        q, idx, mean, std = rfsq_fused(z, levels, stages, strategy, **params, mask=mask, active_stages=active)
        total = _decoded(idx, mean, std, levels, strategy, params, device)
    expected = store_like_kernel(total, dtype, interpreted=device == "cpu")
    assert torch.equal(q, expected), f"{int((q != expected).sum())} of {q.numel()} values differ"
    if mask is not None:
        assert not bool(q.masked_select(~mask.unsqueeze(1)).any())
    if device == "cuda":  # a codec decodes elsewhere: the CPU must reproduce the GPU's values
        cpu_total = _decoded(idx.cpu(), mean.cpu(), std.cpu(), levels, strategy, params)
        assert torch.equal(cpu_total, total.cpu())
