"""Train the paper's autoencoder with RFSQ or a baseline quantizer (single GPU, torchrun DDP, or CPU).

    python training/train.py --preset rfsq2-ln --max-steps 200            # embedded photos, CPU ok
    python training/train.py --preset rfsq4-ln --train-dir IMAGENET/train --val-dir IMAGENET/val
    torchrun --nproc_per_node=8 training/train.py --preset rfsq4-ln --train-dir ... --val-dir ...

Recipe defaults are the paper's: Adam(0.9, 0.999), lr 8e-4, linear warmup over 1% of the steps then
linear decay to 0, weight decay 5e-5, grad-norm clip 1.0, 50 epochs, batch 128 per GPU; loss = L1 in
the ImageNet-normalized space + LPIPS-VGG on [0, 1] images + the quantizer's aux loss. Without
--train-dir the run uses real photos shipped with scikit-image (random 128x128 crops; no download).
Outputs in --output-dir: train.log, metrics.jsonl, results.json, ckpt_last.pt, ckpt_best.pt,
reconstructions.png (originals above reconstructions), loss.png, val_metrics.png.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Dict, Iterator, List, Optional, Tuple

if __package__ in (None, ""):  # run as a script: make `training` and `rfsq_kernels` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist

from training import checkpoint as ckpt
from training import train_args
from training.checkpoint import save_checkpoint
from training.data import DataError, EmbeddedTrain
from training.distributed import any_rank, setup_distributed, teardown_distributed
from training.logs import log, log_to_file, setup_logging
from training.lpips_weights import LPIPSWeightsError
from training.metrics import compute_metrics  # looked up at call time: tests patch it
from training.plots import plot_curves, save_grid
from training.run_dir import OutputDirError, append_metrics, prepare_output_dir, report_results
from training.run_lock import RunDirLock
from training.run_state import Run, note_unreadable, setup_run
from training.stop_signals import stop_on_signals

# How this file reads, top to bottom: the command line (training/train_args.py); what one iteration uses
# (batches, train_step, log_step, validate, stop_early); the loop (train); main(), which sets up the
# distributed context, the run (training/run_state.py: setup_run, resume) and the signal handlers, and
# maps errors to exit codes. The --output-dir, metrics.jsonl and results.json are training/run_dir.py's;
# what a checkpoint holds is training/checkpoint.py's; logging is training/logs.py's.


# ---------------------------------------------------------------------------------------------
# Command line (training/train_args.py; --help shows this file's docstring)
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of train.py (:func:`training.train_args.build_parser`)."""
    return train_args.build_parser(__doc__)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse and check train.py's flags (:func:`training.train_args.parse_args`)."""
    return train_args.parse_args(argv, __doc__)


# ---------------------------------------------------------------------------------------------
# What one iteration uses: batches, one step, its log row, evaluation, an early stop
# ---------------------------------------------------------------------------------------------
def batches(run: Run) -> Iterator[Tuple[int, torch.Tensor]]:
    """Yield ``(epoch, images)`` until the run has ``total_steps`` steps or a stop is requested on any rank.

    Keeps ``run.epoch`` and ``run.batch_in_epoch`` current, so a checkpoint written during a step resumes
    with exactly the batches that were left (the sampler skips the consumed ones). Batches in which every
    image is unreadable are counted and skipped, on all ranks when one rank's is empty; an epoch of them
    only is a DataError, never a silent spin.
    """
    args = run.args
    while run.step < run.total_steps:
        if isinstance(run.train_set, EmbeddedTrain):
            run.train_set.set_epoch(run.epoch)
        run.sampler.set_epoch(run.epoch, skip=run.batch_in_epoch * args.batch_size)
        seen, steps_before, whole_epoch = 0, run.step, run.batch_in_epoch == 0
        for images, bad in run.train_loader:
            # Checked before anything else, so that a stop request or a run of unreadable batches can
            # never spin here; under DDP all ranks agree.
            stop_now, empty = any_rank(run.dist, run.stop.requested, images.numel() == 0)
            if stop_now:
                return
            run.batch_in_epoch += 1
            seen += 1
            note_unreadable(run, bad)
            if empty:
                continue
            yield run.epoch, images
            if run.step >= run.total_steps:
                return
        if seen and run.step == steps_before and whole_epoch:
            examples = "; ".join(f"{p} ({r})" for p, r in sorted(run.unreadable.items())[:3])
            raise DataError(f"epoch {run.epoch} yielded no readable image in {seen} batch(es): "
                            f"{len(run.unreadable)} unreadable file(s), e.g. {examples or 'none named'}. "
                            f"Check the files in --train-dir {args.train_dir}")
        run.epoch, run.batch_in_epoch = run.epoch + 1, 0


def train_step(run: Run, images: torch.Tensor) -> Optional[Dict[str, float]]:
    """One optimizer step on a batch of ``images``. Returns the loss terms averaged over ranks (``loss``, ``l1``,
    ``lpips``, ``aux``), the learning rate the step used (``lr``) and ``stop`` (a stop was requested on some rank), or None when the loss is not
    finite on some rank: then no rank steps (the gradients are dropped) and the error is logged.

    The loss reaches the host once per step, after the backward (and the clip) are queued, so the device
    never waits for the host between forward and backward; only the optimizer step waits for the check."""
    args, d = run.args, run.dist
    x = images.to(d.device, non_blocking=True)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with run.autocast():
        recon, _, _, aux = run.model(x)
        loss, parts = run.loss_fn(recon, x, aux)
    # one small all-reduce: mean loss terms, non-finite check and Ctrl-C agreement on all ranks (queued
    # before the backward on every rank, so the collectives keep the same order everywhere)
    stats = torch.stack([loss.detach().float(), parts["l1"], parts["lpips"], parts["aux"],
                         torch.tensor(float(run.stop.requested), device=d.device)])
    if d.ddp:
        dist.all_reduce(stats)
        stats[:4] /= d.world
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if args.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
    loss_v, l1_v, lp_v, aux_v, stop_v = stats.tolist()  # the one host sync of the step
    if not math.isfinite(loss_v):
        run.optimizer.zero_grad(set_to_none=True)
        log.error("non-finite loss (%s; L1 %s, LPIPS %s, aux %s) at step %d: stopping without stepping. %s",
                  loss_v, l1_v, lp_v, aux_v, run.step + 1, _non_finite_advice(run))
        return None
    lr = run.optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler then sets the next one's)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.step += 1
    return {"loss": loss_v, "l1": l1_v, "lpips": lp_v, "aux": aux_v, "lr": lr, "stop": stop_v > 0}


def _non_finite_advice(run: Run) -> str:
    """What a non-finite loss suggests: before any update, the configuration (not the learning rate); and
    the checkpoint to go back to only when one exists."""
    last = os.path.join(run.args.output_dir, ckpt.LAST)
    if run.step == 0:
        cause = ("The loss is not finite before any update, so the learning rate is not the cause: check the "
                 "quantizer flags (e.g. --rfsq-initial-scale, --levels) and the data.")
    else:
        cause = "Try a lower --lr, or --amp none."
    where = (f" The last good checkpoint is {last} (continue from it with --resume)." if os.path.isfile(last)
             else " No checkpoint was written yet.")
    return cause + where


def log_step(run: Run, epoch: int, losses: Dict[str, float], images_per_s: float, bar, tty: bool) -> None:
    """Advance the progress bar; every --log-every steps (and at step 1) append a train row to metrics.jsonl
    and, without a terminal (or every 10th row with one), log it."""
    args, step = run.args, run.step
    bar.update(1)
    bar.set_postfix(loss=f"{losses['loss']:.4f}", l1=f"{losses['l1']:.4f}", img_s=f"{images_per_s:.1f}",
                    refresh=False)
    if step % args.log_every == 0 or step == 1:
        lr = losses["lr"]  # the rate step `step` used (get_last_lr() is already the next step's)
        append_metrics(run, {"split": "train", "step": step, "epoch": epoch, "lr": lr,
                             "loss": losses["loss"], "l1": losses["l1"],
                             "lpips": losses["lpips"] if run.lpips_in_loss else None,
                             "aux": losses["aux"], "images_per_s": images_per_s})
        if not tty or step % (args.log_every * 10) == 0:
            log.info("step %d/%d  loss %.4f  L1 %.4f  LPIPS %s  aux %.4f  lr %.2e  %.1f img/s",
                     step, run.total_steps, losses["loss"], losses["l1"],
                     f"{losses['lpips']:.4f}" if run.lpips_in_loss else "n/a", losses["aux"], lr, images_per_s)


def validate(run: Run) -> Dict:
    """Evaluate on the validation set (:func:`training.metrics.compute_metrics`, all ranks), append the val row,
    draw reconstructions.png and the curves, and checkpoint: before (marked eval_pending, so that a crash
    here costs no steps) and after (ckpt_best.pt too when the score, LPIPS else L1, improved)."""
    args = run.args
    t_eval = time.time()
    save_checkpoint(run, eval_pending=True)
    metrics, sample = compute_metrics(run.raw_model, run.val_loader, run.lpips_model, run.dist.device, run.autocast,
                               args.channels_last, unreadable=run.unreadable)
    if metrics["images"] == 0:
        examples = "; ".join(f"{p} ({r})" for p, r in sorted(run.unreadable.items())[:3])
        raise DataError(f"evaluation found no readable validation image (e.g. {examples or 'none named'}); "
                        f"check --val-dir {args.val_dir}")
    score = metrics["lpips"] if metrics["lpips"] is not None else metrics["l1"]
    is_best = score < run.best
    run.best = min(run.best, score)
    append_metrics(run, {"split": "val", "step": run.step, "epoch": run.epoch, **metrics})
    if run.dist.master and sample is not None:
        save_grid(*sample, os.path.join(args.output_dir, "reconstructions.png"))
        plot_curves(args.output_dir)
    lp = "n/a" if metrics["lpips"] is None else f"{metrics['lpips']:.4f}"
    log.info("val step %d: L1 %.4f  LPIPS %s  PSNR %.2f dB  usage %s  perplexity %s  residual RMS %s (latent %.3f)",
             run.step, metrics["l1"], lp, metrics["psnr"], metrics["codebook_usage"], metrics["perplexity"],
             [round(r, 4) for r in metrics["residual_rms"]], metrics["latent_rms"])
    save_checkpoint(run, best_too=is_best)
    run.eval_time += time.time() - t_eval
    return metrics


def stop_early(run: Run, exit_code: int) -> int:
    """Save ckpt_last.pt at the current step, say how to continue, and return ``exit_code``."""
    save_checkpoint(run)
    log.warning("stopped at step %d; checkpoint saved to %s (continue with --resume)", run.step,
                os.path.join(run.args.output_dir, ckpt.LAST))
    return exit_code


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------
def train(run: Run) -> int:
    """Train until --max-steps (or the epochs), evaluating every --eval-every steps and at the end;
    returns the exit code: 0 done or stopped by --stop-at-step, 1 non-finite loss, 130 stopped by a signal."""
    from tqdm import tqdm

    args = run.args
    tty = sys.stderr.isatty()
    # Without a terminal (nohup, SLURM, a pipe) the bar's \r frames would garble the log: log lines only.
    bar = tqdm(total=run.total_steps, initial=run.step, disable=not (run.dist.master and tty), dynamic_ncols=True,
               unit="step", mininterval=0.5)
    images_per_step = args.batch_size * run.dist.world
    step0 = run.step
    run.model.train()
    try:
        if run.eval_pending and run.step < run.total_steps:  # the previous run died during this evaluation
            validate(run)
        t0 = time.time()
        for epoch, images in batches(run):
            losses = train_step(run, images)
            if losses is None:  # non-finite loss: logged; the last checkpoint stays the good one
                return 1
            images_per_s = (run.step - step0) * images_per_step / max(run.train_time + time.time() - t0, 1e-9)
            log_step(run, epoch, losses, images_per_s, bar, tty)
            if losses["stop"] or (args.stop_at_step and run.step >= args.stop_at_step):
                return stop_early(run, 130 if losses["stop"] else 0)
            if run.step % run.eval_every == 0 and run.step < run.total_steps:
                run.train_time += time.time() - t0
                validate(run)
                t0 = time.time()
            elif run.step % args.save_every == 0:
                save_checkpoint(run)
        run.train_time += time.time() - t0
        if run.step < run.total_steps:  # batches() ended early: a stop was requested before a step
            return stop_early(run, 130)
    finally:
        bar.close()
    metrics = validate(run)
    report_results(run, metrics)
    return 0


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    """Train; returns the process exit code (0 ok, 1 error / non-finite loss, 130 interrupted)."""
    t_start = time.time()
    args = parse_args(argv)
    d = setup_distributed()
    handlers = setup_logging(d.master)
    lock: Optional[RunDirLock] = None
    try:
        refused = None
        if d.master:  # only rank 0 writes into --output-dir (and so only rank 0 holds its lock)
            try:
                lock = prepare_output_dir(args)
            except OutputDirError as e:
                refused = e
        if any_rank(d, refused is not None)[0]:
            log.error("%s", refused if refused is not None else "rank 0 refused --output-dir; see its log")
            return 1
        if d.master:
            handlers.append(log_to_file(args.output_dir))
        run = setup_run(args, d, t_start)
        with stop_on_signals(run.stop):
            code = train(run)
        if d.ddp and code == 0:
            # Leave together: a gloo rank that tears its process group down while its peer is
            # still writing the final checkpoint can abort ("terminate called ...", seen in CI).
            dist.barrier()
        return code
    except (DataError, LPIPSWeightsError, ckpt.CheckpointError, OSError, ValueError) as e:
        log.error("%s", e)  # OSError: a file the run reads or writes (a full disk names the file)
        return 1
    except KeyboardInterrupt:  # the second Ctrl-C: abort now, without a traceback
        if os.path.isfile(os.path.join(args.output_dir, ckpt.LAST)):
            log.error("aborted; continue from the last checkpoint with --resume")
        else:
            log.error("aborted before the first checkpoint: nothing to resume; rerun the same command to start again")
        return 130
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
        if lock is not None:
            lock.release()
        teardown_distributed(d)


if __name__ == "__main__":
    sys.exit(main())
