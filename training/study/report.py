"""The study's report: coverage, table with spreads, paired verdicts with intervals, plots (``study --report``).

Reads every run record (:mod:`training.study.records`: ``RESULTS_DIR/records/``, committed as each run
finishes) and writes to RESULTS_DIR (never from fewer runs than the report already there covers):

- ``table.md``: what ran (seeds and folds per configuration, photos covered, measured wall time); every
  configuration at every run length: nominal and real (entropy-coded) bits/token, PSNR, LPIPS, L1 as
  mean with SD over seeds and over photos (with n), per-stage PSNR gain, perplexity and residual RMS;
  the pairwise comparisons (mean paired difference A − B with its 95 % crossed-bootstrap interval over
  seeds and photos, :mod:`training.study.stats`), their verdicts at equal nominal bits and what
  changes once the real rate is counted;
- ``summary.json``: the per-run, per-photo numbers behind the table;
- ``rate_distortion.png`` (PSNR and LPIPS against nominal and against real bits/token),
  ``residual_decay.png``, ``reconstructions.png`` (this one needs the run directories' checkpoints: on a
  machine without them the committed picture is kept).
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from training.study.grid import CONFIGS, MAIN, folds, run_dir
from training.study.records import (MAIN_GROUP, covered, load_records, record_groups,
                                    summary_runs)
from training.study.stats import IDENTICAL, NO_DIFFERENCE, compare, spread

HIGHER_IS_BETTER = {"psnr": True, "lpips": False, "l1": False, "real_bits_per_token": False}
#: (A, B) comparisons the study's questions are about, per run length.
PAIRS = (
    ("rfsq2-none", "fsq22"), ("rfsq2-scale", "fsq22"), ("rfsq2-ln", "fsq22"),
    ("rfsq4-none", "fsq40"), ("rfsq4-scale", "fsq40"), ("rfsq4-ln", "fsq40"),
    ("rfsq2-ln", "rfsq2-none"), ("rfsq2-ln", "rfsq2-scale"), ("rfsq2-scale", "rfsq2-none"),
    ("rfsq4-ln", "rfsq4-none"), ("rfsq4-ln", "rfsq4-scale"), ("rfsq4-scale", "rfsq4-none"),
    ("rfsq2-none", "lucid2"), ("rfsq2-ln", "lucid2"), ("rfsq4-none", "lucid4"), ("rfsq4-ln", "lucid4"),
    ("lucid2", "fsq22"), ("lucid4", "fsq40"), ("vqpy4", "lucid4"), ("vqpy4", "rfsq4-ln"),
    ("fsq", "lfq"), ("fsq", "vq-ema"), ("vq-ema", "lfq"), ("rfsq2-none", "fsq"), ("rfsq2-scale", "fsq"),
    ("rfsq2-ln", "fsq"), ("rfsq4-none", "rfsq2-ln"), ("rfsq4-ln", "rfsq2-ln"),
)
Data = Dict[int, Dict[str, List[dict]]]


def attach_run_dirs(data: Data, root: Optional[str]) -> Data:
    """Give each run of ``data`` its directory under ``root`` when that still exists on this machine (the
    reconstructions plot needs its checkpoint); the rest of the report needs only the records."""
    for steps, by_name in data.items():
        for name, runs in by_name.items():
            for r in runs:
                d = run_dir(root, name, r["seed"], steps, r["fold"]) if root else None
                r["run_dir"] = d if d and os.path.isfile(os.path.join(d, "results.json")) else None
    return data


def cells(runs: List[dict], key: str, photos: Optional[set] = None) -> Dict[Tuple[int, str], float]:
    """``{(seed, photo): value}`` of ``key`` over the runs' held-out photos (optionally only ``photos``)."""
    out = {}
    for r in runs:
        for name, m in r["photos"].items():
            if m.get(key) is not None and (photos is None or name in photos):
                out[r["seed"], name] = float(m[key])
    return out


def _fmt_spread(sp: dict, digits: int) -> str:
    if sp["mean"] is None:
        return "n/a"
    sd_s = "n/a" if sp["sd_seeds"] is None else f"{sp['sd_seeds']:.{digits}f}"
    sd_p = "n/a" if sp["sd_photos"] is None else f"{sp['sd_photos']:.{digits}f}"
    return f"{sp['mean']:.{digits}f} (SD {sd_s} seeds n={sp['n_seeds']}; {sd_p} photos n={sp['n_photos']})"


def _fmt_cmp(c: Optional[dict], digits: int) -> str:
    if c is None:
        return "n/a"
    v = "n.d." if c["verdict"] == NO_DIFFERENCE else c["verdict"]
    return f"{c['mean']:+.{digits}f} [{c['low']:+.{digits}f}, {c['high']:+.{digits}f}] {v}"


def rate_verdict(psnr: Optional[dict], bits: Optional[dict]) -> str:
    """A vs B once the real rate is counted: PSNR verdict combined with the real-bits verdict
    ('better' bits = fewer)."""
    if psnr is None or bits is None:
        return "n/a"
    p, b = psnr["verdict"], bits["verdict"]
    if p == "better":
        return "better, at more real bits (trade-off)" if b == "worse" else "better"
    if p == "worse":
        return "worse, at fewer real bits (trade-off)" if b == "better" else "worse"
    if p == b == IDENTICAL:
        return IDENTICAL
    if b == "better":
        return "better (same PSNR, fewer real bits)"
    if b == "worse":
        return "worse (same PSNR, more real bits)"
    return NO_DIFFERENCE


def comparisons(data: Data) -> List[dict]:
    """Every :data:`PAIRS` comparison at every run length, on the photos both configurations share."""
    out = []
    for steps, by_name in data.items():
        for a, b in PAIRS:
            if a not in by_name or b not in by_name:
                continue
            row = {"steps": steps, "a": a, "b": b}
            for key in ("psnr", "lpips", "l1", "real_bits_per_token"):
                row[key] = compare(cells(by_name[a], key), cells(by_name[b], key), HIGHER_IS_BETTER[key])
            if row["psnr"] is None:
                continue
            row["at_real_rate"] = rate_verdict(row["psnr"], row["real_bits_per_token"])
            row["changes"] = row["at_real_rate"] != row["psnr"]["verdict"]
            out.append(row)
    return out


def _progress_wall(data: Data) -> Optional[str]:
    """When the first and last record finished, and the runs' summed wall time (from the records)."""
    runs = [r for by in data.values() for rs in by.values() for r in rs]
    stamps = sorted(r["finished_utc"] for r in runs if r.get("finished_utc"))
    walls = [r["wall_time_s"] for r in runs if r.get("wall_time_s")]
    if not stamps:
        return None
    return (f"{len(runs)} runs; records finished from {stamps[0]} to {stamps[-1]} UTC; "
            f"{sum(walls) / 3600:.2f} h of run wall time in all ({len(walls)} runs timed)")


def coverage(data: Data) -> List[str]:
    """What actually ran: seeds and folds per configuration and run length."""
    lines = ["## What ran\n"]
    wall = _progress_wall(data)
    if wall:
        lines.append(f"Measured: {wall} (from the records in `training/results/records/`).\n")
    lines.append("| steps | config | runs | seeds | folds | held-out photos | train wall s (mean per run) |")
    lines.append("|---|---|---|---|---|---|---|")
    for steps, by_name in data.items():
        for name in CONFIGS:
            runs = by_name.get(name)
            if not runs:
                continue
            seeds = sorted({r["seed"] for r in runs})
            fds = sorted({r["fold"] for r in runs})
            photos = {p for r in runs for p in r["photos"]}
            walls = [r.get("wall_time_s") for r in runs if r.get("wall_time_s")]
            lines.append(f"| {steps} | {name} | {len(runs)} | {' '.join(map(str, seeds))} | {' '.join(map(str, fds))} | "
                         f"{len(photos)} | {np.mean(walls):.0f} |" if walls else
                         f"| {steps} | {name} | {len(runs)} | {' '.join(map(str, seeds))} | {' '.join(map(str, fds))} | "
                         f"{len(photos)} | n/a |")
    lines.append("")
    lines.append("Folds (held-out photos): " + "; ".join(f"{i}: {', '.join(f)}" for i, f in enumerate(folds())) + ".\n")
    return lines


def _per_stage(runs: List[dict], key: str, digits: int) -> str:
    arr = np.asarray([r["heldout"][key] for r in runs], dtype=float).mean(axis=0)
    return " / ".join(f"{v:.{digits}f}" for v in arr)


def _stage_gain(runs: List[dict]) -> str:
    arr = np.asarray([r["heldout"]["psnr_by_stages"] for r in runs], dtype=float).mean(axis=0)
    gains = [arr[0]] + list(np.diff(arr))
    return " / ".join(f"{g:+.2f}" if i else f"{g:.2f}" for i, g in enumerate(gains))


def _real_per_stage(runs: List[dict]) -> str:
    arr = np.asarray([m["ideal_bits_per_stage"] for r in runs for m in r["photos"].values()], dtype=float).mean(0)
    return " / ".join(f"{v:.2f}" for v in arr)


def markdown(data: Data, extra: Optional[Dict[str, Data]] = None) -> str:
    """The whole ``table.md``."""
    lines = ["# Rate–distortion study: results\n",
             "Cross-validation by image: every real photo held out once per seed (folds below); numbers are "
             "per held-out photo (mean over its overlapping 32x32 tiles), then over photos and seeds. PSNR in dB "
             "on [0, 1]; L1 in the ImageNet-normalized space; LPIPS-VGG. *Real bits*: the bytes of an actual "
             "range-coded bitstream per photo (factorized categorical model per stage and digit, fitted on the "
             "training photos' tokens; decoded back exactly) × 8 / tokens. Intervals: 95 % crossed bootstrap "
             "over seeds and photos of the mean paired difference A − B (`training/study/stats.py`); "
             "\"n.d.\" = no detectable difference at this size. Per-stage PSNR, perplexity and residual RMS are "
             "over all held-out tiles of a run (tile-weighted), averaged over runs. Generated by "
             "`python -m training.study --report`.\n"]
    lines += coverage(data)
    for title, groups in [("", data)] + sorted((extra or {}).items()):
        for steps, by_name in groups.items():
            lines.append(f"## {steps} steps{(' — ' + title) if title else ''}\n")
            lines.append("| config | method | nominal bits | real bits (ideal) | real bits per stage (ideal) | PSNR ↑ | "
                         "LPIPS ↓ | L1 ↓ | PSNR per stage (1st, +gain of each next) | perplexity per stage | "
                         "residual RMS after each stage (latent RMS) |")
            lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
            for name in CONFIGS:
                runs = by_name.get(name)
                if not runs:
                    continue
                lat = np.mean([r["heldout"]["latent_rms"] for r in runs])
                ideal = np.mean([m["ideal_bits_per_token"] for r in runs for m in r["photos"].values()])
                lp = spread(cells(runs, "lpips"))
                lines.append(
                    f"| {name} | {CONFIGS[name][1]} | {runs[0]['bits_per_token']:.0f} | "
                    f"{_fmt_spread(spread(cells(runs, 'real_bits_per_token')), 2)} ({ideal:.2f}) | {_real_per_stage(runs)} | "
                    f"{_fmt_spread(spread(cells(runs, 'psnr')), 2)} | {_fmt_spread(lp, 4) if lp['mean'] is not None else 'n/a'} | "
                    f"{_fmt_spread(spread(cells(runs, 'l1')), 4)} | {_stage_gain(runs)} | "
                    f"{_per_stage(runs, 'perplexity', 0)} | {_per_stage(runs, 'residual_rms', 4)} ({lat:.3f}) |")
            lines.append("")
    lines.append("## Pairwise comparisons (A − B: mean paired difference [95 % interval] verdict)\n")
    lines.append("Verdict at equal nominal bits = the PSNR column. *At real rate*: the PSNR verdict with the real-bits "
                 "one (fewer bits = better); *changes* marks the comparisons whose verdict is not the same once the "
                 "real rate is counted.\n")
    lines.append("| steps | A | B | cells (seeds × photos) | ΔPSNR dB | ΔLPIPS | ΔL1 | Δreal bits/token | at real rate | changes |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for c in comparisons(data):
        lines.append(f"| {c['steps']} | {c['a']} | {c['b']} | {c['psnr']['seeds']} × {c['psnr']['photos']} | "
                     f"{_fmt_cmp(c['psnr'], 2)} | {_fmt_cmp(c['lpips'], 4)} | {_fmt_cmp(c['l1'], 4)} | "
                     f"{_fmt_cmp(c['real_bits_per_token'], 2)} | {c['at_real_rate']} | {'**yes**' if c['changes'] else ''} |")
    lines.append("")
    lines += length_check(data)
    lines += loss_check(extra or {})
    return "\n".join(lines)


def length_check(data: Data) -> List[str]:
    """The main configurations at each run length, on the photos of the long runs' fold."""
    long_photos = {p for by in data.values() for n in MAIN for r in by.get(n, []) for p in r["photos"]
                   if r["steps"] == max(data)}
    if len(data) < 2 or not long_photos:
        return []
    lines = ["## Length check (main configurations, on the long runs' held-out photos only)\n",
             "| steps | A | B | cells | ΔPSNR dB | ΔLPIPS |", "|---|---|---|---|---|---|"]
    for steps, by_name in data.items():
        for i, a in enumerate(MAIN):
            for b in MAIN[i + 1:]:
                if a in by_name and b in by_name:
                    cp = compare(cells(by_name[a], "psnr", long_photos), cells(by_name[b], "psnr", long_photos), True)
                    cl = compare(cells(by_name[a], "lpips", long_photos), cells(by_name[b], "lpips", long_photos), False)
                    if cp:
                        lines.append(f"| {steps} | {a} | {b} | {cp['seeds']} × {cp['photos']} | {_fmt_cmp(cp, 2)} | "
                                     f"{_fmt_cmp(cl, 4)} |")
    lines.append("")
    return lines


def loss_check(extra: Dict[str, Data]) -> List[str]:
    """The loss check's verdicts: each pair of main configurations under the study's L1 loss and under
    the paper's L1 + LPIPS (same seeds, steps and held-out photos), and each configuration's change
    from one loss to the other. Empty until both groups have runs."""
    l1, paper = extra.get("loss check, l1"), extra.get("loss check, paper")
    if not l1 or not paper:
        return []
    lines = ["## Loss check (the study's L1 vs the paper's L1 + LPIPS; main configurations, fold 0)\n",
             "Does the training loss change the comparisons? *same verdicts*: the PSNR and the LPIPS verdicts "
             "agree under both losses.\n",
             "| steps | A | B | cells L1 / paper | ΔPSNR dB, L1 | ΔPSNR dB, paper | ΔLPIPS, L1 | ΔLPIPS, paper | "
             "same verdicts |", "|---|---|---|---|---|---|---|---|---|"]
    for steps in sorted(set(l1) & set(paper)):
        for i, a in enumerate(MAIN):
            for b in MAIN[i + 1:]:
                got = []
                for group in (l1, paper):
                    by = group[steps]
                    if a not in by or b not in by:
                        break
                    got.append({k: compare(cells(by[a], k), cells(by[b], k), HIGHER_IS_BETTER[k])
                                for k in ("psnr", "lpips")})
                if len(got) < 2 or not all(g["psnr"] for g in got):
                    continue
                same = all(got[0][k] and got[1][k] and got[0][k]["verdict"] == got[1][k]["verdict"]
                           for k in ("psnr", "lpips"))
                lines.append(f"| {steps} | {a} | {b} | {got[0]['psnr']['seeds']}×{got[0]['psnr']['photos']} / "
                             f"{got[1]['psnr']['seeds']}×{got[1]['psnr']['photos']} | {_fmt_cmp(got[0]['psnr'], 2)} | "
                             f"{_fmt_cmp(got[1]['psnr'], 2)} | {_fmt_cmp(got[0]['lpips'], 4)} | "
                             f"{_fmt_cmp(got[1]['lpips'], 4)} | {'yes' if same else '**no**'} |")
    lines += ["", "Paper's loss − L1 loss, per configuration (paired by seed and photo):\n",
              "| steps | config | cells | ΔPSNR dB | ΔLPIPS | ΔL1 |", "|---|---|---|---|---|---|"]
    for steps in sorted(set(l1) & set(paper)):
        for name in MAIN:
            if name in l1[steps] and name in paper[steps]:
                c = {k: compare(cells(paper[steps][name], k), cells(l1[steps][name], k), HIGHER_IS_BETTER[k])
                     for k in ("psnr", "lpips", "l1")}
                if c["psnr"]:
                    lines.append(f"| {steps} | {name} | {c['psnr']['seeds']} × {c['psnr']['photos']} | "
                                 f"{_fmt_cmp(c['psnr'], 2)} | {_fmt_cmp(c['lpips'], 4)} | {_fmt_cmp(c['l1'], 4)} |")
    lines.append("")
    return lines


_X_OFFSET = {"fsq22": -1.2, "rfsq2-none": -0.6, "rfsq2-ln": 0.6, "lucid2": 1.2,
             "fsq40": -1.2, "rfsq4-none": -0.6, "rfsq4-ln": 0.6, "lucid4": 1.2, "vqpy4": 1.8,
             "vq-ema": -0.6, "lfq": 0.6}
_FAMILY_COLOR = {"baseline": "tab:gray", "fsq": "tab:blue", "none": "tab:orange", "scale": "tab:green",
                 "layernorm": "tab:red", "lucidrains": "tab:purple"}
_MARKER = {"vq-ema": "s", "lfq": "D", "fsq": "o", "fsq22": "p", "fsq40": "h", "rfsq2-none": "^",
           "rfsq2-scale": "^", "rfsq2-ln": "^", "rfsq4-none": "v", "rfsq4-scale": "v", "rfsq4-ln": "v",
           "lucid2": "P", "lucid4": "X", "vqpy4": "*"}


def _seed_means(c: Dict[Tuple[int, str], float]) -> np.ndarray:
    seeds = sorted({s for s, _ in c})
    return np.asarray([np.mean([v for (s, _), v in c.items() if s == k]) for k in seeds])


def plot_rate_distortion(data: Data, path: str) -> None:
    """PSNR and LPIPS against nominal bits/token (top) and real entropy-coded bits/token (bottom); one
    marker per configuration (filled: shortest runs, all folds; hollow: longest runs, their fold);
    error bars: SD over seeds of the photo mean (none with one seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps_list = list(data)
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for row, xkey in enumerate(("nominal", "real")):
        for ax, key in zip(axes[row], ("psnr", "lpips")):
            for si, steps in enumerate(steps_list):
                hollow = si > 0 and si == len(steps_list) - 1
                for name, runs in data[steps].items():
                    y = _seed_means(cells(runs, key))
                    if not len(y):
                        continue
                    if xkey == "nominal":
                        x = runs[0]["bits_per_token"] + _X_OFFSET.get(name, 0.0) + (0.3 if hollow else 0.0)
                        xerr = None
                    else:
                        xs = _seed_means(cells(runs, "real_bits_per_token"))
                        x, xerr = xs.mean(), (xs.std(ddof=1) if len(xs) > 1 else None)
                    col = _FAMILY_COLOR[CONFIGS[name][2]]
                    ax.errorbar(x, y.mean(), yerr=y.std(ddof=1) if len(y) > 1 else None, xerr=xerr,
                                fmt=_MARKER[name], color=col, mfc="none" if hollow else col, ms=8, capsize=3,
                                label=CONFIGS[name][1] if si == 0 and row == 0 else None)
            ax.set_xlabel("nominal bits / token (methods of one rate drawn side by side)" if xkey == "nominal"
                          else "real bits / token (range-coded held-out tokens)")
            ax.set_ylabel({"psnr": "held-out PSNR (dB) ↑", "lpips": "held-out LPIPS-VGG ↓"}[key])
            ax.grid(alpha=0.3)
    title = f"filled: {steps_list[0]} steps" + (f"; hollow: {steps_list[-1]} steps" if len(steps_list) > 1 else "")
    fig.suptitle(f"Rate–distortion, cross-validated held-out photos (error bar: SD over seeds; none with one seed) — "
                 f"{title}", fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_residual_decay(data: Data, path: str) -> Optional[str]:
    """RMS of the residual entering each stage (stage 1: the latent) for the K=4 configurations,
    absolute and relative to the latent (error bar: SD over runs), at the shortest run length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["rfsq4-none", "rfsq4-scale", "rfsq4-ln", "lucid4", "vqpy4"]
    steps = next(iter(data), None)
    if steps is None or not any(n in data[steps] for n in names):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in names:
        runs = data[steps].get(name)
        if not runs:
            continue
        curves = np.asarray([[r["heldout"]["latent_rms"]] + r["heldout"]["residual_rms"] for r in runs])
        x = np.arange(1, curves.shape[1] + 1)
        for ax, c in zip(axes, (curves, curves / curves[:, :1])):
            ax.errorbar(x, c.mean(0), yerr=c.std(0, ddof=1) if len(c) > 1 else None, marker="o", capsize=3,
                        label=f"{CONFIGS[name][1]} (n={len(c)})")
    for ax, t in zip(axes, ("RMS of the residual", "relative to the latent's RMS")):
        ax.set_yscale("log"), ax.set_xlabel("k (1 = latent entering stage 1; 5 = left after stage 4)")
        ax.set_title(t), ax.grid(alpha=0.3, which="both"), ax.legend(fontsize=8)
    fig.suptitle(f"Residual decay, K=4, held-out photos, {steps} steps (error bar: SD over runs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_reconstructions(data: Data, path: str, names: Sequence[str] = ("fsq22", "rfsq2-none", "rfsq2-ln",
                                                                         "rfsq4-ln", "lucid4", "fsq40")) -> Optional[str]:
    """Centre and side tiles of fold 0's held-out photos above the reconstructions of the lowest seed
    on fold 0 of the main methods, at the run length with the most of their checkpoints here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from training.evaluate import heldout_photos, load_run, reconstruct

    def pick(steps):
        chosen = []
        for name in names:
            runs = sorted((r for r in data[steps].get(name, []) if r["fold"] == 0 and r["run_dir"]),
                          key=lambda r: r["seed"])
            if runs:
                chosen.append((name, runs[0]["run_dir"]))
        return chosen

    # the run length with the most of these configurations' checkpoints on this machine (a clone has
    # only what ran on it), the shortest of equals
    options = [(len(pick(st)), -i, st) for i, st in enumerate(data)]
    _, _, steps = max(options, default=(0, 0, None))
    chosen = pick(steps) if steps is not None else []
    if not chosen:  # no run directory on this machine: the committed picture stays
        return None
    _, cfg = load_run(chosen[0][1])
    size = cfg["image_size"]
    tiles = []
    for img in heldout_photos(cfg):
        h, w = img.shape[1:]
        y = (h - size) // 2
        for x in (0, (w - size) // 2, w - size):
            tiles.append(img[:, y:y + size, x:x + size])
    originals = torch.stack(tiles)
    rows = [("held-out original", originals)]
    for name, d in chosen:
        model, _ = load_run(d)
        rows.append((f"{CONFIGS[name][1]}\n{steps} steps", reconstruct(model, originals)))
    fig, axes = plt.subplots(len(rows), 1, figsize=(len(tiles) * 0.9 + 2, len(rows) * 1.0 + 0.3))
    for ax, (label, imgs) in zip(axes, rows):
        strip = torch.cat(list(imgs), dim=2).permute(1, 2, 0).numpy()
        ax.imshow(strip, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary(data: Data) -> dict:
    """Per-run, per-photo held-out numbers (small) for summary.json."""
    keep = ("psnr", "lpips", "l1", "real_bits_per_token", "ideal_bits_per_token")
    rnd = (lambda v: None if v is None else round(v, 5))
    return {str(steps): {name: [{"seed": r["seed"], "fold": r["fold"], "bits_per_token": r["bits_per_token"],
                                 "wall_time_s": r.get("wall_time_s"),
                                 "perplexity": r["heldout"]["perplexity"],
                                 "photos": {p: {k: rnd(m[k]) for k in keep} for p, m in r["photos"].items()}}
                                for r in sorted(runs, key=lambda r: (r["seed"], r["fold"]))]
                         for name, runs in by_name.items()}
            for steps, by_name in data.items()}


def write_report(records_dir: str, results_dir: str, run_root: Optional[str] = None) -> Tuple[List[str], str]:
    """Write the report files from every record under ``records_dir`` (group ``main`` for the table and
    plots, the loss-check groups as extra tables). Returns ``(paths written, message)``: nothing is
    written when there is no record, or when the report already in ``results_dir`` covers a run that
    no record holds (a report is never rebuilt from fewer runs than it had); the message says why."""
    data = attach_run_dirs(load_records(records_dir, MAIN_GROUP), run_root)
    extra = {f"loss check, {g[len('losscheck-'):]}": load_records(records_dir, g)
             for g in record_groups(records_dir) if g.startswith("losscheck-")}
    extra = {t: d for t, d in extra.items() if d}
    if not data:
        return [], (f"no study record under {records_dir!r}: nothing to report. Run the study first "
                    "(python -m training.study) or give --records-dir")
    old = summary_runs(os.path.join(results_dir, "summary.json"))
    missing = sorted(old - covered(data)) if old else []
    if missing:
        eg = ", ".join(f"{n} seed {s} fold {f} ({st} steps)" for st, n, s, f in missing[:4])
        return [], (f"the report in {results_dir!r} covers {len(missing)} run(s) that no record holds (e.g. {eg}); "
                    f"it is left as it is, not rebuilt from fewer runs. Run those runs (python -m training.study) "
                    "and the report is rebuilt with them")
    os.makedirs(results_dir, exist_ok=True)
    written = []
    p = os.path.join(results_dir, "table.md")
    with open(p, "w") as f:
        f.write(markdown(data, extra))
    written.append(p)
    p = os.path.join(results_dir, "summary.json")
    with open(p, "w") as f:
        json.dump({"main": summary(data), **{t: summary(d) for t, d in extra.items()}}, f, indent=0)
    written.append(p)
    p = os.path.join(results_dir, "rate_distortion.png")
    plot_rate_distortion(data, p)
    written.append(p)
    for fn, name in ((plot_residual_decay, "residual_decay.png"), (plot_reconstructions, "reconstructions.png")):
        out = fn(data, os.path.join(results_dir, name))
        if out:
            written.append(out)
    return written, ""
