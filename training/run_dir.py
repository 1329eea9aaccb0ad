"""The output directory of a training run: claiming it, checking a resume against what it holds, and the
rows and results a run writes into it.

:func:`prepare_output_dir` creates --output-dir, refuses a directory that holds a run unless --resume or
--overwrite says what to do with it, and takes its :class:`~training.run_lock.RunDirLock` so that two live
runs never write into one directory. :func:`check_recipe` compares a resumed checkpoint's optimisation flags
with this command's, which a resume may only change with --allow-recipe-change. :func:`append_metrics`
(metrics.jsonl) and :func:`report_results` (results.json) write a run's rows and results into it.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from typing import TYPE_CHECKING, Dict, List

import torch.distributed as dist

from training import checkpoint as ckpt
from training.jsonio import dumps, write_json_atomic
from training.presets import PAPER_TABLE1
from training.run_lock import RunDirBusy, RunDirLock

if TYPE_CHECKING:  # only a type here: run_state imports this module
    from training.run_state import Run

log = logging.getLogger("rfsq.train")  # train.py's logger: its handlers print and file these messages


class OutputDirError(ValueError):
    """--output-dir cannot be used (not a directory, not writable, or holds a run we must not touch)."""


#: Files a run writes into --output-dir (what --overwrite deletes).
RUN_FILES = ("ckpt_last.pt", "ckpt_best.pt", "metrics.jsonl", "results.json", "config.json", "train.log",
             "reconstructions.png", "loss.png", "val_metrics.png")
#: What makes a directory "hold a run": something to resume or a result. The log, config and metrics of a
#: run that stopped before its first checkpoint are not one (a fresh run appends to the log, rewrites the
#: config and drops those metrics rows).
RUN_MARKERS = ("ckpt_last.pt", "ckpt_best.pt", "results.json")


def prepare_output_dir(args: argparse.Namespace) -> RunDirLock:
    """Create --output-dir; refuse one that holds a run unless --resume or --overwrite says what to do
    with it, and one that another live process is using (its :class:`RunDirLock`, returned held: the
    caller releases it when the run ends); with --overwrite delete that run's files; always delete
    temp files of a killed run."""
    d = args.output_dir
    try:
        os.makedirs(d, exist_ok=True)
    except FileExistsError:
        raise OutputDirError(f"--output-dir {d}: exists and is not a directory") from None
    except OSError as e:
        raise OutputDirError(f"--output-dir {d}: cannot create it ({e.strerror or e}"
                             f"{': ' + e.filename if e.filename else ''})") from None
    if not os.access(d, os.W_OK | os.X_OK):
        raise OutputDirError(f"--output-dir {d}: not writable (Permission denied)")
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(d, f))]
    if any(f in RUN_MARKERS for f in existing) and not args.resume and not args.overwrite:
        raise OutputDirError(f"--output-dir {d} already holds a run ({', '.join(existing)}); pass --resume to "
                             "continue it, or --overwrite to delete it and start again (or choose another "
                             "--output-dir)")
    try:  # taken before anything in the directory is changed; a dead holder's lock is gone with it
        lock = RunDirLock(d).acquire()
    except RunDirBusy as e:
        raise OutputDirError(str(e)) from None
    if args.overwrite:
        for f in existing:
            os.remove(os.path.join(d, f))
    ckpt.remove_stale_temps(d)
    return lock


#: Flags that define the optimisation (name in args, flag): a resume that changes one is refused unless
#: --allow-recipe-change applies it. The schedule length is compared as total steps (check_recipe).
RECIPE_FLAGS = (("lr", "--lr"), ("weight_decay", "--weight-decay"), ("warmup", "--warmup"),
                ("grad_clip", "--grad-clip"), ("seed", "--seed"), ("lpips_loss_weight", "--lpips-loss-weight"),
                ("no_lpips", "--no-lpips"))


def check_recipe(args: argparse.Namespace, world: int, total_steps: int, path: str,
                 state: Dict) -> List[Dict]:
    """The optimisation flags in which this command differs from the checkpoint's run, as
    ``{flag, old, new}``; refused (ValueError naming each flag, both values and what to do) unless
    --allow-recipe-change. The images per step (--batch-size x processes) and --embedded-epoch-size are
    refused always: the position in the epoch, the step count and ``images_seen`` are counted in them.
    A different split of the same images per step over ``world`` processes is applied (and logged);
    ``total_steps`` is this command's schedule length, ``state`` the checkpoint read from ``path``."""
    saved = state.get("args")
    if not isinstance(saved, dict):  # a checkpoint from before the flags were stored: nothing to compare
        log.warning("%s does not record its flags: resuming with this command's optimisation flags", path)
        return []
    fixed = []
    world0 = int(state.get("world_size", world))
    per_step0, per_step = saved.get("batch_size", args.batch_size) * world0, args.batch_size * world
    if per_step0 != per_step:
        hint = (f"resume with --batch-size {per_step0 // world} on {world} process(es)" if per_step0 % world == 0
                else f"resume on a number of processes that divides {per_step0}")
        fixed.append(f"images per step: {saved.get('batch_size')} x {world0} process(es) = {per_step0} in the "
                     f"checkpoint, {args.batch_size} x {world} = {per_step} now ({hint})")
    if saved.get("embedded_epoch_size", args.embedded_epoch_size) != args.embedded_epoch_size and not args.train_dir:
        fixed.append(f"--embedded-epoch-size: {saved['embedded_epoch_size']} in the checkpoint, "
                     f"{args.embedded_epoch_size} now")
    if fixed:
        raise ValueError(f"{path} cannot continue with {'; '.join(fixed)}: the position in the epoch, the step "
                         "count and images_seen are counted in these units, so they cannot change mid-run "
                         "(not even with --allow-recipe-change); or start a new run with --overwrite or another "
                         "--output-dir")
    if world0 != world:
        log.info("resuming on %d process(es) x batch %d (the checkpoint's run: %d x %d): the same %d images per step",
                 world, args.batch_size, world0, saved.get("batch_size"), per_step)
    changes = [{"flag": flag, "old": saved[k], "new": getattr(args, k)} for k, flag in RECIPE_FLAGS
               if k in saved and saved[k] != getattr(args, k)]
    total0 = state.get("total_steps", saved.get("max_steps"))
    if total0 is not None and total0 != total_steps:
        # the schedule is compared in total steps; the label names the flag this command set it with
        flag = "--max-steps" if args.max_steps is not None else "--max-train-epochs (total steps)"
        changes.append({"flag": flag, "old": total0, "new": total_steps})
    if changes and not args.allow_recipe_change:
        listed = "; ".join(f"{c['flag']}: {c['old']} in the checkpoint, {c['new']} now" for c in changes)
        raise ValueError(f"{path} was trained with a different recipe: {listed}. Resume with the checkpoint's "
                         f"values, or add --allow-recipe-change to apply the new ones from step {state['step']} "
                         "on (recorded in config.json, the checkpoints and results.json), or start a new run "
                         "with --overwrite or another --output-dir")
    return changes


def append_metrics(run: Run, row: Dict) -> None:
    """Rank 0 appends ``row`` to metrics.jsonl."""
    if run.dist.master:
        with open(run.metrics_path, "a") as f:
            f.write(dumps(row) + "\n")


def report_results(run: Run, metrics: Dict) -> None:
    """After the final evaluation: collect every rank's unreadable files, warn about them, and (rank 0)
    write results.json."""
    args, d = run.args, run.dist
    if d.ddp:
        everyone: List = [None] * d.world
        dist.all_gather_object(everyone, run.unreadable)
        run.unreadable = {p: r for u in everyone for p, r in u.items()}
    if run.unreadable:
        log.warning("skipped %d unreadable image file(s), e.g. %s (all in results.json)", len(run.unreadable),
                    ", ".join(sorted(run.unreadable)[:3]))
    if not d.master:
        return
    q, paper = run.raw_model.quantizer, PAPER_TABLE1.get(run.preset)
    wall = round(time.time() - run.t_start, 1)
    results = {
        "preset": run.preset, "quantizer": args.quantizer, "stages": q.stages, "codebook_size": q.codebook_size,
        "bits_per_token": q.bits_per_token, "quantizer_config": run.identity, "steps": run.step, "epochs": run.epoch,
        "world_size": d.world, "batch_size_per_process": args.batch_size,
        "images_seen": run.step * args.batch_size * d.world,  # resume keeps the images per step (check_recipe)
        "recipe_changes": run.recipe_changes,
        "data": "imagefolder" if args.train_dir else "embedded scikit-image photos",
        "heldout_photos": args.holdout_photos,
        "lpips_weights": run.lpips_source, "skipped_images": len(run.unreadable),
        "skipped_files": sorted(run.unreadable)[:1000],
        "wall_time_s": wall, "train_time_s": round(run.train_time, 1), "eval_time_s": round(run.eval_time, 1),
        "val": metrics,
        "paper": None if paper is None else {"name": paper[0], "l1": paper[1], "lpips": paper[2], "psnr": paper[3]},
    }
    path = os.path.join(args.output_dir, "results.json")
    write_json_atomic(path, results)
    log.info("done: %d steps in %.1f s (this process: training %.1f s, evaluation %.1f s, start-up and "
             "saving %.1f s); results in %s", run.step, wall, run.train_time, run.eval_time,
             max(0.0, wall - run.train_time - run.eval_time), path)
