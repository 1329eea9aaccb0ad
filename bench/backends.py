"""Backend builders: every implementation the benchmarks compare, behind one interface.

``fused``              RFSQ(backend='triton'): the fused Triton kernels (CUDA only here).
``eager``              the pure-PyTorch reference ``rfsq_forward`` run eagerly.
``compile``            ``torch.compile(reference, dynamic=False)`` (inductor).
``compile_cudagraphs`` ``torch.compile(reference, mode='reduce-overhead')`` (CUDA graphs; CUDA only).
``lucidrains``         ``vector_quantize_pytorch.ResidualFSQ`` with the same levels and stage count,
                       in its native channel-last ``(B, N, C)`` layout. Different semantics (its own
                       per-stage scaling ``levels**-k``, ``tan`` shift, no conditioning), so it is a
                       speed peer only; its correctness gate checks shapes and finiteness.

:func:`skip_reason` says why a backend cannot run a case on a device (or None); :func:`build`
returns a :class:`Built` whose ``fn`` maps the backend's native input to ``(quantized, indices)``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import torch

from bench.cases import Case, is_compile_representative
from rfsq_kernels import RFSQ
from rfsq_kernels.reference import rfsq_forward
from rfsq_kernels.testing import randomize_

BACKENDS: Tuple[str, ...] = ("fused", "eager", "compile", "compile_cudagraphs", "lucidrains")
PEERS: Tuple[str, ...] = BACKENDS[1:]
LABELS = {
    "fused": "fused Triton",
    "eager": "eager reference",
    "compile": "torch.compile(ref)",
    "compile_cudagraphs": "compile reduce-overhead",
    "lucidrains": "lucidrains ResidualFSQ (no cond.)",
}
PARAM_SEED = 1234


@dataclass
class Built:
    """A backend ready to run one case.

    ``fn(x) -> (quantized, indices)`` takes the native input (``to_native(z)`` of the channel-first
    ``z``); ``params`` are the trainable tensors whose gradients fwd+bwd computes besides the
    input's; ``exact`` is True when the backend implements the reference semantics (full gate);
    ``step_begin`` runs before every call (CUDA-graph step marking) or is None.
    """

    fn: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]
    params: Tuple[torch.Tensor, ...]
    exact: bool = True
    to_native: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda z: z)
    step_begin: Optional[Callable[[], None]] = None


def reference_module(case: Case, device: torch.device) -> RFSQ:
    """The reference ``RFSQ`` for ``case`` with deterministic, non-trivial parameters: the test
    suite's :func:`rfsq_kernels.testing.randomize_` (scale ``a_k`` around 1, LN weight around 1 and
    bias around 0) drawn from a generator seeded with ``PARAM_SEED``."""
    mod = RFSQ(stages=case.stages, strategy=case.strategy, levels=list(case.levels), backend="reference")
    randomize_(mod, generator=torch.Generator().manual_seed(PARAM_SEED))
    return mod.to(device)


def _fused_import_error() -> Optional[str]:
    try:
        import rfsq_kernels.fused  # noqa: F401
    except Exception as exc:  # any import failure (kernels being written, triton missing) is a skip
        return f"rfsq_kernels.fused failed to import: {type(exc).__name__}: {exc}"
    return None


def _lucidrains_import_error() -> Optional[str]:
    try:
        import vector_quantize_pytorch  # noqa: F401
    except Exception as exc:
        return (f"vector-quantize-pytorch not importable ({type(exc).__name__}); "
                "install it with pip install -e '.[bench]'")
    return None


def compile_on_cpu_everywhere() -> bool:
    """``RFSQ_BENCH_CPU_COMPILE=all`` runs torch.compile on every CPU case, not one."""
    return os.environ.get("RFSQ_BENCH_CPU_COMPILE", "").strip().lower() == "all"


FUSED_CPU_SKIP = ("fused Triton kernels are timed on CUDA only (on CPU they would run in the Triton "
                  "interpreter, whose time means nothing; tests/ check them there)")


def fused_gate_only(case: Case, device: torch.device) -> bool:
    """True where the suite gates (but never times) the fused kernels in the Triton interpreter:
    CPU, ``TRITON_INTERPRET=1`` set, training cases (a fraction of a second each)."""
    from rfsq_kernels.backend import interpreter_enabled

    return device.type == "cpu" and interpreter_enabled() and case.group == "training"


def skip_reason(backend: str, case: Case, device: torch.device, gate_only_ok: bool = False) -> Optional[str]:
    """Why ``backend`` is not run for ``case`` on ``device``, or None when it runs.

    ``gate_only_ok``: the caller only gates (does not time) fused on CPU where
    :func:`fused_gate_only` allows it.
    """
    cuda = device.type == "cuda"
    if backend == "fused":
        if not cuda and not (gate_only_ok and fused_gate_only(case, device)):
            return FUSED_CPU_SKIP
        return _fused_import_error()
    if backend == "compile_cudagraphs" and not cuda:
        return "mode='reduce-overhead' uses CUDA graphs: CUDA only"
    if backend == "compile" and not cuda and not (is_compile_representative(case) or compile_on_cpu_everywhere()):
        return ("CPU: torch.compile runs on one representative case only (seconds of compile per "
                "case); set RFSQ_BENCH_CPU_COMPILE=all to run it everywhere")
    if backend == "lucidrains":
        return _lucidrains_import_error()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return None


def _reference_fn(case: Case, mod: RFSQ) -> Callable:
    levels, stages, strategy, eps = list(case.levels), case.stages, case.strategy, mod.eps

    def fn(z, params):
        q, idx, _, _ = rfsq_forward(z, levels, stages, strategy, **params, eps=eps)
        return q, idx

    return fn


def _bind(fn: Callable, mod: RFSQ) -> Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]:
    params = mod.strategy_parameters()
    return lambda z: fn(z, params)


def build(backend: str, case: Case, device: torch.device) -> Built:
    """Build ``backend`` for ``case`` on ``device`` (call :func:`skip_reason` first)."""
    ref = reference_module(case, device)
    params = tuple(ref.strategy_parameters().values())
    if backend == "eager":
        return Built(_bind(_reference_fn(case, ref), ref), params)
    if backend in ("compile", "compile_cudagraphs"):
        torch._dynamo.reset()  # fresh caches: static shapes per case, no recompile-limit fallback
        mode = "reduce-overhead" if backend == "compile_cudagraphs" else None
        compiled = torch.compile(_reference_fn(case, ref), mode=mode, dynamic=False)
        step = torch.compiler.cudagraph_mark_step_begin if mode else None
        return Built(_bind(compiled, ref), params, step_begin=step)
    if backend == "fused":
        fused = RFSQ(stages=case.stages, strategy=case.strategy, levels=list(case.levels), backend="triton")
        fused.load_state_dict(ref.state_dict())
        fused = fused.to(device)
        return Built(lambda z: fused(z), tuple(fused.strategy_parameters().values()))
    if backend == "lucidrains":
        from vector_quantize_pytorch import ResidualFSQ

        peer = ResidualFSQ(levels=list(case.levels), num_quantizers=case.stages, dim=len(case.levels)).to(device)
        channels = case.shape[1]

        def to_native(z: torch.Tensor) -> torch.Tensor:
            return z.movedim(1, -1).reshape(z.shape[0], -1, channels).contiguous()

        return Built(lambda x: peer(x), tuple(p for p in peer.parameters() if p.requires_grad),
                     exact=False, to_native=to_native)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
