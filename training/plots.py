"""PNG outputs: reconstruction grid and loss/metric curves (matplotlib, Agg backend)."""
from __future__ import annotations

import os
from typing import List

import numpy as np
import torch

from training.jsonio import read_jsonl


def save_grid(originals: torch.Tensor, recons: torch.Tensor, path: str) -> None:
    """Originals (top row) above reconstructions (bottom row); both ``(N, 3, H, W)`` in [0, 1]."""
    from PIL import Image

    top = torch.cat(list(originals), dim=2)
    bottom = torch.cat(list(recons), dim=2)
    grid = torch.cat([top, torch.ones(3, 2, top.shape[2]), bottom], dim=1).clamp(0, 1)
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    tmp = path + ".tmp.png"
    Image.fromarray(arr).save(tmp)
    os.replace(tmp, path)


def _save_figure(fig, path: str) -> None:
    """Write a PNG atomically (temp file + rename: a killed run never leaves half a PNG)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def plot_curves(output_dir: str) -> List[str]:
    """``loss.png`` (train loss terms vs step) and ``val_metrics.png`` (val L1 / LPIPS / PSNR vs step)
    from ``metrics.jsonl``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(os.path.join(output_dir, "metrics.jsonl"))
    train = [r for r in rows if r.get("split") == "train"]
    val = [r for r in rows if r.get("split") == "val"]
    written = []
    if train:
        fig, ax = plt.subplots(figsize=(6, 4))
        steps = [r["step"] for r in train]
        for key in ("loss", "l1", "lpips", "aux"):
            ys = [r.get(key) for r in train]
            if any(y is not None and y != 0 for y in ys):
                ax.plot(steps, [np.nan if y is None else y for y in ys], label=key)
        ax.set_xlabel("step"), ax.set_ylabel("train loss"), ax.set_yscale("log"), ax.legend(), ax.grid(alpha=0.3)
        path = os.path.join(output_dir, "loss.png")
        _save_figure(fig, path)
        written.append(path)
    if val:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
        steps = [r["step"] for r in val]
        for ax, key in zip(axes, ("l1", "lpips", "psnr")):
            ys = [r.get(key) for r in val]
            if all(y is None for y in ys):
                ax.set_title(f"val {key}: unavailable")
            else:
                ax.plot(steps, [np.nan if y is None else y for y in ys], marker="o")
                ax.set_title(f"val {key}")
            ax.set_xlabel("step"), ax.grid(alpha=0.3)
        path = os.path.join(output_dir, "val_metrics.png")
        _save_figure(fig, path)
        written.append(path)
    return written
