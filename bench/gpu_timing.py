"""Timing and model steps of ``bench/gpu_validate.py``.

Timing: ``bench/report.py``'s :func:`~bench.report.measure` (gate against the eager reference,
then ``do_bench`` host-inclusive and events-only medians) on :data:`CURATED` cases, ``fwd`` and
``fwdbwd``, in passes ordered by cost so a time box cuts the expensive peers first: fused and
eager, then lucidrains, then compile_cudagraphs (seconds of compilation per row). Dry run: one
eager CPU row only, to exercise the machinery (marked: not a GPU number); the rest is skipped.

Model: for every curated case and mode, the static report ``bench/results/kernels-sm<arch>.json``
(``bench/kernel_report.py``) gives the byte floor at its 3.0 TB/s (``µs floor``), the counted
bytes at that bandwidth, and the instruction model (``µs instr``); model time per direction =
max(bytes, instr), fwd+bwd the sum of both directions. Next to it the measured fused median and
the ratios measured/model and measured/floor. Nothing is written for a row that was not measured.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from bench.kernel_report import COPY_BYTES_PER_S

#: (group, stages, strategy, dtype) of the timed cases of bench/cases.py.
CURATED = [("training", 2, "layernorm", "float32"), ("training", 4, "layernorm", "bfloat16"),
           ("training", 2, "none", "float32"), ("large", 4, "layernorm", "float32"),
           ("large", 4, "scale", "bfloat16"), ("audio", 4, "layernorm", "float32"),
           ("video", 4, "layernorm", "float32")]
PASSES = (("fused", "eager"), ("lucidrains",), ("compile_cudagraphs",))
MODES = ("fwd", "fwdbwd")
REP_MS = 40.0
RESULTS = Path(__file__).resolve().parent / "results"


def curated_cases(tiny: bool):
    """The :data:`CURATED` cases of ``bench.cases.select_cases`` (full or tiny shapes), in order."""
    from bench.cases import select_cases

    by_key = {(c.group, c.stages, c.strategy, c.dtype): c for c in select_cases(tiny=tiny)}
    return [by_key[k] for k in CURATED if k in by_key]


def _copy_gbs(ctx) -> float:
    for r in ctx.earlier:
        if r.get("name") == "copy bandwidth" and r.get("status") == "ok":
            return float(r["copy_gbs"])
    from bench.timing import copy_bandwidth_gbs

    return copy_bandwidth_gbs(str(ctx.device))


def _measure(case, backend: str, mode: str, ctx, rep_ms: float, dry: bool) -> Dict:
    from bench.report import measure

    row = measure(case, backend, mode, ctx.device, _copy_gbs(ctx), rep_ms)
    if row["status"] == "wrong":  # a gate failure is a correctness failure
        row["status"] = "fail"
    if dry:
        row["dry_run_cpu_not_a_gpu_number"] = True
    return row


def timing_subcases(ctx) -> List[Tuple[str, Callable[[], Optional[Dict]]]]:
    """One sub-case per (pass, case, mode, backend)."""
    cases = curated_cases(tiny=ctx.dry)
    out = []
    for backends in PASSES:
        for case in cases:
            for mode in MODES:
                for backend in backends:
                    name = f"{case.name} {mode} {backend}"
                    if ctx.dry and not (backend == "eager" and mode == "fwd" and case is cases[0]):
                        out.append((name, lambda: {"status": "skipped", "reason": "dry run: timing skipped"}))
                    else:
                        out.append((name, functools.partial(_measure, case, backend, mode, ctx,
                                                            2.0 if ctx.dry else REP_MS, ctx.dry)))
    return out


def _static_report(ctx) -> Tuple[Dict, int]:
    arch = 90
    for r in ctx.earlier:
        if r.get("name") == "versions+device" and r.get("capability"):
            arch = int(r["capability"].replace(".", ""))
    path = RESULTS / f"kernels-sm{arch}.json"
    if not path.exists():
        arch, path = 90, RESULTS / "kernels-sm90.json"
    return json.loads(path.read_text()), arch


def model_row(case_name: str, mode: str, static: Dict, measured: Optional[Dict]) -> Dict:
    """Model numbers of one case and mode (µs), with the measured fused row beside them if any."""
    if case_name not in static["floors"]:
        return {"status": "skipped", "reason": f"{case_name} not in the static report"}
    dirs = ("fwd",) if mode == "fwd" else ("fwd", "bwd")
    floors, counted = static["floors"][case_name], static["bytes"].get(case_name)
    floor_b = floors["fwd"] if mode == "fwd" else floors["fwdbwd"]
    instr = {d: sum(r["instr_us"] for r in static["rows"] if r["case"] == case_name
                    and r["direction"] == ("forward" if d == "fwd" else "backward")) for d in dirs}
    bytes_us = {d: (counted[f"{d}_load"] + counted[f"{d}_store"]) / COPY_BYTES_PER_S * 1e6 if counted else None
                for d in dirs}
    model = sum(max(instr[d], bytes_us[d] or 0.0) for d in dirs)
    row = {"case": case_name, "mode": mode, "floor_us": floor_b / COPY_BYTES_PER_S * 1e6,
           "bytes_us": sum(bytes_us.values()) if counted else None, "instr_us": sum(instr.values()),
           "model_us": model, "launches": sum(1 for r in static["rows"] if r["case"] == case_name
                                              and (mode == "fwdbwd" or r["direction"] == "forward"))}
    if measured:
        us = measured["median_ms"] * 1e3
        row.update(measured_us=us, measured_events_us=measured.get("median_ms_events", float("nan")) * 1e3,
                   measured_floor_us=measured["floor_ms"] * 1e3, ratio_model=us / model,
                   ratio_floor=us / row["floor_us"])
    else:
        row["measured_us"] = None
    return row


def model_subcases(ctx) -> List[Tuple[str, Callable[[], Optional[Dict]]]]:
    """One row per curated full-size case and mode."""
    static, arch = _static_report(ctx)
    measured = {(r.get("case"), r.get("mode")): r for r in ctx.earlier
                if r.get("step") == "timing" and r.get("backend") == "fused" and r.get("status") == "ok"}
    out = []
    for case in curated_cases(tiny=False):
        for mode in MODES:
            fn = functools.partial(model_row, case.name, mode, static, measured.get((case.name, mode)))
            out.append((f"{case.name} {mode} (sm_{arch} model)", fn))
    return out
