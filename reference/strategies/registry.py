"""One registration per strategy: :func:`register_strategy` checks a :class:`StrategyDefinition`
as a whole and fills every table of :mod:`.table` from it, or changes nothing and raises a
``ValueError`` naming the strategy and the missing piece."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, List, Mapping, Optional, Union

from . import table
from .table import STAGED_FAMILIES, DecodeMath, ParamRole, StageMath, Strategy


@dataclass(frozen=True)
class StrategyDefinition:
    """Everything the package knows about one strategy (a module of ``reference/strategies/``
    declares one as ``STRATEGY``).

    ``row``: its table row. ``stage_math`` / ``decode_math``: its reference forward and decode of
    one stage (:data:`.table.StageMath`, :data:`.table.DecodeMath`). ``roles``: the parameter roles
    it introduces (each with its ``draw``, the tests' distribution); its parameters may also use
    roles already registered. ``kernel_stage``: for a family of :data:`.table.STAGED_FAMILIES`,
    the kernel family's stage object (``rfsq_kernels.kernels.elementwise.ElementwiseStage``) or a
    ``"module:attribute"`` path to it, imported on the first kernel launch (the reference must
    import without triton); ``None`` for the other families.
    """

    row: Strategy
    stage_math: Optional[StageMath] = None
    decode_math: Optional[DecodeMath] = None
    roles: Mapping[str, ParamRole] = field(default_factory=dict)
    kernel_stage: Union[str, object, None] = None


def _problems(d: StrategyDefinition) -> List[str]:
    """What is missing or inconsistent in ``d`` against the registered tables (empty: none)."""
    row, out = d.row, []
    if not isinstance(row, Strategy):
        return [f"row must be a Strategy, got {type(row).__name__}"]
    if row.name in table.STRATEGY_TABLE:
        out.append("a strategy of that name is already registered")
    for piece in ("stage_math", "decode_math"):
        if not callable(getattr(d, piece)):
            out.append(f"no {piece.replace('_', ' ')} ({piece})")
    for name, role in d.roles.items():
        if not isinstance(role, ParamRole):
            out.append(f"role {name!r} must be a ParamRole, got {type(role).__name__}")
        elif table.PARAM_ROLES.get(name, role) is not role:
            out.append(f"role {name!r} is already registered by another strategy")
        elif not callable(role.draw):
            out.append(f"role {name!r} has no test distribution (ParamRole.draw)")
    for spec in row.params:
        if spec.role not in d.roles and spec.role not in table.PARAM_ROLES:
            out.append(f"parameter {spec.name!r} has the role {spec.role!r}, which neither this strategy "
                       f"declares (roles) nor is registered")
    if row.kernel_family in STAGED_FAMILIES:
        if d.kernel_stage is None:
            out.append(f"no kernel stage (kernel_stage), which the {row.kernel_family!r} family needs")
    else:
        if d.kernel_stage is not None:
            out.append(f"a kernel stage, which the {row.kernel_family!r} family does not take")
        others = [s.name for s in table.STRATEGY_TABLE.values() if s.kernel_family == row.kernel_family]
        if others:
            out.append(f"the {row.kernel_family!r} family runs one strategy's math and already runs {others[0]!r}")
    return out


def register_strategy(definition: StrategyDefinition) -> None:
    """Fill every strategy table from ``definition`` (its row, roles, test distributions, stage
    math, decode math and kernel stage), all or nothing: a ``ValueError`` naming the strategy
    and every missing or inconsistent piece otherwise."""
    problems = _problems(definition)
    if problems:
        name = getattr(definition.row, "name", definition.row)
        raise ValueError(f"strategy {name!r} cannot be registered: " + "; ".join(problems))
    name = definition.row.name
    for role_name, role in definition.roles.items():
        table.PARAM_ROLES[role_name] = role
        table.DISTRIBUTIONS[role_name] = role.draw
    table.STAGE_MATH[name] = definition.stage_math
    table.DECODE_MATH[name] = definition.decode_math
    if definition.kernel_stage is not None:
        table.KERNEL_STAGES[name] = definition.kernel_stage
    table.STRATEGY_TABLE[name] = definition.row


def unregister_strategy(definition: StrategyDefinition) -> None:
    """Remove everything :func:`register_strategy` added for ``definition`` (a strategy under
    development; the built-in ones stay)."""
    name = definition.row.name
    if table.STRATEGY_TABLE.get(name) is not definition.row:
        raise ValueError(f"strategy {name!r} is not registered by this definition")
    for registry in (table.STRATEGY_TABLE, table.STAGE_MATH, table.DECODE_MATH, table.KERNEL_STAGES):
        registry.pop(name, None)
    for role_name in definition.roles:
        table.PARAM_ROLES.pop(role_name, None)
        table.DISTRIBUTIONS.pop(role_name, None)


@contextlib.contextmanager
def registered_strategy(definition: StrategyDefinition) -> Iterator[str]:
    """``with registered_strategy(d) as name:`` -- ``d`` registered inside the block, unregistered
    after it (tests of a strategy under development)."""
    register_strategy(definition)
    try:
        yield definition.row.name
    finally:
        unregister_strategy(definition)
