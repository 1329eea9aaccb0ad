"""Lookup-Free Quantization baseline (paper: dim=12, commitment weight 1, no entropy loss)."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .validation import POSITION_RANKS, check_indices, check_latent


class LFQ(nn.Module):
    """Sign quantization of each channel to +-1 with a straight-through gradient.

    ``forward(z) -> (quantized, indices, aux_loss)`` with ``indices = sum_c [z_c > 0] * 2**c``
    (``(B, *spatial)``, int32 for dim < 31) and ``aux_loss = commitment_weight * MSE(z, sign(z))``.
    The paper's runs used no entropy loss, so none is implemented.
    """

    def __init__(self, dim: int = 12, commitment_weight: float = 1.0):
        super().__init__()
        if dim < 1 or dim > 62:
            raise ValueError(f"dim must be in [1, 62], got {dim}")
        self.dim = dim
        self.commitment_weight = float(commitment_weight)

    @property
    def codebook_size(self) -> int:
        return 2**self.dim

    @property
    def bits_per_token(self) -> float:
        return float(self.dim)

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_latent(z, self.dim)
        x = z.float()
        positive = x > 0
        q = torch.where(positive, 1.0, -1.0)
        out = x + (q - x).detach()
        aux = self.commitment_weight * F.mse_loss(x, q)
        basis = (2 ** torch.arange(self.dim, device=z.device, dtype=torch.int64)).view(1, -1, *([1] * (z.ndim - 2)))
        indices = (positive.to(torch.int64) * basis).sum(dim=1)
        indices = indices.to(torch.int32 if self.dim < 31 else torch.int64)
        return out.to(z.dtype), indices, aux

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices ``(B, *spatial)`` -> codes ``(B, dim, *spatial)`` in {-1, +1} (float32)."""
        indices = check_indices(indices, self.codebook_size, ranks=POSITION_RANKS)
        bits = (indices.unsqueeze(1) >> torch.arange(self.dim, device=indices.device).view(
            1, -1, *([1] * (indices.ndim - 1)))) & 1
        return bits.float() * 2 - 1

    def extra_repr(self) -> str:
        return f"dim={self.dim}, commitment_weight={self.commitment_weight}"
