"""The reference ``nn.Module`` around the functional core (:mod:`.rfsq`): argument checks,
layouts, projections, quantize dropout, encode/decode and the state dict."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .codebook import (
    LevelsMixin,
    check_fsq_shift,
    check_levels,
    default_levels,
    digits_to_codes,
    indices_to_digits,
)
from .dropout import check_active_stages, check_mask, draw_active_stages
from .layout import check_input, first_to_last, from_channel_last, last_to_first, spatial_shape, to_channel_last
from .sentinel import SENTINEL, check_sentinel_layout, split_sentinel
from .state import ConfigStateMixin
from .strategies import Strategy, get_strategy, stage_scales
from .validation import (
    check_eps,
    check_indices,
    check_initial_scale,
    check_latent,
    check_side,
    check_side_values,
    check_stages,
)
from .rfsq import rfsq_decode_stages, rfsq_forward

#: ``stages`` at call time: None (all), an int k (the first k), or a ``(B,)`` tensor of per-sample counts.
StageCount = Union[None, int, torch.Tensor]


class RFSQ(ConfigStateMixin, LevelsMixin, nn.Module):
    """Pure-PyTorch RFSQ module (the reference). ``forward(z) -> (quantized, indices)``.

    Args:
        stages: number of residual stages K (>= 1).
        strategy: ``'none'``, ``'scale'`` or ``'layernorm'``.
        levels: FSQ levels per channel; default ``[8,8,8,4]`` for 2 stages and ``[4,4,4,4,4]`` for 4.
        initial_scale: ``'scale'`` strategy: ``softplus(p_k)`` starts at exactly this value.
        eps: variance epsilon of the ``'layernorm'`` strategy, a finite number > 0.
        dim: width of the input/output when it differs from ``len(levels)``: ``nn.Linear``
            projections ``dim -> len(levels)`` before and ``len(levels) -> dim`` after quantizing.
        channel_first: True (default): ``(B, C, *spatial)``; False: ``(B, *spatial, C)`` (read in
            place, no copy). ``(B, C)`` inputs work in both (not with ``'layernorm'``).
        quantize_dropout: in training (``self.training`` and grad enabled), each sample uses only
            its first ``k_b`` stages (SoundStream's variable bitrate); dropped stages get index -1.
        quantize_dropout_cutoff_index: ``k_b`` is drawn uniformly from ``[cutoff + 1, K]``.
        quantize_dropout_multiple_of: round ``k_b`` up to a multiple of this (capped at K).
        quantize_dropout_per_sample: True (default): one ``k_b`` per sample; False: one per batch
            (vector-quantize-pytorch's behaviour).
        projection_has_bias: bias of the ``dim`` projections.
        fsq_shift: ``'atanh'`` (default: the exact inverse of FSQ's tanh) or ``'tan'`` (the official
            RFSQ code's shift, for models trained with it: ``rfsq_kernels.from_official``).

    Range of the ``'layernorm'`` statistics: they are computed in float32, so the per-image, per-channel
    variance over the spatial positions overflows once it passes float32's max (3.4e38). This reference
    keeps them finite for every latent with ``|z| <= 1.8e19``; the fused kernels sum squared deviations,
    which holds for ``|z| <= 9.2e18 / sqrt(N)`` (N spatial positions per image, 2.9e17 at 32x32).
    Beyond that the channel's statistics become inf and its outputs NaN; indices stay in range.
    ``decode``/``decode_stages``/``indices_to_codes`` reject indices outside ``[0, codebook_size)``
    (except the sentinel -1 as a suffix along the stage axis: dropped stages, masked positions)
    and a wrong stages dim with a ``ValueError``.

    Parameters: ``scale_param`` ``(K,)`` for ``'scale'``; ``ln_weight``/``ln_bias`` ``(K, C)`` for
    ``'layernorm'``; ``project_in``/``project_out`` when ``dim != len(levels)``. The state_dict also
    stores ``levels``/``stages``/``strategy``/``dim`` (``_extra_state``); loading a checkpoint of
    another configuration raises.
    """

    def __init__(
        self,
        stages: int = 2,
        strategy: str = "layernorm",
        levels: Optional[Sequence[int]] = None,
        initial_scale: float = 1.0,
        eps: float = 1e-5,
        *,
        dim: Optional[int] = None,
        channel_first: bool = True,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        quantize_dropout_per_sample: bool = True,
        projection_has_bias: bool = True,
        fsq_shift: str = "atanh",
    ):
        super().__init__()
        self.fsq_shift = check_fsq_shift(fsq_shift)
        self.stages = check_stages(stages)
        self.strategy = get_strategy(strategy).name
        self.levels = check_levels(levels) if levels is not None else default_levels(stages)
        self.initial_scale = check_initial_scale(initial_scale)
        self.eps = check_eps(eps)
        channels = len(self.levels)
        for spec in self.strategy_spec.params:
            value = spec.initial_value(self.initial_scale)
            setattr(self, spec.name, nn.Parameter(torch.full(spec.shape(stages, channels), value, dtype=torch.float32)))
        self.dim = _check_positive_int(channels if dim is None else dim, "dim")
        self.has_projections = self.dim != channels
        if self.has_projections:
            self.project_in = nn.Linear(self.dim, channels, bias=projection_has_bias)
            self.project_out = nn.Linear(channels, self.dim, bias=projection_has_bias)
        self.channel_first = bool(channel_first)
        cutoff = quantize_dropout_cutoff_index
        if isinstance(cutoff, bool) or not isinstance(cutoff, int) or not 0 <= cutoff < self.stages:
            raise ValueError(f"quantize_dropout_cutoff_index must be an int in [0, stages-1 = {self.stages - 1}] "
                             f"(at least cutoff+1 stages are kept), got {cutoff!r}")
        self.quantize_dropout = bool(quantize_dropout) and self.stages > 1
        self.quantize_dropout_cutoff_index = cutoff
        self.quantize_dropout_multiple_of = _check_positive_int(quantize_dropout_multiple_of,
                                                                "quantize_dropout_multiple_of")
        self.quantize_dropout_per_sample = bool(quantize_dropout_per_sample)

    # -- properties -------------------------------------------------------------------------
    @property
    def bits_per_token(self) -> float:
        """K * log2(prod(levels)) bits per spatial position."""
        return self.stages * math.log2(self.codebook_size)

    @property
    def num_quantizers(self) -> int:
        """K (vector-quantize-pytorch's name)."""
        return self.stages

    @property
    def scales(self) -> Optional[torch.Tensor]:
        """``a_k = softplus(p_k)`` for the ``'scale'`` strategy, else None."""
        return stage_scales(self.scale_param) if hasattr(self, "scale_param") else None

    def config(self) -> dict:
        """What the parameters mean; stored in (and checked against) the state_dict."""
        return {"levels": list(self.levels), "stages": self.stages, "strategy": self.strategy, "dim": self.dim,
                "fsq_shift": self.fsq_shift}

    @property
    def strategy_spec(self) -> Strategy:
        """The strategy's row of :data:`~rfsq_kernels.reference.strategies.STRATEGY_TABLE`."""
        return get_strategy(self.strategy)

    def strategy_parameters(self, num_stages: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """The strategy's learnable parameters by name, in table order (``{}`` for ``'none'``;
        ``scale_param`` for ``'scale'``; ``ln_weight``, ``ln_bias`` for ``'layernorm'``), as keyword
        arguments of :func:`rfsq_forward` / :func:`rfsq_decode_stages` / ``rfsq_fused``.
        ``num_stages``: the rows of the first ``num_stages`` stages only (views, still trainable)."""
        params = {spec.name: getattr(self, spec.name) for spec in self.strategy_spec.params}
        if num_stages is None or num_stages == self.stages:
            return params
        return {name: p[:num_stages] for name, p in params.items()}

    # -- the quantizer on channel-first, codebook-width latents ------------------------------
    def _resolve_stages(self, z: torch.Tensor, stages: StageCount, dropout: bool) -> Tuple[int, Optional[torch.Tensor]]:
        """``(number of stages to run, per-sample active-stage counts or None)``."""
        if stages is None:
            if dropout and self.quantize_dropout and self.training and torch.is_grad_enabled():
                return self.stages, draw_active_stages(
                    z.shape[0], self.stages, self.quantize_dropout_cutoff_index,
                    self.quantize_dropout_multiple_of, self.quantize_dropout_per_sample, z.device)
            return self.stages, None
        if isinstance(stages, torch.Tensor):
            return self.stages, check_active_stages(stages, z.shape[0], self.stages, z.device)
        if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= self.stages:
            raise ValueError(f"stages must be an int in [1, {self.stages}] or a (B,) tensor of per-sample "
                             f"counts, got {stages!r}")
        return stages, None

    def _run(self, z: torch.Tensor, num_stages: int, mask: Optional[torch.Tensor],
             active_stages: Optional[torch.Tensor]):
        """The K-stage loop on a checked channel-first latent (the fused module overrides this)."""
        return rfsq_forward(z, self.levels, num_stages, self.strategy, eps=self.eps, mask=mask,
                            active_stages=active_stages, fsq_shift=self.fsq_shift,
                            **self.strategy_parameters(num_stages))

    def quantize(self, z: torch.Tensor, mask: Optional[torch.Tensor] = None, stages: StageCount = None):
        """Full result ``(quantized, indices, mean, std)`` of a channel-first ``(B, C, *spatial)``
        latent with ``C == len(levels)`` (no layout change, no projection, no dropout); see
        :func:`rfsq_forward`. ``stages``: None (all), an int k (the first k stages; outputs have
        k stages) or a ``(B,)`` integer tensor of per-sample counts (-1 indices beyond them)."""
        check_latent(z, self.num_channels)
        self._check_positions(z, z.shape[2:])
        check_mask(mask, z.shape[0], z.shape[2:], z.device)
        num_stages, active_stages = self._resolve_stages(z, stages, dropout=False)
        return self._run(z, num_stages, mask, active_stages)

    # -- the user-facing API (layout, projections, dropout) ----------------------------------
    def _check_positions(self, z: torch.Tensor, spatial: Sequence[int]) -> None:
        """Refuse a per-image-statistics strategy on inputs with one spatial position per sample:
        ``(B, C)``, ``(B, C, 1)``, ``(B, C, 1, 1)``, ... There every channel's mean is the value itself,
        so the output copies the input, the index is the same everywhere and the side information
        carries the whole signal. (A mask leaving one valid position does the same; that is a
        property of the data, not checked: it would need a host sync. README, "layernorm".)"""
        if not self.strategy_spec.per_image_stats or math.prod(spatial) != 1:
            return
        what = "is (B, C)" if z.ndim == 2 else f"has one spatial position per sample (spatial {tuple(spatial)})"
        raise ValueError(
            f"z of shape {tuple(z.shape)} {what}: strategy={self.strategy!r} normalizes each channel over "
            f"the spatial positions of a sample, and with one position the output is the input itself and the "
            f"side information would carry the whole signal; use strategy='none'/'scale', or pass more positions "
            f"((B, C, N) / (B, N, C) with N > 1)")

    def _encode_input(self, z: torch.Tensor, mask: Optional[torch.Tensor]):
        """User tensor -> ``(channel-first codebook-width latent, mask, flat)``."""
        check_input(z, self.dim, self.channel_first)
        flat = z.ndim == 2
        self._check_positions(z, spatial_shape(z, self.channel_first))
        check_mask(mask, z.shape[0], spatial_shape(z, self.channel_first), z.device)
        x = to_channel_last(z, self.channel_first)
        if self.has_projections:  # in the projection's dtype (float32 unless the module was cast); the
            x = self.project_in(x.to(self.project_in.weight.dtype))  # output goes back to z's dtype
        x = last_to_first(x)
        if flat and mask is not None:
            mask = mask.unsqueeze(-1)
        return x, mask, flat

    def _no_code(self, indices: torch.Tensor) -> Optional[torch.Tensor]:
        """Bool ``indices.shape[:-1]``: the positions no stage quantized (masked positions, samples with
        0 active stages: the sentinel in stage 0, hence in every stage), or None without projections
        (there the codebook-width output is already 0 at them)."""
        return indices[..., 0] == SENTINEL if self.has_projections else None

    def _decode_output(self, q: torch.Tensor, flat: bool, dtype: torch.dtype,
                       no_code: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Channel-first codebook-width result -> the user's layout, width and ``dtype``. ``no_code``
        (:meth:`_no_code`): positions that output 0 in the user's width too, not ``project_out``'s
        bias (forward and decode both pass it, so they agree)."""
        if not self.has_projections:
            q = q.to(dtype)
            if flat:
                return q.squeeze(-1)
            return q if self.channel_first else q.movedim(1, -1)
        y = self.project_out(first_to_last(q, flat).to(self.project_out.weight.dtype)).to(dtype)
        if no_code is not None:
            y = torch.where(no_code.reshape(*y.shape[:-1], 1), torch.zeros((), dtype=y.dtype, device=y.device), y)
        return y if flat else from_channel_last(y, self.channel_first)

    def forward(self, z: torch.Tensor, mask: Optional[torch.Tensor] = None, stages: StageCount = None,
                return_all_codes: bool = False):
        """``(quantized, indices)`` (plus ``all_codes`` with ``return_all_codes=True``).

        ``z``: ``(B, C, *spatial)`` (``channel_first``) or ``(B, *spatial, C)``, or ``(B, C)``, with
        ``C == dim``; ``quantized`` has ``z``'s shape, layout and dtype; ``indices`` is
        ``(B, *spatial, K)`` (``(B, K)`` for ``(B, C)`` input) with -1 for dropped stages and masked
        positions. ``mask``: ``(B, *spatial)`` bool, True = valid. ``stages``: None (all stages, or
        quantize dropout in training), an int k (the first k stages; ``indices`` has k columns) or
        a ``(B,)`` tensor of per-sample counts. ``all_codes``: the per-stage reconstructions
        ``(K, B, ...)`` in the codebook width and the module's layout (not differentiable), as
        :meth:`get_codes_from_indices` returns them.
        """
        x, mask, flat = self._encode_input(z, mask)
        num_stages, active_stages = self._resolve_stages(x, stages, dropout=True)
        quantized, indices, mean, std = self._run(x, num_stages, mask, active_stages)
        # (quantize dropout keeps at least one stage: only a mask or user counts leave positions without a code)
        sparse = mask is not None or isinstance(stages, torch.Tensor)
        out = self._decode_output(quantized, flat, z.dtype, self._no_code(indices) if sparse else None)
        if flat:
            indices = indices.squeeze(1)
        if not return_all_codes:
            return out, indices
        with torch.no_grad():
            parts = rfsq_decode_stages(indices.unsqueeze(1) if flat else indices, self.levels, self.strategy,
                                       **self.strategy_parameters(num_stages), mean=mean if mean.numel() else None,
                                       std=std if std.numel() else None)
        return out, indices, self._stack_codes(parts, flat)

    def encode(self, z: torch.Tensor, mask: Optional[torch.Tensor] = None, stages: StageCount = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``z -> (indices, side)``. ``side`` is float32 ``(B, K, 2, C)`` holding the LN mean
        (``side[:, k, 0]``) and std (``side[:, k, 1]``) of every image, stage and channel — the
        ``2*C*K`` floats per image a codec must store; it is ``(B, K, 2, 0)`` (empty) otherwise.
        ``mask``/``stages`` as in :meth:`forward` (no dropout: encoding is deterministic)."""
        with torch.no_grad():
            x, mask, flat = self._encode_input(z, mask)
            num_stages, active_stages = self._resolve_stages(x, stages, dropout=False)
            _, indices, mean, std = self._run(x, num_stages, mask, active_stages)
        if flat:
            indices = indices.squeeze(1)
        if self.strategy_spec.per_image_stats:
            side = torch.stack([mean, std], dim=2)
        else:
            side = torch.zeros((z.shape[0], num_stages, 2, 0), dtype=torch.float32, device=z.device)
        return indices, side

    def _check_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Decoder input checks, returning the indices as int64 (``check_indices``): an integer tensor
        ``(B, *spatial, K')`` (``(B, K')`` for ``(B, C)`` inputs) with ``1 <= K' <= K`` (the first K'
        stages), values in ``[0, codebook_size)`` or the sentinel -1 as a suffix along the stage axis
        (see :mod:`.sentinel`). Errors name the shape the caller passed."""
        idx = check_indices(indices, self.codebook_size, allow_sentinel=True)
        if not (2 <= idx.ndim <= 5 and 1 <= idx.shape[-1] <= self.stages):
            raise ValueError(
                f"indices must have shape (B, *spatial, K={self.stages}) with 1 to 3 spatial dims (as returned by "
                f"encode/forward; (B, K) for (B, C) inputs; indices[..., :k] for the first k stages), got "
                f"{tuple(idx.shape)}")
        check_sentinel_layout(idx)
        return idx

    def _check_codes(self, indices: torch.Tensor, side: Optional[torch.Tensor]
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """:meth:`_check_indices` plus the side information matching their stages; returns both
        normalised (int64 indices, float32 side: ``check_side``)."""
        idx = self._check_indices(indices)
        layernorm = self.strategy_spec.per_image_stats
        stages = idx.shape[-1]
        if layernorm and isinstance(side, torch.Tensor) and side.ndim == 4 and side.shape[1] != stages:
            raise ValueError(f"side must be the (B, K', 2, C) statistics of the same stages as indices (K' = {stages}; "
                             f"for indices[..., :k] pass side[:, :k]), got {tuple(side.shape)}")
        side = check_side(side, (idx.shape[0], stages, 2, self.num_channels if layernorm else 0), required=layernorm)
        if layernorm:
            check_side_values(side)
        return idx, side

    def _decode_parts(self, idx: torch.Tensor, side: Optional[torch.Tensor]) -> List[torch.Tensor]:
        """Per-stage reconstructions of checked indices and side (:meth:`_check_codes`)."""
        mean = std = None
        if self.strategy_spec.per_image_stats:
            mean, std = side[:, :, 0], side[:, :, 1]
        with torch.no_grad():
            return rfsq_decode_stages(idx, self.levels, self.strategy, **self.strategy_parameters(idx.shape[-1]),
                                      mean=mean, std=std)

    def decode_stages(self, indices: torch.Tensor, side: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """Per-stage float32 reconstructions ``[q_0, ..., q_{K'-1}]`` (channel-first, codebook
        width) from ``encode``'s output; ``indices[..., :k]`` with ``side[:, :k]`` gives the first k.
        The sentinel -1 decodes to 0."""
        return self._decode_parts(*self._check_codes(indices, side))

    def decode(
        self, indices: torch.Tensor, side: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """``(indices, side) -> quantized`` in the module's layout and width; equals
        ``forward(z)[0]`` exactly (``dtype`` = z's dtype). ``indices[..., :k]`` (with
        ``side[:, :k]``) gives the k-stage reconstruction."""
        idx, side = self._check_codes(indices, side)
        flat = idx.ndim == 2
        stages = self._decode_parts(idx.unsqueeze(1) if flat else idx, side)
        total = torch.zeros_like(stages[0])
        for q in stages:
            total = total + q
        return self._decode_output(total, flat, dtype, self._no_code(idx))

    def get_output_from_indices(self, indices: torch.Tensor, side: Optional[torch.Tensor] = None) -> torch.Tensor:
        """vector-quantize-pytorch's name for :meth:`decode` (float32)."""
        return self.decode(indices, side)

    def _stack_codes(self, parts: List[torch.Tensor], flat: bool) -> torch.Tensor:
        codes = torch.stack(parts, dim=0)  # (K, B, C, *spatial)
        if flat:
            return codes.squeeze(-1)
        return codes if self.channel_first else codes.movedim(2, -1)

    def get_codes_from_indices(self, indices: torch.Tensor, side: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-stage reconstructions ``q_k`` stacked as ``(K', B, C, *spatial)`` (``channel_first``)
        or ``(K', B, *spatial, C)`` — codebook width (before ``project_out``); they sum to the
        quantized latent. Dropped stages and masked positions are 0."""
        idx, side = self._check_codes(indices, side)
        flat = idx.ndim == 2
        return self._stack_codes(self._decode_parts(idx.unsqueeze(1) if flat else idx, side), flat)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Normalized FSQ codes of every stage: ``(B, *spatial, K)`` -> ``(B, K, C, *spatial)``
        (the values in [-1, 1] before un-conditioning; needs no side information; -1 gives 0)."""
        indices = self._check_indices(indices)
        codes = []
        for k in range(indices.shape[-1]):
            present, clean = split_sentinel(indices[..., k])
            c = digits_to_codes(indices_to_digits(clean, self.levels), self.levels)
            codes.append(c * present.unsqueeze(1))
        return torch.stack(codes, dim=1)

    def extra_repr(self) -> str:
        extra = f"stages={self.stages}, strategy={self.strategy!r}, levels={list(self.levels)}"
        if self.has_projections:
            extra += f", dim={self.dim}"
        if not self.channel_first:
            extra += ", channel_first=False"
        if self.fsq_shift != "atanh":
            extra += f", fsq_shift={self.fsq_shift!r}"
        if self.quantize_dropout:
            extra += (f", quantize_dropout=True, cutoff_index={self.quantize_dropout_cutoff_index}, "
                      f"multiple_of={self.quantize_dropout_multiple_of}, per_sample={self.quantize_dropout_per_sample}")
        return extra


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value
