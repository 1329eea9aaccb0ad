"""What a compiled kernel looks like: resource usage and SASS of its cubin, loads in its PTX.

Uses the NVIDIA tools bundled in the triton wheel (``triton/backends/nvidia/bin``).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Tuple

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


_BLOCK_LABEL = re.compile(r"^(?:(\$L__BB\w*):|//\s*%bb\.\d+:)\s*(?://\s*(.*))?$")
_JUMP = re.compile(r"^bra(?:\.uni)?\s+(\$L__BB\w*);")
#: Approximate float instructions libdevice's inlined ``tanhf`` may use (one each per call).
TANH_APPROX = ("ex2.approx", "rcp.approx")


def _opcode(line: str) -> str:
    text = line.strip()
    if text.startswith("@"):  # predicated: "@%p1 op ..."
        text = text.split(None, 1)[1] if " " in text else ""
    return text.split(None, 1)[0].rstrip(";") if text else ""


def approx_math(ptx: str) -> Dict[str, int]:
    """Approximate float instructions of a PTX listing (the arithmetic contract of docs/semantics.md).

    Returns ``{"outside": n, "in_tanh": n, "tanh_calls": n, <opcode>: n, ...}``: ``div.full``
    and every ``*.approx*`` instruction count as outside unless it is an ``ex2.approx`` /
    ``rcp.approx`` of libdevice's inlined ``tanhf``: in a basic block whose successor (its
    unconditional ``bra`` target, else the next block) is labelled ``__nv_tanhf``
    (``// %__nv_tanhf.exit``, tanh's join point; the large-|x| branch is the block that jumps or
    falls into it). ``tanh_calls`` counts those labels; each call may hold one of each.
    """
    blocks: List[Tuple[str, List[str]]] = [("", [])]  # (label name, lines)
    comments: Dict[str, str] = {}
    for line in ptx.splitlines():
        m = _BLOCK_LABEL.match(line.strip())
        if m:
            name = m.group(1) or f"fallthrough{len(blocks)}"
            comments[name] = m.group(2) or ""
            blocks.append((name, []))
        else:
            blocks[-1][1].append(line.strip())
    counts: Dict[str, int] = {"outside": 0, "in_tanh": 0,
                              "tanh_calls": sum("__nv_tanhf" in c for c in comments.values())}
    for i, (_name, lines) in enumerate(blocks):
        code = [text for text in lines if text and not text.startswith(("//", ".")) and not text.endswith(":")]
        jump = _JUMP.match(code[-1]) if code else None
        successor = jump.group(1) if jump else blocks[i + 1][0] if i + 1 < len(blocks) else ""
        in_tanh = "__nv_tanhf" in comments.get(successor, "")
        for text in code:
            op = _opcode(text)
            if not (op.startswith("div.full") or ".approx" in op):
                continue
            if in_tanh and op.startswith(TANH_APPROX):
                counts["in_tanh"] += 1
            else:
                counts["outside"] += 1
                counts[op] = counts.get(op, 0) + 1
    return counts
