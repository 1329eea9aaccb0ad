"""Run the sweep in worker processes, turn it into per-binary records, and judge them."""
from __future__ import annotations

import hashlib
import importlib.util
import multiprocessing
import os
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

from .binary import approx_math, sass_instructions

#: Targets on which any register spill fails the check.
NO_SPILL_ARCHS = (80, 90, 100)
#: Targets that compile the full default grid (others: sweep.structure_cases()).
FULL_GRID_ARCHS = (80, 90)
#: Budget of one specialization's first compile, in CPU seconds (a cache hit costs ~0).
MAX_COMPILE_CPU_S = 10.0
_BLOCK_C = (1, 2, 4, 8, 16)


def _block_cs(kernel: str) -> Tuple[int, ...]:
    """The ``BLOCK_C`` values a complete sweep must reach for ``kernel``: the single-tile layernorm
    backward holds at most ``config.LAYERNORM_ROW_MAX_CHANNELS`` channels (wider images take the
    split backward), every other kernel every channel tile."""
    if kernel == "_bwd_layernorm_kernel":
        from ..kernels import config
        return tuple(c for c in _BLOCK_C if c <= config.LAYERNORM_ROW_MAX_CHANNELS)
    return _BLOCK_C


def default_archs() -> List[int]:
    """sm_80 and sm_90, plus sm_100 when the triton wheel bundles ``ptxas-blackwell``."""
    import triton
    blackwell = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    return [80, 90] + ([100] if os.path.exists(blackwell) else [])


#: The plugin files this process has registered (workers run several tasks each).
_LOADED_PLUGINS: set = set()


def load_plugins(paths: Sequence[str]) -> None:
    """Import each Python file in ``paths`` once per process and register its ``STRATEGY`` (a
    :class:`~rfsq_kernels.reference.StrategyDefinition`, e.g. ``tests/toy_strategy.py``): how a
    strategy under development reaches the sweep without editing the package."""
    from rfsq_kernels.reference import StrategyDefinition, register_strategy

    for path in paths:
        key = os.path.abspath(path)
        if key in _LOADED_PLUGINS:
            continue
        spec = importlib.util.spec_from_file_location(f"rfsq_gpucheck_plugin_{len(_LOADED_PLUGINS)}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        definition = getattr(module, "STRATEGY", None)
        if not isinstance(definition, StrategyDefinition):
            raise ValueError(f"{path} defines no STRATEGY (a StrategyDefinition)")
        register_strategy(definition)
        _LOADED_PLUGINS.add(key)


def _family(strategy: str) -> str:
    """The kernel family a strategy launches (its strategy-table row names it)."""
    from rfsq_kernels.reference import get_strategy
    from .sweep import VQ_RFSQ
    return VQ_RFSQ if strategy == VQ_RFSQ else get_strategy(strategy).kernel_family


def _jsonable(v):
    return v if isinstance(v, (bool, int, float, str)) or v is None else str(v)


def _run_task(arch: int, direction: str, family: str, full: bool, strategies: Optional[Sequence[str]] = None,
              quick: bool = False, plugins: Sequence[str] = (), sass: bool = True
              ) -> Tuple[List[dict], List[Tuple[str, str]]]:
    """One worker task: the cases of one (target, direction, kernel family); ``strategies``
    (default: all built-in ones), ``quick`` (:func:`.sweep.quick_cases`), ``plugins``
    (:func:`load_plugins`) and ``sass`` as for :func:`run_parallel`."""
    load_plugins(plugins)
    from .sweep import all_cases, default_cases, quick_cases, structure_cases, sweep, vq_cases
    if quick:
        grid = quick_cases(strategies) if strategies else quick_cases()
    else:
        grid = all_cases() + vq_cases() if full else default_cases() if arch in FULL_GRID_ARCHS else structure_cases()
    cases = [c for c in grid if c.direction == direction and _family(c.strategy) == family
             and (strategies is None or c.strategy in strategies)]
    result = sweep(arch, cases)
    records: Dict[str, dict] = {}
    for case, launch in result.launches:
        rec = records.get(launch.hash)
        split = launch.grid[0] > case.shape[0]  # more programs than images: several tiles per image
        if rec is None:
            consts = {k: _jsonable(v) for k, v in launch.constexprs.items()}
            rec = records[launch.hash] = dict(
                arch=arch, kernel=launch.kernel, hash=launch.hash, direction=direction,
                strategy=case.strategy, num_warps=launch.num_warps, constexprs=consts,
                x_dtype=launch.signature["x_ptr"].lstrip("*"),
                index_dtype=launch.signature.get("idx_ptr", "").lstrip("*"),
                registers=launch.resources.registers, spill_bytes=launch.resources.spill_bytes,
                shared_bytes=launch.resources.shared_bytes,
                compile_s=round(result.compile_s[launch.hash], 2),
                compile_cpu_s=round(result.compile_cpu_s[launch.hash], 2), case=str(case),
                grid=list(launch.grid), launches=0, paths=set())
        rec["launches"] += 1
        rec["paths"].add("split" if split else "single")
    for rec in records.values():
        rec["paths"] = sorted(rec["paths"])
        compiled = result.compiled[rec["hash"]]
        rec["approx"] = approx_math(compiled.asm["ptx"])
        rec["fp_fusion"] = bool(compiled.metadata.enable_fp_fusion)
        if sass:
            # What "the compiled code did not change" is judged by (bench/compare_binaries.py).
            listing = sass_instructions(compiled.asm["cubin"])
            rec["sass_instructions"] = len(listing)
            rec["sass_sha256"] = hashlib.sha256("\n".join(listing).encode()).hexdigest()
    failures = [(str(c), m) for c, m in result.failures]
    return list(records.values()), failures


def run_parallel(archs: Sequence[int], full: bool = False, jobs: int = 2, strategies: Optional[Sequence[str]] = None,
                 quick: bool = False, plugins: Sequence[str] = (), sass: bool = True
                 ) -> Tuple[List[dict], List[Tuple[str, str]]]:
    """Compile the grid for every target in ``jobs`` processes; ``(binaries, failures)``.
    ``strategies``: only these (default: every built-in one); ``quick``: the small grid of
    :func:`.sweep.quick_cases`; ``plugins``: files whose ``STRATEGY`` every worker registers
    first (:func:`load_plugins`); ``sass``: disassemble every binary for its SASS count and
    digest (what bench/compare_binaries.py compares; no check needs them, and disassembly is
    about a fifth of the check's time: 0.8 s of a 2.9 s compile of one layernorm backward)."""
    load_plugins(plugins)
    from ..kernels.launch import FAMILIES
    from .sweep import VQ_RFSQ
    families = sorted({_family(s) for s in strategies} if strategies else {*FAMILIES, VQ_RFSQ},
                      reverse=True)  # layernorm (slowest) first
    tasks = [(a, d, f, full, strategies, quick, tuple(plugins), sass) for a in archs for f in families
             for d in ("backward", "forward")]
    binaries, failures = [], []
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=ctx) as pool:
        for recs, fails in pool.map(_run_task, *zip(*tasks)):
            binaries += recs
            failures += fails
    return binaries, failures


def check(binaries: List[dict], failures: List[Tuple[str, str]], archs: Sequence[int],
          complete: bool = True, strategies: Optional[Sequence[str]] = None) -> List[str]:
    """Every problem found, one line (or block) each: failed compiles, spills (``NO_SPILL_ARCHS``),
    approximate math or FP fusion (:func:`arithmetic_problems`), boolean constexprs that took only
    one value and, with ``complete`` (the default grid), the launcher outcomes (paths, channel
    tiles, dtypes) the sweep never reached -- of the kernels :func:`required_kernels` names for
    the families of ``strategies`` (default: every family)."""
    problems = [f"- compile failed: {case}\n  {msg}" for case, msg in failures]
    for b in binaries:
        if b["compile_cpu_s"] > MAX_COMPILE_CPU_S:
            problems.append(f"- first compile took {b['compile_cpu_s']:.1f} CPU s (> {MAX_COMPILE_CPU_S}): "
                            f"{b['kernel']} sm_{b['arch']} {b['constexprs']} ({b['case']})")
        if b["arch"] in NO_SPILL_ARCHS and b["spill_bytes"]:
            problems.append(f"- spills {b['spill_bytes']} B/thread ({b['registers']} registers): {b['kernel']} "
                            f"sm_{b['arch']} num_warps={b['num_warps']} {b['constexprs']} ({b['case']})")
    problems += arithmetic_problems(binaries)
    families = {_family(s) for s in strategies} if strategies else None
    seen = defaultdict(set)
    for b in binaries:
        key = (b["arch"], b["kernel"])
        c = b["constexprs"]
        seen[key] |= {("path", p) for p in b["paths"]}
        seen[key] |= {("x_dtype", b["x_dtype"]), ("BLOCK_C", c["BLOCK_C"])}
        # every boolean constexpr (USE_INT64, the HAS_* flags the kernels derive from their
        # optional pointers with @triton.heuristics, flags added later) must take both values
        seen[key] |= {(name, v) for name, v in c.items() if isinstance(v, bool) and name != "USE_LIBDEVICE"}
    for (arch, kernel), values in sorted(seen.items()):
        flags = {name for name, v in values if isinstance(v, bool)}
        if arch not in FULL_GRID_ARCHS:  # the structural grid: 32-bit offsets, no masks or stage counts
            flags -= {"USE_INT64", "HAS_MASK", "HAS_ACTIVE_STAGES"}
        for name in sorted(flags):
            if {(name, False), (name, True)} - values:
                problems.append(f"- sweep reached only one value of {name} for {kernel} on sm_{arch}: "
                                f"give sweep.Case/run_case an input that flips it")
    for arch in archs if complete else ():
        for kernel, paths in required_kernels(families, arch):
            want = {("path", p) for p in paths} | {("BLOCK_C", c) for c in _block_cs(kernel)}
            if arch in FULL_GRID_ARCHS:  # other targets compile the structural grid only
                want |= {("USE_INT64", v) for v in (False, True)}
                want |= {("x_dtype", d) for d in ("fp32", "bf16", "fp16")}
                if "vq_fsq" not in kernel:  # the standalone FSQ has neither masks nor stage counts
                    want |= {(flag, v) for flag in ("HAS_MASK", "HAS_ACTIVE_STAGES") for v in (False, True)}
            missing = want - seen[(arch, kernel)]
            if missing:
                problems.append(f"- sweep never reached {sorted(missing)} of {kernel} on sm_{arch}")
    return problems


def required_kernels(families: Optional[Sequence[str]] = None, arch: Optional[int] = None
                     ) -> List[Tuple[str, Tuple[str, ...]]]:
    """``(kernel, paths)`` that a complete sweep for ``arch`` must launch, of the kernel
    ``families`` given (default: all): every kernel the launchers can choose."""
    from .sweep import VQ_RFSQ
    # A row tile holds at most 512 positions, and the structural grid (every target outside
    # FULL_GRID_ARCHS) has no smaller image than 32x32: there every launch is several programs per
    # image. One program per image is a grid, not another binary.
    paths = ("single", "split") if arch is None or arch in FULL_GRID_ARCHS else ("split",)
    elementwise = (("_fwd_elementwise_rows_kernel", paths), ("_bwd_elementwise_rows_kernel", paths))
    by_family = {
        "layernorm": (("_fwd_layernorm_split_kernel", ("split",)), ("_fwd_layernorm_kernel", ("single",)),
                      ("_bwd_layernorm_split_kernel", ("split",)), ("_bwd_layernorm_kernel", ("single",))),
        "elementwise": elementwise,
        VQ_RFSQ: (("_fwd_vq_rfsq_kernel", ("single", "split")), ("_bwd_vq_rfsq_kernel", ("single", "split")),
                  ("_fwd_vq_fsq_kernel", ("single", "split")), ("_bwd_vq_fsq_kernel", ("single", "split"))),
    }
    return [kp for family, kernels in by_family.items() if families is None or family in families for kp in kernels]


def arithmetic_problems(binaries: List[dict]) -> List[str]:
    """The arithmetic contract (docs/semantics.md), per binary: no approximate division/square root/other
    ``.approx`` instruction outside libdevice ``tanh`` (at most one ``ex2`` and one ``rcp`` per
    inlined call), and FMA contraction off (``enable_fp_fusion=False``)."""
    problems = []
    for b in binaries:
        a = b["approx"]
        where = f"{b['kernel']} sm_{b['arch']} {b['constexprs']} ({b['case']})"
        if a["outside"]:
            ops = ", ".join(f"{n} {op}" for op, n in sorted(a.items())
                            if op not in ("outside", "in_tanh", "tanh_calls"))
            problems.append(f"- {a['outside']} approximate-math instructions outside libdevice tanh ({ops}): {where}")
        if a["in_tanh"] > 2 * a["tanh_calls"]:
            problems.append(f"- {a['in_tanh']} ex2/rcp.approx in {a['tanh_calls']} inlined tanh calls "
                            f"(at most one each per call): {where}")
        if b["fp_fusion"]:
            problems.append(f"- compiled with enable_fp_fusion=True (mul+add contracted into FMAs): {where}")
    return problems


def summary_table(binaries: List[dict]) -> str:
    """Per (target, kernel, path): binaries, max registers, max spill bytes, max compile CPU s, max
    approximate-math instructions outside tanh (must be 0) and binaries built with FP fusion (0)."""
    groups = defaultdict(list)
    for b in binaries:
        groups[(b["arch"], b["kernel"], "+".join(b["paths"]))].append(b)
    lines = [f"{'target':7} {'kernel':26} {'path':14} {'binaries':>8} {'max regs':>8} "
             f"{'max spill B':>11} {'max compile CPU s':>17} {'max approx':>10} {'fp fusion':>9}"]
    for (arch, kernel, path), bs in sorted(groups.items()):
        lines.append(f"sm_{arch:<4} {kernel:26} {path:14} {len(bs):8d} {max(b['registers'] for b in bs):8d} "
                     f"{max(b['spill_bytes'] for b in bs):11d} {max(b['compile_cpu_s'] for b in bs):17.1f} "
                     f"{max(b['approx']['outside'] for b in bs):10d} {sum(b['fp_fusion'] for b in bs):9d}")
    return "\n".join(lines)
