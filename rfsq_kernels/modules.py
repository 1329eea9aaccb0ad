"""The public ``nn.Module``s: the reference modules plus dispatch to the fused kernels."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .backend import check_backend, use_fused
from .reference import FSQ
from .reference import RFSQ as _ReferenceRFSQ
from .reference import check_latent, rfsq_forward

__all__ = ["RFSQ", "FSQ"]


class RFSQ(_ReferenceRFSQ):
    """Robust Residual FSQ: ``forward(z) -> (quantized, indices)``.

    ``z`` is channel-first ``(B, C, *spatial)`` (rank 3, 4 or 5) with ``C == len(levels)``, any float
    dtype (math in float32, output in ``z``'s dtype). ``indices`` is ``(B, *spatial, K)``.

    Args:
        stages: number of residual stages K (default 2).
        strategy: ``'layernorm'`` (default), ``'scale'`` or ``'none'``.
        levels: per-channel FSQ levels; defaults: 2 stages -> [8,8,8,4], 4 stages -> [4,4,4,4,4].
        initial_scale: ``'scale'``: ``softplus(p_k)`` starts at exactly this value (default 1.0).
        eps: ``'layernorm'`` variance epsilon, a finite number > 0. The float32 statistics stay finite
            for ``|z| <= 9.2e18 / sqrt(spatial positions)`` on every backend (see the reference RFSQ).
        backend: ``'auto'`` (fused Triton kernels for CUDA tensors, reference otherwise),
            ``'triton'`` or ``'reference'``. The ``state_dict`` is the same for every backend.
    """

    def __init__(
        self,
        stages: int = 2,
        strategy: str = "layernorm",
        levels: Optional[Sequence[int]] = None,
        initial_scale: float = 1.0,
        eps: float = 1e-5,
        backend: str = "auto",
    ):
        super().__init__(stages=stages, strategy=strategy, levels=levels, initial_scale=initial_scale, eps=eps)
        self.backend = check_backend(backend)

    def quantize(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Full result ``(quantized, indices, mean, std)``; mean/std are the LN statistics
        ``(B, K, C)`` (empty for other strategies)."""
        check_latent(z, self.num_channels)
        if use_fused(self.backend, z):
            from .fused import rfsq_fused

            return rfsq_fused(z, self.levels, self.stages, self.strategy, *self._params(), eps=self.eps)
        return rfsq_forward(z, self.levels, self.stages, self.strategy, *self._params(), eps=self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"
