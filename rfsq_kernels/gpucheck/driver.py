"""A stand-in Triton driver: real compilation for a chosen NVIDIA target, launches recorded.

With ``offline_target(90)`` active, ``kernel[grid](...)`` specializes on its arguments as on a
GPU, compiles (TTIR -> PTX -> cubin with the bundled ``ptxas``) for ``sm_90`` and, instead of
launching, appends a :class:`Launch` to the driver's record. Tensors may live on ``meta`` (no
memory, so shapes whose offsets exceed 2**31 cost nothing); Triton only reads their dtype and
data pointer (0, i.e. 16-byte aligned, as CUDA allocations are).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Tuple

import torch
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.driver import ty_to_cpp
from triton.runtime import driver as triton_driver

from .binary import Resources, resources_of

#: Device properties reported to Triton (H100 SXM for sm_90; Triton only needs max_shared_mem).
_SHARED_MEM = {80: 166912, 90: 232448, 100: 232448}


@dataclass(frozen=True)
class Launch:
    """One recorded kernel launch: which binary, on which grid, with which constexprs."""

    kernel: str                      # kernel function name
    hash: str                        # Triton's hash of the compiled binary
    grid: Tuple[int, int, int]
    num_warps: int
    constexprs: Dict[str, Any]       # by parameter name (includes ints specialized to 1)
    signature: Dict[str, str]        # parameter name -> Triton type ("*bf16", "i32", "constexpr")
    attrs: Dict[str, Any]            # parameter name -> specialization attributes (divisibility)
    resources: Resources


@dataclass
class _Utils:
    """``driver.utils``: loading a binary only inspects it (no CUDA context)."""

    arch: int
    binaries: Dict[int, Resources] = field(default_factory=dict)

    def load_binary(self, name: str, cubin: bytes, shared: int, device: int):
        res = resources_of(cubin, self.arch)
        handle = len(self.binaries) + 1
        self.binaries[handle] = res
        return None, handle, res.registers, res.spill_bytes, 1024

    def get_device_properties(self, device: int) -> Dict[str, Any]:
        return {"max_shared_mem": _SHARED_MEM.get(self.arch, 232448), "multiprocessor_count": 132,
                "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": 1980000,
                "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    def unload_module(self, module) -> None:
        pass


class OfflineDriver:
    """Answers what Triton asks a driver for, for one target ``sm_<arch>``.

    The device id is the arch number, so each target gets its own per-device kernel caches in
    every ``JITFunction`` (switching targets never reuses another target's binaries).
    """

    def __init__(self, arch: int):
        self.arch = int(arch)
        self.utils = _Utils(self.arch)
        self.launches: List[Launch] = []

    @classmethod
    def is_active(cls) -> bool:
        return False

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self) -> int:
        return self.arch

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("meta")

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty_to_cpp(ty)

    def get_benchmarker(self):
        raise RuntimeError("the offline driver compiles only; nothing can be timed")

    def launcher_cls(self, src, metadata):
        """The callable Triton would launch with: here it records the launch."""
        names = list(src.fn.arg_names)
        constexprs = {names[path[0]]: value for path, value in src.constants.items() if len(path) == 1}
        attrs = {names[path[0]]: value for path, value in src.attrs.items() if len(path) == 1}

        def record(gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter_hook,
                   exit_hook, *args):
            self.launches.append(Launch(
                kernel=metadata.name, hash=metadata.hash, grid=(gx, gy, gz),
                num_warps=metadata.num_warps, constexprs=constexprs, signature=dict(src.signature),
                attrs=attrs,
                resources=self.utils.binaries[function]))

        return record


@contextlib.contextmanager
def offline_target(arch: int) -> Iterator[OfflineDriver]:
    """Make Triton compile for ``sm_<arch>`` and record launches while the block runs."""
    drv = OfflineDriver(arch)
    previous = getattr(triton_driver, "_active", None)  # None on a machine without a GPU driver
    triton_driver.set_active(drv)
    try:
        yield drv
    finally:
        triton_driver.set_active(previous)
