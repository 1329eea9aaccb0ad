"""Statistics of the study: paired differences with a crossed bootstrap interval, verdicts, spread.

Every configuration is measured on the same grid of cells, (seed, held-out photo): seeds pair across
configurations (same data order and, where the architectures allow, the same initialisation), and
every photo is held out once in cross-validation. A comparison A vs B uses the paired differences
``D[s, p] = metric_A[s, p] - metric_B[s, p]`` on the cells both have.

The 95 % interval of the mean difference is a **crossed (two-way) percentile bootstrap**: each
replicate resamples seeds and photos independently, with replacement, and averages ``D`` over the
resampled grid; the percentiles are *expanded* for the number of photos (:func:`expanded_alpha`),
because the plain percentile interval is too narrow with few photos. Why not a paired t interval: the differences have two crossed sources of variation
(photos differ far more than seeds, and not normally: a texture and a sky are different animals), and a
t interval over one of them ignores the other; resampling both is the standard non-parametric answer
and is conservative when one of them is small. With one seed the interval cannot include the seed
variation (the report says so). Measured coverage of the nominal 95 % on synthetic data (photo SD 0.8,
seed SD 0.2, cell noise 0.3; 400 draws): see tests/trainer/test_training_study.py and the README.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import numpy as np

#: bootstrap replicates and the RNG seed (fixed, so that the report is reproducible).
N_BOOT = 4000
BOOT_SEED = 0
NO_DIFFERENCE = "no detectable difference at this size"
IDENTICAL = "identical"  # every paired difference is exactly 0


def paired_matrix(a: Dict[Tuple[int, str], float], b: Dict[Tuple[int, str], float]) -> np.ndarray:
    """``D[seed, photo] = a - b`` over the (seed, photo) cells; NaN where either side lacks the cell."""
    seeds = sorted({s for s, _ in a} | {s for s, _ in b})
    photos = sorted({p for _, p in a} | {p for _, p in b})
    d = np.full((len(seeds), len(photos)), np.nan)
    for i, s in enumerate(seeds):
        for j, p in enumerate(photos):
            if (s, p) in a and (s, p) in b and a[s, p] is not None and b[s, p] is not None:
                d[i, j] = a[s, p] - b[s, p]
    keep_s, keep_p = ~np.isnan(d).all(1), ~np.isnan(d).all(0)
    return d[keep_s][:, keep_p]


def bootstrap_ci(d: np.ndarray, level: float = 0.95, n_boot: int = N_BOOT,
                 seed: int = BOOT_SEED) -> Tuple[float, float, float]:
    """``(mean, low, high)`` of ``d`` (``(seeds, photos)``, NaN = missing cell): the mean over the cells
    and the crossed percentile bootstrap interval (see the module docstring)."""
    d = np.asarray(d, dtype=float)
    if d.ndim != 2 or np.isnan(d).all():
        raise ValueError("bootstrap_ci needs a (seeds, photos) matrix with at least one value")
    mean = float(np.nanmean(d))
    S, P = d.shape
    rng = np.random.default_rng(seed)
    si = rng.integers(0, S, size=(n_boot, S))
    pi = rng.integers(0, P, size=(n_boot, P))
    grid = d[si[:, :, None], pi[:, None, :]]  # (n_boot, S, P)
    with warnings.catch_warnings():  # a replicate that drew only missing cells is dropped
        warnings.simplefilter("ignore", RuntimeWarning)
        reps = np.nanmean(grid.reshape(n_boot, -1), axis=1)
    reps = reps[~np.isnan(reps)]
    alpha = expanded_alpha((1 - level) / 2, P)
    return mean, float(np.quantile(reps, alpha)), float(np.quantile(reps, 1 - alpha))


def expanded_alpha(alpha: float, n: int) -> float:
    """The tail probability of the *expanded* percentile bootstrap (Hesterberg 2015, "What teachers should
    know about the bootstrap", sec. 5.3): ``Phi(sqrt(n / (n - 1)) * t_{alpha, n - 1})``, which corrects the
    percentile interval's known narrowness at small ``n`` (here ``n`` = photos, the main resampled unit)."""
    from scipy import stats

    if n < 2:
        return alpha
    return float(stats.norm.cdf(np.sqrt(n / (n - 1)) * stats.t.ppf(alpha, n - 1)))


def verdict(low: float, high: float, higher_is_better: bool) -> str:
    """``better`` / ``worse`` (for A) when the interval of A - B excludes 0, else :data:`NO_DIFFERENCE`."""
    if low > 0:
        return "better" if higher_is_better else "worse"
    if high < 0:
        return "worse" if higher_is_better else "better"
    return NO_DIFFERENCE


def compare(a: Dict[Tuple[int, str], float], b: Dict[Tuple[int, str], float], higher_is_better: bool
            ) -> Optional[dict]:
    """Paired comparison of two configurations' per-(seed, photo) values: ``mean`` difference A - B,
    ``low``/``high`` (95 %), ``verdict``, ``seeds`` and ``photos`` (the paired cells' extent); None when
    they share no cell."""
    d = paired_matrix(a, b)
    if d.size == 0 or np.isnan(d).all():
        return None
    mean, low, high = bootstrap_ci(d)
    same = bool(np.all(d[~np.isnan(d)] == 0))  # e.g. an exact drop-in against its original
    return {"mean": mean, "low": low, "high": high, "verdict": IDENTICAL if same else verdict(low, high, higher_is_better),
            "seeds": int(d.shape[0]), "photos": int(d.shape[1])}


def spread(values: Dict[Tuple[int, str], float]) -> dict:
    """One configuration's ``mean`` over its cells, ``sd_seeds`` (SD of the per-seed means over photos,
    ``n_seeds``; None with one seed) and ``sd_photos`` (SD of the per-photo means over seeds, ``n_photos``)."""
    cells = {k: v for k, v in values.items() if v is not None}
    seeds = sorted({s for s, _ in cells})
    photos = sorted({p for _, p in cells})
    per_seed = [np.mean([v for (s, _), v in cells.items() if s == k]) for k in seeds]
    per_photo = [np.mean([v for (_, p), v in cells.items() if p == k]) for k in photos]
    return {"mean": float(np.mean(list(cells.values()))) if cells else None,
            "sd_seeds": float(np.std(per_seed, ddof=1)) if len(seeds) > 1 else None, "n_seeds": len(seeds),
            "sd_photos": float(np.std(per_photo, ddof=1)) if len(photos) > 1 else None, "n_photos": len(photos)}
