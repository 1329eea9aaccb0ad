"""One timed workload = (case, backend, mode): inputs, the closure to time, and its correctness gate.

``fwd`` is an inference forward (``torch.no_grad``); ``fwdbwd`` is a forward with autograd plus
``torch.autograd.grad`` of the quantized output (fed a fixed random gradient, not an expanded
``sum()`` gradient) w.r.t. the input and every trainable parameter — no ``.grad`` accumulation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Tuple

import torch

from bench.backends import Built, build
from bench.cases import Case, floor_bytes, make_input
from bench.gate import GateResult, check_exact, check_peer


@dataclass
class Workload:
    """``call()`` runs one step (no device sync); ``gate`` was checked on its output."""

    case: Case
    backend: str
    mode: str
    call: Callable[[], object]
    gate: GateResult
    floor_bytes: int


def _closure(built: Built, x: torch.Tensor, g: torch.Tensor, mode: str) -> Callable[[], Tuple]:
    step, fn = built.step_begin, built.fn
    if mode == "fwd":
        def call():
            if step is not None:
                step()
            with torch.no_grad():
                return fn(x)
        return call
    inputs = (x, *built.params)

    def call():
        if step is not None:
            step()
        q, idx = fn(x)
        return q, idx, torch.autograd.grad(q, inputs, g)
    return call


def _snapshot(out: Tuple) -> Tuple:
    """Clone outputs (CUDA-graph replays overwrite them)."""
    return tuple(_snapshot(o) if isinstance(o, tuple) else o.detach().clone() for o in out)


def prepare(case: Case, backend: str, mode: str, device: torch.device, seed: int = 0) -> Workload:
    """Build ``backend`` for ``case``, make inputs (``seed``), run it (three times for CUDA graphs:
    warm-up, record, replay) and gate the last output against the eager reference."""
    built = build(backend, case, device)
    z = make_input(case, device, seed)
    g_cf = make_input(case, device, seed + 1)  # incoming gradient, channel-first, random
    x = built.to_native(z).detach().requires_grad_(mode == "fwdbwd")
    g = built.to_native(g_cf)
    call = _closure(built, x, g, mode)
    out = None
    for _ in range(3 if built.step_begin is not None else 1):
        out = _snapshot(call())
    grads = out[2] if mode == "fwdbwd" else None
    if not built.exact:
        gate = check_peer(case, out[0], out[1], None if grads is None else grads[0])
    else:
        ref = build("eager", case, device)
        z_ref = z.detach().requires_grad_(mode == "fwdbwd")
        ref_out = _snapshot(_closure(ref, z_ref, g_cf, mode)())
        gate = check_exact(case, out[0], out[1], ref_out[0], ref_out[1],
                           grads, ref_out[2] if mode == "fwdbwd" else None)
    return Workload(case, backend, mode, call, gate, floor_bytes(case, mode))
