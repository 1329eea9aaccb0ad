"""The first GPU run in one command: environment, correctness, graphs/compile, timing, model.

    python bench/gpu_validate.py [--out DIR] [--budget-s SECONDS] [--dry-run] [--steps ...]

Made for a lent machine (one GPU, 15 minutes in all, no network, this package not installed): it
imports the package from the checkout (``bench/gpu_env.py``), installs the optional wheels of
``.whl/`` (``bash bench/gpu_wheels.sh``) into a temporary target, then runs the steps of
:data:`STEPS` in order, each within its budget, and writes ``<out>/gpu-validate-<device>-<date>``
``.json`` (every row with status and reason) and ``.md`` (the summary) after every step, so a run
cut short still leaves evidence. ``--dry-run`` runs every step on the CPU (tiny shapes, kernels in
the Triton interpreter, no timing) in well under 2 minutes; ``tests/tools/test_gpu_validate.py`` runs it.

Time boxes. Each step runs in its own Python process, started with the step's budget
(``--budget-s`` scales the table) and killed (its process group) at the budget plus a short grace.
Why processes and not threads or in-process checks alone: the first execution of kernels that
never ran on a GPU may hang (a device-side spin, a compiler stuck) or kill the CUDA context
(illegal address, device assert), and a dead context cannot be recovered in that process; a fresh
process recovers both, at the cost of one torch import (~3 s) per step. Inside a step the process
checks the time between sub-cases and records the ones it cannot start as ``skipped`` (time box).
Every row is appended to a per-process JSON-lines file as it finishes, so a killed step keeps what
it did; the parent merges them into the JSON after each step. Correctness on the GPU runs in four
processes (sub-cases dealt round-robin, so each keeps the priority order): it is mostly Triton
compilation, which one process does serially.
When a step reports a dead CUDA context the parent probes a fresh process; only if the device is
unusable there too are the later steps recorded as skipped.
"""
from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: the checkout, not an installed copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import gpu_env  # noqa: E402  (stdlib only: safe before TRITON_INTERPRET is decided)

#: name -> (module:function returning the step's sub-cases, GPU budget s, dry-run budget s, GPU
#: processes, what). GPU budgets sum to 420 s; with the per-step grace and the wheel install the
#: run stays under 8 minutes. Correctness is mostly Triton compilation (one process compiles
#: serially), so on the GPU its sub-cases are dealt round-robin to 4 processes sharing the device
#: (the machine has 16 cores); timing is never split (it would measure the neighbours).
STEPS: Dict[str, Tuple[str, float, float, int, str]] = {
    "environment": ("bench.gpu_env:subcases", 20, 15, 1, "device, versions, packages, copy bandwidth"),
    "correctness": ("bench.gpu_correct:subcases", 215, 55, 4, "fused vs reference on the device"),
    "graphs": ("bench.gpu_graphs:subcases", 55, 25, 1, "CUDA graph capture/replay, torch.compile fullgraph"),
    "timing": ("bench.gpu_timing:timing_subcases", 115, 10, 1, "bench/report.py machinery, curated cases"),
    "model": ("bench.gpu_timing:model_subcases", 15, 10, 1, "measured vs the static report's model"),
}
GRACE_S = 8.0
#: A sub-case is not started with less than this left, nor with less than 1.5x the longest so far.
MIN_LEFT_S = 2.0
DEAD_CONTEXT_EXIT = 3
CUDA_DEAD = ("illegal memory access", "device-side assert", "unspecified launch failure", "CUDA error: an illegal",
             "context is destroyed", "misaligned address", "illegal instruction")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


class Context:
    """What a step's sub-cases get: the device, dry-run flag, and the rows of earlier steps."""

    def __init__(self, device, dry: bool, earlier: List[Dict]):
        self.device, self.dry, self.earlier = device, dry, earlier


def _cuda_dead(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return any(s in text for s in CUDA_DEAD)


def run_subcases(step: str, subcases: Sequence[Tuple[int, str, Callable[[], Optional[Dict]]]], rows_path: Path,
                 deadline: float) -> int:
    """Run ``(index, name, fn)`` sub-cases in order, appending one row each to ``rows_path``; returns
    the exit code (``DEAD_CONTEXT_EXIT`` once the CUDA context died: the rest are then skipped)."""
    longest, dead = 0.0, False
    with rows_path.open("a") as sink:
        for index, name, fn in subcases:
            left = deadline - time.time()
            row: Dict = {"step": step, "index": index, "name": name}
            if dead:
                row.update(status="skipped", reason="CUDA context died in an earlier sub-case of this step")
            elif left < max(MIN_LEFT_S, 1.5 * longest):
                row.update(status="skipped", reason=f"time box: {left:.1f} s left, longest sub-case {longest:.1f} s")
            else:
                t0 = time.time()
                try:
                    extra = dict(fn() or {})
                    row.update(status=extra.pop("status", "ok"), **extra)
                except AssertionError as exc:
                    row.update(status="fail", reason=str(exc)[:1500] or "assertion failed")
                except Exception as exc:  # recorded with its reason; later sub-cases still run
                    row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:1500],
                               traceback=traceback.format_exc()[-1500:])
                    dead = _cuda_dead(exc)
                row["seconds"] = round(time.time() - t0, 2)
                longest = max(longest, row["seconds"])
            sink.write(json.dumps(row, default=str) + "\n")
            sink.flush()
    return DEAD_CONTEXT_EXIT if dead else 0


def _child(args) -> int:
    """One step in this process (``--step``): import late, after TRITON_INTERPRET is settled."""
    gpu_env.use_checkout()
    import importlib

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    rows_dir = Path(args.rows)
    shard, shards = (int(x) for x in args.shard.split("/"))
    module, func = STEPS[args.step][0].split(":")
    ctx = Context(device, args.dry_run, read_rows(rows_dir))
    try:
        listed = getattr(importlib.import_module(module), func)(ctx)
    except Exception as exc:  # the step could not even list its sub-cases
        listed = [("setup", functools.partial(_raise, exc))]
    mine = [(i, name, fn) for i, (name, fn) in enumerate(listed) if i % shards == shard]
    return run_subcases(args.step, mine, rows_dir / f"{args.step}-{shard}.jsonl", args.deadline)


def _raise(exc: BaseException):
    raise exc


def _run_step(step: str, budget: float, shards: int, rows: Path, dry: bool, env: Dict[str, str]) -> Dict:
    """Start the step's ``shards`` processes; kill each one's process group at ``budget + GRACE_S``.
    Status: the worst of the processes (timed-out, error, cuda-dead, ok)."""
    started = time.time()
    procs = []
    for i in range(shards):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--step", step, "--rows", str(rows), "--shard",
               f"{i}/{shards}", "--deadline", str(started + budget)] + (["--dry-run"] if dry else [])
        procs.append(subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(0.0, started + budget + GRACE_S - time.time()))
            status = {0: "ok", DEAD_CONTEXT_EXIT: "cuda-dead"}.get(proc.returncode, "error")
            reason = "" if status == "ok" else f"exit code {proc.returncode}: {(out or '')[-1500:]}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            status, reason = "timed-out", f"killed after {budget + GRACE_S:.0f} s (budget {budget:.0f} s); rows so far kept"
        results.append((status, reason, out or ""))
    order = ("timed-out", "error", "cuda-dead", "ok")
    status, reason, out = min(results, key=lambda r: order.index(r[0]))
    return {"step": step, "status": status, "reason": reason, "budget_s": round(budget, 1), "processes": shards,
            "seconds": round(time.time() - started, 1), "output_tail": out[-800:]}


def _cuda_usable(env: Dict[str, str]) -> bool:
    probe = "import torch; x = torch.ones(4, device='cuda'); assert float((x + 1).sum()) == 8.0"
    try:
        return subprocess.run([sys.executable, "-c", probe], env=env, timeout=60, capture_output=True).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def read_rows(rows_dir: Path) -> List[Dict]:
    """Every row written so far, in step order, then sub-case order."""
    rows = []
    for path in rows_dir.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                pass
    steps = list(STEPS)
    return sorted(rows, key=lambda r: (steps.index(r["step"]), r.get("index", 0)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the JSON + markdown summary")
    p.add_argument("--budget-s", type=float, default=None,
                   help="total step budget in seconds; scales the table (GPU 420 s, dry run 115 s)")
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU: tiny shapes, interpreter, no timing")
    p.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    p.add_argument("--processes", type=int, default=None,
                   help="processes for the correctness step (default: the table's on a GPU, 1 in a dry run)")
    p.add_argument("--no-wheels", action="store_true", help="do not install the wheels of .whl/ (tests)")
    p.add_argument("--step", choices=list(STEPS), help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    p.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step:
        return _child(args)
    import torch  # the parent never imports triton: the steps decide TRITON_INTERPRET

    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device here: use --dry-run (every step on the CPU, kernels in the Triton interpreter)")
    from bench.gpu_report import write_outputs

    started = time.time()
    env = dict(os.environ)
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    index = 2 if args.dry_run else 1
    table_total = sum(STEPS[s][index] for s in args.steps)
    scale = (args.budget_s / table_total) if args.budget_s else 1.0
    args.out.mkdir(parents=True, exist_ok=True)
    record: Dict = {"command": " ".join(["python", "bench/gpu_validate.py", *(argv if argv is not None else sys.argv[1:])]),
                    "dry_run": args.dry_run, "date": dt.datetime.now().isoformat(timespec="seconds"),
                    "budget_scale": round(scale, 3), "steps": [], "rows": []}
    with tempfile.TemporaryDirectory(prefix="rfsq-gpu-validate-") as tmp:
        record["wheels"] = ({"status": "skipped", "reason": "--no-wheels", "wheels": []} if args.no_wheels
                            else gpu_env.install_wheels(Path(tmp) / "site"))
        if record["wheels"]["status"] == "ok":
            env[gpu_env.SITE_ENV] = str(Path(tmp) / "site")
        stem = None
        rows_dir = Path(tmp) / "rows"
        rows_dir.mkdir()
        dead = False
        for step in args.steps:
            budget = STEPS[step][index] * scale
            if dead:
                result = {"step": step, "status": "skipped", "reason": "CUDA unusable in a fresh process"}
            else:
                shards = 1 if args.dry_run else STEPS[step][3]
                if args.processes and step == "correctness":
                    shards = args.processes
                result = _run_step(step, budget, shards, rows_dir, args.dry_run, env)
                if result["status"] != "ok" and not args.dry_run:  # a crash or hang may have taken the device
                    dead = not _cuda_usable(env)
            record["steps"].append(result)
            record["rows"] = read_rows(rows_dir)
            env_row = next((r for r in record["rows"] if r["name"] == "versions+device"), None)
            if env_row:  # device, versions and date at the top of the record too
                record["environment"] = {k: v for k, v in env_row.items() if k not in ("step", "index", "name")}
            record["wall_s"] = round(time.time() - started, 1)
            stem = write_outputs(record, args.out, stem)
            print(f"[{record['wall_s']:6.1f} s] {step}: {result['status']} "
                  f"({sum(r['step'] == step for r in record['rows'])} rows)", flush=True)
    print(f"wrote {args.out / stem}.json and .md in {time.time() - started:.0f} s")
    bad = [r for r in record["rows"] if r["status"] in ("fail", "error")]
    return 1 if bad or any(s["status"] not in ("ok",) for s in record["steps"]) else 0


if __name__ == "__main__":
    sys.exit(main())
