"""Validation metrics: L1, LPIPS, PSNR, per-stage codebook usage/perplexity and residual RMS."""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from training.data import denormalize



def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


class CodeCounter:
    """Per-stage histogram of the codes seen, stored sparsely (distinct codes and their counts).

    Memory grows with the number of distinct codes seen, never with the codebook size (LFQ with 40
    bits has 2**40 codes; a dense histogram would need 8.8 TB). Per-batch histograms are merged in
    amortised ``O(n log n)``; :meth:`all_gather` combines the ranks of a DDP run.
    """

    def __init__(self, stages: int):
        self.stages = stages
        self._chunks: List[List[Tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(stages)]
        self._merged_size = [0] * stages

    @staticmethod
    def _merge(chunks: List[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
        values = torch.cat([v for v, _ in chunks])
        counts = torch.cat([c for _, c in chunks])
        unique, inverse = torch.unique(values, return_inverse=True)
        return unique, torch.zeros_like(unique).scatter_add_(0, inverse, counts)

    def add(self, indices: torch.Tensor) -> None:
        """Count ``indices`` of shape ``(N, stages)``."""
        for k in range(self.stages):
            chunks = self._chunks[k]
            chunks.append(torch.unique(indices[:, k].long(), return_counts=True))
            if sum(len(v) for v, _ in chunks) > 2 * self._merged_size[k] + 2**20:
                self._chunks[k] = [self._merge(chunks)]
                self._merged_size[k] = len(self._chunks[k][0][0])

    def histogram(self, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(codes, counts)`` of stage ``k``, codes sorted."""
        chunks = self._chunks[k]
        if not chunks:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        self._chunks[k] = [self._merge(chunks)]
        self._merged_size[k] = len(self._chunks[k][0][0])
        return self._chunks[k][0]

    def all_gather(self) -> None:
        """Combine the histograms of all ranks (no-op without an initialised process group)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        mine = [tuple(t.cpu() for t in self.histogram(k)) for k in range(self.stages)]
        everyone: List = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        self._chunks = [[rank[k] for rank in everyone] for k in range(self.stages)]
        self._merged_size = [0] * self.stages

    def usage(self, k: int, codebook_size: int) -> float:
        """Fraction of the ``codebook_size`` codes of stage ``k`` seen at least once."""
        return len(self.histogram(k)[0]) / codebook_size

    def perplexity(self, k: int) -> float:
        """``exp(entropy)`` of stage ``k``'s code distribution (1.0 when nothing was counted)."""
        counts = self.histogram(k)[1].double()
        if counts.numel() == 0:
            return 1.0
        p = counts / counts.sum()
        return math.exp(-(p * p.log()).sum().item())


def _round_sig(x: float, digits: int) -> float:
    """``x`` to ``digits`` significant digits (a usage of 3e-11 must not round to 0)."""
    return float(f"{x:.{digits}g}")


@torch.no_grad()
def compute_metrics(
    model: torch.nn.Module,
    loader,
    lpips_model: Optional[torch.nn.Module],
    device: torch.device,
    autocast=nullcontext,
    channels_last: bool = False,
    unreadable: Optional[Dict[str, str]] = None,
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

    Batches may be ``(images, unreadable_samples)`` pairs (see :func:`training.data.collate_skip`);
    the unreadable files are added to ``unreadable`` (path -> reason) when it is given.
    """
    was_training = model.training
    model.eval()
    quant = model.quantizer
    K, V = quant.stages, quant.codebook_size
    sums = torch.zeros(5 + K, dtype=torch.float64, device=device)  # n, l1, lpips, psnr, z_sq, resid_sq[K]
    codes = CodeCounter(K)
    elems = torch.zeros(1, dtype=torch.float64, device=device)  # number of latent elements
    originals, recons = [], []
    for batch in loader:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if unreadable is not None and isinstance(batch, (tuple, list)) and len(batch) > 1:
            unreadable.update({b.path: b.reason for b in batch[1]})
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
        codes.add(idx.reshape(-1, K))
        if sum(len(o) for o in originals) < 8:  # the first 8 images, for the reconstruction grid
            originals.append(x01.cpu())
            recons.append(r01.cpu())
    _all_reduce(sums), _all_reduce(elems)
    codes.all_gather()
    model.train(was_training)
    n = max(sums[0].item(), 1.0)
    e = max(elems.item(), 1.0)
    metrics = {
        "images": int(sums[0].item()),
        "l1": sums[1].item() / n,
        "lpips": (sums[2].item() / n) if lpips_model is not None else None,
        "psnr": sums[3].item() / n,
        "bits_per_token": quant.bits_per_token,
        "codebook_usage": [_round_sig(codes.usage(k, V), 6) for k in range(K)],
        "perplexity": [round(codes.perplexity(k), 3) for k in range(K)],
        "latent_rms": math.sqrt(sums[4].item() / e),
        "residual_rms": [math.sqrt(sums[5 + k].item() / e) for k in range(K)],
    }
    sample = (torch.cat(originals)[:8], torch.cat(recons)[:8]) if originals else None
    return metrics, sample
