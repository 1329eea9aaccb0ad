"""The conditioning strategies of RFSQ: one table that every layer reads.

A strategy decides how stage k conditions the residual before FSQ rounds it and how the code is
mapped back (docs/semantics.md). What the rest of the code needs to know about it is in its
:class:`Strategy` row: its learnable parameters (names, shapes, initial values) and whether it
computes per-image statistics (the side information a codec stores, the kernel family, why
``(B, C)`` inputs are refused). The reference module, the fused glue and launchers, the offline
compile check, the training CLI and ``bench/`` all read :data:`STRATEGY_TABLE`.

Adding a strategy (README, "Adding a conditioning strategy"): a row here, its per-stage math in
``reference/rfsq.py`` (``STAGE_MATH`` and ``DECODE_MATH``), and its kernel stage in
``rfsq_kernels/kernels/`` (the launcher picks the family from ``per_image_stats``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

#: Parameter roles: what a parameter's value means, hence how it starts and how tests draw it.
SOFTPLUS_SCALE = "softplus_scale"  # p_k with a_k = softplus(p_k) > 0; starts at softplus^-1(initial_scale)
GAIN = "gain"                      # multiplies the normalized residual; starts at 1, must stay away from 0
SHIFT = "shift"                    # added to the normalized residual; starts at 0


@dataclass(frozen=True)
class ParamSpec:
    """One learnable parameter of a strategy: ``(K,)`` or, with ``per_channel``, ``(K, C)``."""

    name: str
    per_channel: bool
    role: str

    def shape(self, stages: int, channels: int) -> Tuple[int, ...]:
        """The parameter's shape for ``stages`` x ``channels``."""
        return (stages, channels) if self.per_channel else (stages,)

    def initial_value(self, initial_scale: float) -> float:
        """Every entry's value at construction."""
        if self.role == SOFTPLUS_SCALE:
            return scale_param_init(initial_scale)
        return 1.0 if self.role == GAIN else 0.0


@dataclass(frozen=True)
class Strategy:
    """A row of :data:`STRATEGY_TABLE`.

    ``per_image_stats``: each stage normalizes every (image, channel) over the image's spatial
    positions, so the forward returns ``(B, K, C)`` mean/std (the codec's side information),
    positions are coupled (the fused path uses the one-program-per-image ``layernorm`` kernels
    instead of the elementwise ones) and a ``(B, C)`` input, with one position, is refused.
    """

    name: str
    params: Tuple[ParamSpec, ...]
    per_image_stats: bool
    summary: str

    @property
    def param_names(self) -> Tuple[str, ...]:
        """Names of the learnable parameters, in the order every layer passes them."""
        return tuple(p.name for p in self.params)


STRATEGY_TABLE: Dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("none", (), False, "plain residual FSQ: q_k = FSQ(r_k)"),
        Strategy("scale", (ParamSpec("scale_param", False, SOFTPLUS_SCALE),), False,
                 "learnable scale per stage: q_k = FSQ(a_k r_k) / a_k, a_k = softplus(p_k)"),
        Strategy("layernorm", (ParamSpec("ln_weight", True, GAIN), ParamSpec("ln_bias", True, SHIFT)), True,
                 "invertible per-image, per-channel normalization with affine (w_k, b_k)"),
    )
}

#: Strategy names, in table order (CLI ``choices``, test and bench parametrization).
STRATEGIES: Tuple[str, ...] = tuple(STRATEGY_TABLE)

#: Every parameter name any strategy uses, in the order the functional APIs take them
#: (``rfsq_forward(..., scale_param, ln_weight, ln_bias)``).
ALL_PARAM_NAMES: Tuple[str, ...] = tuple(p.name for s in STRATEGY_TABLE.values() for p in s.params)


def get_strategy(strategy: str) -> Strategy:
    """The table row of ``strategy``; a ``ValueError`` naming the choices for anything else."""
    row = STRATEGY_TABLE.get(strategy) if isinstance(strategy, str) else None
    if row is None:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return row


def scale_param_init(initial_scale: float) -> float:
    """The float32 ``p`` with ``softplus(p) == initial_scale`` exactly (SPEC: ``log(expm1(s))``).

    ``log(expm1(s))`` rounded to float32 can miss ``s`` by one ulp after softplus; the nearest
    float32 neighbours are searched for one that hits it exactly.
    """
    if not (initial_scale > 0 and math.isfinite(initial_scale)):
        raise ValueError(f"initial_scale must be a positive finite number, got {initial_scale}")
    target = torch.tensor(initial_scale, dtype=torch.float32)
    # log(expm1(s)) = s + log1p(-exp(-s)) for large s: the same value without expm1's overflow past s = 709
    s = initial_scale
    p = torch.tensor(math.log(math.expm1(s)) if s < 20 else s + math.log1p(-math.exp(-s)), dtype=torch.float32)
    best = p
    for _ in range(8):
        a = F.softplus(p)
        if a == target:
            return p.item()
        p = torch.nextafter(p, torch.tensor(float("inf")) if a < target else torch.tensor(float("-inf")))
    return best.item()
