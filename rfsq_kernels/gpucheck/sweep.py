"""Drive the real launchers over the specialization grid and record what they compile.

The grid is over the *inputs* a user can pass; which kernel, grid, tile, ``num_warps`` and
constexprs each input gets is decided by ``rfsq_forward_launch`` / ``rfsq_backward_launch``
themselves (the code that runs on a GPU). Spatial sizes and batch sizes are chosen so that the
launcher's every path is reached (one tile or several per image, one or several programs per
image -- the check's ``split`` path -- 32- and 64-bit offsets), and :func:`.check.check`
checks afterwards, from the recorded launches, that it was.

All tensors live on ``meta``: a 64-bit-offset input of 2**31 elements costs nothing.

A new launcher argument that selects a kernel flag (a boolean constexpr) needs an axis in
:class:`Case` / :func:`run_case`; until it has one, :func:`check.check` fails, because it wants
every boolean constexpr of every kernel to take both values.
"""
from __future__ import annotations

import itertools
import math
import resource
import time
from dataclasses import dataclass, field, replace
from typing import Dict, Iterable, List, Sequence, Tuple

import torch

from ..kernels.launch import rfsq_backward_launch, rfsq_forward_launch
from .driver import Launch, offline_target
from rfsq_kernels.reference import STRATEGIES, get_strategy, index_dtype

DIRECTIONS = ("forward", "backward")
STAGES = (1, 2, 3, 4, 8)
CHANNELS = tuple(range(1, 17))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Odd tiny image (one tile), the paper's 32x32 latent, and a large image (several tiles per image).
SPATIAL = ((3, 5), (32, 32), (96, 96))


@dataclass(frozen=True)
class Case:
    """One call of a launcher: which inputs (shapes, dtypes), never which kernel."""

    direction: str
    strategy: str
    stages: int
    levels: Tuple[int, ...]
    dtype: torch.dtype
    shape: Tuple[int, ...]
    mask: bool = False      # a (B, *spatial) padding mask is passed
    active_stages: bool = False  # per-sample stage counts (quantize dropout) are passed
    groups: int = 1         # vq only: GroupedResidualFSQ's one launch for this many channel-slice groups

    def __str__(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        extra = (" mask" if self.mask else "") + (" active_stages" if self.active_stages else "")
        extra += f" groups={self.groups}" if self.groups > 1 else ""
        return (f"{self.direction} strategy={self.strategy} K={self.stages} C={len(self.levels)} "
                f"levels={list(self.levels)} dtype={dt} shape={'x'.join(map(str, self.shape))}{extra}")


def levels_for(channels: int) -> List[Tuple[int, ...]]:
    """Level tuples of ``channels`` channels reaching each index dtype that this C can have."""
    small, large = (3,) * channels, (8,) * channels
    return [small] if index_dtype(small) == index_dtype(large) else [small, large]


def batches_for(channels: int, spatial: Sequence[int]) -> Tuple[int, int]:
    """A small batch, and one whose element offsets reach 2**31 (64-bit offsets)."""
    per_image = channels * math.prod(spatial)
    return 2, 2**31 // per_image + 1


def all_cases(directions: Iterable[str] = DIRECTIONS, strategies: Iterable[str] = STRATEGIES,
              stages: Iterable[int] = STAGES, channels: Iterable[int] = CHANNELS,
              dtypes: Iterable[torch.dtype] = DTYPES, spatial: Iterable[Tuple[int, ...]] = SPATIAL,
              offsets: Iterable[int] = (32, 64)) -> List[Case]:
    """Every combination of the given axis values (``offsets``: 32 = a small batch, 64 = a
    batch whose offsets reach 2**31)."""
    out = []
    for d, s, k, c, dt, sp in itertools.product(directions, strategies, stages, channels, dtypes, spatial):
        small, big = batches_for(c, sp)
        for lv in levels_for(c):
            for bits in offsets:
                out.append(Case(d, s, k, lv, dt, (small if bits == 32 else big, c, *sp)))
    return out


#: The pseudo-strategy of vector-quantize-pytorch's ResidualFSQ kernels (their own family,
#: :mod:`rfsq_kernels.kernels.vq`, not a row of the strategy table).
VQ_RFSQ = "vq_rfsq"


#: Groups of the grouped ResidualFSQ cases: channel slices of one (B, S, G*C) tensor, whose
#: position stride G*C specializes differently from an ungrouped call's C.
VQ_GROUPS = 4


def vq_cases(structure_only: bool = False) -> List[Case]:
    """The ResidualFSQ family: direction x K in {1, 2, 4, 8} x every C x the training and the
    large image, float32, 32-bit offsets; unless ``structure_only``, also K=8 x C in {5, 16} x
    every dtype x 32/64-bit offsets x all images, and the mask / stage-count flags. Each also as
    a grouped launch (:data:`VQ_GROUPS` channel-slice groups; no mask, the module has none)."""
    out = all_cases(strategies=[VQ_RFSQ], stages=(1, 2, 4, 8), spatial=SPATIAL[1:], dtypes=(torch.float32,),
                    offsets=(32,))
    if not structure_only:
        out += all_cases(strategies=[VQ_RFSQ], stages=(8,), channels=(5, 16))
        for base in all_cases(strategies=[VQ_RFSQ], stages=(8,), channels=(5, 16), dtypes=(torch.float32,),
                              spatial=SPATIAL[1:], offsets=(32,)):
            out += [Case(base.direction, base.strategy, base.stages, base.levels, base.dtype, base.shape, m, d)
                    for m, d in ((True, True), (True, False), (False, True))]
    return out + [replace(c, groups=VQ_GROUPS) for c in out if not c.mask]


def _image_stats_strategies() -> List[str]:
    """The strategies with per-image statistics (``layernorm``): their single-tile kernels hold
    the whole image, so at the widest channel tiles (sm_100's smaller tile) and with a mask in the
    backward (half the tile) only the tiny image reaches them."""
    return [s for s in STRATEGIES if get_strategy(s).per_image_stats]


def structure_cases() -> List[Case]:
    """direction x strategy x every K x every C x the training and the large image, float32,
    32-bit offsets, and the tiny image for :func:`_image_stats_strategies` (the structural part
    of :func:`default_cases`)."""
    return (all_cases(spatial=SPATIAL[1:], dtypes=(torch.float32,), offsets=(32,))
            + all_cases(strategies=_image_stats_strategies(), spatial=SPATIAL[:1], dtypes=(torch.float32,),
                        offsets=(32,))
            + vq_cases(structure_only=True))


def sparse_cases() -> List[Case]:
    """Masks and per-sample stage counts (their own constexpr specializations): direction x
    strategy x K=8 x the training and the large image (and the tiny one for
    :func:`_image_stats_strategies`), float32, 32-bit offsets; both flags at C in {5, 16}, each
    flag alone at C=5."""
    out = []
    bases = all_cases(stages=(8,), channels=(5, 16), dtypes=(torch.float32,), spatial=SPATIAL[1:], offsets=(32,))
    bases += all_cases(strategies=_image_stats_strategies(), stages=(8,), channels=(5, 16), dtypes=(torch.float32,),
                       spatial=SPATIAL[:1], offsets=(32,))
    for base in bases:
        flags = [(True, True)] + ([(True, False), (False, True)] if len(base.levels) == 5 else [])
        out += [Case(base.direction, base.strategy, base.stages, base.levels, base.dtype, base.shape, m, d)
                for m, d in flags]
    return out


def quick_cases(strategies: Iterable[str] = STRATEGIES) -> List[Case]:
    """A small grid for a strategy under development (``--quick``): direction x strategy x K in
    {1, 3} x C in {5, 16} x the training and the large image, float32, 32-bit offsets; plus bf16
    with 64-bit offsets and masks/stage counts (both, each alone) at K=3, C=5, training image; for
    the ResidualFSQ family also the unmasked K=3, C=5 cases as grouped launches (:data:`VQ_GROUPS`).
    Every flag takes both values; not every tile shape or path is reached."""
    out = all_cases(strategies=strategies, stages=(1, 3), channels=(5, 16), dtypes=(torch.float32,),
                    spatial=SPATIAL[1:], offsets=(32,))
    out += all_cases(strategies=strategies, stages=(3,), channels=(5,), dtypes=(torch.bfloat16,),
                     spatial=SPATIAL[1:2], offsets=(64,))
    for base in all_cases(strategies=strategies, stages=(3,), channels=(5,), dtypes=(torch.float32,),
                          spatial=SPATIAL[1:2], offsets=(32,)):
        out += [Case(base.direction, base.strategy, base.stages, base.levels, base.dtype, base.shape, m, d)
                for m, d in ((True, True), (True, False), (False, True))]
    # GROUPED is a constexpr of the vq kernels: without grouped launches it takes one value. These
    # four per direction reach one and several programs per image, both offset widths, stage counts.
    out += [replace(c, groups=VQ_GROUPS) for c in out
            if c.strategy == VQ_RFSQ and c.stages == 3 and len(c.levels) == 5 and not c.mask]
    return out


def default_cases() -> List[Case]:
    """The grid ``make test`` compiles (deduplicated: a few hundred binaries per target):

    * structure: direction x strategy x every K x every C (1..16) x the training and the large
      image, float32, 32-bit offsets -- every tile shape, path, stage count and ``num_warps``
      the launchers choose;
    * boundary: direction x the strategies with parameters (scale, layernorm) x K=8 x C in {5, 16} x every dtype x 32/64-bit
      offsets x all three images -- every load/store type and offset width, at the heaviest
      stage count, the paper's and the largest channel tile, with and without 16-divisible
      sizes;
    * sparse: :func:`sparse_cases` (padding masks, per-sample stage counts).

    A ``layernorm`` case takes the path its shape takes at run time: the single-tile kernels, or
    the split ones for an image larger than one tile (the large image at every C, the training
    image at the widest channel tiles).

    The complete product of all axes is :func:`all_cases` (``--full``): thousands of binaries
    per target, hours on 2 cores.
    """
    structure = structure_cases()
    boundary = all_cases(strategies=[s for s in STRATEGIES if get_strategy(s).params], stages=(8,),
                         channels=(5, 16))
    seen, out = set(), []
    for case in structure + boundary + sparse_cases() + vq_cases():
        if case not in seen:
            seen.add(case)
            out.append(case)
    return out


def run_vq_case(case: Case) -> None:
    """Call the ResidualFSQ launchers on ``meta`` tensors: ``x`` is ``(B, S, C)`` channel-last, as
    after ``project_in``; at K in {1, 8} without flags also the standalone FSQ's launchers."""
    from ..kernels.vq import fsq, residual_fsq
    meta = torch.device("meta")
    k, c, b, s = case.stages, len(case.levels), case.shape[0], math.prod(case.shape[2:])
    x = torch.empty((b, s, c), dtype=case.dtype, device=meta)
    scales = torch.empty((k, c), dtype=torch.float32, device=meta)
    clamp = torch.empty((c,), dtype=torch.float32, device=meta)
    mask = torch.empty((b, s), dtype=torch.bool, device=meta) if case.mask else None
    active = torch.empty((b,), dtype=torch.int32, device=meta) if case.active_stages else None
    if case.groups > 1:
        run_grouped_vq_case(case, x, scales, clamp, active)
        return
    standalone_fsq = case.stages in (1, 8) and not (case.mask or case.active_stages)  # its kernels have no K/flags
    if case.direction == "forward":
        residual_fsq.forward(x, list(case.levels), scales, clamp, mask, active)
        if standalone_fsq:
            fsq.forward(x, list(case.levels))
    else:
        residual_fsq.backward(torch.empty_like(x), x, list(case.levels), scales, clamp, mask, active)
        if standalone_fsq:
            fsq.backward(torch.empty_like(x), x, list(case.levels))


def run_grouped_vq_case(case: Case, x: torch.Tensor, scales: torch.Tensor, clamp: torch.Tensor,
                        active) -> None:
    """GroupedResidualFSQ's launch: ``case.groups`` channel slices of one ``(B, S, G*C)`` input
    (the module's layout without projections), one (K, C) table per group; the backward's
    incoming gradient is contiguous ``(G, B, S, C)`` (autograd stacks the groups' gradients)."""
    from ..kernels.vq import residual_fsq
    g, (b, s, c) = case.groups, x.shape
    x4 = torch.empty((b, s, g * c), dtype=x.dtype, device=x.device).unflatten(-1, (g, c)).permute(2, 0, 1, 3)
    tables = [scales] * g, [clamp] * g
    if case.direction == "forward":
        residual_fsq.grouped_forward(x4, list(case.levels), *tables, active)
    else:
        residual_fsq.grouped_backward(x4.new_empty(x4.shape), x4, list(case.levels), *tables, active)


def run_case(case: Case) -> None:
    """Call the real launcher on ``meta`` tensors shaped as ``case`` says."""
    if case.strategy == VQ_RFSQ:
        run_vq_case(case)
        return
    meta = torch.device("meta")
    k, c = case.stages, len(case.levels)
    z = torch.empty(case.shape, dtype=case.dtype, device=meta)
    row = get_strategy(case.strategy)
    params = tuple(torch.empty(p.shape(k, c), dtype=torch.float32, device=meta) for p in row.params)
    sparse = dict(mask=torch.empty((case.shape[0], *case.shape[2:]), dtype=torch.bool, device=meta) if case.mask else None,
                  active_stages=torch.empty((case.shape[0],), dtype=torch.int32, device=meta) if case.active_stages else None)
    if case.direction == "forward":
        rfsq_forward_launch(z, list(case.levels), k, case.strategy, params, **sparse)
    else:
        run_backward_case(case, z, row, params, sparse)


def run_backward_case(case: Case, z: torch.Tensor, row, params: Tuple[torch.Tensor, ...], sparse: dict) -> None:
    """The backward launcher's call of ``case`` (the forward's saved outputs as ``meta`` tensors)."""
    meta, k, c = z.device, case.stages, len(case.levels)
    mean = std = indices = None
    if row.per_image_stats:
        mean = torch.empty((case.shape[0], k, c), dtype=torch.float32, device=meta)
        std = torch.empty_like(mean)
        indices = torch.empty((case.shape[0], *case.shape[2:], k), dtype=index_dtype(case.levels), device=meta)
    grad_q = torch.empty_like(z)
    rfsq_backward_launch(grad_q, z, list(case.levels), k, case.strategy, params, mean, std, **sparse,
                         indices=indices)


@dataclass
class SweepResult:
    """What one target's sweep compiled: launches per case, failures, compile seconds per binary."""

    arch: int
    launches: List[Tuple[Case, Launch]] = field(default_factory=list)
    failures: List[Tuple[Case, str]] = field(default_factory=list)
    compile_s: Dict[str, float] = field(default_factory=dict)   # binary hash -> first-call seconds
    compile_cpu_s: Dict[str, float] = field(default_factory=dict)  # the same in CPU seconds (+ ptxas)
    compiled: Dict[str, object] = field(default_factory=dict)    # binary hash -> CompiledKernel


def sweep(arch: int, cases: Sequence[Case]) -> SweepResult:
    """Run every case through the launchers with Triton compiling for ``sm_<arch>``.

    A case whose compilation fails is recorded with the compiler's message and the sweep goes
    on; each distinct message is reported once, with the first case that hit it.
    """
    result = SweepResult(arch)
    failed_msgs: Dict[str, str] = {}
    with offline_target(arch) as drv:
        for case in cases:
            n0 = len(drv.launches)
            t0, c0 = time.perf_counter(), _cpu_seconds()
            try:
                run_case(case)
            except Exception as e:  # the compiler's error, reported with the case
                msg = f"{type(e).__name__}: {e}"
                if msg not in failed_msgs:
                    failed_msgs[msg] = str(case)
                    result.failures.append((case, msg))
                continue
            dt, dc = time.perf_counter() - t0, _cpu_seconds() - c0
            for launch in drv.launches[n0:]:
                result.launches.append((case, launch))
                result.compile_s.setdefault(launch.hash, dt)
                result.compile_cpu_s.setdefault(launch.hash, dc)
    result.compiled = compiled_kernels(arch)
    return result


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas): a compile's cost that does
    not grow when other jobs share the machine."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def jit_function(obj):
    """The ``JITFunction`` inside ``obj`` (a kernel wrapped by ``@triton.heuristics`` holds it as
    ``.fn``), or None when ``obj`` is not a kernel."""
    while obj is not None and not hasattr(obj, "device_caches"):
        obj = getattr(obj, "fn", None)
    return obj


def compiled_kernels(arch: int) -> Dict[str, object]:
    """Every ``CompiledKernel`` the project's kernels hold for device ``arch``, by hash."""
    out = {}
    for module in kernel_modules():
        for obj in vars(module).values():
            caches = getattr(jit_function(obj), "device_caches", None)
            if caches is None or arch not in caches:
                continue
            for kernel in caches[arch][0].values():
                out[kernel.hash] = kernel
    return out


def kernel_modules() -> Tuple[object, ...]:
    """Every module that defines kernels: the strategy families and the vector-quantize-pytorch ones."""
    from ..kernels import elementwise, layernorm, layernorm_split, layernorm_split_backward
    from ..kernels.vq import fsq, residual_fsq
    return (elementwise, layernorm, layernorm_split, layernorm_split_backward, residual_fsq, fsq)
