"""The paper's encoder/decoder and a uniform adapter over the four quantizers."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from rfsq_kernels import FSQ, LFQ, RFSQ, VQEMA
from rfsq_kernels.reference import default_levels


class LucidrainsResidualFSQ(nn.Module):
    """``vector_quantize_pytorch.ResidualFSQ`` (or, with ``impl="vqpy"``, its exact drop-in
    ``rfsq_kernels.vqpytorch.ResidualFSQ``) (the benchmark peer of ``bench/backends.py``: same
    levels and stage count, ``dim = len(levels)``, defaults otherwise: fixed per-stage scales
    ``levels**-k``, a tanh soft clamp of the input, no learned conditioning) on channel-first latents.

    ``forward(z (B, C, H, W)) -> (quantized (B, C, H, W), indices (B, H, W, K))``;
    :meth:`decode_stages` gives each stage's contribution (in the latent space) from those indices.
    """

    def __init__(self, levels: Sequence[int], stages: int, impl: str = "lucidrains"):
        super().__init__()
        if impl == "vqpy":  # this package's exact drop-in (fused kernels on CUDA, the reference elsewhere)
            from rfsq_kernels.vqpytorch import ResidualFSQ
        else:
            try:
                from vector_quantize_pytorch import ResidualFSQ
            except ImportError as e:
                raise ValueError("--quantizer lucidrains needs vector-quantize-pytorch (pip install -e '.[bench]')") from e
        self.levels, self.stages = list(levels), stages
        self.peer = ResidualFSQ(levels=self.levels, num_quantizers=stages, dim=len(self.levels))
        self.codebook_size = self.peer.codebook_size
        self.bits_per_token = float(stages * math.log2(self.codebook_size))

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = z.shape
        q, idx = self.peer(z.float().movedim(1, -1).reshape(b, h * w, c))
        return q.reshape(b, h, w, c).movedim(-1, 1).to(z.dtype), idx.reshape(b, h, w, self.stages)

    @torch.no_grad()
    def decode_stages(self, indices: torch.Tensor) -> List[torch.Tensor]:
        """Per-stage contributions ``[q_0, ..., q_{K-1}]`` (B, C, H, W) of ``indices`` (B, H, W, K)."""
        b, h, w, k = indices.shape
        codes = self.peer.get_codes_from_indices(indices.reshape(b, h * w, k))  # (K, B, N, C)
        return [c.reshape(b, h, w, -1).movedim(-1, 1).float() for c in codes]


class QuantizerAdapter(nn.Module):
    """Wraps RFSQ / FSQ / LFQ / VQEMA so that ``forward(z) -> (quantized, indices (B,H,W,K), aux_loss)``.

    ``stages`` is K (1 for the single-stage baselines); ``stage_reconstructions(z)`` gives each stage's
    float32 contribution ``q_k`` (their sum is the quantized latent), for the residual-RMS metric.
    """

    def __init__(self, quantizer: nn.Module, kind: str):
        super().__init__()
        self.quantizer = quantizer
        self.kind = kind

    @property
    def stages(self) -> int:
        return self.quantizer.stages if self.kind in ("rfsq", "lucidrains", "vqpy") else 1

    @property
    def codebook_size(self) -> int:
        """Codes per stage."""
        return int(self.quantizer.codebook_size)

    @property
    def bits_per_token(self) -> float:
        return float(self.quantizer.bits_per_token)

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.kind in ("rfsq", "fsq", "lucidrains", "vqpy"):
            q, idx = self.quantizer(z)
            aux = z.new_zeros((), dtype=torch.float32)
        else:
            q, idx, aux = self.quantizer(z)
        if idx.ndim == z.ndim - 1:  # single-stage: (B, H, W) -> (B, H, W, 1)
            idx = idx.unsqueeze(-1)
        return q, idx, aux

    @torch.no_grad()
    def stage_reconstructions(self, z: torch.Tensor) -> List[torch.Tensor]:
        """Per-stage reconstructions ``[q_0, ..., q_{K-1}]`` (float32) of ``z``."""
        if self.kind == "rfsq":
            return self.quantizer.decode_stages(*self.quantizer.encode(z))
        if self.kind in ("lucidrains", "vqpy"):
            return self.quantizer.decode_stages(self.quantizer(z)[1])
        q, _, _ = self.forward(z)
        return [q.float()]


def quantizer_kwargs(cfg, backend: str) -> dict:
    """:func:`build_quantizer`'s keyword arguments from the CLI namespace or a run's saved config
    (``rfsq_stages``, ``rfsq_strategy``, ``rfsq_initial_scale``, ``levels``, ``embed_dim``, ``n_embed``,
    ``lfq_dim``), with ``backend``."""
    get = cfg.get if isinstance(cfg, dict) else lambda name: getattr(cfg, name)
    names = ("rfsq_stages", "rfsq_strategy", "rfsq_initial_scale", "levels", "embed_dim", "n_embed", "lfq_dim")
    return {**{name: get(name) for name in names}, "backend": backend}


def build_quantizer(
    quantizer: str,
    *,
    rfsq_stages: int = 2,
    rfsq_strategy: str = "layernorm",
    rfsq_initial_scale: float = 1.0,
    levels: Optional[Sequence[int]] = None,
    embed_dim: int = 6,
    n_embed: int = 4096,
    lfq_dim: int = 12,
    backend: str = "auto",
) -> QuantizerAdapter:
    """One of ``rfsq`` / ``fsq`` / ``lfq`` / ``ema`` (VQ-EMA), wrapped in :class:`QuantizerAdapter`
    (everything after ``quantizer`` by keyword: :func:`quantizer_kwargs` builds them from a config)."""
    if quantizer == "rfsq":
        q = RFSQ(stages=rfsq_stages, strategy=rfsq_strategy, levels=levels,
                 initial_scale=rfsq_initial_scale, backend=backend)
    elif quantizer == "fsq":
        q = FSQ(levels if levels is not None else [8, 8, 8, 8])
    elif quantizer in ("lucidrains", "vqpy"):
        q = LucidrainsResidualFSQ(levels if levels is not None else default_levels(rfsq_stages), rfsq_stages, quantizer)
    elif quantizer == "lfq":
        q = LFQ(dim=lfq_dim, commitment_weight=1.0)
    elif quantizer == "ema":
        q = VQEMA(n_embed=n_embed, dim=embed_dim, decay=0.99, eps=1e-5, commitment_weight=1.0)
    else:
        raise ValueError(f"unknown quantizer {quantizer!r}; choose rfsq, fsq, lfq, ema, lucidrains or vqpy")
    return QuantizerAdapter(q, quantizer)


def latent_channels(adapter: QuantizerAdapter) -> int:
    """C of the latent the quantizer expects: len(levels), the LFQ dim or the VQ code dim."""
    q = adapter.quantizer
    if adapter.kind in ("rfsq", "fsq", "lucidrains", "vqpy"):
        return len(q.levels)
    return q.dim


class AutoEncoder(nn.Module):
    """SPEC's encoder/decoder (128x128 images -> 32x32 latents) around a quantizer.

    Encoder: Conv(3->w, k4 s2 p1) ReLU Conv(w->2w, k4 s2 p1) ReLU Conv1x1(2w->C);
    decoder: Conv1x1(C->2w) ReLU ConvT(2w->w, k4 s2 p1) ReLU ConvT(w->3, k4 s2 p1); w = 128 in the
    paper (``width`` is smaller only in tests). ``forward(x) -> (recon, z, indices, aux_loss)``.
    """

    def __init__(self, quantizer: QuantizerAdapter, width: int = 128):
        super().__init__()
        c = latent_channels(quantizer)
        self.encoder = nn.Sequential(
            nn.Conv2d(3, width, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(2 * width, c, 1))
        self.quantizer = quantizer
        self.decoder = nn.Sequential(
            nn.Conv2d(c, 2 * width, 1), nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(width, 3, 4, 2, 1))

    def forward(self, x: torch.Tensor):
        z = self.encoder(x)
        q, indices, aux = self.quantizer(z)
        return self.decoder(q), z, indices, aux
