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
import logging
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, ContextManager, Dict, Iterator, List, Optional, Tuple

if __package__ in (None, ""):  # run as a script: make `training` and `rfsq_kernels` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

from training import checkpoint as ckpt
from training import train_args
from training.data import (DataError, EmbeddedTrain, EmbeddedVal, SafeImageFolder, ShardedSampler,
                           TiledCrops, collate_skip, load_photos, split_embedded)
from training.distributed import Dist, any_rank, setup_distributed, teardown_distributed
from training.lpips_loss import ReconstructionLoss, load_lpips
from training.lpips_weights import LPIPSWeightsError
from training.metrics import compute_metrics  # looked up at call time: tests patch it
from training.model import AutoEncoder, build_quantizer, quantizer_kwargs
from training.jsonio import dumps, read_jsonl, write_json_atomic, write_text_atomic
from training.plots import plot_curves, save_grid
from training.presets import PAPER_TABLE1, identity_differences, preset_of, run_identity
from training.run_dir import OutputDirError, check_recipe, prepare_output_dir
from training.run_lock import RunDirLock
from training.stop_signals import StopRequest, stop_on_signals

log = logging.getLogger("rfsq.train")
MAX_NAMED_UNREADABLE = 20  # unreadable files named in the log; the rest are counted (and in results.json)

# How this file reads, top to bottom: the command line (training/train_args.py); logging; data loaders and
# the LR schedule; the Run (setup_run, resume; the --output-dir and recipe checks are in training/run_dir.py);
# what one iteration uses (batches, train_step, log_step, validate, save_checkpoint); the loop (train);
# main(), which sets up the distributed context, the run and the signal handlers, and maps errors to exit codes.


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
# Logging (the output directory: training/run_dir.py)
# ---------------------------------------------------------------------------------------------
class _TqdmHandler(logging.Handler):
    def emit(self, record):
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")


def setup_logging(master: bool) -> List[logging.Handler]:
    """Rank 0 logs INFO to the terminal, other ranks only warnings; :func:`log_to_file` adds train.log."""
    log.setLevel(logging.INFO if master else logging.WARNING)
    log.propagate = False
    handler = _TqdmHandler()
    handler.setFormatter(_FORMAT)
    log.addHandler(handler)
    return [handler]


def log_to_file(output_dir: str) -> logging.Handler:
    """Also log to OUTPUT_DIR/train.log (rank 0, once the directory is known to be ours)."""
    handler = logging.FileHandler(os.path.join(output_dir, "train.log"))
    handler.setFormatter(_FORMAT)
    log.addHandler(handler)
    return handler


# ---------------------------------------------------------------------------------------------
# Data and LR schedule
# ---------------------------------------------------------------------------------------------
def lr_lambda(total_steps: int, warmup: float) -> Callable[[int], float]:
    """Linear warmup (``warmup`` fraction of ``total_steps`` if < 1, else steps) then linear decay to 0."""
    w = max(1, int(round(warmup * total_steps)) if warmup < 1 else int(warmup))

    def f(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return max(0.0, (total_steps - step) / max(1, total_steps - w))

    return f


def _worker_init(_):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the main process (the loader's
    # workers are shut down by it; they must not die first and turn a clean stop into a loader error)


def make_loaders(args: argparse.Namespace, rank: int, world: int,
                 pin: bool) -> Tuple[DataLoader, ShardedSampler, Dataset, DataLoader]:
    """(train loader, train sampler, train dataset, val loader)."""
    if (args.holdout_photos or args.extra_photos) and (args.train_dir or args.val_dir):
        raise DataError("--holdout-photos and --extra-photos are about the embedded photos; they cannot be combined "
                        "with --train-dir/--val-dir")
    if args.train_dir or args.val_dir:
        if not (args.train_dir and args.val_dir):
            raise DataError("give both --train-dir and --val-dir (or neither, for the embedded photos)")
        train_set, val_set = SafeImageFolder(args.train_dir, args.image_size), SafeImageFolder(args.val_dir, args.image_size)
        workers = 8 if args.num_workers is None else args.num_workers
    else:
        photos, names = load_photos(max(2 * args.image_size, 64), args.extra_photos or ())
        if args.holdout_photos:
            train_photos, heldout = split_embedded(photos, args.holdout_photos, names)
            train_set = EmbeddedTrain(train_photos, args.image_size, args.embedded_epoch_size, args.seed)
            val_set = TiledCrops(heldout, args.image_size, stride=args.image_size // 2)
        else:
            train_set = EmbeddedTrain(photos, args.image_size, args.embedded_epoch_size, args.seed)
            val_set = EmbeddedVal(photos, args.image_size)
        workers = 0 if args.num_workers is None else args.num_workers
    if len(train_set) // world < args.batch_size:
        raise DataError(f"{len(train_set)} training images cannot fill one batch of {args.batch_size} per process "
                        f"on {world} process(es); lower --batch-size")
    sampler = ShardedSampler(len(train_set), rank, world, shuffle=True, seed=args.seed, drop_last=True)
    common = dict(num_workers=workers, pin_memory=pin, collate_fn=collate_skip, worker_init_fn=_worker_init)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True, **common)
    val_sampler = ShardedSampler(len(val_set), rank, world, shuffle=False, drop_last=False)
    val_loader = DataLoader(val_set, batch_size=args.batch_size, sampler=val_sampler, **common)
    return train_loader, sampler, train_set, val_loader


# ---------------------------------------------------------------------------------------------
# The run: everything a training process holds, built once by setup_run
# ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One training process's run: what :func:`setup_run` builds, the loop advances and checkpoints hold."""

    args: argparse.Namespace
    dist: Dist
    t_start: float  # when main() started (results.json's wall time counts from it)
    # data
    train_set: Dataset
    sampler: ShardedSampler
    train_loader: DataLoader
    val_loader: DataLoader
    # model, loss, optimization
    raw_model: AutoEncoder  # unwrapped: what is saved and evaluated
    model: torch.nn.Module  # what is trained: raw_model, torch.compile'd and/or DDP-wrapped
    lpips_model: Optional[torch.nn.Module]
    lpips_source: str  # where the LPIPS weights came from, or why there are none
    loss_fn: ReconstructionLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast: Callable[[], ContextManager]
    # schedule and identity
    steps_per_epoch: int
    total_steps: int
    eval_every: int
    preset: str  # what the flags amount to: a --preset with overridden quantizer flags is "custom"
    identity: Dict  # the configuration a checkpoint must match to be resumed (presets.run_identity)
    # position: what a checkpoint stores and resume restores
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` consumed (skipped empty ones included)
    best: float = math.inf  # best validation score so far (LPIPS, else L1)
    eval_pending: bool = False  # the checkpoint was written just before an evaluation that did not finish
    recipe_changes: List[Dict] = field(default_factory=list)  # --allow-recipe-change: {step, flag, old, new}
    # this process's bookkeeping
    unreadable: Dict[str, str] = field(default_factory=dict)  # path -> reason, train and val
    train_time: float = 0.0
    eval_time: float = 0.0
    stop: StopRequest = field(default_factory=StopRequest)

    @property
    def lpips_in_loss(self) -> bool:
        """LPIPS is a term of the training loss (not only reported in validation)."""
        return self.lpips_model is not None and self.args.lpips_loss_weight > 0

    @property
    def metrics_path(self) -> str:
        """OUTPUT_DIR/metrics.jsonl: one JSON row per logged train step and per evaluation."""
        return os.path.join(self.args.output_dir, "metrics.jsonl")


def setup_run(args: argparse.Namespace, d: Dist, t_start: float) -> Run:
    """Data, model, loss, optimizer and LR schedule; resumed from a checkpoint when --resume finds one;
    then compiled / DDP-wrapped. Logs the configuration and (rank 0) writes config.json."""
    device = d.device
    if args.quantizer_backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise ValueError("--quantizer-backend triton needs a CUDA GPU (or TRITON_INTERPRET=1, very slow); "
                         "use --quantizer-backend auto or reference on CPU")
    train_loader, sampler, train_set, val_loader = make_loaders(args, d.rank, d.world, device.type == "cuda")
    torch.manual_seed(args.seed)  # identical init on every rank
    quantizer = build_quantizer(args.quantizer, **quantizer_kwargs(args, backend=args.quantizer_backend))
    model = AutoEncoder(quantizer, width=args.model_width).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    torch.manual_seed(args.seed + d.rank)  # per-rank RNG from here on
    if args.no_lpips:
        lpips_model, lpips_source = None, "disabled (--no-lpips)"
    else:
        lpips_model, lpips_source = load_lpips(args.lpips_weights)
        lpips_model = lpips_model.to(device)
        if args.channels_last:
            lpips_model = lpips_model.to(memory_format=torch.channels_last)
    lpips_in_loss = lpips_model is not None and args.lpips_loss_weight > 0
    loss_fn = ReconstructionLoss(lpips_model if lpips_in_loss else None, args.lpips_loss_weight)

    steps_per_epoch = len(train_loader)
    total_steps = args.max_steps if args.max_steps is not None else args.max_train_epochs * steps_per_epoch
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                                 **({"fused": True} if device.type == "cuda" else {}))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    preset = preset_of(vars(args))
    if args.preset and preset != args.preset:
        log.info("--preset %s with overridden quantizer flags: a custom configuration, not the paper's %s",
                 args.preset, PAPER_TABLE1.get(args.preset, (args.preset,))[0])
    run = Run(
        args=args, dist=d, t_start=t_start,
        train_set=train_set, sampler=sampler, train_loader=train_loader, val_loader=val_loader,
        raw_model=model, model=model, lpips_model=lpips_model, lpips_source=lpips_source, loss_fn=loss_fn,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, args.warmup)),
        scaler=torch.amp.GradScaler(device.type, enabled=args.amp == "fp16"),
        autocast=partial(torch.autocast, device.type, dtype=amp_dtype) if amp_dtype else nullcontext,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        eval_every=args.eval_every or (steps_per_epoch if args.train_dir else 100),
        preset=preset, identity=run_identity(vars(args)),
    )
    resume(run)

    if args.compile:
        run.model = torch.compile(run.model)
    if d.ddp:
        run.model = DDP(run.model, device_ids=[d.local_rank] if device.type == "cuda" else None,
                        broadcast_buffers=False)

    q = quantizer
    log.info("quantizer %s (%s): %d stage(s) x %d codes, %.1f bits/token, backend %s | device %s x %d | "
             "batch %d/process, %d steps (%d/epoch), eval every %d | LPIPS: %s | amp %s, channels_last %s, compile %s",
             preset, args.quantizer, q.stages, q.codebook_size, q.bits_per_token,
             args.quantizer_backend, device, d.world, args.batch_size, total_steps, steps_per_epoch, run.eval_every,
             lpips_source, args.amp, args.channels_last, args.compile)
    if d.master:
        write_json_atomic(os.path.join(args.output_dir, "config.json"),
                          {**vars(args), "world_size": d.world, "total_steps": total_steps,
                           "recipe_changes": run.recipe_changes})
    return run


def resume(run: Run) -> None:
    """Restore ``run`` from the checkpoint --resume names (if any): weights, optimizer, schedule, position
    and RNG. Rank 0 drops the metrics.jsonl rows logged after that checkpoint (and those of the evaluation
    it redoes); a fresh run drops the rows of a run that died before its first checkpoint."""
    args, d = run.args, run.dist
    resume_path, state = ckpt.find_resume(args.output_dir, args.resume)
    if not resume_path:
        if args.resume == "auto":
            log.info("--resume auto: no checkpoint in %s, starting fresh", args.output_dir)
        if d.master and os.path.exists(run.metrics_path):
            os.remove(run.metrics_path)
        return
    differences = identity_differences(state["quantizer_config"], run.identity)
    if differences:
        raise ValueError(f"{resume_path} was trained with a different configuration: {'; '.join(differences)}. "
                         "Resume with the checkpoint's settings, or start a new run with --overwrite or "
                         "another --output-dir")
    changes = check_recipe(args, d.world, run.total_steps, resume_path, state)
    run.raw_model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.step, run.epoch, run.batch_in_epoch, run.best = state["step"], state["epoch"], state["batch_in_epoch"], state["best"]
    run.recipe_changes = list(state.get("recipe_changes") or [])
    if changes:
        apply_recipe_changes(run, changes)
    run.eval_pending = bool(state.get("eval_pending", False))
    if d.world == 1:
        ckpt.set_rng_state(state["rng"])
    else:
        torch.manual_seed(args.seed + d.rank + 1000003 * run.step)
    if d.master:
        redo_eval = run.eval_pending or run.step >= run.total_steps
        rows = [r for r in read_jsonl(run.metrics_path)
                if r["step"] < run.step or (r["step"] == run.step and not (redo_eval and r["split"] == "val"))]
        write_text_atomic(run.metrics_path, "".join(dumps(r) + "\n" for r in rows))
    log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_path, run.step, run.epoch, run.batch_in_epoch)
    if run.step >= run.total_steps:
        log.info("the run is already complete (%d/%d steps): evaluating it again; --overwrite trains it anew",
                 run.step, run.total_steps)


def apply_recipe_changes(run: Run, changes: List[Dict]) -> None:
    """--allow-recipe-change: make the restored optimizer and schedule use this command's --lr and
    --weight-decay (a loaded state would keep the checkpoint's) and the new schedule from this step on
    (--warmup, total steps); the other recipe flags are read from args where used. Logged, and
    appended to ``run.recipe_changes``."""
    args = run.args
    for group in run.optimizer.param_groups:
        group["initial_lr"] = args.lr
        group["weight_decay"] = args.weight_decay
    run.scheduler.base_lrs = [args.lr for _ in run.optimizer.param_groups]
    factor = lr_lambda(run.total_steps, args.warmup)(run.step)
    for group in run.optimizer.param_groups:
        group["lr"] = args.lr * factor  # the rate of the next step under the new schedule
    run.scheduler._last_lr = [g["lr"] for g in run.optimizer.param_groups]
    run.recipe_changes += [{"step": run.step, **c} for c in changes]
    log.warning("--allow-recipe-change: from step %d on, %s", run.step,
                "; ".join(f"{c['flag']} {c['old']} -> {c['new']}" for c in changes))


# ---------------------------------------------------------------------------------------------
# What one iteration uses: batches, one step, evaluation, checkpoints, metrics rows
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


def checkpoint_state(run: Run, eval_pending: bool = False) -> Dict:
    """What ckpt_last.pt / ckpt_best.pt hold (training.checkpoint.REQUIRED_KEYS and more)."""
    return {"model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "step": run.step,
            "epoch": run.epoch, "batch_in_epoch": run.batch_in_epoch, "best": run.best, "rng": ckpt.rng_state(),
            "quantizer_config": run.identity, "eval_pending": eval_pending,
            "args": {k: v for k, v in vars(run.args).items()}, "world_size": run.dist.world,
            "total_steps": run.total_steps, "recipe_changes": run.recipe_changes}


def save_checkpoint(run: Run, best_too: bool = False, eval_pending: bool = False) -> None:
    """Rank 0 writes ckpt_last.pt (and ckpt_best.pt when ``best_too``) atomically; other ranks do nothing."""
    if run.dist.master:
        state = checkpoint_state(run, eval_pending)
        ckpt.atomic_save(state, os.path.join(run.args.output_dir, ckpt.LAST))
        if best_too:
            ckpt.atomic_save(state, os.path.join(run.args.output_dir, ckpt.BEST))


def append_metrics(run: Run, row: Dict) -> None:
    """Rank 0 appends ``row`` to metrics.jsonl."""
    if run.dist.master:
        with open(run.metrics_path, "a") as f:
            f.write(dumps(row) + "\n")


def note_unreadable(run: Run, samples) -> None:
    """Record the unreadable training images of a batch; the first MAX_NAMED_UNREADABLE are named in the log."""
    for s in samples:
        if s.path not in run.unreadable:
            run.unreadable[s.path] = s.reason
            n = len(run.unreadable)
            if n <= MAX_NAMED_UNREADABLE:
                log.warning("skipping unreadable image %s (%s)%s", s.path, s.reason,
                            "; further ones are only counted" if n == MAX_NAMED_UNREADABLE else "")


def stop_early(run: Run, exit_code: int) -> int:
    """Save ckpt_last.pt at the current step, say how to continue, and return ``exit_code``."""
    save_checkpoint(run)
    log.warning("stopped at step %d; checkpoint saved to %s (continue with --resume)", run.step,
                os.path.join(run.args.output_dir, ckpt.LAST))
    return exit_code


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
