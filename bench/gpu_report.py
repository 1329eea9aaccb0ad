"""The JSON record and the markdown summary of ``bench/gpu_validate.py``.

Summary sections: header (device, versions, date; a dry run says it is not a GPU run), one line
per step (status, time against budget, rows by status), every failure with its reason, the
correctness rows (mode clear/counted, flips, launch path), graphs, the timing table of
``bench/report.py`` and measured vs model. Skipped rows are counted with their reasons.
"""
from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

STATUSES = ("ok", "fail", "error", "skipped")


def _stem(record: Dict, out_dir: Path) -> str:
    env = next((r for r in record["rows"] if r.get("name") == "versions+device"), {})
    label = "cpu-dry-run" if record["dry_run"] else env.get("device_label", "unknown-device")
    base, n = f"gpu-validate-{label}-{dt.date.today().isoformat()}", 1
    while any((out_dir / f"{base if n == 1 else f'{base}-{n}'}{ext}").exists() for ext in (".json", ".md")):
        n += 1
    return base if n == 1 else f"{base}-{n}"


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _table(header: List[str], lines: List[List[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in line) + " |" for line in lines]
    return "\n".join(out)


def markdown(record: Dict) -> str:
    """The summary of ``record`` (see the module docstring)."""
    rows = record["rows"]
    env = next((r for r in rows if r.get("name") == "versions+device"), {})
    copy = next((r for r in rows if r.get("name") == "copy bandwidth"), {})
    title = "CPU DRY RUN (Triton interpreter; no number here is a GPU number)" if record["dry_run"] else \
        env.get("device_name", "device unknown")
    parts = [f"# GPU validation: {title}\n",
             f"`{record['command']}` on {record['date']}, {record.get('wall_s', '?')} s wall. torch "
             f"{env.get('torch', '?')}, triton {env.get('triton', '?')}, Python {env.get('python', '?')}, CUDA "
             f"{env.get('cuda_runtime', '-')}, capability {env.get('capability', '-')}, {env.get('sm_count', '-')} SMs, "
             f"L2 {env.get('l2_bytes', '-')} B, driver {env.get('driver', '-')}; copy bandwidth "
             f"{copy.get('copy_gbs', '-')} GB/s. Wheels: {record['wheels']['status']} "
             f"({len(record['wheels'].get('wheels', []))} from .whl/).\n"]
    step_lines = []
    for s in record["steps"]:
        c = Counter(r["status"] for r in rows if r.get("step") == s["step"])
        step_lines.append([s["step"], s["status"], f"{s.get('seconds', 0)} / {s.get('budget_s', '-')}",
                           *[str(c.get(k, 0)) for k in STATUSES]])
    parts.append("## Steps\n\n" + _table(["step", "status", "s / budget", *STATUSES], step_lines) + "\n")
    bad = [r for r in rows if r["status"] in ("fail", "error")]
    bad_steps = [s for s in record["steps"] if s["status"] not in ("ok",)]
    if bad or bad_steps:
        lines = [f"- **{s['step']}** step {s['status']}: {s.get('reason', '')[:400]}" for s in bad_steps]
        lines += [f"- **{r['step']} / {r['name']}** {r['status']}: {r.get('reason', '')[:600]}" for r in bad]
        parts.append("## Failures\n\n" + "\n".join(lines) + "\n")
    else:
        parts.append("## Failures\n\nnone\n")
    corr = [r for r in rows if r.get("step") == "correctness"]
    if corr:
        parts.append("## Correctness (fused vs reference on the same device)\n\nmode clear = input drawn clear of "
                     ".5 boundaries (indices must match exactly); counted = random input, flips allowed only where "
                     "the float64 oracle's margin is below BOUNDARY_TOL, and counted.\n\n" + _table(
                         ["sub-case", "status", "mode", "flips", "path", "s"],
                         [[r["name"], r["status"], r.get("mode", "-"), _fmt(r.get("flips")), r.get("path", "-"),
                           _fmt(r.get("seconds"))] for r in corr]) + "\n")
    graphs = [r for r in rows if r.get("step") == "graphs"]
    if graphs:
        parts.append("## CUDA graphs and torch.compile\n\n" + _table(
            ["sub-case", "status", "detail", "s"],
            [[r["name"], r["status"], r.get("reason") or (f"bitwise={r['bitwise']}, {r['backend']}" if "bitwise" in r
                                                           else "replay == eager bitwise"), _fmt(r.get("seconds"))]
             for r in graphs]) + "\n")
    timed = [r for r in rows if r.get("step") == "timing" and "backend" in r]
    if timed:
        from bench.backends import BACKENDS
        from bench.report import format_table

        cells = [dict(r, status={"fail": "wrong"}.get(r["status"], r["status"])) for r in timed]
        parts.append("## Timing (median ms, % of the copy-bandwidth byte floor; fused/x = x time / fused time)\n\n"
                     + ("CPU dry run: not GPU numbers.\n\n" if record["dry_run"] else "")
                     + "```\n" + format_table(cells, [b for b in BACKENDS if any(r["backend"] == b for r in timed)])
                     + "\n```\n")
    model = [r for r in rows if r.get("step") == "model" and r["status"] == "ok"]
    if model:
        parts.append("## Measured vs model (µs; model = max(counted bytes, instructions) per direction, "
                     "static report bench/results/kernels-sm<arch>.json)\n\n" + _table(
                         ["case", "mode", "µs floor", "µs bytes", "µs instr", "µs model", "µs measured",
                          "µs events", "measured/model", "measured/floor"],
                         [[r["case"], r["mode"], _fmt(r["floor_us"]), _fmt(r.get("bytes_us")), _fmt(r["instr_us"]),
                           _fmt(r["model_us"]), _fmt(r.get("measured_us")), _fmt(r.get("measured_events_us")),
                           _fmt(r.get("ratio_model")), _fmt(r.get("ratio_floor"))] for r in model]) + "\n")
    skipped = Counter((r["step"], r.get("reason", "")[:160]) for r in rows if r["status"] == "skipped")
    if skipped:
        parts.append("## Skipped\n\n" + "\n".join(f"- {step}: {n} x {reason}" for (step, reason), n in skipped.items())
                     + "\n")
    return "\n".join(parts)


def write_outputs(record: Dict, out_dir: Path, stem: Optional[str] = None) -> str:
    """Write ``<stem>.json`` and ``<stem>.md`` under ``out_dir`` (a new stem on the first call:
    a later run never overwrites an earlier one); returns the stem."""
    stem = stem or _stem(record, out_dir)
    (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown(record))
    return stem
