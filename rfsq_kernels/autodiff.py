"""What the fused custom ops do about autodiff beyond reverse mode (shared by :mod:`rfsq_kernels.fused`
and :mod:`rfsq_kernels.vqpytorch.fused`).

The ops implement reverse mode only. Forward-mode AD and ``torch.func`` transforms go through
the op's reference instead (:func:`needs_reference_autodiff`: same values and straight-through
derivatives); differentiating a backward op (double backward) raises one clear error
(:func:`forbid_double_backward`). What the ops save for the backward goes through :func:`saveable`,
so inputs made under ``torch.inference_mode()`` train too.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor


def needs_reference_autodiff(*tensors: Optional[Tensor]) -> bool:
    """True when a forward-mode tangent or a ``torch.func`` transform (jvp, grad, vmap, ...) is active:
    the custom op implements reverse mode only, so those go through the reference, whose autodiff
    gives the same straight-through derivatives (the kernels would give a zero tangent or fail).
    Under ``torch.compile`` tracing the op is kept."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active():
        return True
    return any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def saveable(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` as autograd can save it: a tensor made under ``torch.inference_mode()`` cannot be saved
    for backward, so it is copied (only then) into a normal tensor."""
    return t.clone() if t is not None and t.is_inference() else t


def forbid_double_backward(backward_op, kernels: str, instead: str) -> None:
    """Register on ``backward_op`` (a ``torch.library.custom_op``) an autograd formula that raises:
    its outputs carry a graph under ``create_graph=True``, and differentiating them says what to
    do (``instead``) rather than PyTorch's "no autograd formula was registered"."""
    def no_double_backward(ctx, *grads):
        raise RuntimeError(
            f"double backward (a gradient of a gradient: create_graph=True, torch.func.hessian, ...) through the "
            f"fused {kernels} is not implemented; use {instead}, whose straight-through gradient is differentiable")

    backward_op.register_autograd(no_double_backward, setup_context=lambda ctx, inputs, output: None)
