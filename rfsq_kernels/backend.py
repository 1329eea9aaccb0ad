"""Choosing between the fused Triton kernels and the pure-PyTorch reference."""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "reference")


def check_backend(backend: str) -> str:
    """Return ``backend`` if it is ``auto``, ``triton`` or ``reference``; raise otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1`` set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_importable() -> bool:
    """True when the ``triton`` package imports."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def use_fused(backend: str, z: torch.Tensor) -> bool:
    """Decide whether ``z`` goes through the fused kernels.

    ``auto``: CUDA tensors with Triton available; ``reference``: never; ``triton``: always, and a
    CPU tensor is an error unless the Triton interpreter is on.
    """
    if backend == "reference":
        return False
    if backend == "auto":
        return z.is_cuda and triton_importable()
    if not triton_importable():
        raise RuntimeError("backend='triton' needs the `triton` package (pip install triton); "
                           "use backend='reference' or 'auto' without it")
    if not z.is_cuda and not interpreter_enabled():
        raise RuntimeError(
            f"backend='triton' runs on CUDA tensors, but z is on {z.device}; move z to a GPU, use "
            f"backend='auto'/'reference' for CPU tensors, or set TRITON_INTERPRET=1 before importing "
            f"triton to run the kernels in the (slow) Triton interpreter")
    return True
