"""Rate–distortion study: does RFSQ's conditioning pay off at equal bits? (issue 13)

    python -m training.study                      # the whole grid (short runs, then the 10x longer ones), then the report
    python -m training.study --length short       # only the short grid
    python -m training.study --only fsq22 rfsq2-ln --seeds 0 --steps 200
    python -m training.study --report             # only regenerate training/results/ from the runs that exist

Every run is ``training/train.py``'s ``main`` (same code path as any training run) on the embedded
scikit-image photos, split *by image*: it trains on 13 of them and validates on 4 it never sees
(:data:`HELDOUT`, overlapping tiles). Runs live in ``ROOT/<steps>steps/<config>-seed<k>/`` (default
ROOT ``runs/study``, git-ignored); a run with a ``results.json`` is skipped, one with a checkpoint is
continued (``--resume auto``), and a lock file lets several copies of this command share the grid
(start one per free core). After each run, :func:`training.evaluate.evaluate_run` adds the per-stage
PSNR (``eval_heldout/eval.json``). ``--report`` writes the table and plots to ``training/results/``.

Grid (:data:`CONFIGS`): the paper's 9 presets; single-stage FSQ with the latent width and bits of each
RFSQ (``fsq22``: levels 64 64 64 16 vs RFSQ-2x[8,8,8,4]; ``fsq40``: [256]*5 vs RFSQ-4x[4]*5); and
``vector_quantize_pytorch.ResidualFSQ`` with RFSQ's levels and stages (``lucid2``, ``lucid4``)
when that package is installed. The 4 :data:`MAIN` configurations are also trained 10x longer.

Scale (chosen for a 2-core machine shared with other jobs; measured, one thread per run):

- 32x32 crops (latent 8x8) of the photos resized to a 64-pixel short side; encoder/decoder width 32
  (paper: 128x128, width 128); batch 16; Adam at the paper's lr 8e-4, 1 % warmup, linear decay.
- **Loss: L1 (+ the quantizer's aux loss) only; LPIPS-VGG is measured in every validation but not
  trained on.** Measured on one idle core, a step (batch 16) takes 0.024 s with L1 and 0.65 s with
  L1 + LPIPS-VGG (its forward+backward, ~40 ms per 32x32 image, is 96 % of the step): the grid's
  106k steps would need ~19 core-hours instead of ~45 core-minutes. ``--lpips-loss-weight 1``
  restores the paper's loss; ``--loss-check`` measures whether the change matters.
- :data:`SHORT_STEPS` = 1000 steps (16k crops) per short run, 10000 for the long ones; 2 seeds.
- Loss check (``--loss-check``): the 4 main configurations for 250 steps with L1 only and with the
  paper's L1 + LPIPS (2 seeds each), to see whether the loss change alters their ranking.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

#: embedded photos never trained on (3 RGB scenes and 1 greyscale); validation = their tiles.
HELDOUT = ("chelsea", "coffee", "rocket", "coins")
SHORT_STEPS = 1000
LONG_FACTOR = 10
SEEDS = (0, 1)
#: the study's scale (train.py flags), see the module docstring.
SCALE = {"image_size": 32, "model_width": 32, "batch_size": 16, "lpips_loss_weight": 0.0}

#: name -> (train.py flags, label, family). Family groups methods in the plots.
CONFIGS: Dict[str, tuple] = {
    "vq-ema": (["--preset", "vq-ema"], "VQ-EMA 4096", "baseline"),
    "lfq": (["--preset", "lfq"], "LFQ 12 bit", "baseline"),
    "fsq": (["--preset", "fsq"], "FSQ [8]*4", "fsq"),
    "fsq22": (["--quantizer", "fsq", "--levels", "64", "64", "64", "16"], "FSQ [64,64,64,16] (22 bit)", "fsq"),
    "fsq40": (["--quantizer", "fsq", "--levels", "256", "256", "256", "256", "256"], "FSQ [256]*5 (40 bit)", "fsq"),
    "rfsq2-none": (["--preset", "rfsq2-none"], "RFSQ-2 none", "none"),
    "rfsq2-scale": (["--preset", "rfsq2-scale"], "RFSQ-2 scale", "scale"),
    "rfsq2-ln": (["--preset", "rfsq2-ln"], "RFSQ-2 layernorm", "layernorm"),
    "rfsq4-none": (["--preset", "rfsq4-none"], "RFSQ-4 none", "none"),
    "rfsq4-scale": (["--preset", "rfsq4-scale"], "RFSQ-4 scale", "scale"),
    "rfsq4-ln": (["--preset", "rfsq4-ln"], "RFSQ-4 layernorm", "layernorm"),
    "lucid2": (["--quantizer", "lucidrains", "--rfsq-stages", "2", "--levels", "8", "8", "8", "4"],
               "lucidrains ResidualFSQ-2", "lucidrains"),
    "lucid4": (["--quantizer", "lucidrains", "--rfsq-stages", "4", "--levels", "4", "4", "4", "4", "4"],
               "lucidrains ResidualFSQ-4", "lucidrains"),
}
#: the configurations also trained LONG_FACTOR x longer (the length check).
MAIN = ("fsq22", "rfsq2-none", "rfsq2-ln", "rfsq4-ln")
#: the loss check (``--loss-check``): the main configurations with L1 only and with the paper's
#: L1 + LPIPS, LOSS_CHECK_STEPS steps each, in ROOT-losscheck/{l1,paper}/.
LOSS_CHECK_STEPS = 250
LOSS_CHECK = {"l1": 0.0, "paper": 1.0}
LUCIDRAINS = ("lucid2", "lucid4")


def lucidrains_available() -> bool:
    """Whether ``vector_quantize_pytorch`` imports (the ResidualFSQ configurations need it)."""
    try:
        import vector_quantize_pytorch  # noqa: F401
    except Exception:
        return False
    return True


def run_dir(root: str, name: str, seed: int, steps: int) -> str:
    """Where run (``name``, ``seed``) of ``steps`` steps lives."""
    return os.path.join(root, f"{steps}steps", f"{name}-seed{seed}")


def train_argv(name: str, seed: int, steps: int, out: str, scale: dict) -> List[str]:
    """train.py's flags for one run of the study."""
    flags, _, _ = CONFIGS[name]
    argv = [*flags, "--seed", str(seed), "--max-steps", str(steps), "--output-dir", out, "--resume", "auto",
            "--holdout-photos", *HELDOUT, "--eval-every", str(max(1, steps // 4)),
            "--save-every", str(max(1, min(250, steps // 4))), "--log-every", str(max(1, steps // 100))]
    for key, value in scale.items():
        if value is True:
            argv.append("--" + key.replace("_", "-"))
        elif value is not False and value is not None:
            argv += ["--" + key.replace("_", "-"), str(value)]
    return argv


def is_finished(out: str, steps: int) -> bool:
    """A results.json with ``steps`` steps and the per-stage evaluation exist."""
    res = os.path.join(out, "results.json")
    if not (os.path.isfile(res) and os.path.isfile(os.path.join(out, "eval_heldout", "eval.json"))):
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


def run_one(name: str, seed: int, steps: int, root: str, scale: dict, lpips_weights: Optional[str] = None) -> str:
    """Train (or continue) one run and evaluate it on the held-out photos. Returns ``done``,
    ``skipped`` (finished before), ``busy`` (another process holds it) or ``failed (code N)``."""
    from training.evaluate import evaluate_run
    from training.train import main as train_main

    out = run_dir(root, name, seed, steps)
    if is_finished(out, steps):
        return "skipped"
    if not acquire_lock(out):
        return "busy"
    try:
        argv = train_argv(name, seed, steps, out, scale)
        if lpips_weights:
            argv += ["--lpips-weights", lpips_weights]
        if not os.path.isfile(os.path.join(out, "results.json")):
            code = train_main(argv)
            if code != 0:
                return f"failed (code {code})"
        evaluate_run(out, lpips_weights=lpips_weights)
        return "done"
    finally:
        release_lock(out)


def plan(only: Optional[Sequence[str]], seeds: Sequence[int], steps: int, length: str) -> List[tuple]:
    """The (name, seed, steps) runs to do, in order: short grid first, then the long runs."""
    names = [n for n in CONFIGS if not only or n in only]
    if not lucidrains_available():
        skipped = [n for n in names if n in LUCIDRAINS]
        if skipped:
            print(f"vector-quantize-pytorch is not installed: skipping {skipped}", file=sys.stderr)
        names = [n for n in names if n not in LUCIDRAINS]
    runs = []
    if length in ("short", "both"):
        runs += [(n, s, steps) for s in seeds for n in names]
    if length in ("long", "both"):
        runs += [(n, s, steps * LONG_FACTOR) for s in seeds for n in names if n in MAIN]
    return runs


def main(argv: Optional[List[str]] = None) -> int:
    """Run the grid (or ``--report`` only); returns 0 when every selected run finished."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(CONFIGS), metavar="CONFIG",
                   help=f"configurations to run (default all): {', '.join(CONFIGS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="seeds (default 0 1)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"steps of a short run (default {SHORT_STEPS}); long runs take {LONG_FACTOR}x")
    p.add_argument("--length", choices=["short", "long", "both"], default="both",
                   help="short grid, the long runs of the main configurations, or both (default)")
    p.add_argument("--root", default=os.path.join("runs", "study"), help="where runs go (default runs/study)")
    p.add_argument("--results-dir", default=os.path.join("training", "results"),
                   help="where --report writes the table and plots (default training/results)")
    p.add_argument("--report", action="store_true", help="only (re)write the report from existing runs")
    p.add_argument("--loss-check", action="store_true",
                   help=f"instead of the grid: the main configurations for {LOSS_CHECK_STEPS} steps (or --steps if "
                        "given) with L1 only and with the paper's L1 + LPIPS (ROOT-losscheck/)")
    p.add_argument("--no-report", action="store_true", help="do not write the report after the runs")
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process (default 1; start "
                                                          "one copy of this command per core instead)")
    p.add_argument("--image-size", type=int, default=SCALE["image_size"])
    p.add_argument("--model-width", type=int, default=SCALE["model_width"])
    p.add_argument("--batch-size", type=int, default=SCALE["batch_size"])
    p.add_argument("--lpips-loss-weight", type=float, default=SCALE["lpips_loss_weight"],
                   help="LPIPS weight in the training loss (default 0: L1 only, see the docstring; 1 = paper)")
    p.add_argument("--lpips-weights", metavar="PATH|random", help="passed to train.py (tests use 'random')")
    p.add_argument("--no-lpips", action="store_true", help="no LPIPS at all, not even in evaluation (smoke test)")
    p.add_argument("--embedded-epoch-size", type=int, default=512, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = LOSS_CHECK_STEPS if args.loss_check else SHORT_STEPS
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if not args.seeds:
        p.error("--seeds needs at least one seed")

    if not args.report:
        torch.set_num_threads(args.threads)
        scale = {"image_size": args.image_size, "model_width": args.model_width, "batch_size": args.batch_size,
                 "lpips_loss_weight": args.lpips_loss_weight, "embedded_epoch_size": args.embedded_epoch_size,
                 "no_lpips": args.no_lpips}
        if args.loss_check:
            runs = [(n, s, args.steps, os.path.join(args.root + "-losscheck", variant), w)
                    for variant, w in LOSS_CHECK.items() for s in args.seeds for n in MAIN
                    if not args.only or n in args.only]
        else:
            runs = [(n, s, st, args.root, args.lpips_loss_weight) for n, s, st in
                    plan(args.only, args.seeds, args.steps, args.length)]
        t_start, failed = time.time(), 0
        for i, (name, seed, steps, root, lpips_w) in enumerate(runs):
            t0 = time.time()
            status = run_one(name, seed, steps, root, {**scale, "lpips_loss_weight": lpips_w}, args.lpips_weights)
            failed += status.startswith("failed") or status == "busy"
            print(f"[study {i + 1}/{len(runs)}] {name} seed {seed} {steps} steps: {status} "
                  f"({time.time() - t0:.0f} s; {time.time() - t_start:.0f} s in all)", file=sys.stderr, flush=True)
            if status == "failed (code 130)":  # Ctrl-C / SIGTERM: the run saved a checkpoint; stop the grid
                print("interrupted: run the same command again to continue", file=sys.stderr)
                return 130
        if failed:
            print(f"{failed} run(s) failed or are held by another process", file=sys.stderr)
    else:
        failed = 0
    if args.report or not args.no_report:
        from training.study_report import write_report

        extra = {f"loss check, {v}": os.path.join(args.root + "-losscheck", v) for v in LOSS_CHECK}
        for path in write_report(args.root, args.results_dir, extra):
            print(f"wrote {path}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
