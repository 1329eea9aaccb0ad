"""Did a refactor change the compiled code? Compare two ``python -m rfsq_kernels.gpucheck --json`` files.

    python bench/compare_binaries.py before.json after.json [--common] [--pair-defaults]

A binary is identified by what the launcher chose, not by its hash (the hash covers the Python
source, so moving a jit function changes it): target, kernel name, ``num_warps``, the constexprs
(a constexpr jit function by its bare name: a moved helper keeps its identity), the input and
index dtypes, and the first sweep case that launched it. For each binary present in both files
the registers, spill bytes, SASS instruction count and digest, and approximate-math counts must
be equal. Exit status 0 when every binary is identical and no binary is missing from either side
(with ``--common``: binaries on one side only are counted, not failed -- a targeted run against a
full baseline); 1 otherwise, with the differences listed.

``--pair-defaults``: a refactor that adds a constexpr (the vq kernels' ``GROUPED``, default
``False``) gives every "after" binary a constexpr that no "before" binary has, so no key matches.
With this flag a binary left unmatched on one side is paired with the unmatched binary on the
other side whose key differs only by constexprs, present on one side alone, at their default
value -- ``False`` or ``None`` (the records carry no kernel signatures, so these stand for the
argument's default; ``0`` is not assumed, it is a real tile or stage value). A binary with two
such partners stays unpaired (reported as missing). Works with and without ``--common``.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from typing import Dict, Iterable, List, Tuple

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


_CONSTS = 3  # where the constexprs sit in a binary_key


def _is_default(value) -> bool:
    # identity, not ==: 0 == False, and a 0 constexpr is a real value, not an absent argument
    return value is False or value is None


def _rest(key: Tuple) -> Tuple:
    """A key without its constexprs."""
    return key[:_CONSTS] + key[_CONSTS + 1:]


def _only_defaults_apart(b: Tuple, a: Tuple) -> bool:
    """Do two keys with equal :func:`_rest` differ only by constexprs that one side alone has, at
    their default value?"""
    cb, ca = dict(b[_CONSTS]), dict(a[_CONSTS])
    return (all(cb[k] == ca[k] for k in cb.keys() & ca.keys())
            and all(_is_default(v) for k, v in (*cb.items(), *ca.items()) if k not in cb.keys() & ca.keys()))


def _unique_partners(keys: Iterable[Tuple], others: Iterable[Tuple]) -> Dict[Tuple, Tuple]:
    """``key -> other`` for each key with exactly one partner among ``others``."""
    by_rest = defaultdict(list)
    for other in others:
        by_rest[_rest(other)].append(other)
    out = {}
    for key in keys:
        partners = [o for o in by_rest[_rest(key)] if _only_defaults_apart(key, o)]
        if len(partners) == 1:
            out[key] = partners[0]
    return out


def pairs(before: Dict[Tuple, dict], after: Dict[Tuple, dict],
          pair_defaults: bool = False) -> List[Tuple[Tuple, Tuple]]:
    """``(before key, after key)`` of the binaries both sides hold: equal keys, and with
    ``pair_defaults`` the unmatched keys whose only difference is a one-sided default constexpr
    (each side's partner unique)."""
    out = [(key, key) for key in sorted(set(before) & set(after), key=str)]
    if pair_defaults:
        only_b, only_a = set(before) - set(after), set(after) - set(before)
        forward, backward = _unique_partners(only_b, only_a), _unique_partners(only_a, only_b)
        out += sorted(((b, a) for b, a in forward.items() if backward.get(a) == b), key=str)
    return out


def compare(before: Dict[Tuple, dict], after: Dict[Tuple, dict], common: bool = False,
            pair_defaults: bool = False) -> List[str]:
    """One line per difference (missing binaries unless ``common``, changed columns); binaries
    paired as :func:`pairs` says."""
    out = []
    paired = pairs(before, after, pair_defaults)
    if not common:
        seen_b, seen_a = {b for b, _ in paired}, {a for _, a in paired}
        out += [f"- only before: {key}" for key in sorted(set(before) - seen_b, key=str)]
        out += [f"- only after: {key}" for key in sorted(set(after) - seen_a, key=str)]
    for bkey, akey in paired:
        b, a = before[bkey], after[akey]
        key = akey if bkey == akey else f"{akey} (paired with before {dict(bkey[_CONSTS])})"
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
    p.add_argument("--pair-defaults", action="store_true",
                   help="pair binaries whose keys differ only by a one-sided constexpr at False/None")
    args = p.parse_args(argv)
    before, after = load(args.before), load(args.after)
    diffs = compare(before, after, args.common, args.pair_defaults)
    kernels = sorted({k[1] for k in after})
    print(f"{len(before)} binaries before, {len(after)} after, {len(pairs(before, after, args.pair_defaults))} in both "
          f"({', '.join(kernels)})")
    if diffs:
        print(f"{len(diffs)} differences:")
        print("\n".join(diffs))
        return 1
    print("identical: registers, spills, SASS (count and digest), approximate math, FP fusion of every binary")
    return 0


if __name__ == "__main__":
    sys.exit(main())
