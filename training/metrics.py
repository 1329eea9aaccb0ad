"""Validation metrics: L1, LPIPS, PSNR, per-stage codebook usage/perplexity and residual RMS."""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from training.data import denormalize


#: codebooks up to this size get a dense (stages, codes) histogram; larger ones (e.g. FSQ [256]*5,
#: 2**40 codes) are counted sparsely from the codes that actually occur.
DENSE_HISTOGRAM_MAX = 2**24


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader,
    lpips_model: Optional[torch.nn.Module],
    device: torch.device,
    autocast=nullcontext,
    channels_last: bool = False,
) -> Tuple[Dict, Optional[Tuple[torch.Tensor, torch.Tensor]]]:
    """Evaluate ``model`` (an :class:`training.model.AutoEncoder`, unwrapped) on ``loader``.

    Sums are all-reduced across ranks, so with a sharded loader every rank gets the full-set result.
    Returns ``(metrics, (originals, reconstructions))`` with this rank's first 8 images in [0, 1]
    for the reconstruction grid. Metrics:

    - ``l1``: mean |recon - x| in the normalized space (the training loss term; recon not clamped);
    - ``lpips``: mean LPIPS-VGG of the [0, 1]-clamped reconstruction vs the original, or ``None``
      when LPIPS is unavailable (``--no-lpips``);
    - ``psnr``: mean over images of ``10 log10(1 / MSE)`` on [0, 1]-clamped images;
    - ``codebook_usage``/``perplexity``: per stage, the fraction of codes used at least once and
      ``exp(entropy)`` of the code histogram over all val tokens;
    - ``residual_rms``: per stage, RMS of ``z - sum_{j<=k} q_j``, and ``latent_rms`` (RMS of z);
    - ``bits_per_token``, ``images``.
    """
    was_training = model.training
    model.eval()
    quant = model.quantizer
    K, V = quant.stages, quant.codebook_size
    sums = torch.zeros(5 + K, dtype=torch.float64, device=device)  # n, l1, lpips, psnr, z_sq, resid_sq[K]
    dense = V <= DENSE_HISTOGRAM_MAX  # a (K, V) histogram; sparse (per-stage dicts) for huge codebooks
    counts = torch.zeros(K, V if dense else 1, dtype=torch.float64, device=device)
    sparse: List[Dict[int, int]] = [{} for _ in range(K)]
    elems = torch.zeros(1, dtype=torch.float64, device=device)  # number of latent elements
    originals, recons = [], []
    for batch in loader:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if x.numel() == 0:
            continue
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            recon, z, idx, _ = model(x)
        recon, z = recon.float(), z.float()
        b = x.shape[0]
        sums[0] += b
        sums[1] += (recon - x).abs().mean(dim=(1, 2, 3)).sum().double()
        x01, r01 = denormalize(x).clamp(0, 1), denormalize(recon).clamp(0, 1)
        mse = (r01 - x01).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        sums[3] += (10 * torch.log10(1.0 / mse)).sum().double()
        if lpips_model is not None:
            sums[2] += lpips_model(r01, x01, normalize=True).float().sum().double()
        sums[4] += z.pow(2).sum().double()
        elems += z.numel()
        resid = z.clone()
        for k, q in enumerate(quant.stage_reconstructions(z)):
            resid = resid - q
            sums[5 + k] += resid.pow(2).sum().double()
        flat = idx.reshape(-1, K).long()
        for k in range(K):
            if dense:
                counts[k] += torch.bincount(flat[:, k], minlength=V)[:V].double()
            else:
                for code, c in zip(*(t.tolist() for t in torch.unique(flat[:, k], return_counts=True))):
                    sparse[k][code] = sparse[k].get(code, 0) + c
        if sum(len(o) for o in originals) < 8:  # the first 8 images, for the reconstruction grid
            originals.append(x01.cpu())
            recons.append(r01.cpu())
    _all_reduce(sums), _all_reduce(counts), _all_reduce(elems)
    model.train(was_training)
    n = max(sums[0].item(), 1.0)
    if dense:
        probs = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
        entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=1)
        used = [(counts[k] > 0).double().mean().item() for k in range(K)]
    else:  # this rank's tokens only under DDP
        entropy, used = torch.zeros(K, dtype=torch.float64), []
        for k in range(K):
            c = torch.tensor(list(sparse[k].values()) or [0], dtype=torch.float64)
            p = c / c.sum().clamp_min(1)
            entropy[k] = -(p * torch.log(p.clamp_min(1e-30))).sum()
            used.append(len(sparse[k]) / V)
    e = max(elems.item(), 1.0)
    metrics = {
        "images": int(sums[0].item()),
        "l1": sums[1].item() / n,
        "lpips": (sums[2].item() / n) if lpips_model is not None else None,
        "psnr": sums[3].item() / n,
        "bits_per_token": quant.bits_per_token,
        "codebook_usage": [round(u, 6) if u >= 1e-6 else u for u in used],
        "perplexity": [round(math.exp(entropy[k].item()), 3) for k in range(K)],
        "latent_rms": math.sqrt(sums[4].item() / e),
        "residual_rms": [math.sqrt(sums[5 + k].item() / e) for k in range(K)],
    }
    sample = (torch.cat(originals)[:8], torch.cat(recons)[:8]) if originals else None
    return metrics, sample
