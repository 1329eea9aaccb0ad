"""Decode's side information dtypes and the output of positions without a code (issue 25, items 7, 8).

- ``side`` is read as float32, encode's statistics: a float64 copy decodes exactly (in decode's
  ``dtype``), a float64 side that is not float32 is refused, a bf16/fp16 side is refused.
- With ``dim=`` projections, a position no stage quantized (masked, or a sample with 0 active
  stages) outputs 0, not ``project_out.bias``, in forward and in decode alike.
"""
from __future__ import annotations

import pytest
import torch

from rfsq_kernels import RFSQ
from rfsq_kernels.reference import rfsq_decode_stages


def _layernorm_codec():
    m = RFSQ(stages=2, strategy="layernorm", levels=[8, 5, 4])
    with torch.no_grad():
        m.ln_weight.uniform_(0.5, 1.5)
        m.ln_bias.uniform_(-0.3, 0.3)
    z = torch.randn(4, 3, 8, 10) * 2 + 0.3
    idx, side = m.encode(z)
    return m, z, idx, side


def test_float64_side_decodes_exactly_in_the_requested_dtype(seed):
    m, z, idx, side = _layernorm_codec()
    want = m(z)[0]
    out = m.decode(idx, side.double())
    assert out.dtype == torch.float32
    assert torch.equal(out, want)
    assert torch.equal(m.decode(idx, side.double(), dtype=torch.bfloat16), want.bfloat16())
    for a, b in zip(m.decode_stages(idx, side.double()), m.decode_stages(idx, side)):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_float64_side_that_is_not_float32_is_refused(seed):
    m, z, idx, side = _layernorm_codec()
    off = side.double()
    off[0, 0, 1, 0] += 1e-12  # no float32 has this value: not encode's output
    with pytest.raises(ValueError, match="side is float64 and holds values that float32 does not represent exactly"):
        m.decode(idx, off)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_side_is_refused(seed, dtype):
    m, z, idx, side = _layernorm_codec()
    with pytest.raises(TypeError, match=rf"side is {dtype}.*lost their low bits.*float32"):
        m.decode(idx, side.to(dtype))
    # a strategy without statistics has an empty side: its dtype carries nothing
    none = RFSQ(stages=2, strategy="none", levels=[8, 5, 4])
    nidx, nside = none.encode(z)
    assert torch.equal(none.decode(nidx, nside.to(dtype)), none(z)[0])


def test_functional_decode_refuses_non_float32_statistics(seed):
    m, z, idx, side = _layernorm_codec()
    with pytest.raises(TypeError, match="mean must be float32"):
        rfsq_decode_stages(idx, m.levels, "layernorm", **m.strategy_parameters(), mean=side[:, :, 0].double(),
                           std=side[:, :, 1])


@pytest.mark.parametrize("channel_first", [True, False])
@pytest.mark.parametrize("strategy", ["none", "layernorm"])
def test_projected_output_is_zero_where_no_stage_quantized(seed, strategy, channel_first):
    m = RFSQ(stages=2, strategy=strategy, levels=[8, 5, 4], dim=6, channel_first=channel_first)
    with torch.no_grad():
        m.project_out.bias.uniform_(0.5, 1.0)  # far from 0, so a leaked bias shows
    z = torch.randn(3, 6, 4, 5)
    if not channel_first:
        z = z.movedim(1, -1)
    mask = torch.rand(3, 4, 5) > 0.3
    mask[0, 0, 0] = False
    out, idx = m(z, mask=mask)
    masked = out.movedim(1, -1)[~mask] if channel_first else out[~mask]
    assert masked.numel() and float(masked.detach().abs().max()) == 0.0
    kept = out.movedim(1, -1)[mask] if channel_first else out[mask]
    assert bool((kept != 0).any())
    idx2, side = m.encode(z, mask=mask)
    assert torch.equal(m.decode(idx2, side), out)
    # a sample with 0 active stages has no code anywhere: 0 too, and decode agrees
    counts = torch.tensor([0, 1, 2])
    out, idx = m(z, stages=counts)
    first = out[0]
    assert float(first.abs().max()) == 0.0 and bool((out[2] != 0).any())
    _, side = m.encode(z, stages=counts)
    assert torch.equal(m.decode(idx, side), out)


def test_projected_flat_output_is_zero_where_masked(seed):
    m = RFSQ(stages=2, strategy="scale", levels=[8, 5, 4], dim=6)
    with torch.no_grad():
        m.project_out.bias.fill_(0.75)
    z = torch.randn(5, 6)
    mask = torch.tensor([True, False, True, False, True])
    out, idx = m(z, mask=mask)
    assert out.shape == (5, 6) and float(out[~mask].abs().max()) == 0.0
    assert torch.equal(m.decode(idx), out)
    # the projection gets no gradient from the masked rows
    m.zero_grad()
    m(z, mask=mask)[0].sum().backward()
    assert float(m.project_out.bias.grad[0]) == float(mask.sum())


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("shape,channel_first", [((2, 4, 1, 1), True), ((2, 4, 1), True), ((2, 1, 1, 4), False),
                                                 ((2, 1, 1, 1, 4), False), ((2, 4), True)])
def test_layernorm_refuses_one_position_per_sample(backend, shape, channel_first):
    """Item 5: with one spatial position, layernorm's output copies its input and the side
    information carries the whole signal; every such shape is refused like (B, C) (other strategies
    quantize it)."""
    m = RFSQ(stages=2, backend=backend, channel_first=channel_first)
    z = torch.randn(shape)
    calls = [lambda: m(z), lambda: m.encode(z)]
    if channel_first and len(shape) > 2:
        calls.append(lambda: m.quantize(z))
    for call in calls:
        with pytest.raises(ValueError, match=r"(one spatial position per sample|is \(B, C\)).*side information would "
                                             r"carry the whole signal"):
            call()
    q, idx = RFSQ(stages=2, strategy="scale", backend=backend, channel_first=channel_first)(z)
    assert q.shape == z.shape
    RFSQ(stages=2, backend=backend)(torch.randn(2, 4, 1, 2))  # two positions: fine
