"""pytest-benchmark suite: the ResidualFSQ drop-in (``rfsq_kernels.vqpytorch``) beside
vector-quantize-pytorch's own ResidualFSQ, same semantics, same ``(B, N, C)`` input.

Backends: ``library`` (vector_quantize_pytorch.ResidualFSQ), ``drop_in_reference`` (ours,
``backend='reference'``), ``drop_in_fused`` (ours, ``backend='triton'``: CUDA only; the
interpreter tests check it on CPU). Shapes: the training, large, audio and video cases of
``bench/cases.py`` (``vq_cases``). Each workload is gated against the library before timing:
the reference path must equal it bit for bit on CPU; on CUDA (and for the fused path) indices
must agree at >= 99% of positions (``tanh`` may differ in the last bit) and values closely.

    pytest bench/bench_vqpytorch.py --benchmark-only
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.cases import MODES, floor_bytes, make_input, vq_cases
from bench.timing import synchronized

vq = pytest.importorskip("vector_quantize_pytorch", reason="vector-quantize-pytorch is not installed "
                         "(pip install -e '.[bench]')")

BACKENDS = ("library", "drop_in_reference", "drop_in_fused")
CASES = vq_cases()


_MODULES = {}


def _module(backend: str, case, device: torch.device):
    """The module for (backend, levels, K, device), built once (the library builds its implicit
    codebooks, 128 MB for the 2**20-code cases, at construction)."""
    key = (backend, case.levels, case.stages, str(device))
    if key not in _MODULES:
        kw = dict(levels=list(case.levels), num_quantizers=case.stages)
        if backend == "library":
            _MODULES[key] = vq.ResidualFSQ(**kw).to(device)
        else:
            from rfsq_kernels.vqpytorch import ResidualFSQ

            _MODULES[key] = ResidualFSQ(backend="triton" if backend == "drop_in_fused" else "reference",
                                        **kw).to(device)
    return _MODULES[key]


def _closure(module, x, g, mode):
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return module(x)
        return call

    def call():
        q, idx = module(x)
        return q, idx, torch.autograd.grad(q, (x,), g.to(q.dtype))
    return call


def _gate(out, ref, exact: bool) -> str:
    (q, idx), (rq, ridx) = out[:2], ref[:2]
    rq = rq.to(q.dtype)
    if exact:
        assert torch.equal(q, rq) and torch.equal(idx, ridx), "WRONG: not bitwise the library's output"
        if len(out) > 2:
            assert torch.equal(out[2][0], ref[2][0]), "WRONG: gradient not bitwise the library's"
        return "bitwise"
    agree = float((idx == ridx).float().mean())
    assert agree >= 0.99, f"WRONG: only {agree:.4f} of indices agree with the library"
    return f"indices agree {agree:.5f}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_vq_residual_fsq(benchmark, request, device: torch.device, case, backend: str, mode: str) -> None:
    """Gate against the library, then time one (case, backend, mode)."""
    if backend == "drop_in_fused" and device.type != "cuda":
        pytest.skip("the fused drop-in is timed on CUDA only (tests/dropins/test_vqpytorch_fused.py checks it in the "
                    "Triton interpreter)")
    z = make_input(case, device)
    x = z.movedim(1, -1).reshape(z.shape[0], -1, z.shape[1]).contiguous().requires_grad_(mode == "fwdbwd")
    g = make_input(case, device, seed=1).movedim(1, -1).reshape(x.shape).contiguous()
    call = _closure(_module(backend, case, device), x, g, mode)
    out = call()
    if backend != "library":
        ref = _closure(_module("library", case, device), x, g, mode)()
        exact = backend == "drop_in_reference" and device.type == "cpu"
        gate = _gate(out, ref, exact)
    else:
        gate = "the library itself"
    copy_gbs = request.getfixturevalue("copy_gbs")
    nbytes = floor_bytes(case, mode)
    benchmark.group = f"vq-{case.name}-{mode}"
    benchmark.extra_info.update(dataclasses.asdict(case), case=case.name, backend=backend, mode=mode,
                                device=str(device), gate=gate, floor_bytes=nbytes, copy_gbs=round(copy_gbs, 2),
                                floor_ms=nbytes / (copy_gbs * 1e9) * 1e3, bits_per_token=case.bits_per_token)
    benchmark(synchronized(call, device))
