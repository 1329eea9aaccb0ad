"""The conditioning strategies of RFSQ: one table that every layer reads.

A strategy decides how stage k conditions the residual before FSQ rounds it and how the code is
mapped back (docs/semantics.md). What the rest of the code needs to know about it is in its
:class:`Strategy` row: its learnable parameters (names, shapes, initial values) and whether it
computes per-image statistics (the side information a codec stores, why ``(B, C)`` inputs are
refused) and which kernel family runs it. The parameters travel as one ordered group, in the
row's order, through every layer: the stage math, the custom ops, the launchers and the kernels.
The reference module, the fused glue and launchers, the offline compile check, the training CLI
and ``bench/`` all read :data:`STRATEGY_TABLE`.

Adding a strategy: README, "Where things are, and how to add a strategy".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

#: Parameter roles: what a parameter's value means, hence how it starts (:data:`PARAM_ROLES`), what
#: the kernels receive, and how tests draw it (``rfsq_kernels.testing``).
SOFTPLUS_SCALE = "softplus_scale"  # p_k with a_k = softplus(p_k) > 0; starts at softplus^-1(initial_scale)
GAIN = "gain"                      # multiplies the normalized residual; starts at 1, must stay away from 0
SHIFT = "shift"                    # added to the normalized residual; starts at 0

#: Kernel families (``rfsq_kernels/kernels/<family>.py``): positions independent (one program per
#: image tile), or per-image statistics (one program per image).
ELEMENTWISE = "elementwise"
LAYERNORM = "layernorm"
KERNEL_FAMILIES = (ELEMENTWISE, LAYERNORM)


@dataclass(frozen=True)
class ParamRole:
    """What a parameter role means to the code: ``initial(initial_scale)`` is every entry's value at
    construction; ``to_kernel`` (float32, differentiable) is what the fused kernels receive instead
    of the parameter itself (None: the parameter as is), so autograd applies its derivative."""

    initial: Callable[[float], float]
    to_kernel: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


#: Every parameter role by name. A strategy with a new role registers it here (and its random
#: distribution in ``rfsq_kernels.testing.DISTRIBUTIONS``).
PARAM_ROLES: Dict[str, ParamRole] = {
    SOFTPLUS_SCALE: ParamRole(lambda initial_scale: scale_param_init(initial_scale), lambda p: stage_scales(p)),
    GAIN: ParamRole(lambda _initial_scale: 1.0),
    SHIFT: ParamRole(lambda _initial_scale: 0.0),
}


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
        """Every entry's value at construction (its role's ``initial``)."""
        return _role(self.role).initial(initial_scale)

    def kernel_form(self, value: torch.Tensor) -> torch.Tensor:
        """What the fused kernels receive for ``value`` (its role's ``to_kernel``)."""
        to_kernel = _role(self.role).to_kernel
        return value if to_kernel is None else to_kernel(value)


def _role(role: str) -> ParamRole:
    found = PARAM_ROLES.get(role)
    if found is None:
        raise ValueError(f"unknown parameter role {role!r}; register it in PARAM_ROLES "
                         f"(reference/strategies.py), known: {sorted(PARAM_ROLES)}")
    return found


@dataclass(frozen=True)
class Strategy:
    """A row of :data:`STRATEGY_TABLE`.

    ``params``: the learnable parameters, in the order every layer passes them (one group).
    ``per_image_stats``: each stage normalizes every (image, channel) over the image's spatial
    positions, so the forward returns ``(B, K, C)`` mean/std (the codec's side information) and a
    ``(B, C)`` input, with one position, is refused. ``kernel_family``: the file of
    ``rfsq_kernels/kernels/`` that runs it (:data:`KERNEL_FAMILIES`; per-image statistics couple
    the positions, so they need the one-program-per-image ``layernorm`` family).
    """

    name: str
    params: Tuple[ParamSpec, ...]
    per_image_stats: bool
    summary: str
    kernel_family: str = ELEMENTWISE

    def __post_init__(self):
        if self.kernel_family not in KERNEL_FAMILIES:
            raise ValueError(f"kernel_family must be one of {KERNEL_FAMILIES}, got {self.kernel_family!r}")
        if self.per_image_stats and self.kernel_family != LAYERNORM:
            raise ValueError(f"strategy {self.name!r}: per-image statistics need the {LAYERNORM!r} kernel family")

    @property
    def param_names(self) -> Tuple[str, ...]:
        """Names of the learnable parameters, in the order every layer passes them."""
        return tuple(p.name for p in self.params)

    def bind(self, given: Mapping[str, Optional[torch.Tensor]]) -> Tuple[torch.Tensor, ...]:
        """The strategy's parameter group, in table order, from keyword arguments by name.

        A name the strategy does not have is a ``TypeError`` (``None`` values are ignored, so
        ``scale_param=None`` with ``'none'`` still works); a missing one is a ``ValueError``."""
        unexpected = sorted(n for n, v in given.items() if v is not None and n not in self.param_names)
        if unexpected:
            raise TypeError(f"strategy={self.name!r} takes the parameters {self.param_names}, "
                            f"got unexpected {unexpected}")
        missing = [n for n in self.param_names if given.get(n) is None]
        if missing:
            raise ValueError(f"strategy={self.name!r} needs the parameters {self.param_names}, missing {missing}")
        return tuple(given[n] for n in self.param_names)


STRATEGY_TABLE: Dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("none", (), per_image_stats=False, kernel_family=ELEMENTWISE,
                 summary="plain residual FSQ: q_k = FSQ(r_k)"),
        Strategy("scale", (ParamSpec("scale_param", False, SOFTPLUS_SCALE),), per_image_stats=False,
                 kernel_family=ELEMENTWISE,
                 summary="learnable scale per stage: q_k = FSQ(a_k r_k) / a_k, a_k = softplus(p_k)"),
        Strategy("layernorm", (ParamSpec("ln_weight", True, GAIN), ParamSpec("ln_bias", True, SHIFT)),
                 per_image_stats=True, kernel_family=LAYERNORM,
                 summary="invertible per-image, per-channel normalization with affine (w_k, b_k)"),
    )
}

#: The built-in strategy names, in table order (CLI ``choices``, test and bench parametrization).
STRATEGIES: Tuple[str, ...] = tuple(STRATEGY_TABLE)


def get_strategy(strategy: str) -> Strategy:
    """The table row of ``strategy``; a ``ValueError`` naming the choices for anything else."""
    row = STRATEGY_TABLE.get(strategy) if isinstance(strategy, str) else None
    if row is None:
        raise ValueError(f"strategy must be one of {tuple(STRATEGY_TABLE)}, got {strategy!r}")
    return row


def stage_scales(scale_param: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``a_k = softplus(p_k)`` for every stage, as the reference, decode and the fused op all
    compute it: in float64, rounded once to ``dtype``.

    softplus is a transcendental that PyTorch rounds differently on different paths (on the CPU
    its vectorized and scalar loops disagree in the last float32 bit for about 1 value in 8;
    CUDA's differs again). In float64 those differences sit about 2**-29 float32 steps apart,
    so the rounded ``a_k`` agrees on every path and device unless the float64 value falls that
    close to a float32 rounding midpoint (about 1 parameter value in 2**28; docs/semantics.md,
    "Arithmetic contract")."""
    return F.softplus(scale_param.double()).to(dtype)


def scale_param_init(initial_scale: float) -> float:
    """The float32 ``p`` with ``softplus(p) == initial_scale`` exactly (docs/semantics.md: ``log(expm1(s))``).

    ``log(expm1(s))`` rounded to float32 can miss ``s`` by one ulp after softplus; the nearest
    float32 neighbours are searched for one that hits it exactly.
    """
    if not (initial_scale > 0 and math.isfinite(initial_scale)):
        raise ValueError(f"initial_scale must be a positive finite number, got {initial_scale}")
    target = torch.tensor(initial_scale, dtype=torch.float32)
    # log(expm1(s)) = s + log1p(-exp(-s)) for large s: the same value without expm1's overflow past s = 709
    s = initial_scale
    first = torch.tensor(math.log(math.expm1(s)) if s < 20 else s + math.log1p(-math.exp(-s)), dtype=torch.float32)
    p = first
    for _ in range(8):
        a = stage_scales(p)
        if a == target:
            return p.item()
        p = torch.nextafter(p, torch.tensor(float("inf")) if a < target else torch.tensor(float("-inf")))
    return first.item()  # no float32 within 8 ulp hits it exactly: the rounded formula
