"""The public ``nn.Module``s: the reference modules plus dispatch to the fused kernels."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch

from .backend import check_backend, use_fused
from .reference import FSQ
from .reference import RFSQ as _ReferenceRFSQ

__all__ = ["RFSQ", "FSQ"]


class RFSQ(_ReferenceRFSQ):
    """Robust Residual FSQ: ``forward(z, mask=None, stages=None, return_all_codes=False)
    -> (quantized, indices[, all_codes])``.

    ``z`` is ``(B, C, *spatial)`` (``channel_first=True``, the default) or ``(B, *spatial, C)``
    (``channel_first=False``, read in place), or ``(B, C)``; ``C == dim`` (default ``len(levels)``);
    any float dtype (math in float32, output in ``z``'s dtype). ``indices`` is ``(B, *spatial, K)``
    with the sentinel -1 for dropped stages and masked positions.

    Args:
        stages: number of residual stages K (default 2).
        strategy: ``'layernorm'`` (default), ``'scale'`` or ``'none'``.
        levels: per-channel FSQ levels; defaults: 2 stages -> [8,8,8,4], 4 stages -> [4,4,4,4,4].
        initial_scale: ``'scale'``: ``softplus(p_k)`` starts at exactly this value (default 1.0).
        eps: ``'layernorm'`` variance epsilon, a finite number > 0. The float32 statistics stay finite
            for ``|z| <= 9.2e18 / sqrt(spatial positions)`` on every backend (see the reference RFSQ).
        backend: ``'auto'`` (fused Triton kernels for CUDA tensors, reference otherwise),
            ``'triton'`` or ``'reference'``. The ``state_dict`` is the same for every backend.
        dim, channel_first, quantize_dropout, quantize_dropout_cutoff_index,
        quantize_dropout_multiple_of, quantize_dropout_per_sample, projection_has_bias:
            see :class:`rfsq_kernels.reference.RFSQ`.
        fsq_shift: ``'atanh'`` (default) or ``'tan'``: the official RFSQ code's FSQ shift, for models
            trained with it (:func:`rfsq_kernels.from_official`); both backends compute either.
    """

    def __init__(self, stages: int = 2, strategy: str = "layernorm", levels: Optional[Sequence[int]] = None,
                 initial_scale: float = 1.0, eps: float = 1e-5, backend: str = "auto", **options: Any):
        # options: the reference module's keyword-only arguments (dim, channel_first, quantize_dropout*,
        # projection_has_bias, fsq_shift), checked there, so a new one needs no change here
        super().__init__(stages, strategy, levels, initial_scale, eps, **options)
        self.backend = check_backend(backend)

    def _run(self, z: torch.Tensor, num_stages: int, mask: Optional[torch.Tensor],
             active_stages: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The K-stage loop on a checked channel-first latent: fused kernels or the reference."""
        if use_fused(self.backend, z):
            from .fused import rfsq_fused

            return rfsq_fused(z, self.levels, num_stages, self.strategy, eps=self.eps, mask=mask,
                              active_stages=active_stages, fsq_shift=self.fsq_shift,
                              **self.strategy_parameters(num_stages))
        return super()._run(z, num_stages, mask, active_stages)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"
