"""Graphs step of ``bench/gpu_validate.py``: CUDA-graph capture/replay and ``torch.compile``.

CUDA graphs: the fused module's forward (no grad), and forward+backward, are captured once on a
static input and replayed on a new one; the replay must equal an eager fused run on that input
bit for bit (same kernels, deterministic backward). ``torch.compile(fullgraph=True)`` of the fused
module, forward and backward: indices equal to eager fused, values and every gradient within the
test suite's tolerances (inductor may compute the scale's softplus in another order), and whether
they are bitwise equal is recorded. Dry run (CPU): graphs are skipped (CUDA only), compile uses
``aot_eager`` (inductor needs a C++ toolchain and minutes of CPU).
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional, Tuple

import torch

from fused_helpers import assert_close_grads, assert_close_values
from rfsq_kernels import RFSQ
from rfsq_kernels.testing import randomize_

SHAPE = {False: (8, 5, 32, 32), True: (2, 5, 5, 7)}  # device / dry run


def _module(strategy: str, device) -> RFSQ:
    torch.manual_seed(7)
    return randomize_(RFSQ(stages=4, strategy=strategy, levels=[4] * 5, backend="triton")).to(device)


def _eager(m: RFSQ, z: torch.Tensor, g: Optional[torch.Tensor]):
    """``(q, idx, grads)`` of the fused module (grads: z first, then the parameters) or no grads."""
    if g is None:
        with torch.no_grad():
            q, idx = m(z)
        return q, idx, []
    zz = z.detach().clone().requires_grad_()
    params = list(m.strategy_parameters().values())
    q, idx = m(zz)
    grads = torch.autograd.grad((q * g).sum(), [zz, *params])
    return q.detach(), idx, list(grads)


def check_cuda_graph(strategy: str, backward: bool, device) -> Dict:
    """Capture on one input, replay on another, compare with eager bitwise."""
    if device.type != "cuda":
        return {"status": "skipped", "reason": "CUDA graphs need CUDA (dry run on CPU)"}
    m = _module(strategy, device)
    shape = SHAPE[False]
    z_static = torch.randn(shape, device=device)
    g_static = torch.randn(shape, device=device) if backward else None
    params = list(m.strategy_parameters().values())

    def step():
        if not backward:
            with torch.no_grad():
                return list(m(z_static))
        zz = z_static.detach().requires_grad_()
        q, idx = m(zz)
        return [q.detach(), idx, *torch.autograd.grad((q * g_static).sum(), [zz, *params])]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, caches) outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    z_new = torch.randn(shape, device=device)
    z_static.copy_(z_new)
    graph.replay()
    torch.cuda.synchronize()
    q, idx, grads = _eager(m, z_new, g_static)
    expect = [q, idx, *grads]
    names = ["quantized", "indices", "grad z", *[f"grad {n}" for n in m.strategy_parameters()]][:len(expect)]
    for name, got, want in zip(names, outs, expect):
        assert torch.equal(got, want), f"replay {name} differs from eager: {int((got != want).sum())} elements"
    return {"shape": list(shape), "compared": names}


def check_compile(strategy: str, device, dry: bool) -> Dict:
    """``torch.compile(fused module, fullgraph=True)`` forward+backward against eager fused."""
    torch._dynamo.reset()
    backend = "aot_eager" if dry else "inductor"
    m = _module(strategy, device)
    shape = SHAPE[dry]
    z, g = torch.randn(shape, device=device), torch.randn(shape, device=device)
    params = list(m.strategy_parameters().values())
    compiled = torch.compile(m, fullgraph=True, backend=backend)

    def run(mod):
        zz = z.clone().requires_grad_()
        q, idx = mod(zz)
        return q.detach(), idx, torch.autograd.grad((q * g).sum(), [zz, *params])

    (cq, cidx, cgrads), (q, idx, grads) = run(compiled), run(m)
    assert torch.equal(cidx, idx), f"compiled indices differ: {int((cidx != idx).sum())}"
    assert_close_values(cq, q, "quantized")
    names = ["z", *m.strategy_parameters()]
    for name, a, e in zip(names, cgrads, grads):
        assert_close_grads(a, e, f"grad {name}")
    bitwise = torch.equal(cq, q) and all(torch.equal(a, e) for a, e in zip(cgrads, grads))
    return {"backend": backend, "bitwise": bitwise, "shape": list(shape)}


def subcases(ctx) -> List[Tuple[str, Callable[[], Optional[Dict]]]]:
    """CUDA graphs first (cheap), then compile (layernorm first: the default strategy)."""
    out = []
    for backward in (False, True):
        for s in ("layernorm", "scale", "none"):
            out.append((f"cuda-graph-{'fwdbwd' if backward else 'fwd'}-{s}",
                        functools.partial(check_cuda_graph, s, backward, ctx.device)))
    for s in ("layernorm", "scale", "none"):
        out.append((f"compile-fullgraph-fwdbwd-{s}", functools.partial(check_compile, s, ctx.device, ctx.dry)))
    return out
