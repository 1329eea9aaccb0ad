"""The study's runner: the grid of runs, their locks and records, and the command line.

The package docstring (:mod:`training.study`) is the ``--help`` text; ``python -m training.study``
runs :func:`main` (``training/study/__main__.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import List, Optional

import torch

import training.study as package
from training.flag_types import int_flag
from training.study.grid import (CONFIGS, LONG_FACTOR, LOSS_CHECK, LOSS_CHECK_STEPS, MAIN, N_FOLDS, SCALE, SEEDS,
                                 SHORT_STEPS, folds, plan, run_dir, skipped_configs, train_argv)
from training.study.photo_eval import PHOTOS_JSON
from training.study.records import (MAIN_GROUP, commit_records, make_record, record_path, uncommitted_records,
                                    write_record)


def is_finished(out: str, steps: int) -> bool:
    """A results.json with ``steps`` steps, the held-out evaluation and the per-photo evaluation exist."""
    res = os.path.join(out, "results.json")
    ev = os.path.join(out, "eval_heldout")
    if not all(os.path.isfile(p) for p in (res, os.path.join(ev, "eval.json"), os.path.join(ev, PHOTOS_JSON))):
        return False
    with open(res) as f:
        return json.load(f).get("steps") == steps


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_path(out: str) -> str:
    """The lock file of run dir ``out``: a hidden sibling (so that ``RUN_GROUP/*`` globs only runs)."""
    return os.path.join(os.path.dirname(out), "." + os.path.basename(out) + ".lock")


def acquire_lock(out: str) -> bool:
    """Take the run's lock file (holding this pid) unless a live process holds it; stale locks are taken over."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    path = lock_path(out)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _pid_alive(pid):
                return False
            try:
                os.remove(path)  # stale: its process is gone
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def release_lock(out: str) -> None:
    try:
        os.remove(lock_path(out))
    except FileNotFoundError:
        pass


def _log(root: str, line: str) -> None:
    """Append a timestamped line to ROOT/progress.log (the study's measured wall time comes from it)."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "progress.log"), "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime())} pid {os.getpid()} {line}\n")


def run_one(name: str, seed: int, steps: int, root: str, scale: dict, lpips_weights: Optional[str] = None,
            fold: int = 0, n_folds: int = N_FOLDS, records_dir: Optional[str] = None,
            group: str = MAIN_GROUP) -> str:
    """Train (or continue) one run on every fold but ``fold`` and evaluate it on the held-out photos
    (overall and per photo, with the real rate), then write its record under ``records_dir``.
    Returns ``done``, ``skipped`` (its record exists, or its directory finished before: the record is
    written then), ``busy`` (another process holds it) or ``failed (code N)``."""
    from training.evaluate import evaluate_run
    from training.study.photo_eval import evaluate_photos
    from training.train import main as train_main

    out = run_dir(root, name, seed, steps, fold)
    rec = record_path(records_dir, group, name, seed, steps, fold) if records_dir else None
    if rec and os.path.isfile(rec):
        return "skipped"
    if is_finished(out, steps):
        if rec:
            write_record(rec, make_record(out, name, seed, fold))
        return "skipped"
    if not acquire_lock(out):
        return "busy"
    try:
        t0 = time.time()
        argv = train_argv(name, seed, steps, out, scale, fold, n_folds)
        if lpips_weights:
            argv += ["--lpips-weights", lpips_weights]
        if not os.path.isfile(os.path.join(out, "results.json")):
            code = train_main(argv)
            if code != 0:
                return f"failed (code {code})"
        evaluate_run(out, lpips_weights=lpips_weights)
        evaluate_photos(out, lpips_weights=lpips_weights)
        if rec:
            write_record(rec, make_record(out, name, seed, fold))
        _log(root, f"done {name} seed {seed} fold {fold} {steps} steps in {time.time() - t0:.1f} s")
        return "done"
    finally:
        release_lock(out)


#: set in the environment of the copies ``--jobs N`` starts, so their end-of-grid line says whose it is
WORKER_ENV = "RFSQ_STUDY_WORKER"


def _spawn_workers(argv: List[str], n: int) -> List[subprocess.Popen]:
    """``n`` more copies of this command (no report, one job each), sharing the grid through the locks."""
    cmd = [sys.executable, "-m", "training.study", *argv, "--jobs", "1", "--no-report"]
    return [subprocess.Popen(cmd, env={**os.environ, WORKER_ENV: "1"}) for _ in range(n)]


def _without_jobs(argv: List[str]) -> List[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--jobs":
            skip = True
        elif not a.startswith("--jobs="):
            out.append(a)
    return out


def build_parser() -> argparse.ArgumentParser:
    # prog: argparse would name the file that runs (__main__.py), not the command the docstring shows
    p = argparse.ArgumentParser(prog="python -m training.study", description=package.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(CONFIGS), metavar="CONFIG",
                   help=f"configurations to run (default all): {', '.join(CONFIGS)}")
    p.add_argument("--seeds", nargs="+", type=int_flag(0), default=list(SEEDS),
                   help=f"seeds (default {' '.join(map(str, SEEDS))})")
    p.add_argument("--folds", nargs="+", type=int_flag(0, N_FOLDS - 1), default=None, metavar="F",
                   help=f"cross-validation folds to run (default all {N_FOLDS}; long runs use fold 0)")
    p.add_argument("--steps", type=int_flag(1), default=None,
                   help=f"steps of a short run (default {SHORT_STEPS}); long runs take {LONG_FACTOR}x")
    p.add_argument("--length", choices=["short", "long", "both"], default="both",
                   help="short grid, the long runs of the main configurations, or both (default)")
    p.add_argument("--root", default=os.path.join("runs", "study-cv"), help="where runs go (default runs/study-cv)")
    p.add_argument("--results-dir", default=os.path.join("training", "results"),
                   help="where --report writes the table and plots (default training/results)")
    p.add_argument("--records-dir", default=None,
                   help="where each finished run's record goes (default RESULTS_DIR/records): the committed "
                        "progress of the study, read by the runner (a record = a finished run) and the report")
    p.add_argument("--commit", action="store_true",
                   help="git-commit each record as its run finishes (only the record files), so that progress "
                        "lands even if the machine is lost")
    p.add_argument("--report", action="store_true", help="only (re)write the report from the records")
    p.add_argument("--loss-check", action="store_true",
                   help=f"instead of the grid: the main configurations for {LOSS_CHECK_STEPS} steps (or --steps if "
                        "given) with L1 only and with the paper's L1 + LPIPS, fold 0 (ROOT-losscheck/)")
    p.add_argument("--no-report", action="store_true", help="do not write the report after the runs")
    p.add_argument("--jobs", type=int_flag(1), default=1,
                   help="processes working on the grid (default 1; one per free core), one torch thread each")
    p.add_argument("--threads", type=int_flag(1), default=1, help="torch threads of each process (default 1)")
    p.add_argument("--image-size", type=int_flag(4, multiple_of=4), default=SCALE["image_size"])
    p.add_argument("--model-width", type=int_flag(1), default=SCALE["model_width"])
    p.add_argument("--batch-size", type=int_flag(1), default=SCALE["batch_size"])
    p.add_argument("--lpips-loss-weight", type=float, default=SCALE["lpips_loss_weight"],
                   help="LPIPS weight in the training loss (default 0: L1 only, see the docstring; 1 = paper)")
    p.add_argument("--lpips-weights", metavar="PATH|random", help="passed to train.py (tests use 'random')")
    p.add_argument("--no-lpips", action="store_true", help="no LPIPS at all, not even in evaluation (smoke test)")
    p.add_argument("--embedded-epoch-size", type=int_flag(1), default=512, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run the grid (or ``--report`` only); returns 0 when every selected run finished (``--report``:
    1 when there is no record to report on)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = LOSS_CHECK_STEPS if args.loss_check else SHORT_STEPS
    records = args.records_dir or os.path.join(args.results_dir, "records")

    failed = 0
    if not args.report:
        torch.set_num_threads(args.threads)
        scale = {"image_size": args.image_size, "model_width": args.model_width, "batch_size": args.batch_size,
                 "lpips_loss_weight": args.lpips_loss_weight, "embedded_epoch_size": args.embedded_epoch_size,
                 "no_lpips": args.no_lpips}
        skipped = skipped_configs(args.only)
        if skipped:
            print(f"skipping {skipped}: their module is not installed ({', '.join(skipped)} need "
                  "vector-quantize-pytorch or rfsq_kernels.vqpytorch)", file=sys.stderr)
        if args.commit:  # records a killed earlier process wrote but could not commit
            commit_records(uncommitted_records(records), "study: records left uncommitted by an earlier run")
        if args.loss_check:
            runs = [(n, s, args.steps, 0, os.path.join(args.root + "-losscheck", variant), w, f"losscheck-{variant}")
                    for variant, w in LOSS_CHECK.items() for s in args.seeds for n in MAIN
                    if not args.only or n in args.only]
        else:
            runs = [(n, s, st, f, args.root, args.lpips_loss_weight, MAIN_GROUP) for n, s, st, f in
                    plan(args.only, args.seeds, args.steps, args.length, args.folds)]
        workers = _spawn_workers(_without_jobs(argv), args.jobs - 1) if args.jobs > 1 else []
        t_start = time.time()
        _log(args.root, f"start {len(runs)} runs, {args.jobs} job(s): {' '.join(argv)}")
        for i, (name, seed, steps, fold, root, lpips_w, group) in enumerate(runs):
            t0 = time.time()
            status = run_one(name, seed, steps, root, {**scale, "lpips_loss_weight": lpips_w}, args.lpips_weights,
                             fold, records_dir=records, group=group)
            failed += status.startswith("failed")
            rec = record_path(records, group, name, seed, steps, fold)
            if args.commit and status in ("done", "skipped") and rec in uncommitted_records(records):
                commit_records([rec], f"study record: {name} seed {seed} fold {fold}, {steps} steps "
                                      f"({group}; {time.time() - t0:.0f} s)")
            print(f"[study {i + 1}/{len(runs)}] {name} seed {seed} fold {fold} {steps} steps: {status} "
                  f"({time.time() - t0:.0f} s; {time.time() - t_start:.0f} s in all)", file=sys.stderr, flush=True)
            if status == "failed (code 130)":  # Ctrl-C / SIGTERM: the run saved a checkpoint; stop the grid
                print("interrupted: run the same command again to continue", file=sys.stderr)
                for w in workers:
                    w.terminate()
                return 130
        for w in workers:
            # a worker's exit code is not a run count (it exits 1 when it saw this process still busy
            # on a run): the records, checked once every worker is done, say what did not finish
            w.wait()
        # runs another copy held while this one passed them: finished now, or still busy (or failed)
        busy = [r for r in runs if not os.path.isfile(record_path(records, r[6], r[0], r[1], r[2], r[3]))]
        _log(args.root, f"end after {time.time() - t_start:.0f} s, {len(busy)} run(s) unfinished")
        if failed or busy:
            role = "this worker: " if os.environ.get(WORKER_ENV) else ""
            print(f"{role}{failed} run(s) failed here, {len(busy)} without a record (failed, or still running in "
                  "another process): run the same command again to continue", file=sys.stderr)
            failed = failed or len(busy)
    if args.report or not args.no_report:
        from training.study.report import write_report

        written, why_not = write_report(records, args.results_dir, run_root=args.root)
        if not written:
            print(f"{'error' if args.report else 'report not written'}: {why_not}", file=sys.stderr)
            if args.report:
                return 1
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
    return 1 if failed else 0
