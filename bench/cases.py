"""Benchmark cases shared by the pytest-benchmark suite and ``bench/report.py``.

A :class:`Case` is one RFSQ problem: input shape (channel-first), levels, stage count, strategy and
input dtype. :func:`select_cases` returns the full GPU list or a tiny CPU list (same structure, small
shapes) and :func:`floor_bytes` the bytes that must move through memory at least (the byte floor).

Size selection: ``RFSQ_BENCH_SIZE=full|tiny``; default ``full`` when CUDA is available, else ``tiny``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from rfsq_kernels.reference import STRATEGIES, get_strategy, index_dtype

MODES: Tuple[str, ...] = ("fwd", "fwdbwd")

# Levels per configuration (C == len(levels)).
LEVELS_K2 = (8, 8, 8, 4)            # SPEC default for 2 stages: 2 x 2048 codes, 22 bits/token
LEVELS_K4 = (4, 4, 4, 4, 4)         # SPEC default for 4 stages: 4 x 1024 codes, 40 bits/token
LEVELS_C8 = (8, 8, 8, 8, 4, 4, 4, 4)  # large / audio / sweep: mixed per-channel constants, 2^20 codes
LEVELS_C6 = (8, 8, 8, 5, 5, 5)      # video: includes odd L (offset 0), 64000 codes

SWEEP_STRATEGY = "layernorm"
SWEEP_SPATIAL = (32, 32)            # sweep grows the batch of 8-channel 32x32 latents


@dataclass(frozen=True)
class Case:
    """One benchmark problem. ``shape`` is channel-first ``(B, C, *spatial)``."""

    group: str          # training | large | audio | video | sweep
    shape: Tuple[int, ...]
    levels: Tuple[int, ...]
    stages: int
    strategy: str
    dtype: str = "float32"  # float32 | bfloat16

    @property
    def name(self) -> str:
        """Stable id, e.g. ``training-128x5x32x32-K4-layernorm-fp32``."""
        dt = {"float32": "fp32", "bfloat16": "bf16"}[self.dtype]
        dims = "x".join(str(s) for s in self.shape)
        return f"{self.group}-{dims}-K{self.stages}-{self.strategy}-{dt}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def numel(self) -> int:
        """N = B * C * prod(spatial)."""
        return math.prod(self.shape)

    @property
    def positions(self) -> int:
        """P = B * prod(spatial): number of index tuples (tokens)."""
        return self.numel // self.shape[1]

    @property
    def bits_per_token(self) -> float:
        return self.stages * math.log2(math.prod(self.levels))


def floor_bytes(case: Case, mode: str) -> int:
    """Fewest bytes an implementation must move for ``mode`` (``fwd`` or ``fwdbwd``).

    forward: read z + write quantized (input dtype) + write indices (int32/int64, P*K) + for
    ``layernorm`` write the LN mean/std (2*B*K*C float32). fwd+bwd adds: read z again, read the
    incoming gradient, write grad_z (3*N more elements in the input dtype). Parameter gradients
    (a few floats) are ignored.
    """
    e = torch.empty((), dtype=case.torch_dtype).element_size()
    i = torch.empty((), dtype=index_dtype(list(case.levels))).element_size()
    n, p = case.numel, case.positions
    fwd = 2 * n * e + p * case.stages * i
    if case.strategy not in (VQ_STRATEGY, VQ_FSQ_STRATEGY) and get_strategy(case.strategy).per_image_stats:
        # the (B, K, C) mean and std
        fwd += 2 * case.shape[0] * case.stages * case.shape[1] * 4
    if mode == "fwd":
        return fwd
    if mode == "fwdbwd":
        return fwd + 3 * n * e
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def tiny_mode() -> bool:
    """True when small CPU-sized shapes are selected (``RFSQ_BENCH_SIZE`` or no CUDA)."""
    size = os.environ.get("RFSQ_BENCH_SIZE", "").strip().lower()
    if size in ("tiny", "full"):
        return size == "tiny"
    if size:
        raise ValueError(f"RFSQ_BENCH_SIZE must be 'tiny' or 'full', got {size!r}")
    return not torch.cuda.is_available()


def _all_strategies(group: str, shape: Sequence[int], levels: Tuple[int, ...], stages: int,
                    dtypes: Sequence[str]) -> List[Case]:
    return [Case(group, tuple(shape), levels, stages, s, dt) for dt in dtypes for s in STRATEGIES]


def sweep_cases(tiny: bool) -> List[Case]:
    """Size sweep for :data:`SWEEP_STRATEGY`: total elements 2^16..2^27 (tiny: 2^13..2^18),
    shape ``(B, 8, 32, 32)`` with B = N / 8192 (tiny: ``(B, 8, 8, 8)``, B = N / 512)."""
    spatial = (8, 8) if tiny else SWEEP_SPATIAL
    per_image = len(LEVELS_C8) * math.prod(spatial)
    lo, hi = (13, 18) if tiny else (16, 27)
    return [Case("sweep", (2**p // per_image, len(LEVELS_C8), *spatial), LEVELS_C8, 4, SWEEP_STRATEGY)
            for p in range(lo, hi + 1)]


def main_cases(tiny: bool) -> List[Case]:
    """Training (fp32+bf16), large (fp32+bf16), audio and video cases, all three strategies."""
    if tiny:
        t2, t4, large = (4, 4, 16, 16), (4, 5, 16, 16), (2, 8, 32, 32)
        audio, video = (2, 8, 1024), (1, 6, 4, 16, 16)
    else:
        t2, t4, large = (128, 4, 32, 32), (128, 5, 32, 32), (64, 8, 128, 128)
        audio, video = (32, 8, 16384), (8, 6, 8, 64, 64)
    both = ("float32", "bfloat16")
    return (_all_strategies("training", t2, LEVELS_K2, 2, both)
            + _all_strategies("training", t4, LEVELS_K4, 4, both)
            + _all_strategies("large", large, LEVELS_C8, 4, both)
            + _all_strategies("audio", audio, LEVELS_C8, 4, ("float32",))
            + _all_strategies("video", video, LEVELS_C6, 4, ("float32",)))


#: vector-quantize-pytorch's ResidualFSQ math (``rfsq_kernels.vqpytorch``), not a strategy-table row.
VQ_STRATEGY = "vq_rfsq"
#: Its standalone FSQ (one stage, no scales): the kernel report's rows of ``kernels/vq/fsq.py``.
VQ_FSQ_STRATEGY = "vq_fsq"


def vq_cases(tiny: Optional[bool] = None, groups: Optional[Sequence[str]] = None) -> List[Case]:
    """The training, large, audio and video shapes of :func:`main_cases` (one per shape, levels,
    K and dtype) for the ResidualFSQ drop-in (``strategy=VQ_STRATEGY``)."""
    tiny = tiny_mode() if tiny is None else tiny
    seen, out = set(), []
    for c in main_cases(tiny):
        key = (c.group, c.shape, c.levels, c.stages, c.dtype)
        if key not in seen and (not groups or c.group in groups):
            seen.add(key)
            out.append(Case(c.group, c.shape, c.levels, c.stages, VQ_STRATEGY, c.dtype))
    return out


def vq_fsq_cases(groups: Optional[Sequence[str]] = None) -> List[Case]:
    """The standalone FSQ (``strategy=VQ_FSQ_STRATEGY``, K=1) on each shape, levels and dtype of
    :func:`vq_cases` at full size: the kernel report's rows of vector-quantize-pytorch's ``FSQ``."""
    seen, out = set(), []
    for c in vq_cases(tiny=False, groups=groups):
        key = (c.group, c.shape, c.levels, c.dtype)
        if key not in seen:
            seen.add(key)
            out.append(Case(c.group, c.shape, c.levels, 1, VQ_FSQ_STRATEGY, c.dtype))
    return out


def select_cases(tiny: Optional[bool] = None, groups: Optional[Sequence[str]] = None) -> List[Case]:
    """Every case (main + sweep), tiny or full, optionally restricted to ``groups``."""
    tiny = tiny_mode() if tiny is None else tiny
    cases = main_cases(tiny) + sweep_cases(tiny)
    if groups:
        unknown = set(groups) - {c.group for c in cases}
        if unknown:
            raise ValueError(f"unknown case groups {sorted(unknown)}")
        cases = [c for c in cases if c.group in groups]
    return cases


def is_compile_representative(case: Case) -> bool:
    """The one case on which CPU runs still exercise ``torch.compile`` (compiling costs seconds per
    case and mode on CPU): the 2-stage fp32 ``layernorm`` training case."""
    return (case.group == "training" and case.stages == 2 and case.dtype == "float32"
            and case.strategy == "layernorm")


def make_input(case: Case, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Random channel-first ``z`` (standard normal times 2, so several codes are hit), never zeros."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn(case.shape, generator=gen, dtype=torch.float32) * 2.0
    return z.to(device=device, dtype=case.torch_dtype)
