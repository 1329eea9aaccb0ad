"""Re-evaluate a finished training run on any folder of images (or on the run's held-out photos).

    python -m training.evaluate RUN_DIR --val-dir DIR      # every image under DIR (any layout)
    python -m training.evaluate RUN_DIR                    # the embedded photos the run held out

Each image is resized so that its shorter side is twice the run's image size (as the embedded photos
are for training) and cut into overlapping ``S`` x ``S`` tiles (stride ``S/2``, whole image covered).
Metrics are those of training (:func:`training.metrics.evaluate`: L1, PSNR, LPIPS-VGG, bits/token,
per-stage codebook usage, perplexity and residual RMS) plus ``psnr_by_stages``: the PSNR of the
reconstruction decoded from the first k stages only, k = 1..K (what each added stage buys).
Writes OUT/eval.json and OUT/reconstructions.png (the centre tile of up to 8 images, originals
above reconstructions); OUT defaults to RUN_DIR/eval_<folder name>.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from training import checkpoint as ckpt
from training.data import (DataError, TiledCrops, denormalize, load_photos, normalize,
                           read_rgb, split_embedded, unreadable_reason, walk_files)
from training.lpips_loss import load_lpips
from training.lpips_weights import LPIPSWeightsError
from training.metrics import compute_metrics
from training.model import AutoEncoder, build_quantizer, quantizer_kwargs
from training.plots import save_grid

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


def load_run(run_dir: str, which: str = "last") -> Tuple[AutoEncoder, dict]:
    """The trained autoencoder of ``run_dir`` (``ckpt_last.pt`` or ``ckpt_best.pt``) in eval mode, and
    the run's ``config.json``."""
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: {run_dir!r} is not a training run directory")
    with open(cfg_path) as f:
        cfg = json.load(f)
    path = os.path.join(run_dir, ckpt.LAST if which == "last" else ckpt.BEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (the run has no checkpoint yet)")
    quantizer = build_quantizer(cfg["quantizer"], **quantizer_kwargs(cfg, backend="reference"))
    model = AutoEncoder(quantizer, width=cfg["model_width"])
    model.load_state_dict(ckpt.load(path)["model"])
    return model.eval(), cfg


def load_folder_photos(root: str, short_side: int) -> List[torch.Tensor]:
    """Every readable image under ``root`` (recursively, sorted by path) as a ``(3, H, W)`` tensor in
    [0, 1] whose shorter side is ``short_side``. Raises :class:`DataError` when there is none."""
    import torch.nn.functional as F
    from torchvision.transforms.functional import to_tensor

    if not os.path.isdir(root):
        raise DataError(f"--val-dir {root!r} is not a directory")
    paths = sorted(p for p in walk_files(root) if p.lower().endswith(IMAGE_EXTENSIONS))  # links: each real file once
    photos, skipped = [], 0
    for p in paths:
        try:  # the loader and skip policy of training (training.data.read_rgb)
            t = to_tensor(read_rgb(p))
        except Exception as e:
            skipped += 1
            print(f"warning: {p} is unreadable, skipped ({unreadable_reason(e)})", file=sys.stderr)
            continue
        h, w = t.shape[1:]
        s = short_side / min(h, w)
        size = (max(short_side, round(h * s)), max(short_side, round(w * s)))
        photos.append(F.interpolate(t[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1))
    if skipped:
        print(f"warning: skipped {skipped} of {len(paths)} image file(s) under {root}", file=sys.stderr)
    if not photos:
        raise DataError(f"--val-dir {root!r} holds no readable image ({', '.join(IMAGE_EXTENSIONS)})")
    return photos


def heldout_photos(cfg: dict) -> List[torch.Tensor]:
    """The embedded photos a run held out (``--holdout-photos``), at its training resolution."""
    if not cfg.get("holdout_photos"):
        raise DataError("the run held out no embedded photos (trained without --holdout-photos); give --val-dir")
    photos, names = load_photos(max(2 * cfg["image_size"], 64), cfg.get("extra_photos") or ())
    return split_embedded(photos, cfg["holdout_photos"], names)[1]


@torch.no_grad()
def psnr_by_stages(model: AutoEncoder, loader) -> List[float]:
    """Mean PSNR (dB, [0, 1]-clamped images) of the reconstruction decoded from the first k stages,
    for k = 1..K (the last equals the full reconstruction's PSNR)."""
    K = model.quantizer.stages
    sums, n = torch.zeros(K, dtype=torch.float64), 0
    for x in loader:
        z = model.encoder(x)
        x01 = denormalize(x).clamp(0, 1)
        partial = torch.zeros_like(z)
        for k, q in enumerate(model.quantizer.stage_reconstructions(z)):
            partial = partial + q
            r01 = denormalize(model.decoder(partial)).clamp(0, 1)
            mse = (r01 - x01).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
            sums[k] += (10 * torch.log10(1.0 / mse)).sum().double()
        n += x.shape[0]
    return (sums / max(n, 1)).tolist()


def centre_tiles(photos: List[torch.Tensor], size: int, limit: int = 8) -> torch.Tensor:
    """The centre ``size`` x ``size`` crop of each of the first ``limit`` photos, ``(N, 3, S, S)`` in [0, 1]."""
    out = []
    for img in photos[:limit]:
        h, w = img.shape[1:]
        y, x = (h - size) // 2, (w - size) // 2
        out.append(img[:, y:y + size, x:x + size])
    return torch.stack(out)


@torch.no_grad()
def reconstruct(model: AutoEncoder, images01: torch.Tensor) -> torch.Tensor:
    """Reconstructions in [0, 1] of ``(N, 3, S, S)`` images in [0, 1]."""
    recon = model(torch.stack([normalize(x) for x in images01]))[0]
    return denormalize(recon).clamp(0, 1)


def evaluate_run(run_dir: str, photos: Optional[List[torch.Tensor]] = None, out_dir: Optional[str] = None,
                 lpips_weights: Optional[str] = None, which: str = "last", batch_size: int = 64) -> Dict:
    """Evaluate ``run_dir``'s model on ``photos`` (default: the embedded photos it held out).

    Returns the metrics (see the module docstring) and writes ``eval.json`` and ``reconstructions.png``
    to ``out_dir`` (default ``RUN_DIR/eval_heldout``).
    """
    model, cfg = load_run(run_dir, which)
    size = cfg["image_size"]
    if photos is None:
        photos = heldout_photos(cfg)
    tiles = TiledCrops(photos, size, stride=max(1, size // 2))
    loader = DataLoader(tiles, batch_size=batch_size)
    lpips_model = None
    if not cfg.get("no_lpips") or lpips_weights:
        lpips_model, _ = load_lpips(lpips_weights or cfg.get("lpips_weights"))
    metrics, _ = compute_metrics(model, loader, lpips_model, torch.device("cpu"))
    metrics["psnr_by_stages"] = psnr_by_stages(model, loader)
    metrics["photos"] = len(photos)
    out_dir = out_dir or os.path.join(run_dir, "eval_heldout")
    os.makedirs(out_dir, exist_ok=True)
    originals = centre_tiles(photos, size)
    save_grid(originals, reconstruct(model, originals), os.path.join(out_dir, "reconstructions.png"))
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump({"run_dir": run_dir, "checkpoint": which, **metrics}, f, indent=1)
    return metrics


def main(argv: Optional[List[str]] = None) -> int:
    """Command line; returns the exit code (0 ok, 1 error)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (config.json + ckpt_last.pt)")
    p.add_argument("--val-dir", help="folder of images (searched recursively); default: the run's held-out photos")
    p.add_argument("--out", help="output folder (default RUN_DIR/eval_<val-dir name> or RUN_DIR/eval_heldout)")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last", help="which checkpoint (default last)")
    p.add_argument("--lpips-weights", metavar="PATH", help="VGG16 weights for LPIPS (default: as in training)")
    args = p.parse_args(argv)
    try:
        photos = None
        out = args.out
        if args.val_dir:
            with open(os.path.join(args.run_dir, "config.json")) as f:
                size = json.load(f)["image_size"]
            photos = load_folder_photos(args.val_dir, max(2 * size, 64))
            out = out or os.path.join(args.run_dir, "eval_" + os.path.basename(os.path.normpath(args.val_dir)))
        m = evaluate_run(args.run_dir, photos, out, args.lpips_weights, args.checkpoint)
    except (DataError, LPIPSWeightsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    lp = "n/a" if m["lpips"] is None else f"{m['lpips']:.4f}"
    print(f"{m['photos']} image(s), {m['images']} tiles: L1 {m['l1']:.4f}  LPIPS {lp}  PSNR {m['psnr']:.2f} dB  "
          f"{m['bits_per_token']:.1f} bits/token  PSNR by stages {[round(v, 2) for v in m['psnr_by_stages']]}  "
          f"usage {m['codebook_usage']}  perplexity {m['perplexity']}  residual RMS "
          f"{[round(r, 4) for r in m['residual_rms']]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
