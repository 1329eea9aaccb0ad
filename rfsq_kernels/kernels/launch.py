"""The fused kernels' entry points: run the kernel family the strategy table names.

``Strategy.kernel_family`` picks the file: ``layernorm`` (one program per image, per-image
statistics) or ``elementwise`` (one program per image tile). The strategy's parameters arrive as
one group in table order (kernel form: ``ParamSpec.kernel_form``, e.g. ``a = softplus(p)``) and
go to the family as that group; parameter gradients come back as a group in the same order.
Each family is a :class:`KernelFamily`: three launchers with declared signatures, and the
strategy's kernel stage for the families generic over it (:func:`kernel_stage`).
Design: ``docs/kernel-design.md``.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ..reference import get_strategy
from ..reference.strategies import KERNEL_FAMILIES, KERNEL_STAGES, STAGED_FAMILIES
from . import elementwise, layernorm, layouts

Outputs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
#: ``(grad_z, parameter gradients in table order)``.
Gradients = Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]

#: The arguments every family's ``forward`` / ``backward`` takes first, in this order.
FORWARD_ARGS = ("z", "levels", "stages", "params", "mask", "active_stages", "fsq_shift")
BACKWARD_ARGS = ("grad_q", *FORWARD_ARGS)


@dataclass(frozen=True)
class KernelFamily:
    """What :mod:`.launch` calls of a kernel family (``rfsq_kernels/kernels/<family>.py``), and
    exactly the arguments each function takes, none of them ignored:

    - ``forward_outputs(z, levels, stages) -> (quantized, indices, mean, std)``, uninitialised;
    - ``forward(*FORWARD_ARGS, *forward_inputs) -> (quantized, indices, mean, std)``;
    - ``backward(*BACKWARD_ARGS, *backward_inputs) -> (grad_z, grad_params)``.

    The family's own inputs come last: ``stage`` (the strategy's kernel stage, an instance of
    ``stage_type``) for a family generic over the strategy, ``eps`` (forward) and the saved
    ``mean``, ``std``, ``indices`` (backward) for one with per-image statistics. The signatures
    are checked when the family is declared."""

    forward_outputs: Callable[..., Outputs]
    forward: Callable[..., Outputs]
    backward: Callable[..., Gradients]
    forward_inputs: Tuple[str, ...]
    backward_inputs: Tuple[str, ...]
    stage_type: Optional[type] = None  # None: the family runs one strategy's math, no stage

    def __post_init__(self):
        for fn, want in ((self.forward_outputs, ("z", "levels", "stages")),
                         (self.forward, (*FORWARD_ARGS, *self.forward_inputs)),
                         (self.backward, (*BACKWARD_ARGS, *self.backward_inputs))):
            got = tuple(inspect.signature(fn).parameters)
            if got != want:
                raise TypeError(f"{fn.__module__}.{fn.__qualname__} takes {got}, the family interface {want}")
        if (self.stage_type is not None) != ("stage" in self.forward_inputs and "stage" in self.backward_inputs):
            raise TypeError("a family with a stage_type takes its stage as the input 'stage', and only then")


#: The kernel families by ``Strategy.kernel_family`` (the reference's ``KERNEL_FAMILIES``).
FAMILIES: Dict[str, KernelFamily] = {
    "elementwise": KernelFamily(elementwise.forward_outputs, elementwise.forward, elementwise.backward,
                                forward_inputs=("stage",), backward_inputs=("stage",),
                                stage_type=elementwise.ElementwiseStage),
    "layernorm": KernelFamily(layernorm.forward_outputs, layernorm.forward, layernorm.backward,
                              forward_inputs=("eps",), backward_inputs=("mean", "std", "indices")),
}
if (set(FAMILIES) != set(KERNEL_FAMILIES)
        or set(STAGED_FAMILIES) != {n for n, f in FAMILIES.items() if f.stage_type is not None}):
    raise ImportError(f"the kernel families {sorted(FAMILIES)} do not match the reference's {KERNEL_FAMILIES} "
                      f"(those taking a stage: {STAGED_FAMILIES})")


def _family(strategy: str) -> KernelFamily:
    return FAMILIES[get_strategy(strategy).kernel_family]


@functools.lru_cache(maxsize=None)
def _import_stage(path: str) -> object:
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def kernel_stage(strategy: str) -> object:
    """The kernel stage ``strategy``'s module declared (imported on first use when given as a
    ``"module:attribute"`` path); a ``ValueError`` naming the strategy when it cannot be had."""
    family = _family(strategy)
    declared = KERNEL_STAGES.get(strategy)
    if declared is None:
        raise ValueError(f"strategy {strategy!r} declares no kernel stage, which its family needs")
    try:
        stage = _import_stage(declared) if isinstance(declared, str) else declared
    except (ImportError, AttributeError) as e:
        raise ValueError(f"strategy {strategy!r}: its kernel stage {declared!r} cannot be imported ({e})") from e
    if not isinstance(stage, family.stage_type):
        raise ValueError(f"strategy {strategy!r}: its kernel stage {declared!r} has the type "
                         f"{type(stage).__name__}; its family takes {family.stage_type.__name__}")
    return stage


def _inputs(strategy: str, names: Tuple[str, ...], **available) -> dict:
    """The family's own inputs by name, from what the launcher has (``stage`` resolved here)."""
    return {n: kernel_stage(strategy) if n == "stage" else available[n] for n in names}


def _no_positions(z: torch.Tensor) -> bool:
    """An empty batch or zero spatial extent: nothing to launch, every output is zeros. Handled
    here once, so the family launchers always see at least one position."""
    return z.shape[0] == 0 or math.prod(z.shape[2:]) == 0


def forward_outputs(z: torch.Tensor, levels: Sequence[int], stages: int, strategy: str) -> Outputs:
    """Uninitialised ``(quantized, indices, mean, std)`` with the reference's shapes and dtypes
    (shared by the launcher and the fake/meta implementation); mean/std are empty ``(0,)``
    tensors for strategies without per-image statistics."""
    return _family(strategy).forward_outputs(z, levels, stages)


def rfsq_forward_launch(
    z: torch.Tensor,
    levels: Sequence[int],
    stages: int,
    strategy: str,
    params: Sequence[torch.Tensor] = (),
    eps: float = 1e-5,
    mask: Optional[torch.Tensor] = None,
    active_stages: Optional[torch.Tensor] = None,
    fsq_shift: str = "atanh",
) -> Outputs:
    """Run the fused K-stage forward; returns ``(quantized, indices, mean, std)`` like
    :func:`rfsq_kernels.reference.rfsq_forward` (``mask`` ``(B, *spatial)`` bool and
    ``active_stages`` ``(B,)`` int32 included: one launch serves any mix of per-sample counts).

    ``params``: the strategy's parameter group in table order and kernel form (for ``'scale'``
    ``(a,)`` with ``a = softplus(scale_param)`` ``(K,)`` float32; for ``'layernorm'``
    ``(ln_weight, ln_bias)``, ``(K, C)``). ``fsq_shift``: ``'atanh'`` or the official code's ``'tan'``.
    """
    if _no_positions(z):
        return tuple(t.zero_() for t in forward_outputs(z, levels, stages, strategy))
    family = _family(strategy)
    return family.forward(z, levels, stages, tuple(params), mask, active_stages, fsq_shift,
                          **_inputs(strategy, family.forward_inputs, eps=eps))


def backward_outputs(z: torch.Tensor, stages: int, strategy: str, params: Sequence[torch.Tensor]) -> Gradients:
    """Uninitialised ``(grad_z, grad_params)``, ``grad_params`` shaped like ``params``. Shared
    with the fake implementation."""
    return layouts.new_output(z), tuple(torch.empty_like(p) for p in params)


def rfsq_backward_launch(
    grad_q: torch.Tensor,
    z: torch.Tensor,
    levels: Sequence[int],
    stages: int,
    strategy: str,
    params: Sequence[torch.Tensor] = (),
    mean: Optional[torch.Tensor] = None,
    std: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    active_stages: Optional[torch.Tensor] = None,
    fsq_shift: str = "atanh",
    indices: Optional[torch.Tensor] = None,
) -> Gradients:
    """Gradients ``(grad_z, grad_params)`` of ``sum(grad_q * quantized)``, ``grad_params`` in the
    order of ``params`` (kernel form: for ``'scale'`` d/da; autograd applies the softplus
    derivative). ``mean``/``std`` are the forward's saved statistics and ``indices`` its packed
    indices (per-image strategies: the backward rebuilds the stages' residuals from them).
    ``grad_q`` may have any strides (an expanded stride-0 gradient is read in place).
    """
    params = tuple(params)
    if _no_positions(z):
        grad_z, grad_params = backward_outputs(z, stages, strategy, params)
        return grad_z.zero_(), tuple(g.zero_() for g in grad_params)
    family = _family(strategy)
    return family.backward(grad_q, z, levels, stages, params, mask, active_stages, fsq_shift,
                           **_inputs(strategy, family.backward_inputs, mean=mean, std=std, indices=indices))
