"""The strategy table's types and the tables themselves, which :mod:`.registry` fills.

A strategy decides how stage k conditions the residual before FSQ rounds it and how the code is
mapped back (docs/semantics.md). What the rest of the code needs to know about it is in its
:class:`Strategy` row: its learnable parameters (names, shapes, roles), whether it computes
per-image statistics (the side information a codec stores, why ``(B, C)`` inputs are refused) and
which kernel family runs it. The parameters travel as one ordered group, in the row's order,
through every layer: the stage math, the custom ops, the launchers and the kernels.

Every table here is keyed by strategy (or role) name and written only by
:func:`.registry.register_strategy`, which fills all of them from one strategy module at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch

#: Kernel families (``rfsq_kernels/kernels/<family>.py``): positions independent (one program per
#: image tile), or per-image statistics (one program per image).
ELEMENTWISE = "elementwise"
LAYERNORM = "layernorm"
KERNEL_FAMILIES = (ELEMENTWISE, LAYERNORM)
#: The families whose kernels are generic over a strategy's kernel stage (so a strategy of that
#: family must declare one); the others run one strategy's math and take no stage.
STAGED_FAMILIES = (ELEMENTWISE,)

#: A random draw for tests: ``draw(base, generator)`` moves ``base`` (float32, CPU) as the role allows.
Draw = Callable[[torch.Tensor, Optional[torch.Generator]], torch.Tensor]


@dataclass(frozen=True)
class ParamRole:
    """What a parameter role means to the code: ``initial(initial_scale)`` is every entry's value at
    construction; ``to_kernel`` (float32, differentiable) is what the fused kernels receive instead
    of the parameter itself (None: the parameter as is), so autograd applies its derivative;
    ``draw`` is the random distribution tests and benchmarks use (``rfsq_kernels.testing``)."""

    initial: Callable[[float], float]
    to_kernel: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    draw: Optional[Draw] = None


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
            raise ValueError(f"strategy {self.name!r}: kernel_family must be one of {KERNEL_FAMILIES}, "
                             f"got {self.kernel_family!r}")
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


class StageContext(NamedTuple):
    """What a stage's math needs besides the residual and the parameters."""

    levels: Sequence[int]
    compute_dtype: torch.dtype
    eps: float
    dims: Tuple[int, ...]  # spatial dims of the channel-first residual
    valid: Optional[torch.Tensor]  # (B, 1, *spatial) bool, or None without a mask
    count: Optional[torch.Tensor]  # valid positions per image, (B, 1, ...), or None without a mask
    fsq_shift: str = "atanh"  # the FSQ shift: 'atanh' or the official code's 'tan'


#: A strategy's parameter group: its parameters in table order (``Strategy.bind``).
ParamGroup = Tuple[torch.Tensor, ...]

#: Per-stage forward math: ``(r_k, k, params, ctx) -> (q_k, digits, stats)``, ``params`` the
#: parameter group, ``stats`` the stage's ``(B, C)`` float32 ``(mean, std)`` with per-image statistics.
StageMath = Callable[[torch.Tensor, int, ParamGroup, StageContext], tuple]
#: Per-stage decode: ``(float32 codes (B, C, *spatial), k, params, mean, std) -> q_k``, the same
#: float32 operations in the same order as the strategy's stage math (decode is exact).
DecodeMath = Callable[[torch.Tensor, int, ParamGroup, Optional[torch.Tensor], Optional[torch.Tensor]],
                      torch.Tensor]

# The tables, by strategy name (roles and distributions: by role name). Filled together by
# register_strategy; nothing else writes them.
STRATEGY_TABLE: Dict[str, Strategy] = {}
PARAM_ROLES: Dict[str, ParamRole] = {}
#: ``role -> draw(base, generator)`` (``rfsq_kernels.testing.DISTRIBUTIONS`` is this dict).
DISTRIBUTIONS: Dict[str, Draw] = {}
STAGE_MATH: Dict[str, StageMath] = {}
DECODE_MATH: Dict[str, DecodeMath] = {}
#: The kernel stage each strategy of a staged family declared: an object, or a ``"module:attribute"``
#: path the kernel side imports on first use (the reference never imports the kernels).
KERNEL_STAGES: Dict[str, Union[str, object]] = {}


def _role(role: str) -> ParamRole:
    found = PARAM_ROLES.get(role)
    if found is None:
        raise ValueError(f"unknown parameter role {role!r}; a strategy module declares its new roles "
                         f"(reference/strategies/), known: {sorted(PARAM_ROLES)}")
    return found


def get_strategy(strategy: str) -> Strategy:
    """The table row of ``strategy``; a ``ValueError`` naming the choices for anything else."""
    row = STRATEGY_TABLE.get(strategy) if isinstance(strategy, str) else None
    if row is None:
        raise ValueError(f"strategy must be one of {tuple(STRATEGY_TABLE)}, got {strategy!r}")
    return row
