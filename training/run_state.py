"""What a training run holds and how it is built: the :class:`Run` (data, model, loss, optimization,
schedule, position and this process's bookkeeping) and :func:`setup_run`, which builds it from the flags
and restores it from a checkpoint when --resume finds one (:func:`resume`). The loop in train.py
advances it; :func:`training.checkpoint.checkpoint_state` is what of it a checkpoint holds."""
from __future__ import annotations

import argparse
import logging
import math
import os
import signal
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, ContextManager, Dict, List, Optional, Tuple

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

from training import checkpoint as ckpt
from training.data import (DataError, EmbeddedTrain, EmbeddedVal, SafeImageFolder, ShardedSampler,
                           TiledCrops, collate_skip, load_photos, split_embedded)
from training.distributed import Dist
from training.jsonio import dumps, read_jsonl, write_json_atomic, write_text_atomic
from training.lpips_loss import ReconstructionLoss, load_lpips
from training.model import AutoEncoder, build_quantizer, quantizer_kwargs
from training.presets import PAPER_TABLE1, identity_differences, preset_of, run_identity
from training.run_dir import check_recipe
from training.stop_signals import StopRequest

log = logging.getLogger("rfsq.train")
MAX_NAMED_UNREADABLE = 20  # unreadable files named in the log; the rest are counted (and in results.json)


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
# This process's bookkeeping
# ---------------------------------------------------------------------------------------------
def note_unreadable(run: Run, samples) -> None:
    """Record the unreadable training images of a batch; the first MAX_NAMED_UNREADABLE are named in the log."""
    for s in samples:
        if s.path not in run.unreadable:
            run.unreadable[s.path] = s.reason
            n = len(run.unreadable)
            if n <= MAX_NAMED_UNREADABLE:
                log.warning("skipping unreadable image %s (%s)%s", s.path, s.reason,
                            "; further ones are only counted" if n == MAX_NAMED_UNREADABLE else "")
