"""The conditioning strategies of RFSQ: one module per strategy, one registration each.

Each module here (:mod:`.none`, :mod:`.scale`, :mod:`.layernorm`) declares its whole strategy as a
:class:`StrategyDefinition` ``STRATEGY``: its table row, parameter roles (with their test
distributions), stage math, decode math and kernel stage. :func:`register_strategy` checks it and
fills every table of :mod:`.table` (:data:`STRATEGY_TABLE`, :data:`PARAM_ROLES`,
:data:`DISTRIBUTIONS`, :data:`STAGE_MATH`, :data:`DECODE_MATH`, :data:`KERNEL_STAGES`); the
reference module, the fused glue and launchers, the offline compile check, the training CLI and
``bench/`` read those. Adding a strategy: docs/kernel-design.md, "How to add a strategy".
"""
from __future__ import annotations

from typing import Tuple

from . import layernorm, none, scale
from .layernorm import GAIN, SHIFT
from .registry import StrategyDefinition, register_strategy, registered_strategy, unregister_strategy
from .scale import SOFTPLUS_SCALE, scale_param_init, stage_scales
from .table import (
    DECODE_MATH,
    DISTRIBUTIONS,
    ELEMENTWISE,
    KERNEL_FAMILIES,
    KERNEL_STAGES,
    LAYERNORM,
    PARAM_ROLES,
    STAGE_MATH,
    STAGED_FAMILIES,
    STRATEGY_TABLE,
    ParamGroup,
    ParamRole,
    ParamSpec,
    StageContext,
    Strategy,
    get_strategy,
)

for _module in (none, scale, layernorm):
    register_strategy(_module.STRATEGY)

#: The built-in strategy names, in table order (CLI ``choices``, test and bench parametrization).
STRATEGIES: Tuple[str, ...] = tuple(STRATEGY_TABLE)
