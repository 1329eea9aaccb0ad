"""VQ-VAE vector quantization with an EMA codebook (paper: n_embed=4096, dim=6)."""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .validation import POSITION_RANKS, check_indices, check_latent


def _all_reduce_sum(t: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


class VQEMA(nn.Module):
    """Nearest-neighbour VQ whose codebook follows an exponential moving average of its assignments.

    ``forward(z) -> (quantized, indices, aux_loss)``; ``aux_loss = commitment_weight * MSE(z, e)``.
    In training mode the EMA statistics (code counts and code sums) are updated with ``decay``;
    when ``torch.distributed`` is initialised they are **all-reduced across ranks** first (the only
    collective any quantizer of this package issues), so every rank keeps an identical codebook.
    Codebook init: uniform(-1/n_embed, 1/n_embed).
    """

    def __init__(
        self,
        n_embed: int = 4096,
        dim: int = 6,
        decay: float = 0.99,
        eps: float = 1e-5,
        commitment_weight: float = 1.0,
        chunk_size: int = 16384,
    ):
        super().__init__()
        self.n_embed, self.dim = n_embed, dim
        self.decay, self.eps = float(decay), float(eps)
        self.commitment_weight = float(commitment_weight)
        self.chunk_size = chunk_size
        embed = torch.empty(n_embed, dim).uniform_(-1.0 / n_embed, 1.0 / n_embed)
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.zeros(n_embed))
        self.register_buffer("embed_avg", embed.clone())

    @property
    def codebook_size(self) -> int:
        return self.n_embed

    @property
    def bits_per_token(self) -> float:
        return math.log2(self.n_embed)

    @torch.no_grad()
    def _nearest(self, flat: torch.Tensor) -> torch.Tensor:
        # Chunked so that the (N, n_embed) distance matrix never exceeds chunk_size rows.
        e = self.embed
        e_sq = (e * e).sum(1)
        out = []
        for chunk in flat.split(self.chunk_size):
            d = (chunk * chunk).sum(1, keepdim=True) - 2 * chunk @ e.t() + e_sq
            out.append(d.argmin(1))
        return torch.cat(out) if out else flat.new_zeros((0,), dtype=torch.int64)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        counts = torch.bincount(idx, minlength=self.n_embed).float()
        sums = torch.zeros_like(self.embed_avg).index_add_(0, idx, flat)
        _all_reduce_sum(counts)
        _all_reduce_sum(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.n_embed * self.eps) * n
        self.embed.copy_(self.embed_avg / smoothed.unsqueeze(1))

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_latent(z, self.dim)
        x = z.float().movedim(1, -1)
        flat = x.reshape(-1, self.dim)
        idx = self._nearest(flat)
        if self.training:
            self._ema_update(flat.detach(), idx)
        q = F.embedding(idx, self.embed).view_as(x)
        aux = self.commitment_weight * F.mse_loss(x, q.detach())
        out = (x + (q - x).detach()).movedim(-1, 1)
        return out.to(z.dtype), idx.view(x.shape[:-1]).to(torch.int32), aux

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices ``(B, *spatial)`` -> code vectors ``(B, dim, *spatial)`` (float32)."""
        indices = check_indices(indices, self.codebook_size, ranks=POSITION_RANKS)
        return F.embedding(indices, self.embed).movedim(-1, 1)

    def extra_repr(self) -> str:
        return f"n_embed={self.n_embed}, dim={self.dim}, decay={self.decay}"
