"""What a compiled kernel looks like: resource usage and SASS of its cubin, loads in its PTX.

Uses the NVIDIA tools bundled in the triton wheel (``triton/backends/nvidia/bin``).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import List, Tuple

import triton

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_SASS_ADDR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", re.M)


@dataclass(frozen=True)
class Resources:
    """Per-thread registers, spill frame (stack + local bytes per thread), static shared bytes."""

    registers: int
    stack_bytes: int
    shared_bytes: int
    local_bytes: int

    @property
    def spill_bytes(self) -> int:
        """Local-memory bytes per thread. The kernels declare no local arrays, so any local
        memory is register spilling (ptxas reports it as spill stores)."""
        return self.stack_bytes + self.local_bytes


def _tool_on_cubin(tool: str, args: List[str], cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([os.path.join(_BIN, tool), *args, f.name], check=True,
                             capture_output=True, text=True)
    return out.stdout


def resources_of(cubin: bytes, arch: int) -> Resources:
    """Resource usage of the (single) kernel in ``cubin`` (``cuobjdump --dump-resource-usage``)."""
    m = _USAGE.search(_tool_on_cubin("cuobjdump", ["--dump-resource-usage"], cubin))
    if m is None:
        raise RuntimeError("cuobjdump printed no resource usage for the kernel")
    return Resources(*(int(v) for v in m.groups()))


def sass_listing(cubin: bytes) -> List[Tuple[int, str]]:
    """The kernel's SASS as ``(address, instruction)``, e.g. ``(0x40, "FFMA R4, R2, R3, R4")``."""
    return [(int(a, 16), ins) for a, ins in _SASS_ADDR.findall(_tool_on_cubin("cuobjdump", ["-sass"], cubin))]


def sass_instructions(cubin: bytes) -> List[str]:
    """The kernel's SASS instructions (one string each, e.g. ``FFMA R4, R2, R3, R4``)."""
    return [ins for _a, ins in sass_listing(cubin)]


def sass_loops(listing: List[Tuple[int, str]]) -> List[Tuple[int, int]]:
    """Loops of a SASS listing as ``(first, last)`` instruction indices, one per backward branch
    (``BRA`` to a lower address; the trailing self-branch that pads a kernel is not a loop)."""
    index = {addr: i for i, (addr, _ins) in enumerate(listing)}
    loops = []
    for i, (addr, ins) in enumerate(listing):
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", ins)
        if m and m.group(1) is not None:
            target = int(m.group(1), 16)
            if target < addr and target in index:
                loops.append((index[target], i))
    return loops


_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+\d+")
_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', re.M)


def ptx_by_source(ptx: str) -> List[Tuple[str, int, str]]:
    """PTX instructions with the Python source line they were generated from, as
    ``(file, line, instruction)`` (from the ``.loc`` line info Triton emits)."""
    files = {int(i): path for i, path in _FILE.findall(ptx)}
    out, where = [], ("", 0)
    for raw in ptx.splitlines():
        m = _LOC.match(raw)
        if m:
            where = (files.get(int(m.group(1)), ""), int(m.group(2)))
            continue
        text = raw.strip()
        if text and not text.startswith((".", "//", "{", "}", ")", "$")) and not text.endswith(":"):
            out.append((where[0], where[1], text))
    return out


def coherence_problems(ptx: str, sass: List[str], barrier_lines: List[Tuple[str, int]]) -> List[str]:
    """What breaks in-program communication through global memory.

    A program that writes a buffer and reads it back from other threads (layernorm statistics,
    the backward's ``G`` scratch) needs coherent loads -- ``ld.global.nc`` / ``LDG.E.CONSTANT``
    go through the non-coherent texture path and may return stale data -- and a barrier
    between writer and reader: some ``bar.sync`` must come from one of ``barrier_lines`` (the
    ``tl.debug_barrier()`` calls). Returns one message per problem.
    """
    problems = []
    ops = ptx_by_source(ptx)
    nc = [f"{os.path.basename(f)}:{n}: {op}" for f, n, op in ops if op.split()[0].startswith("ld.global.nc")
          or " ld.global.nc" in op]
    if nc:
        problems.append(f"{len(nc)} non-coherent PTX loads, e.g. {nc[0]}")
    constant = [ins for ins in sass if ins.split()[0].startswith("LDG") and ".CONSTANT" in ins.split()[0]]
    if constant:
        problems.append(f"{len(constant)} non-coherent SASS loads, e.g. {constant[0]}")
    wanted = {(os.path.realpath(f), n) for f, n in barrier_lines}
    barriers = [op for f, n, op in ops if (os.path.realpath(f), n) in wanted and "bar" in op.split()[0]]
    if not barriers:
        problems.append("no barrier instruction comes from the tl.debug_barrier() lines "
                        + ", ".join(f"{os.path.basename(f)}:{n}" for f, n in barrier_lines))
    return problems
