"""Per-photo evaluation of one study run: distortion and the real (entropy-coded) rate of each held-out photo.

:func:`evaluate_photos` loads a finished run, tiles each held-out photo as :mod:`training.evaluate`
does (overlapping ``S`` x ``S`` tiles, stride ``S/2``), and writes ``RUN/eval_heldout/photos.json``:
for every held-out photo its PSNR, LPIPS and L1 (means over its tiles) and the bits/token that a
range coder needs for its tokens (one bitstream per photo, see :mod:`training.entropy_rate`) with the
model fitted on the tokens of the run's *training* photos (tiled the same way).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from training.data import TiledCrops, load_photos
from training.entropy_rate import code_tokens, digit_sizes, fit_factorized, token_digits
from training.evaluate import load_run
from training.lpips_loss import load_lpips
from training.metrics import compute_metrics

PHOTOS_JSON = "photos.json"


def named_split(cfg: dict) -> Tuple[List[Tuple[str, torch.Tensor]], List[Tuple[str, torch.Tensor]]]:
    """``(train, held-out)`` lists of ``(scene name, photo)`` of a run (the stereo views share the name
    ``stereo_motorcycle``)."""
    photos, names = load_photos(max(2 * cfg["image_size"], 64), cfg.get("extra_photos") or ())
    held = set(cfg.get("holdout_photos") or ())
    pairs = [(n.split(":")[0], p) for n, p in zip(names, photos)]
    return [x for x in pairs if x[0] not in held], [x for x in pairs if x[0] in held]


def _loader(photos: List[torch.Tensor], size: int) -> DataLoader:
    return DataLoader(TiledCrops(photos, size, stride=max(1, size // 2)), batch_size=64)


@torch.no_grad()
def evaluate_photos(run_dir: str, lpips_weights: Optional[str] = None) -> Dict:
    """Per-photo metrics and real rate of ``run_dir``'s held-out photos; writes and returns
    ``eval_heldout/photos.json`` (``{"photos": {name: {...}}, "rate_model": ...}``)."""
    model, cfg = load_run(run_dir)
    size = cfg["image_size"]
    train, held = named_split(cfg)
    lpips_model = None
    if not cfg.get("no_lpips") or lpips_weights:
        lpips_model, _ = load_lpips(lpips_weights or cfg.get("lpips_weights"))
    sizes = digit_sizes(model.quantizer)
    train_digits = token_digits(model, _loader([p for _, p in train], size))
    probs = fit_factorized(train_digits, sizes)
    K, D = model.quantizer.stages, len(sizes)
    out: Dict[str, dict] = {}
    for name in dict.fromkeys(n for n, _ in held):
        imgs = [p for n, p in held if n == name]
        loader = _loader(imgs, size)
        m, _ = compute_metrics(model, loader, lpips_model, torch.device("cpu"))
        digits = token_digits(model, loader)
        rate = code_tokens(digits, probs)
        per_stage = [sum(rate["ideal_bits_per_column"][k * D:(k + 1) * D]) for k in range(K)]
        out[name] = {"tiles": m["images"], "psnr": m["psnr"], "lpips": m["lpips"], "l1": m["l1"],
                     "nominal_bits_per_token": m["bits_per_token"], "real_bits_per_token": rate["bits_per_token"],
                     "ideal_bits_per_token": rate["ideal_bits_per_token"], "ideal_bits_per_stage": per_stage,
                     "bytes": rate["bytes"], "tokens": rate["tokens"], "uniform_columns": rate["uniform_columns"]}
    result = {"run_dir": run_dir, "photos": out,
              "rate_model": {"kind": "factorized categorical per (stage, digit), fitted on the training photos' "
                                     "tokens (+0.5 per symbol), or uniform where that is cheaper (a header bit per column), "
                                     "range-coded with constriction, one stream per photo",
                             "digit_sizes": sizes, "stages": K,
                             "train_tokens": int(len(train_digits))}}
    path = os.path.join(run_dir, "eval_heldout", PHOTOS_JSON)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return result
