"""Helpers for the vector-quantize-pytorch client-code tests: the interpreter's tanh as an autograd
function (to run the library's own math with the tanh the fused kernels use under the
interpreter), and the library's ResidualFSQ with its soft clamp taken out (to feed it an input
clamped with that tanh)."""
from __future__ import annotations

import copy

import numpy as np
import torch

from rfsq_kernels.backend import interpreter_enabled


def interp_tanh_values(z: torch.Tensor) -> torch.Tensor:
    """The interpreter's tanh (rfsq_kernels/kernels/fpmath.py), in NumPy float32 like the interpreter."""
    a = z.detach().cpu().numpy().astype(np.float32)
    e = np.exp(np.float32(-2.0) * np.abs(a))
    t = (np.float32(1.0) - e) / (np.float32(1.0) + e)
    return torch.from_numpy(np.where(a < 0, -t, t).astype(np.float32)).to(z.device)


class _InterpTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):
        t = interp_tanh_values(z)
        ctx.save_for_backward(t)
        return t

    @staticmethod
    def backward(ctx, g):
        (t,) = ctx.saved_tensors
        return g * (1.0 - t.double() * t.double()).float()  # 1 - t*t rounded once, like ATen's


def kernel_tanh(z: torch.Tensor) -> torch.Tensor:
    """``tanh`` as the fused kernels compute it here: the interpreter's fallback under
    ``TRITON_INTERPRET=1``, torch's (libdevice-equivalent) tanh on a GPU."""
    if z.is_cuda or not interpreter_enabled():
        return torch.tanh(z)
    return _InterpTanh.apply(z)


def library_with_kernel_tanh(monkeypatch) -> None:
    """Make the library's FSQ module use :func:`kernel_tanh` (it imports ``tanh`` from torch by name)."""
    import vector_quantize_pytorch.finite_scalar_quantization as lib_fsq

    monkeypatch.setattr(lib_fsq, "tanh", kernel_tanh)


def library_rfsq_core(lib: torch.nn.Module) -> torch.nn.Module:
    """A copy of the library's ResidualFSQ without projections and soft clamp: ``core(y)`` runs its
    stages on an already clamped ``y`` (and ``project_out`` when ``keep_project_out``)."""
    core = copy.deepcopy(lib)
    core.soft_clamp_input_value = None
    core.project_in = torch.nn.Identity()
    return core


def library_rfsq_with_kernel_tanh(lib: torch.nn.Module, x: torch.Tensor, **kw):
    """The library's ResidualFSQ forward on channel-last ``x`` with its soft clamp computed by
    :func:`kernel_tanh` (same operations otherwise)."""
    h = lib.project_in(x)
    c = lib.soft_clamp_input_value
    y = kernel_tanh(h / c) * c
    return library_rfsq_core(lib)(y, **kw)


def tanh_boundary_positions(x, levels, K):
    """Positions where some stage's pre-floor value (float64) lies within 4 ulp(max(|y|, 1)) of the
    soft-clamped input ``y``, amplified by the stage (``(L-1) / (2 s_k)``), of an integer, or its ``u_k`` that close to
    the clamp's edge ±1: there the two tanh may flip a digit or the gradient's pass-through."""
    lv = torch.tensor(levels, dtype=torch.float64)
    c = 1 + 1 / (lv - 1)
    r = torch.tanh(x.double() / c) * c
    # the interpreter's (1 - e)/(1 + e) tanh is off by up to ~1e-7 absolute (many ulp near 0)
    ulp = r.abs().clamp_min(1.0) * 2.0 ** -23
    near = torch.zeros(x.shape[:-1], dtype=torch.bool)
    for k in range(K):
        s = lv ** -k
        u = r / s
        near |= ((u.abs() - 1).abs() < 4 * ulp / s).any(-1)  # the clamp's pass-through edge
        v = u.clamp(-1, 1)
        b = (lv - 1) * (v + 1) / 2 + 0.5
        near |= ((b - b.round()).abs() < 4 * ulp * (lv - 1) / (2 * s)).any(-1)
        d = torch.floor(b)
        r = r - (2 / (lv - 1) * d - 1) * s
    return near
