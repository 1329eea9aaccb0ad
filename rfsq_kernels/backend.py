"""Choosing between the fused Triton kernels and the pure-PyTorch reference."""
from __future__ import annotations

import os
import sys
from typing import Optional

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


def triton_imported_in_interpreter() -> Optional[bool]:
    """Whether the already-imported ``triton`` runs in the interpreter: Triton decides at import time
    (its own ``@triton.jit`` helpers become interpreter functions only when ``TRITON_INTERPRET=1`` was
    set then). None when ``triton.language`` is not imported yet (or cannot tell)."""
    standard = sys.modules.get("triton.language.standard")
    helper = getattr(standard, "cdiv", None)
    if helper is None:
        return None
    return type(helper).__name__ == "InterpretedFunction"


def check_interpreter_consistent() -> None:
    """Raise our explanation when ``TRITON_INTERPRET`` changed after ``triton`` was imported (Triton
    itself would fail with "0 active drivers" or "Cannot call @triton.jit'd outside of the scope of a
    kernel")."""
    imported = triton_imported_in_interpreter()
    if imported is None or imported == interpreter_enabled():
        return
    if interpreter_enabled():
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton was imported, so Triton is not in interpreter mode "
            "(it reads the variable once, at import). Set it before anything imports triton or rfsq_kernels' "
            "kernels: in the shell (TRITON_INTERPRET=1 python ...) or at the very top of the script")
    raise RuntimeError(
        "TRITON_INTERPRET was unset after triton was imported in interpreter mode (Triton reads it once, at "
        "import); restart the process without TRITON_INTERPRET to compile the kernels for the GPU")


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
        fused = z.is_cuda and triton_importable()
        if fused:
            check_interpreter_consistent()
        return fused
    if not triton_importable():
        raise RuntimeError("backend='triton' needs the `triton` package (pip install triton); "
                           "use backend='reference' or 'auto' without it")
    if not z.is_cuda and not interpreter_enabled():
        raise RuntimeError(
            f"backend='triton' runs on CUDA tensors, but z is on {z.device}; move z to a GPU, use "
            f"backend='auto'/'reference' for CPU tensors, or set TRITON_INTERPRET=1 before importing "
            f"triton to run the kernels in the (slow) Triton interpreter")
    check_interpreter_consistent()
    return True
