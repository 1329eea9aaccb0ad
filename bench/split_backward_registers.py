"""Registers and spill bytes of every split layernorm backward launch at the 8 cases that spilled or
sat at the register cap (bench/NOTES.md, 2026-12-02/03), compiled offline for the targets given
(default sm_90, sm_100, sm_80). Run without ``TRITON_INTERPRET``:

    python bench/split_backward_registers.py 90 100 80
"""
import sys

import torch

from rfsq_kernels.gpucheck.sweep import Case, sweep

L = "layernorm"


def lv(c, big):
    """Levels of ``c`` channels: 8 per channel gives int64 indices at C = 16, 3 gives int32."""
    return (8,) * c if big else (3,) * c


CASES = [
    Case("backward", L, 3, lv(5, 0), torch.float32, (2, 5, 96, 96)),
    Case("backward", L, 3, lv(16, 0), torch.float32, (2, 16, 96, 96)),
    Case("backward", L, 3, lv(16, 1), torch.float32, (2, 16, 96, 96)),
    Case("backward", L, 3, lv(5, 0), torch.bfloat16, (2**31 // (5 * 96 * 96) + 1, 5, 96, 96)),
    Case("backward", L, 8, lv(16, 0), torch.float32, (2, 16, 96, 96), True, True),
    Case("backward", L, 8, lv(5, 0), torch.float32, (2, 5, 96, 96), True, True),
    Case("backward", L, 8, lv(16, 1), torch.float32, (2, 16, 96, 96), True, True),
    Case("backward", L, 8, lv(16, 1), torch.float16, (2**31 // (16 * 96 * 96) + 1, 16, 96, 96)),
]


def main(archs) -> None:
    """Compile :data:`CASES` for each target and print one line per split-backward launch."""
    for arch in archs:
        res = sweep(arch, CASES)
        for case, msg in res.failures:
            print("FAIL", arch, case, msg[:300])
        for case, launch in res.launches:
            if "split" not in launch.kernel:
                continue
            r, c = launch.resources, launch.constexprs
            print(f"sm_{arch} {launch.kernel} PHASE={c.get('PHASE')} BLOCK_S={c.get('BLOCK_S')} regs={r.registers} "
                  f"spill={r.spill_bytes} grid={launch.grid[0]} cpu={res.compile_cpu_s[launch.hash]:.1f} | {case}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [80, 90, 100])
