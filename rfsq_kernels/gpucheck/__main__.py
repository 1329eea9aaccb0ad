"""``python -m rfsq_kernels.gpucheck``: compile every kernel specialization for real targets.

Exit status 0 when every case compiles, no binary spills registers (sm_80/sm_90/sm_100), no
binary holds approximate math outside libdevice tanh or was built with FP fusion (the arithmetic
contract of docs/semantics.md), and the launches reached every path; 1 otherwise, with the failing cases and the compiler's messages.
Run it where ``TRITON_INTERPRET`` is unset (the test suite starts it in a subprocess).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures.process import BrokenProcessPool

from ..output_claim import claim_output
from .check import NO_SPILL_ARCHS, check, default_archs, load_plugins, run_parallel, summary_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=None,
                   help="compute capabilities (default: 80 90, and 100 when triton bundles ptxas-blackwell)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    p.add_argument("--full", action="store_true", help="the complete product of all axes (hours); "
                   "default: sweep.default_cases() on sm_80/sm_90, sweep.structure_cases() elsewhere")
    p.add_argument("--json", default=None, help="write every compiled binary's record here, with its SASS "
                   "instruction count and digest (bench/compare_binaries.py; without --json the SASS is not "
                   "disassembled)")
    p.add_argument("--strategy", nargs="+", default=None, help="only these strategies (default: all built-in ones)")
    p.add_argument("--quick", action="store_true", help="the small grid of sweep.quick_cases() (a strategy under "
                   "development): compile errors, spills and both values of every flag, not every path")
    p.add_argument("--plugin", nargs="+", default=[], metavar="FILE",
                   help="Python files whose STRATEGY (a StrategyDefinition) every worker registers first: a "
                   "strategy under development (see tests/toy_strategy.py)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU", file=sys.stderr)
        return 2
    supported = default_archs()
    unknown = sorted(set(args.arch or []) - set(supported))
    if unknown:
        p.error(f"--arch {' '.join(map(str, unknown))}: not a target of this check; choose from "
                f"{' '.join(map(str, supported))} (compute capability x 10: 80 = A100, 90 = H100"
                f"{', 100 = B200' if 100 in supported else ''})")
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    _check_plugins_and_strategies(p, args)
    json_tmp = claim_output(p, "--json", args.json) if args.json else None  # an unwritable --json fails now, not after the sweep
    archs = list(dict.fromkeys(args.arch)) if args.arch else supported
    spill_archs = [a for a in archs if a in NO_SPILL_ARCHS]
    t0 = time.perf_counter()
    try:
        binaries, failures = run_parallel(archs, full=args.full, jobs=args.jobs, strategies=args.strategy,
                                          quick=args.quick, plugins=args.plugin, sass=args.json is not None)
    except BrokenProcessPool:
        print("a compiler worker process died (the compiler aborted); rerun with --jobs 1 to see its message",
              file=sys.stderr)
        _discard(json_tmp)
        return 1
    except BaseException:
        _discard(json_tmp)
        raise
    wall = time.perf_counter() - t0
    print(summary_table(binaries))
    problems = check(binaries, failures, archs, complete=not args.quick, strategies=args.strategy)
    slowest = max(binaries, key=lambda b: b["compile_cpu_s"], default=None)
    if slowest:
        print(f"\n{len(binaries)} binaries for sm_{', sm_'.join(map(str, archs))} in {wall:.0f} s wall "
              f"({args.jobs} jobs); slowest first compile {slowest['compile_cpu_s']:.1f} CPU s "
              f"({slowest['compile_s']:.1f} s wall): {slowest['kernel']} sm_{slowest['arch']} ({slowest['case']})")
    if json_tmp:
        with open(json_tmp, "w") as f:
            json.dump({"archs": archs, "wall_s": wall, "binaries": binaries,
                       "failures": [{"case": c, "error": m} for c, m in failures]}, f, indent=1)
        os.replace(json_tmp, args.json)
    if problems:
        print(f"\nFAILED ({len(problems)} problems; spills checked on "
              f"{', '.join(f'sm_{a}' for a in spill_archs) or 'none of the targets'}):")
        for line in problems:
            print(line)
        return 1
    print("OK: every case compiled for " + ", ".join(f"sm_{a}" for a in archs)
          + (", no spills on " + ", ".join(f"sm_{a}" for a in spill_archs) if spill_archs else
             " (spills are checked on " + ", ".join(f"sm_{a}" for a in NO_SPILL_ARCHS) + " only)")
          + ", no approximate math outside tanh, FP fusion off")
    return 0


def _check_plugins_and_strategies(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Load the --plugin files and check every --strategy name (built-in, the vector-quantize-pytorch
    family or a plugin's) before anything is compiled: an argparse error, not a worker's traceback."""
    from rfsq_kernels.reference import STRATEGIES, get_strategy
    from .sweep import VQ_RFSQ

    for path in args.plugin:
        if not os.path.isfile(path):
            p.error(f"--plugin {path}: no such file")
    try:
        load_plugins(args.plugin)
    except Exception as e:  # the plugin's own bug: name the file and the error, not a traceback
        p.error(f"--plugin {' '.join(args.plugin)}: cannot load it ({type(e).__name__}: {e}); a plugin is a "
                "Python file defining STRATEGY, a StrategyDefinition (see tests/toy_strategy.py)")
    for name in args.strategy or []:
        if name == VQ_RFSQ:
            continue
        try:
            get_strategy(name)
        except (KeyError, ValueError):
            p.error(f"--strategy {name}: unknown strategy; choose from {' '.join([*STRATEGIES, VQ_RFSQ])} "
                    "(or one a --plugin registers)")


def _discard(tmp) -> None:
    if tmp:
        try:
            os.remove(tmp)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
