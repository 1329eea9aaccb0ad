"""Input checks shared by the reference and the fused path: every error names the argument."""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Tuple

import numpy as np
import torch


def check_stages(stages: int) -> int:
    """Return ``stages`` if it is an int >= 1; raise otherwise."""
    if isinstance(stages, bool) or not isinstance(stages, int):
        raise TypeError(f"stages must be an int >= 1, got {stages!r}")
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    return stages


def check_latent(z: torch.Tensor, channels: int, name: str = "z") -> None:
    """Check a channel-first latent ``(B, C, *spatial)`` with ``C == channels`` and a float dtype."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
    if not z.dtype.is_floating_point or z.is_complex():
        raise TypeError(
            f"{name} must be a real floating-point tensor (float32, bfloat16, float16 or float64), "
            f"got dtype {z.dtype}"
        )
    if not 3 <= z.ndim <= 5:
        raise ValueError(
            f"{name} must be channel-first (B, C, *spatial) with 1 to 3 spatial dims "
            f"(rank 3, 4 or 5), got shape {tuple(z.shape)}"
        )
    if z.shape[1] != channels:
        raise ValueError(
            f"{name} has {z.shape[1]} channels (dim 1 of shape {tuple(z.shape)}) but the quantizer "
            f"expects {channels} (one per entry of levels)"
        )


#: The float32 range in which a positive constant is usable: normal numbers only (a subnormal or an
#: underflow to 0 would be flushed / divide by zero on the device; above the max it is inf).
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # 1.1754944e-38
FLOAT32_MAX = float(np.finfo(np.float32).max)  # 3.4028235e+38
#: Smallest ``initial_scale``. Un-conditioning multiplies by ``1/a`` (docs/semantics.md, "Arithmetic
#: contract"), whose derivative ``-1/a**2`` overflows float32 below about 5e-20: the scale's gradient
#: would be inf, or NaN where every code is 0. 1e-18 keeps ``1/a**2 <= 1e36``.
MIN_INITIAL_SCALE = 1e-18


def check_positive_float32(value: float, name: str, meaning: str, low: float = FLOAT32_TINY) -> float:
    """Return ``value`` as a float if it is a real number in ``[low, FLOAT32_MAX]`` (by default the normal
    positive float32 numbers, about [1.2e-38, 3.4e38]); raise naming ``name``, what it is (``meaning``)
    and the range otherwise. ``1e-50`` is > 0 in Python but 0 in float32, in which the math runs."""
    if torch.compiler.is_compiling():
        # torch.compile(dynamic=True) traces a module's float attribute as a symbol, which Python's math
        # cannot test inside the graph; the value was checked when the module was built from a number
        # (a function such as rfsq_fused checks it in eager calls).
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number > 0, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0 ({meaning}), got {value!r}")
    if not low <= v <= FLOAT32_MAX:
        with np.errstate(over="ignore", under="ignore"):
            as32 = float(np.float32(v))
        raise ValueError(f"{name}={value!r} must lie in [{low:.8g}, {FLOAT32_MAX:.8g}] ({meaning}): it is used in "
                         f"float32, where it would be {as32!r}" + (" (a subnormal)" if 0 < as32 < FLOAT32_TINY else ""))
    return v


def check_eps(eps: float, name: str = "eps") -> float:
    """Return ``eps`` as a float if it is a number > 0 that float32 holds as a normal number; raise
    otherwise (a negative or zero layernorm epsilon turns ``sqrt(var + eps)`` into NaN for constant
    channels)."""
    return check_positive_float32(eps, name, "the layernorm variance epsilon")


def check_initial_scale(initial_scale: float, name: str = "initial_scale") -> float:
    """Return ``initial_scale`` as a float if ``a = softplus(p)`` can start at it in float32 (a normal
    positive float32 number); raise naming the range otherwise."""
    return check_positive_float32(initial_scale, name, "the 'scale' strategy's starting a_k = softplus(p_k)",
                                  low=MIN_INITIAL_SCALE)


def tracing() -> bool:
    """True while ``torch.compile`` traces: a value check must not read data back to the host there
    (it would break the graph, or fail under ``fullgraph=True``)."""
    return torch.compiler.is_compiling()


def require(ok: torch.Tensor, message: Callable[[], str], summary: str, exc: type = ValueError) -> None:
    """Raise ``exc(message())`` unless the 0-d bool tensor ``ok`` is True.

    Eager: one host sync, and ``message`` may read values to name them. While ``torch.compile``
    traces: ``torch._assert_async(ok, summary)`` instead (no sync, no graph break; a device-side
    assert on CUDA, a ``RuntimeError`` on CPU), so data-dependent checks never break the graph."""
    if tracing():
        torch._assert_async(ok, summary)
    elif not bool(ok):
        raise exc(message())


#: Accepted index ranks of the decoders that take ``(B, *spatial)`` indices (FSQ, LFQ, VQEMA): ``(B,)``
#: (from a ``(B, C)`` input) up to ``(B, T, H, W)``.
POSITION_RANKS = (1, 4)


def index_values(indices: torch.Tensor, name: str = "indices") -> torch.Tensor:
    """``indices`` of any integer dtype as int64, the one dtype every decoder unpacks (no host sync).

    Widening first is what makes every integer dtype decode the same: the sentinel test ``== -1``
    on a uint8 tensor would wrap -1 to 255 and read the valid index 255 as a dropped stage. Unsigned
    dtypes cannot hold the sentinel, and uint64 values of 2**63 and more become negative here, which
    the range check of :func:`check_indices` refuses."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor, got {type(indices).__name__}")
    if indices.dtype.is_floating_point or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int32/int64 as returned by the encoder; any integer "
                        f"dtype that holds the values is read exactly), got dtype {indices.dtype}; convert it "
                        f"with {name}.long() if it holds integer values")
    return indices.to(torch.int64)


def check_indices(
    indices: torch.Tensor,
    codebook_size: int,
    stages: Optional[int] = None,
    name: str = "indices",
    allow_sentinel: bool = False,
    ranks: Optional[Tuple[int, int]] = None,
    shape_hint: str = "(B, *spatial)",
) -> torch.Tensor:
    """Check codes handed to a decoder and return them as int64 (:func:`index_values`): the one
    validation and normalisation every decoder runs. Values must lie in ``[0, codebook_size - 1]``;
    when ``stages`` is given the shape is ``(B, *spatial, K=stages)`` with 1 to 3 spatial dims; when
    ``ranks = (lo, hi)`` is given, ``lo <= indices.ndim <= hi`` (``shape_hint`` names the shape).

    ``allow_sentinel`` also accepts ``-1`` (reserved for "no code": stages dropped or positions
    masked); an unsigned dtype cannot hold it, so there every value must be a real index. Any integer
    dtype is accepted (uint8 255 is index 255). The range check is one fused min/max reduction
    (:func:`require`: no host sync under ``torch.compile``), and only decoders call it."""
    unsigned = isinstance(indices, torch.Tensor) and not indices.dtype.is_floating_point \
        and not indices.is_complex() and indices.dtype != torch.bool and not indices.dtype.is_signed
    idx = index_values(indices, name)
    if stages is not None and not (3 <= idx.ndim <= 5 and idx.shape[-1] == stages):
        raise ValueError(f"{name} must have shape (B, *spatial, K={stages}) with 1 to 3 spatial dims (as returned "
                         f"by encode/forward), got {tuple(idx.shape)}")
    if ranks is not None and not ranks[0] <= idx.ndim <= ranks[1]:
        raise ValueError(f"{name} must have shape {shape_hint}, rank {ranks[0]} to {ranks[1]} (as returned by "
                         f"forward), got shape {tuple(idx.shape)} (rank {idx.ndim})")
    if idx.numel() == 0:
        return idx
    low = -1 if allow_sentinel and not unsigned else 0
    lo, hi = torch.aminmax(idx)

    def message() -> str:
        vlo, vhi = (int(v) for v in torch.stack([lo, hi]).tolist())
        sentinel = (f" (or [-1, {codebook_size - 1}]: -1 marks a dropped stage / masked position)"
                    if allow_sentinel else "")
        read = f" (read from {indices.dtype} as int64)" if indices.dtype != torch.int64 and vlo < 0 and unsigned else ""
        return (f"{name} must lie in [0, {codebook_size - 1}]{sentinel} (codebook_size = {codebook_size} codes per "
                f"stage), got values in [{vlo}, {vhi}]{read}: corrupted or produced by another quantizer?")

    # codebook_size may exceed int64 (2**63 codes): every int64 value is below it then
    ok = lo >= low if codebook_size > 2**63 - 1 else (lo >= low) & (hi < codebook_size)
    require(ok, message, f"{name} outside [{low}, {codebook_size - 1}] (corrupted or from another quantizer?)")
    return idx


def check_side(side: Optional[torch.Tensor], expected: Tuple[int, ...], required: bool) -> Optional[torch.Tensor]:
    """Check the side information of a decode and return it as float32: ``None`` (allowed unless
    ``required``) or a float tensor of shape ``expected`` = ``(B, K, 2, C)`` as returned by ``encode``
    (``C = 0`` when there are no statistics).

    ``encode``'s side is float32, and decode reproduces the forward bit for bit only from exactly
    those values, in float32 arithmetic: a float64 side is accepted when it holds float32 values (a
    lossless copy; it is read as float32, so the output dtype is decode's ``dtype``, not float64) and
    refused otherwise; a bfloat16/float16 side has lost their low bits and is refused."""
    if side is None:
        if required:
            raise ValueError(f"side must be the (B, K, 2, C) = {expected} statistics returned by encode, got None")
        return None
    if not isinstance(side, torch.Tensor) or not side.dtype.is_floating_point:
        raise TypeError(f"side must be a float tensor (B, K, 2, C) = {expected} as returned by encode, got "
                        f"{getattr(side, 'dtype', type(side).__name__)}")
    if tuple(side.shape) != tuple(expected):
        raise ValueError(f"side must be the (B, K, 2, C) = {expected} statistics returned by encode (B must match "
                         f"indices), got {tuple(side.shape)}")
    if side.numel() and side.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"side is {side.dtype}, but encode returns float32 statistics and decode reproduces the "
                        f"forward only from exactly those: a {side.dtype} copy has lost their low bits. Store side "
                        f"as float32 (or float64), as encode returned it")
    side32 = side.float()
    if side.dtype == torch.float64 and side.numel():
        exact = (side32.double() == side) | ~torch.isfinite(side)  # non-finite values: check_side_values
        require(exact.all(), lambda: (
            f"side is float64 and holds values that float32 does not represent exactly (e.g. "
            f"{float(side[~exact][0])!r}): encode's statistics are float32, so these are not encode's output and "
            f"decode could not reproduce the forward; pass side as encode returned it (float32)"),
            "side holds float64 values that are not float32 (not encode's float32 statistics)")
    return side32


def check_side_values(side: torch.Tensor) -> None:
    """Reject layernorm side information ``(B, K, 2, C)`` that no encoder produces: a non-finite mean or
    std, or a std <= 0 (``encode`` gives ``std = sqrt(var + eps) > 0``), as a corrupted bitstream would
    (one reduction and one host sync, on the decode path only)."""
    if side.numel() == 0:
        return
    mean, std = side[:, :, 0], side[:, :, 1]
    flags = torch.stack([torch.isfinite(mean).all(), torch.isfinite(std).all(), ~(std <= 0).any()])

    def message() -> str:
        what = [w for w, good in zip(("a non-finite mean (side[:, :, 0])", "a non-finite std (side[:, :, 1])",
                                      "a std <= 0 (side[:, :, 1])"), flags.tolist()) if not good]
        return (f"side holds {' and '.join(what)}: encode always gives a finite mean and a std > 0, so "
                f"this side information is corrupted (or comes from a diverged model whose statistics "
                f"overflowed float32)")

    require(flags.all(), message, "side holds a non-finite mean/std or a std <= 0: corrupted side information")


def check_call_tensors(z: torch.Tensor, levels, stages: int, spec, group, mask: Optional[torch.Tensor],
                       active_stages: Optional[torch.Tensor]) -> None:
    """The tensors one K-stage call reads, checked at its boundary by ``rfsq_forward``, ``rfsq_fused``
    and the custom ops (shapes, dtypes and devices only: no host sync, so ``torch.compile`` traces it).

    ``z``: a float channel-first latent with ``len(levels)`` channels; each tensor of ``group`` (the
    strategy ``spec``'s parameters in table order) a float tensor of its table shape on ``z``'s device;
    ``mask`` None or bool ``(B, *spatial)``; ``active_stages`` None or integer ``(B,)``, both on ``z``'s
    device. (Strides are the caller's business: the fused path makes parameters contiguous.)"""
    from .dropout import check_active_stages_layout, check_mask

    check_latent(z, len(levels))
    for p, value in zip(spec.params, group):
        if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
            raise TypeError(f"strategy={spec.name!r} needs {p.name} as a float tensor, got "
                            f"{getattr(value, 'dtype', type(value).__name__)}")
        want = p.shape(stages, len(levels))
        if tuple(value.shape) != want:
            raise ValueError(f"strategy={spec.name!r} needs {p.name} of shape {want}, got {tuple(value.shape)}")
        if value.device != z.device:
            raise ValueError(f"{p.name} is on {value.device} but z is on {z.device}: move the module (or the "
                             f"parameter) to z's device")
    check_mask(mask, z.shape[0], z.shape[2:], z.device)
    if active_stages is not None:
        check_active_stages_layout(active_stages, z.shape[0], z.device, name="active_stages")
