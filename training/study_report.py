"""The study's report: table, pairwise verdicts and plots from whatever runs exist (``study --report``).

Reads ``ROOT/<steps>steps/<config>-seed<k>/{results.json, config.json, eval_heldout/eval.json}`` of the
runs that finished and writes to RESULTS_DIR:

- ``table.md``: every configuration at every run length, mean ± half the min–max range over seeds
  (with 2 seeds: the distance of each seed from the mean), bits/token, per-stage usage, perplexity,
  residual RMS and the PSNR bought by each stage; the length check (ranking of the main configurations
  at each length); the pairwise verdicts the README's conclusions rest on;
- ``summary.json``: the per-seed numbers behind the table;
- ``rate_distortion.png``, ``residual_decay.png``, ``reconstructions.png``.

A difference counts only when the seed ranges do not overlap (every seed of A beats every seed of B);
otherwise the verdict is "within seed spread".
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from training.study import CONFIGS, HELDOUT, MAIN

METRICS = ("psnr", "lpips", "l1")
HIGHER_IS_BETTER = {"psnr": True, "lpips": False, "l1": False}
#: (A, B) comparisons the study's questions are about, per run length.
PAIRS = (
    ("rfsq2-none", "fsq22"), ("rfsq2-scale", "fsq22"), ("rfsq2-ln", "fsq22"),
    ("rfsq4-none", "fsq40"), ("rfsq4-scale", "fsq40"), ("rfsq4-ln", "fsq40"),
    ("rfsq2-ln", "rfsq2-none"), ("rfsq2-ln", "rfsq2-scale"), ("rfsq2-scale", "rfsq2-none"),
    ("rfsq4-ln", "rfsq4-none"), ("rfsq4-ln", "rfsq4-scale"), ("rfsq4-scale", "rfsq4-none"),
    ("rfsq2-none", "lucid2"), ("rfsq2-ln", "lucid2"), ("rfsq4-none", "lucid4"), ("rfsq4-ln", "lucid4"),
    ("lucid2", "fsq22"), ("lucid4", "fsq40"),
    ("fsq", "lfq"), ("fsq", "vq-ema"), ("vq-ema", "lfq"), ("rfsq2-none", "fsq"), ("rfsq2-scale", "fsq"),
    ("rfsq2-ln", "fsq"), ("rfsq4-none", "rfsq2-ln"), ("rfsq4-ln", "rfsq2-ln"),
)


def collect(root: str) -> Dict[int, Dict[str, List[dict]]]:
    """``{steps: {config: [run, ...]}}`` of the finished runs under ``root``; a run is its results.json
    with ``heldout`` (eval_heldout/eval.json), ``config`` (config.json), ``seed`` and ``run_dir``."""
    out: Dict[int, Dict[str, List[dict]]] = defaultdict(lambda: defaultdict(list))
    if not os.path.isdir(root):
        return {}
    for group in sorted(os.listdir(root)):
        m = re.fullmatch(r"(\d+)steps", group)
        if not m:
            continue
        for name in sorted(os.listdir(os.path.join(root, group))):
            d = os.path.join(root, group, name)
            m2 = re.fullmatch(r"(.+)-seed(\d+)", name)
            paths = [os.path.join(d, f) for f in ("results.json", "config.json", os.path.join("eval_heldout", "eval.json"))]
            if not m2 or m2.group(1) not in CONFIGS or not all(os.path.isfile(p) for p in paths):
                continue
            with open(paths[0]) as f:
                run = json.load(f)
            with open(paths[1]) as f:
                run["config"] = json.load(f)
            with open(paths[2]) as f:
                run["heldout"] = json.load(f)
            if run["steps"] != int(m.group(1)):
                continue
            run["seed"], run["run_dir"] = int(m2.group(2)), d
            out[int(m.group(1))][m2.group(1)].append(run)
    return {s: dict(v) for s, v in sorted(out.items())}


def values(runs: List[dict], key: str) -> List[float]:
    """Held-out ``key`` of each seed (None where unavailable is dropped)."""
    return [r["heldout"][key] for r in runs if r["heldout"].get(key) is not None]


def mean_spread(vals: Sequence[float]) -> Tuple[float, float]:
    """(mean, half the min–max range)."""
    a = np.asarray(vals, dtype=float)
    return float(a.mean()), float((a.max() - a.min()) / 2)


def verdict(a: List[dict], b: List[dict], key: str) -> str:
    """'better' / 'worse' when every seed of A beats / loses to every seed of B on ``key``, else 'tie'
    ('1 seed' when either side has fewer than 2 seeds: no verdict)."""
    va, vb = values(a, key), values(b, key)
    if not va or not vb:
        return "n/a"
    if min(len(va), len(vb)) < 2:
        return "1 seed"
    sign = 1 if HIGHER_IS_BETTER[key] else -1
    if min(sign * x for x in va) > max(sign * y for y in vb):
        return "better"
    if max(sign * x for x in va) < min(sign * y for y in vb):
        return "worse"
    return "tie"


def _fmt(vals: Sequence[float], digits: int) -> str:
    if not vals:
        return "n/a"
    m, s = mean_spread(vals)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _per_stage(runs: List[dict], key: str, digits: int) -> str:
    arr = np.asarray([r["heldout"][key] for r in runs], dtype=float).mean(axis=0)
    return " / ".join(f"{v:.{digits}g}" if key == "codebook_usage" else f"{v:.{digits}f}" for v in arr)


def _stage_gain(runs: List[dict]) -> str:
    arr = np.asarray([r["heldout"]["psnr_by_stages"] for r in runs], dtype=float).mean(axis=0)
    gains = [arr[0]] + list(np.diff(arr))
    return " / ".join(f"{g:+.2f}" if i else f"{g:.2f}" for i, g in enumerate(gains))


def markdown(data: Dict[int, Dict[str, List[dict]]], extra: Optional[Dict[str, Dict[int, Dict[str, List[dict]]]]] = None) -> str:
    """The whole ``table.md``."""
    lines = [f"# Rate–distortion study: results\n",
             f"Held-out photos (never trained on): {', '.join(HELDOUT)}; metrics on their overlapping 32x32 "
             "tiles. Mean ± half the min–max range over seeds. PSNR in dB on [0, 1]; L1 in the "
             "ImageNet-normalized space; LPIPS-VGG. Generated by `python -m training.study --report`.\n"]
    for title, groups in [("", data)] + sorted((extra or {}).items()):
        for steps, by_name in groups.items():
            lines.append(f"## {steps} steps{(' — ' + title) if title else ''}\n")
            lines.append("| config | method | bits/token | seeds | PSNR ↑ | LPIPS ↓ | L1 ↓ | PSNR per stage (1st, +gain of each next) "
                         "| usage per stage | perplexity per stage | residual RMS after each stage (latent RMS) |")
            lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
            for name in CONFIGS:
                runs = by_name.get(name)
                if not runs:
                    continue
                lat = np.mean([r["heldout"]["latent_rms"] for r in runs])
                lines.append(
                    f"| {name} | {CONFIGS[name][1]} | {runs[0]['bits_per_token']:.0f} | {len(runs)} | "
                    f"{_fmt(values(runs, 'psnr'), 2)} | {_fmt(values(runs, 'lpips'), 4)} | {_fmt(values(runs, 'l1'), 4)} | "
                    f"{_stage_gain(runs)} | {_per_stage(runs, 'codebook_usage', 3)} | "
                    f"{_per_stage(runs, 'perplexity', 0)} | {_per_stage(runs, 'residual_rms', 4)} ({lat:.3f}) |")
            lines.append("")
    lines.append("## Length check: ranking of the main configurations (by mean; `=` joins seed-overlapping neighbours)\n")
    lines.append("| steps | by PSNR (best first) | by LPIPS (best first) |")
    lines.append("|---|---|---|")
    for steps, by_name in data.items():
        present = [n for n in MAIN if n in by_name]
        if len(present) < 2:
            continue
        lines.append(f"| {steps} | {_ranking(by_name, present, 'psnr')} | {_ranking(by_name, present, 'lpips')} |")
    lines.append("")
    lines.append("## Pairwise verdicts (A vs B: better/worse only when the seed ranges do not overlap)\n")
    lines.append("| steps | A | B | PSNR | LPIPS | L1 | ΔPSNR (A−B, dB) |")
    lines.append("|---|---|---|---|---|---|---|")
    for steps, by_name in data.items():
        for a, b in PAIRS:
            if a in by_name and b in by_name and values(by_name[a], "psnr") and values(by_name[b], "psnr"):
                d = np.mean(values(by_name[a], "psnr")) - np.mean(values(by_name[b], "psnr"))
                lines.append(f"| {steps} | {a} | {b} | {verdict(by_name[a], by_name[b], 'psnr')} | "
                             f"{verdict(by_name[a], by_name[b], 'lpips')} | {verdict(by_name[a], by_name[b], 'l1')} | {d:+.2f} |")
    lines.append("")
    return "\n".join(lines)


def _ranking(by_name: Dict[str, List[dict]], names: List[str], key: str) -> str:
    names = [n for n in names if values(by_name[n], key)]
    if not names:
        return "n/a"
    sign = 1 if HIGHER_IS_BETTER[key] else -1
    order = sorted(names, key=lambda n: -sign * np.mean(values(by_name[n], key)))
    out = order[0]
    for prev, cur in zip(order, order[1:]):
        out += (" > " if verdict(by_name[prev], by_name[cur], key) == "better" else " = ") + cur
    return out


_X_OFFSET = {"fsq22": -1.2, "rfsq2-none": -0.6, "rfsq2-ln": 0.6, "lucid2": 1.2,
             "fsq40": -1.2, "rfsq4-none": -0.6, "rfsq4-ln": 0.6, "lucid4": 1.2,
             "vq-ema": -0.6, "lfq": 0.6}


def plot_rate_distortion(data, path: str) -> None:
    """Bits/token vs PSNR and vs LPIPS: one marker per method (filled: shortest runs; hollow: longest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = {"baseline": "tab:gray", "fsq": "tab:blue", "none": "tab:orange", "scale": "tab:green",
            "layernorm": "tab:red", "lucidrains": "tab:purple"}
    markers = {"vq-ema": "s", "lfq": "D", "fsq": "o", "fsq22": "p", "fsq40": "h", "rfsq2-none": "^",
               "rfsq2-scale": "^", "rfsq2-ln": "^", "rfsq4-none": "v", "rfsq4-scale": "v", "rfsq4-ln": "v",
               "lucid2": "P", "lucid4": "X"}
    steps_list = list(data)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key in zip(axes, ("psnr", "lpips")):
        for si, steps in enumerate(steps_list):
            hollow = si > 0 and si == len(steps_list) - 1
            for name, runs in data[steps].items():
                vals = values(runs, key)
                if not vals:
                    continue
                m, s = mean_spread(vals)
                # spread the methods of one bit rate sideways so that their markers do not hide each other
                bits = runs[0]["bits_per_token"] + _X_OFFSET.get(name, 0.0) + (0.3 if hollow else 0.0)
                col = fams[CONFIGS[name][2]]
                ax.errorbar(bits, m, yerr=s, fmt=markers[name], color=col, mfc="none" if hollow else col, ms=8,
                            capsize=3, label=f"{CONFIGS[name][1]}" if si == 0 else None)
        ax.set_xlabel("bits / token (methods of one rate drawn side by side)")
        ax.set_ylabel({"psnr": "held-out PSNR (dB) ↑", "lpips": "held-out LPIPS-VGG ↓"}[key])
        ax.grid(alpha=0.3)
    title = f"filled: {steps_list[0]} steps" + (f"; hollow: {steps_list[-1]} steps (main configs)" if len(steps_list) > 1 else "")
    fig.suptitle(f"Rate–distortion on held-out photos (error bar: seed range) — {title}", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_residual_decay(data, path: str) -> Optional[str]:
    """RMS of the residual entering each stage (stage 1: the latent) for K=4 none/scale/layernorm
    (and lucidrains' ResidualFSQ), absolute and relative to the latent, at the run length that has most of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["rfsq4-none", "rfsq4-scale", "rfsq4-ln", "lucid4"]
    present = {s: sum(n in by for n in names) for s, by in data.items()}
    if not any(present.values()):
        return None
    steps = max(present, key=lambda s: (present[s], s))  # the length that has the most of them
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in names:
        runs = data[steps].get(name)
        if not runs:
            continue
        curves = np.asarray([[r["heldout"]["latent_rms"]] + r["heldout"]["residual_rms"] for r in runs])
        x = np.arange(1, curves.shape[1] + 1)
        for ax, c in zip(axes, (curves, curves / curves[:, :1])):
            ax.errorbar(x, c.mean(0), yerr=(c.max(0) - c.min(0)) / 2, marker="o", capsize=3, label=CONFIGS[name][1])
    for ax, t in zip(axes, ("RMS of the residual", "relative to the latent's RMS")):
        ax.set_yscale("log"), ax.set_xlabel("k (1 = latent entering stage 1; 5 = left after stage 4)")
        ax.set_title(t), ax.grid(alpha=0.3, which="both"), ax.legend(fontsize=8)
    fig.suptitle(f"Residual decay, K=4, held-out photos, {steps} steps (error bar: seed range)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reconstructions(data, path: str, names: Sequence[str] = ("fsq22", "rfsq2-none", "rfsq2-ln", "rfsq4-ln",
                                                                   "lucid4", "fsq40")) -> Optional[str]:
    """Centre and side tiles of each held-out photo, above the reconstructions of seed 0 (longest run
    available) of the main methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from training.evaluate import heldout_photos, load_run, reconstruct

    chosen = []
    for name in names:
        steps = max((s for s, by in data.items() if name in by), default=None)
        if steps is not None:
            run = sorted(data[steps][name], key=lambda r: r["seed"])[0]
            chosen.append((name, steps, run["run_dir"]))
    if not chosen:
        return None
    _, cfg = load_run(chosen[0][2])
    size = cfg["image_size"]
    tiles = []
    for img in heldout_photos(cfg):
        h, w = img.shape[1:]
        y = (h - size) // 2
        for x in (0, (w - size) // 2, w - size):
            tiles.append(img[:, y:y + size, x:x + size])
    originals = torch.stack(tiles)
    rows = [("held-out original", originals)]
    for name, steps, d in chosen:
        model, _ = load_run(d)
        rows.append((f"{CONFIGS[name][1]}\n{steps} steps", reconstruct(model, originals)))
    fig, axes = plt.subplots(len(rows), 1, figsize=(len(tiles) * 0.9 + 2, len(rows) * 1.0 + 0.3))
    for ax, (label, imgs) in zip(axes, rows):
        strip = torch.cat(list(imgs), dim=2).permute(1, 2, 0).numpy()
        ax.imshow(strip, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(data) -> dict:
    """Per-seed held-out numbers (small) for summary.json."""
    keep = ("psnr", "lpips", "l1", "psnr_by_stages", "codebook_usage", "perplexity", "residual_rms", "latent_rms")
    return {str(steps): {name: [{"seed": r["seed"], "bits_per_token": r["bits_per_token"],
                                 "wall_time_s": r.get("wall_time_s"), **{k: r["heldout"][k] for k in keep}}
                                for r in sorted(runs, key=lambda r: r["seed"])]
                         for name, runs in by_name.items()}
            for steps, by_name in data.items()}


def write_report(root: str, results_dir: str, extra_roots: Optional[Dict[str, str]] = None) -> List[str]:
    """Write the report files for the runs under ``root`` (and titled ``extra_roots``, table only);
    returns the paths written (none when no run finished)."""
    data = collect(root)
    extra = {title: collect(r) for title, r in (extra_roots or {}).items()}
    extra = {t: d for t, d in extra.items() if d}
    if not data:
        return []
    os.makedirs(results_dir, exist_ok=True)
    written = []
    p = os.path.join(results_dir, "table.md")
    with open(p, "w") as f:
        f.write(markdown(data, extra))
    written.append(p)
    p = os.path.join(results_dir, "summary.json")
    with open(p, "w") as f:
        json.dump({"main": summary(data), **{t: summary(d) for t, d in extra.items()}}, f, indent=1)
    written.append(p)
    p = os.path.join(results_dir, "rate_distortion.png")
    plot_rate_distortion(data, p)
    written.append(p)
    for fn, name in ((plot_residual_decay, "residual_decay.png"), (plot_reconstructions, "reconstructions.png")):
        out = fn(data, os.path.join(results_dir, name))
        if out:
            written.append(out)
    return written
