"""Indices of every integer dtype decode exactly or are refused clearly (issue 25, items 1 and 14):
every decoder reads them through ``rfsq_kernels.reference.check_indices`` (int64, then the range and
sentinel checks), so a uint8 index 255 is never the -1 sentinel and a uint64 above 2**63 never wraps
into one; decoders' rank checks name the shape the caller passed."""
from __future__ import annotations

import re

import pytest
import torch

from rfsq_kernels import FSQ, LFQ, RFSQ, VQEMA
from rfsq_kernels.reference import STRATEGIES, check_indices, rfsq_decode_stages
from rfsq_kernels.vqpytorch import FSQ as VqFSQ
from rfsq_kernels.vqpytorch import ResidualFSQ

#: Every integer dtype that holds 0..255 (int8 does not: it is covered with the sentinel below).
WIDE = [torch.uint8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.int64, torch.uint64]


def _saturated(strategy):
    """A 2-stage RFSQ with 256 codes per stage and indices that include 0 and 255."""
    m = RFSQ(stages=2, strategy=strategy, levels=[4, 4, 4, 4])
    z = torch.randn(2, 4, 3, 5) * 3
    z[0, :, 0, 0], z[1, :, 0, 0] = 50.0, -50.0  # index 255 / index 0 in stage 0
    idx, side = m.encode(z)
    assert int(idx.max()) == 255 and int(idx.min()) == 0
    return m, z, idx, side


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_integer_dtype_decodes_exactly(seed, strategy):
    m, z, idx, side = _saturated(strategy)
    want, want_codes, want_parts = m.decode(idx, side), m.indices_to_codes(idx), m.decode_stages(idx, side)
    assert torch.equal(want, m(z)[0])
    for dtype in WIDE:
        narrow = idx.to(dtype)
        assert torch.equal(m.decode(narrow, side), want), dtype
        assert torch.equal(m.indices_to_codes(narrow), want_codes), dtype
        for a, b in zip(m.decode_stages(narrow, side), want_parts):
            assert torch.equal(a, b), dtype
        assert torch.equal(m.get_codes_from_indices(narrow, side), m.get_codes_from_indices(idx, side)), dtype
    # the functional decoder reads them the same way
    parts = rfsq_decode_stages(idx.to(torch.uint8), m.levels, strategy, **m.strategy_parameters(),
                               mean=side[:, :, 0] if side.numel() else None, std=side[:, :, 1] if side.numel() else None)
    assert torch.equal(sum(parts), sum(want_parts))


def test_signed_narrow_dtypes_keep_the_sentinel():
    m = RFSQ(stages=2, strategy="none", levels=[3, 3])
    idx = torch.tensor([[[0, -1], [8, 4]], [[-1, -1], [5, -1]]], dtype=torch.int64)  # (B=2, N=2, K=2)
    want = m.decode(idx)
    for dtype in (torch.int8, torch.int16, torch.int32):
        assert torch.equal(m.decode(idx.to(dtype)), want)
    assert float(want[1, :, 0].abs().sum()) == 0  # the all-sentinel position decodes to 0


def test_values_no_dtype_can_hold_are_refused():
    m = RFSQ(stages=1, strategy="none", levels=[4, 4, 4, 4])
    huge = torch.tensor([[[2**64 - 1]]], dtype=torch.uint64)  # would be -1 (the sentinel) as int64
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 255\].*read from torch.uint64 as int64"):
        m.decode(huge)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 255\]"):
        m.decode(torch.tensor([[[256]]], dtype=torch.uint16))
    with pytest.raises(TypeError, match=r"indices must be an integer tensor .*got dtype torch.float32.*\.long\(\)"):
        m.decode(torch.zeros(1, 1, 1))
    with pytest.raises(TypeError, match="indices must be an integer tensor"):
        m.decode(torch.zeros(1, 1, 1, dtype=torch.bool))


def test_baseline_decoders_read_narrow_dtypes_and_check_ranks():
    fsq = FSQ([4, 4, 4, 4])
    idx = torch.tensor([[0, 255], [17, 200]])
    want = fsq.indices_to_codes(idx)
    assert torch.equal(fsq.indices_to_codes(idx.to(torch.uint8)), want)
    assert fsq.indices_to_codes(idx[:, 0]).shape == (2, 4)  # (B,) from a (B, C) input
    for bad in (torch.tensor(3), torch.zeros(1, 1, 1, 1, 1, dtype=torch.int64)):
        with pytest.raises(ValueError, match=r"indices must have shape \(B, \*spatial\), rank 1 to 4 .*got shape "
                                             + re.escape(f"{tuple(bad.shape)} (rank {bad.ndim})")):
            fsq.indices_to_codes(bad)
    lfq, vq = LFQ(8), VQEMA(256, 6)
    assert torch.equal(lfq.indices_to_codes(idx.to(torch.uint8)), lfq.indices_to_codes(idx))
    assert torch.equal(vq.indices_to_codes(idx.to(torch.uint8)), vq.indices_to_codes(idx))
    with pytest.raises(ValueError, match="rank 1 to 4"):
        lfq.indices_to_codes(torch.tensor(3))


def test_vqpytorch_decoders_read_narrow_dtypes():
    rfsq = ResidualFSQ(levels=[4, 4, 4, 4], num_quantizers=2, dim=4, backend="reference")
    x = torch.randn(2, 6, 4) * 3
    x[0, 0] = 50.0
    q, idx = rfsq(x)
    assert int(idx.max()) == 255
    for dtype in (torch.uint8, torch.int16, torch.uint32):
        assert torch.equal(rfsq.get_output_from_indices(idx.to(dtype)), rfsq.get_output_from_indices(idx))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 255\] \(or \[-1, 255\]"):
        rfsq.get_output_from_indices(idx - 2)
    fsq = VqFSQ(levels=[4, 4, 4, 4])
    _, fidx = fsq(x)
    assert torch.equal(fsq.indices_to_codes(fidx.to(torch.uint8)), fsq.indices_to_codes(fidx))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 255\]"):
        fsq.indices_to_codes(fidx + 256)


def test_flat_decode_errors_name_the_callers_shape():
    m = RFSQ(stages=2, strategy="none", levels=[4, 4])
    z = torch.randn(3, 2)
    idx, _ = m.encode(z)
    assert torch.equal(m.decode(idx), m(z)[0])
    with pytest.raises(ValueError, match=r"got \(3, 3\)$"):
        m.decode(torch.cat([idx, idx[:, :1]], dim=1))
    with pytest.raises(ValueError, match=r"got \(3, 3\)$"):
        m.get_codes_from_indices(torch.cat([idx, idx[:, :1]], dim=1))


def test_check_indices_returns_int64():
    out = check_indices(torch.tensor([[[1, -1]]], dtype=torch.int8), 16, stages=2, allow_sentinel=True)
    assert out.dtype == torch.int64 and out.tolist() == [[[1, -1]]]
    # an unsigned dtype cannot hold the sentinel: 255 is a real index, refused when out of range
    with pytest.raises(ValueError, match=r"got values in \[1, 255\]"):
        check_indices(torch.tensor([[[1, 255]]], dtype=torch.uint8), 16, stages=2, allow_sentinel=True)
