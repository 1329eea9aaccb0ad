"""Did a refactor change the compiled code? Compare two ``python -m rfsq_kernels.gpucheck --json`` files.

    python bench/compare_binaries.py before.json after.json [--common]

A binary is identified by what the launcher chose, not by its hash (the hash covers the Python
source, so moving a jit function changes it): target, kernel name, ``num_warps``, the constexprs
(a constexpr jit function by its bare name: a moved helper keeps its identity), the input and
index dtypes, and the first sweep case that launched it. For each binary present in both files the registers, spill bytes, SASS
instruction count and digest, and approximate-math counts must be equal. Exit status 0 when
every binary is identical and no binary is missing from either side (with ``--common``: binaries
on one side only are counted, not failed -- a targeted run against a full baseline); 1 otherwise,
with the differences listed.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Dict, List, Tuple

#: The per-binary columns that must not change.
COLUMNS = ("registers", "spill_bytes", "sass_instructions", "sass_sha256", "approx", "fp_fusion")
_JIT = re.compile(r"JITFunction\((?:[\w.]+:)?(\w+)\)")


def _bare(value):
    """A constexpr as a comparable value: ``JITFunction(pkg.mod:name)`` -> ``name``."""
    return _JIT.sub(r"\1", value) if isinstance(value, str) else value


def binary_key(rec: dict) -> Tuple:
    """What identifies one binary across source moves."""
    consts = tuple(sorted((k, _bare(v)) for k, v in rec["constexprs"].items()))
    # the first sweep case that launched it tells apart binaries that differ only in argument
    # specialization (16-divisible sizes and strides); the sweep's order is fixed
    return rec["arch"], rec["kernel"], rec["num_warps"], consts, rec["x_dtype"], rec["index_dtype"], rec["case"]


def load(path: str) -> Dict[Tuple, dict]:
    """The binaries of one ``--json`` file by :func:`binary_key`."""
    with open(path) as f:
        return {binary_key(b): b for b in json.load(f)["binaries"]}


def compare(before: Dict[Tuple, dict], after: Dict[Tuple, dict], common: bool = False) -> List[str]:
    """One line per difference (missing binaries unless ``common``, changed columns)."""
    out = []
    if not common:
        out += [f"- only before: {key}" for key in sorted(set(before) - set(after), key=str)]
        out += [f"- only after: {key}" for key in sorted(set(after) - set(before), key=str)]
    for key in sorted(set(before) & set(after), key=str):
        b, a = before[key], after[key]
        for col in COLUMNS:
            if col not in b or col not in a:
                out.append(f"- {col} missing in {'before' if col not in b else 'after'}: {key}")
            elif b[col] != a[col]:
                out.append(f"- {col} {b[col]} -> {a[col]}: {key}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--common", action="store_true", help="compare the binaries both files hold; count the others")
    args = p.parse_args(argv)
    before, after = load(args.before), load(args.after)
    diffs = compare(before, after, args.common)
    kernels = sorted({k[1] for k in after})
    print(f"{len(before)} binaries before, {len(after)} after, {len(set(before) & set(after))} in both "
          f"({', '.join(kernels)})")
    if diffs:
        print(f"{len(diffs)} differences:")
        print("\n".join(diffs))
        return 1
    print("identical: registers, spills, SASS (count and digest), approximate math, FP fusion of every binary")
    return 0


if __name__ == "__main__":
    sys.exit(main())
