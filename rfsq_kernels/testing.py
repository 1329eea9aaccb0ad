"""Random strategy parameters for tests and benchmarks (in the spirit of ``torch.testing``).

Freshly built modules hold their initial parameters (scale ``softplus(p_k) = initial_scale``, LN
weight 1, bias 0), where some gradients and some code paths are degenerate (``w = 1`` hides a
swapped weight/bias, equal stages hide a wrong stage index). Tests and benchmarks therefore draw
non-trivial parameters from here. The distribution of each parameter follows its
:class:`~rfsq_kernels.reference.ParamSpec` ``role``: the role's ``draw``, which the strategy module
that introduces the role declares (:data:`DISTRIBUTIONS`, filled by the strategy registration), so
a new strategy needs no change here. The built-in roles:

- ``softplus_scale`` (``p_k`` with ``a_k = softplus(p_k)``): ``p + 0.3 N(0, 1)``; ``a_k`` stays
  positive by construction and, around the default ``p = softplus^-1(1)``, within about
  ``[0.6, 1.5]`` at one sigma.
- ``gain`` (multiplies the normalized residual): ``w * U(0.6, 1.4)``, bounded away from 0 (the
  inverse transform divides by it) and with the sign of ``w``.
- ``shift`` (added to the normalized residual): ``b + 0.2 N(0, 1)``.

Pass a seeded ``torch.Generator`` for reproducible values (``bench/`` does); without one the
global RNG is used (the test suite seeds it per test).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn

from rfsq_kernels.reference.strategies import DISTRIBUTIONS, get_strategy

__all__ = ["DISTRIBUTIONS", "random_strategy_params", "randomize_"]


def _distribution(role: str) -> Callable[[Tensor, Optional[torch.Generator]], Tensor]:
    draw = DISTRIBUTIONS.get(role)
    if draw is None:
        raise ValueError(f"no random distribution for parameter role {role!r}; the strategy module that "
                         f"introduces the role declares it (ParamRole.draw)")
    return draw


def random_strategy_params(
    strategy: str,
    stages: int,
    channels: int,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    requires_grad: bool = False,
    initial_scale: float = 1.0,
) -> Dict[str, Tensor]:
    """Random learnable parameters of ``strategy`` for ``stages`` stages of ``channels`` channels,
    by name in table order: the keyword arguments of ``rfsq_forward`` / ``rfsq_fused``.

    Each value is drawn around the parameter's initial value (``initial_scale`` for the scale) with
    the distribution of its role (module docstring). Values are drawn in float32 and then cast to
    ``dtype``, so a float64 draw holds the same numbers as a float32 one from the same RNG state.
    ``requires_grad``: return leaf tensors that record gradients. ``{}`` for ``'none'``.
    """
    params: Dict[str, Tensor] = {}
    for spec in get_strategy(strategy).params:
        draw = _distribution(spec.role)
        base = torch.full(spec.shape(stages, channels), spec.initial_value(initial_scale), dtype=torch.float32)
        params[spec.name] = draw(base, generator).to(dtype).requires_grad_(requires_grad)
    return params


def randomize_(module: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Move every strategy parameter of an RFSQ ``module`` randomly away from its current value, in
    place (the distributions of :func:`random_strategy_params`, centred on the current values), and
    return the module. Other parameters (``dim`` projections) are left as they are.

    ``module`` must have ``strategy`` and ``strategy_parameters()`` (``rfsq_kernels.RFSQ`` and the
    reference ``RFSQ``).
    """
    roles: Dict[str, str] = {spec.name: spec.role for spec in get_strategy(module.strategy).params}
    with torch.no_grad():
        for name, param in module.strategy_parameters().items():
            base = param.detach().to("cpu", torch.float32)
            param.copy_(_distribution(roles[name])(base, generator))
    return module
