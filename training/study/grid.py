"""What the study trains: configurations, seeds, cross-validation folds, run directories.

Shared by the runner (:mod:`training.study.runner`) and the report (:mod:`training.study.report`), which
import this module and not each other.
"""
from __future__ import annotations

import importlib
import os
from typing import Dict, List, Optional, Sequence, Tuple

from training.data import EXTRA_PHOTOS

SHORT_STEPS = 1000
LONG_FACTOR = 10
#: seeds 0..4; seed k of every configuration sees the same crops in the same order (same photos per
#: fold, same ``--seed``) and, where two architectures have the same parameter shapes, the same init.
SEEDS = (0, 1, 2, 3, 4)
#: the study's scale (train.py flags), see training/study/__init__.py.
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
    # this package's exact, fused drop-in for lucid4 (issue 21, rfsq_kernels.vqpytorch.ResidualFSQ):
    # on the CPU it runs the reference path and must reproduce lucid4 (same seed) exactly.
    "vqpy4": (["--quantizer", "vqpy", "--rfsq-stages", "4", "--levels", "4", "4", "4", "4", "4"],
              "fused vqpytorch ResidualFSQ-4", "lucidrains"),
}
#: the order runs are scheduled in within one seed: the :data:`HEADLINE` configurations (equal-bit
#: single-stage FSQ vs RFSQ-layernorm, lucidrains' ResidualFSQ) on every fold first, then the others on
#: every fold, so that a partial study answers the headline comparisons on every photo first.
HEADLINE = ("fsq22", "rfsq2-ln", "fsq40", "rfsq4-ln", "lucid4")
ORDER = HEADLINE + ("rfsq2-none", "rfsq4-none", "lucid2", "rfsq2-scale", "rfsq4-scale", "fsq", "vq-ema", "lfq")
#: configurations run only when named with ``--only``: ``vqpy4`` is the same computation as ``lucid4``
#: (run for run, tests/trainer/test_training_study.py), so the grid does not spend its time on it.
ON_REQUEST = ("vqpy4",)
#: configuration -> the module it needs (skipped, with a message, when that does not import).
REQUIRES = {"lucid2": "vector_quantize_pytorch", "lucid4": "vector_quantize_pytorch",
            "vqpy4": "rfsq_kernels.vqpytorch"}
#: the configurations also trained LONG_FACTOR x longer (on fold :data:`LONG_FOLD` only).
MAIN = ("fsq22", "rfsq2-none", "rfsq2-ln", "rfsq4-ln")
LONG_FOLD = 0

#: the held-out units of cross-validation: every real photograph of the embedded set (the stereo pair
#: is one scene: both views on one side) and the offline extras. ``colorwheel`` is synthetic (an HSV
#: wheel, not a photo): always trained on, never held out.
CV_PHOTOS = ("astronaut", "camera", "chelsea", "brick", "coffee", "grass", "rocket", "gravel", "hubble_deep_field",
             "moon", "immunohistochemistry", "coins", "retina", "clock", "stereo_motorcycle", *sorted(EXTRA_PHOTOS))
N_FOLDS = 4
#: the loss check (``--loss-check``): the main configurations with L1 only and with the paper's
#: L1 + LPIPS, LOSS_CHECK_STEPS steps each, fold 0, in ROOT-losscheck/{l1,paper}/.
LOSS_CHECK_STEPS = 250
LOSS_CHECK = {"l1": 0.0, "paper": 1.0}


def folds(n_folds: int = N_FOLDS) -> List[Tuple[str, ...]]:
    """The held-out photos of each fold: :data:`CV_PHOTOS` dealt round-robin (RGB and greyscale
    photos alternate in that list, so every fold holds both)."""
    return [tuple(CV_PHOTOS[i::n_folds]) for i in range(n_folds)]


def available(name: str) -> bool:
    """Whether configuration ``name``'s required module (:data:`REQUIRES`) imports."""
    mod = REQUIRES.get(name)
    if mod is None:
        return True
    try:
        importlib.import_module(mod)
    except Exception:
        return False
    return True


def run_dir(root: str, name: str, seed: int, steps: int, fold: int) -> str:
    """Where run (``name``, ``seed``, ``fold``) of ``steps`` steps lives."""
    return os.path.join(root, f"{steps}steps", f"fold{fold}", f"{name}-seed{seed}")


def train_argv(name: str, seed: int, steps: int, out: str, scale: dict, fold: int, n_folds: int = N_FOLDS) -> List[str]:
    """train.py's flags for one run of the study: train on every fold but ``fold``, validate on it."""
    flags, _, _ = CONFIGS[name]
    argv = [*flags, "--seed", str(seed), "--max-steps", str(steps), "--output-dir", out, "--resume", "auto",
            "--extra-photos", *sorted(EXTRA_PHOTOS), "--holdout-photos", *folds(n_folds)[fold],
            "--eval-every", str(steps),  # validate once, at the end (the study evaluates afterwards anyway)
            "--save-every", str(max(1, min(250, steps // 4))), "--log-every", str(max(1, steps // 100))]
    for key, value in scale.items():
        if value is True:
            argv.append("--" + key.replace("_", "-"))
        elif value is not False and value is not None:
            argv += ["--" + key.replace("_", "-"), str(value)]
    return argv


def plan(only: Optional[Sequence[str]], seeds: Sequence[int], steps: int, length: str,
         fold_ids: Optional[Sequence[int]] = None, n_folds: int = N_FOLDS) -> List[Tuple[str, int, int, int]]:
    """The ``(name, seed, steps, fold)`` runs to do, in order: the short grid seed by seed (in each, the
    :data:`HEADLINE` configurations on every fold, then the others on every fold), then the long runs."""
    names = [n for n in ORDER + ON_REQUEST if (n in only if only else n in ORDER) and available(n)]
    fold_ids = list(range(n_folds)) if fold_ids is None else list(fold_ids)
    runs = []
    tiers = [[n for n in names if n in HEADLINE], [n for n in names if n not in HEADLINE]]
    if length in ("short", "both"):
        runs += [(n, s, steps, f) for s in seeds for tier in tiers for f in fold_ids for n in tier]
    if length in ("long", "both"):
        runs += [(n, s, steps * LONG_FACTOR, LONG_FOLD) for s in seeds for n in names if n in MAIN]
    return runs


def skipped_configs(only: Optional[Sequence[str]]) -> List[str]:
    """The selected configurations whose required module is missing."""
    return [n for n in CONFIGS if (not only or n in only) and not available(n)]
