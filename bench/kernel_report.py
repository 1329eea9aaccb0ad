"""Static kernel report: what every benchmark case launches, as compiled for a real GPU.

    python bench/kernel_report.py [--arch 90] [--groups training large]

Not a timing. For each case of ``bench/cases.py`` (GPU shapes) and each launch of its forward
and backward, the kernel is compiled by Triton's real compiler for ``sm_<arch>`` through the
project's own launchers (stand-in driver, ``rfsq_kernels.gpucheck``) and the table reports:
grid size against the SM count, ``num_warps``, registers per thread, spill bytes, shared memory,
the occupancy these imply, the SASS instruction count (static: loops count once), and the bytes
the launch loads and stores, counted by instrumenting the Triton interpreter
(``bench/kernel_bytes.py``, one image per case scaled to the batch), beside the case's byte
floor (``bench.cases.floor_bytes``). A direction of several launches (the split layernorm
forward: K + 1) has a row per launch, each with its own trip counts and bytes, and a sum row.
Writes ``bench/results/kernels-sm<arch>.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.cases import VQ_FSQ_STRATEGY, Case, floor_bytes, select_cases, vq_cases, vq_fsq_cases  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: Per-SM limits (sm_80 A100 and sm_90 H100 share them but the SM count and shared memory).
SM_COUNT = {80: 108, 90: 132, 100: 148}
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024, 100: 228 * 1024}
REGS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 64, 32
#: H100 SXM models (bench/NOTES.md): copy bandwidth and thread-instruction issue rate.
COPY_BYTES_PER_S, THREAD_INSTR_PER_S = 3.0e12, 33e12


def occupancy(arch: int, num_warps: int, registers: int, shared: int) -> Dict[str, float]:
    """Resident programs per SM and warp occupancy implied by registers, threads and shared memory
    (registers are allocated per warp in units of 256)."""
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * num_warps)
    by_warps = MAX_WARPS_PER_SM // num_warps
    by_smem = SMEM_PER_SM[arch] // (shared + 1024) if shared else MAX_BLOCKS_PER_SM
    blocks = max(0, min(by_regs, by_warps, by_smem, MAX_BLOCKS_PER_SM))
    return {"programs_per_sm": blocks, "occupancy": blocks * num_warps / MAX_WARPS_PER_SM}


def static_rows(cases: List[Case], arch: int) -> List[dict]:
    """One row per (case, launch), from the real launchers under the offline driver."""
    from rfsq_kernels.gpucheck import sweep
    from rfsq_kernels.gpucheck.binary import approx_math, sass_listing, sass_loops
    from rfsq_kernels.gpucheck.driver import offline_target

    rows, sass = [], {}
    by_name = {c.name: c for c in cases}
    with offline_target(arch) as drv:
        for case in cases:
            for direction in ("forward", "backward"):
                n0 = len(drv.launches)
                if case.strategy == VQ_FSQ_STRATEGY:
                    run_standalone_fsq(case, direction)
                else:
                    sweep.run_case(sweep.Case(direction, case.strategy, case.stages, tuple(case.levels),
                                              case.torch_dtype, tuple(case.shape)))
                launches = drv.launches[n0:]
                for i, launch in enumerate(launches):
                    rows.append(dict(case=case.name, direction=direction, launch_index=i,
                                     launches=len(launches), launch=launch))
        compiled = sweep.compiled_kernels(arch)
    out = []
    for row in rows:
        launch = row.pop("launch")
        if launch.hash not in sass:
            listing = sass_listing(compiled[launch.hash].asm["cubin"])
            approx = approx_math(compiled[launch.hash].asm["ptx"])["outside"]
            sass[launch.hash] = (len(listing), sass_loops(listing), approx)
        n_sass, loops, approx = sass[launch.hash]
        res = launch.resources
        consts = launch.constexprs
        tile = consts["BLOCK_C"] * consts["BLOCK_S"]
        case = by_name[row["case"]]
        programs = launch.grid[0] * launch.grid[1] * launch.grid[2]
        path = _path(launch.kernel)
        chunks, decodes = loop_trips(path, case, consts["BLOCK_S"], programs, row["launch_index"], row["direction"])
        executed = executed_estimate(n_sass, loops, path, case.stages, chunks, consts["BLOCK_C"], decodes)
        occ = occupancy(arch, launch.num_warps, res.registers, res.shared_bytes)
        out.append(dict(
            row, kernel=launch.kernel.strip("_"), path=path,
            grid=programs, waves=programs / (SM_COUNT[arch] * max(occ["programs_per_sm"], 1)),
            num_warps=launch.num_warps, tile=f"{consts['BLOCK_C']}x{consts['BLOCK_S']}",
            elems_per_thread=tile / (32 * launch.num_warps), registers=res.registers,
            spill_bytes=res.spill_bytes, shared_bytes=res.shared_bytes, **occ,
            sass=n_sass, loops=[b - a + 1 for a, b in loops],
            sass_per_elem=n_sass / (tile / (32 * launch.num_warps)),
            executed_per_thread=executed,
            executed_per_lane=executed * 32 * launch.num_warps * programs / case.numel * case.shape[1]
            / consts["BLOCK_C"],
            approx=approx,
            thread_instructions=executed * 32 * launch.num_warps * programs,
            executed_per_elem=executed * 32 * launch.num_warps * programs / case.numel,
            instr_us=executed * 32 * launch.num_warps * programs
            / (THREAD_INSTR_PER_S * min(1.0, programs / SM_COUNT[arch])) * 1e6))
    return out


def run_standalone_fsq(case: Case, direction: str) -> None:
    """Launch vector-quantize-pytorch's standalone FSQ kernel of ``direction`` on ``meta``
    tensors shaped as ``case``: ``x`` is ``(B, S, C)``, as :func:`rfsq_kernels.gpucheck.sweep.run_vq_case`
    lays it out (the module's layout after ``project_in``)."""
    import torch

    from rfsq_kernels.kernels.vq import fsq

    b, c, s = case.shape[0], case.shape[1], math.prod(case.shape[2:])
    x = torch.empty((b, s, c), dtype=case.torch_dtype, device="meta")
    if direction == "forward":
        fsq.forward(x, list(case.levels))
    else:
        fsq.backward(torch.empty_like(x), x, list(case.levels))


def loop_trips(path: str, case: Case, block_s: int, programs: int, launch_index: int,
               direction: str = "forward") -> Tuple[float, int]:
    """``(chunks, decodes)`` for :func:`executed_estimate`: the tile loop's trips per program
    (the image's ``ceil(S / BLOCK_S)`` tiles; on the split path shared by the image's
    ``programs / B`` programs, so the mean over programs -- short and empty last slices included --
    times the programs is exactly the tiles run) and the split path's decode loop trips: launch
    ``l`` of the split forward decodes stages ``0 .. l-2`` (``l - 1`` trips, none in launch 0);
    launch ``l`` of the split backward rebuilds ``r_{K-1-l}`` (``K - 1 - l`` trips, none in the
    last launch)."""
    tiles = math.ceil(math.prod(case.shape[2:]) / block_s)
    if path != "split":
        return tiles, 0
    decodes = launch_index - 1 if direction == "forward" else case.stages - 1 - launch_index
    return tiles / (programs / case.shape[0]), max(decodes, 0)


def executed_estimate(n_sass: int, loops, path: str, stages: int, chunks: float,
                      channels: int = 1, decodes: int = 0) -> float:
    """Instructions one thread executes (a model): every SASS instruction once, times the trip
    counts of the loops around it. Loops are recognised by their nesting, which follows the
    kernels' source: the single-tile stage loop runs K times, a rebuild loop inside it (K-1)/2
    times on average; the channel-row backward's loop runs over its ``channels`` rows (its
    stages are unrolled); a split launch's tile loop runs ``chunks`` times (per program,
    :func:`loop_trips`) with its decode loop inside, ``decodes`` times. Branches inside
    loops (libdevice tanh's rare path) are counted as taken, so this overestimates slightly."""
    replay = (stages - 1) / 2
    outer = [l for l in loops if not any(o != l and o[0] <= l[0] and l[1] <= o[1] for o in loops)]

    def trips(loop, depth):
        table = {"tiled": (stages,), "rows-backward": (channels,), "single": (stages, replay),
                 "split": (chunks, decodes)}[path]
        return table[min(depth, len(table) - 1)]

    weight = [1.0] * n_sass

    def visit(loop, depth):
        t = trips(loop, depth)
        for i in range(loop[0], loop[1] + 1):
            weight[i] *= t
        inner = [l for l in loops if l != loop and loop[0] <= l[0] and l[1] <= loop[1]]
        direct = [l for l in inner if not any(o != l and o in inner and o[0] <= l[0] and l[1] <= o[1] for o in inner)]
        for l in direct:
            visit(l, depth + 1)

    for loop in sorted(outer):
        visit(loop, 0)
    return sum(weight)


def _path(kernel: str) -> str:
    """single / split (layernorm: one program and one tile per image; several programs per image,
    K + 1 launches), tiled (none/scale: one program per image tile) or rows-backward (the
    channel-row backward, a loop over the rows)."""
    name = kernel.strip("_")
    if name in ("fwd_layernorm_split_kernel", "bwd_layernorm_split_kernel"):
        return "split"
    if name in ("fwd_layernorm_kernel", "bwd_layernorm_kernel"):
        return "single"
    return "rows-backward" if name == "bwd_elementwise_rows_kernel" else "tiled"


def count_bytes(groups, arch: int) -> Dict[str, Dict[str, int]]:
    """Run ``bench/kernel_bytes.py`` under the interpreter (a separate process), with the tiles
    the launchers choose for ``sm_<arch>``."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bytes.json"
        cmd = [sys.executable, "-m", "bench.kernel_bytes", "--json", str(out), "--arch", str(arch)]
        if groups:
            cmd += ["--groups", *groups]
        subprocess.run(cmd, env=env, check=True, cwd=Path(__file__).resolve().parents[1])
        return json.loads(out.read_text())


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def launch_bytes(row: dict, nbytes: Dict[str, object], direction: str) -> Optional[Tuple[int, int]]:
    """``(load, store)`` of the row's launch (``direction`` ``fwd``/``bwd``): its own count when
    the byte count has one per launch of that direction (as many as the compile recorded), the
    direction's total for a direction of one launch, None when not counted."""
    per_launch = nbytes.get(f"{direction}_launches")
    index, launches = row.get("launch_index", 0), row.get("launches", 1)
    if per_launch is not None and len(per_launch) == launches:
        return per_launch[index][0], per_launch[index][1]
    if launches == 1 and f"{direction}_load" in nbytes:
        return nbytes[f"{direction}_load"], nbytes[f"{direction}_store"]
    return None


def model_us(row: dict, nbytes: Dict[str, object], direction: str) -> float:
    """The row's model time: the larger of its launch's counted bytes at the copy bandwidth and its
    executed instructions' time (``instr_us``); the instruction time alone when the bytes were not
    counted."""
    counted = sum(launch_bytes(row, nbytes, direction) or (0, 0))
    return max(counted / COPY_BYTES_PER_S * 1e6, row["instr_us"])


def direction_sums(rows: List[dict], nbytes: Dict[str, Dict[str, object]]) -> List[dict]:
    """One sum per (case, direction) of several launches (the split layernorm forward): executed
    instructions per element and µs instr added over the launches, the direction's bytes, and
    µs model = the sum of the launches' µs model (the launches run one after another; where the
    bytes were not counted per launch, the larger of all bytes and all instructions)."""
    groups: Dict[Tuple[str, str], List[dict]] = {}
    for r in rows:
        if r.get("launches", 1) > 1:
            groups.setdefault((r["case"], r["direction"]), []).append(r)
    out = []
    for (case, direction), launches in groups.items():
        d = "fwd" if direction == "forward" else "bwd"
        b = nbytes.get(case, {})
        instr_us = sum(r["instr_us"] for r in launches)
        load, store = b.get(f"{d}_load", float("nan")), b.get(f"{d}_store", float("nan"))
        if all(launch_bytes(r, b, d) is not None for r in launches):
            model = sum(model_us(r, b, d) for r in launches)
        else:
            model = max((b.get(f"{d}_load", 0) + b.get(f"{d}_store", 0)) / COPY_BYTES_PER_S * 1e6, instr_us)
        out.append(dict(case=case, direction=direction, launches=len(launches), path=launches[0]["path"],
                        executed_per_elem=sum(r["executed_per_elem"] for r in launches),
                        instr_us=instr_us, load=load, store=store, model_us=model))
    return out


def markdown(rows: List[dict], cases: List[Case], nbytes: Dict[str, Dict[str, int]], arch: int,
             switched: Optional[Dict[str, bool]] = None) -> str:
    """The report as one Markdown table (plus a header saying what it is and is not);
    ``switched``: the environment switches an older report (``--from-json``) was compiled with."""
    env = "".join(f"{k}={int(v)} " for k, v in (switched or {}).items())
    head = (f"# Kernel report, sm_{arch} (static: compiled, not run)\n\n"
            f"Generated by `{env}python bench/kernel_report.py --arch {arch}`. **This is a static report, "
            f"not a timing**: nothing here ran on a GPU. Grid vs {SM_COUNT[arch]} SMs; occupancy from "
            f"registers, warps and shared memory; SASS = static instruction count of the binary (a "
            f"runtime loop counts once), per element = per element a thread holds in one tile; bytes "
            f"= loads + stores counted in the Triton interpreter (no cache reuse assumed), MB; floor "
            f"= `bench.cases.floor_bytes` (fwd; bwd = fwdbwd - fwd). exec/elem = thread-instructions "
            f"the launch executes per input element (padded lanes included), a model: static SASS "
            f"times the trip counts of the loops around each instruction (`executed_estimate`). Three "
            f"models of time, none measured: µs floor = floor bytes at "
            f"{COPY_BYTES_PER_S / 1e12:.1f} TB/s; µs instr = executed thread-instructions at "
            f"{THREAD_INSTR_PER_S / 1e12:.0f} T/s (SPEC 'Where the time goes': 132 SMs x 128 lanes x "
            f"1.98 GHz) scaled by the share of SMs the grid can use (grid < SMs leaves SMs idle); "
            f"µs model = the larger of (MB ld + MB st) at {COPY_BYTES_PER_S / 1e12:.1f} TB/s and µs instr "
            f"(the launch is bound by whichever it runs out of first; no cache reuse). "
            f"exec/lane = the same per tile lane (padded channels count: C=5 runs 8 lanes), all "
            f"stages. approx = approximate-math PTX instructions outside libdevice tanh (`div.full`, "
            f"`*.approx`; must be 0: the kernels promise IEEE float32, docs/semantics.md 'Arithmetic contract'). A direction of several launches (the split layernorm forward, "
            f"K + 1 launches: statistics, then one per stage) has one row per launch -- bytes, "
            f"exec/elem and µs of that launch, its own loop trip counts -- and a **sum** row: exec/elem "
            f"and µs instr added, the direction's bytes and floor, µs model = the launches' µs model "
            f"added.\n\n")
    cols = ["case", "dir", "kernel", "path", "tile", "grid", "waves", "warps", "regs", "spill B",
            "smem B", "prog/SM", "occ", "SASS", "SASS/elem", "exec/elem", "exec/lane", "approx", "MB ld",
            "MB st", "MB floor", "µs floor", "µs instr", "µs model"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    by_name = {c.name: c for c in cases}
    sums = {(t["case"], t["direction"]): t for t in direction_sums(rows, nbytes)}
    for r in rows:
        case, d = by_name[r["case"]], "fwd" if r["direction"] == "forward" else "bwd"
        b = nbytes.get(r["case"], {})
        floor = _floor(case, d)
        one = r.get("launches", 1) == 1  # the floor is the direction's: on its one row or its sum row
        ld, st = launch_bytes(r, b, d) or (float("nan"), float("nan"))
        launch = "" if one else f" (launch {r['launch_index']})"
        lines.append("| " + " | ".join([
            r["case"], d, r["kernel"] + launch, r["path"], r["tile"], str(r["grid"]), f"{r['waves']:.2f}",
            str(r["num_warps"]), str(r["registers"]), str(r["spill_bytes"]), str(r["shared_bytes"]),
            str(r["programs_per_sm"]), f"{r['occupancy']:.0%}", str(r["sass"]), f"{r['sass_per_elem']:.0f}",
            f"{r['executed_per_elem']:.0f}", f"{r['executed_per_lane']:.0f}", str(r["approx"]),
            _mb(ld), _mb(st), _mb(floor) if one else "",
            f"{floor / COPY_BYTES_PER_S * 1e6:.1f}" if one else "",
            f"{r['instr_us']:.1f}", f"{model_us(r, b, d):.1f}"]) + " |")
        t = sums.get((r["case"], r["direction"]))
        if t is not None and r["launch_index"] == t["launches"] - 1:
            lines.append("| " + " | ".join([
                r["case"], d, f"**sum of {t['launches']} launches**", t["path"], *[""] * 11,
                f"{t['executed_per_elem']:.0f}", "", "", _mb(t["load"]), _mb(t["store"]), _mb(floor),
                f"{floor / COPY_BYTES_PER_S * 1e6:.1f}", f"{t['instr_us']:.1f}", f"{t['model_us']:.1f}"]) + " |")
    return head + "\n".join(lines) + "\n"


def _floor(case: Case, d: str) -> int:
    """The direction's byte floor: the forward's, or fwd+bwd minus it."""
    return floor_bytes(case, "fwd") if d == "fwd" else floor_bytes(case, "fwdbwd") - floor_bytes(case, "fwd")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--groups", nargs="*", default=None, help="case groups (default: all)")
    p.add_argument("--no-bytes", action="store_true", help="skip the interpreter byte count")
    p.add_argument("--bytes-json", default=None, help="reuse counts written by bench/kernel_bytes.py")
    p.add_argument("--from-json", action="store_true",
                   help="re-render the Markdown from the committed .json (no compile, no byte count)")
    p.add_argument("--family", choices=("rfsq", "vq_rfsq"), default="rfsq",
                   help="rfsq: the RFSQ strategies (kernels-sm<arch>); vq_rfsq: the vector-quantize-pytorch "
                        "ResidualFSQ and standalone FSQ kernels (kernels-vq-sm<arch>, no byte count)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the report compiles for a real GPU", file=sys.stderr)
        return 2
    vq = args.family == "vq_rfsq"
    cases = (vq_cases(tiny=False, groups=args.groups) + vq_fsq_cases(args.groups) if vq
             else select_cases(tiny=False, groups=args.groups))
    stem = RESULTS / (f"kernels-vq-sm{args.arch}" if vq else f"kernels-sm{args.arch}")
    if args.from_json:
        saved = json.loads(stem.with_suffix(".json").read_text())
        md = markdown(saved["rows"], cases, saved["bytes"], args.arch, saved.get("switches"))
        stem.with_suffix(".md").write_text(md)
        print(f"wrote {stem}.md from {stem}.json")
        return 0
    rows = static_rows(cases, args.arch)
    if vq:
        nbytes = {}
    elif args.bytes_json:
        nbytes = json.loads(Path(args.bytes_json).read_text())
    else:
        nbytes = {} if args.no_bytes else count_bytes(args.groups, args.arch)
    RESULTS.mkdir(exist_ok=True)
    md = markdown(rows, cases, nbytes, args.arch)
    stem.with_suffix(".md").write_text(md)
    stem.with_suffix(".json").write_text(json.dumps(
        {"arch": args.arch, "static_report_not_a_timing": True, "sm_count": SM_COUNT[args.arch],
         "rows": rows, "bytes": nbytes, "sums": direction_sums(rows, nbytes),
         "floors": {c.name: {m: floor_bytes(c, m) for m in ("fwd", "fwdbwd")} for c in cases}}, indent=1))
    print(md)
    print(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
