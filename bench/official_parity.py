"""How close ``from_official`` + ``fsq_shift='tan'`` comes to the official RFSQ math (issue 30,
item 4): over seeds and the two paper configurations, counts index flips and measures the largest
value and input-gradient differences in float32 ulp of the image's largest magnitude, against the
re-implementation in ``tests/official_rfsq.py``. Numbers are quoted in docs/semantics.md.

Run: ``python bench/official_parity.py [seeds]`` (reference path, CPU; one line per strategy).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

if __package__ in (None, ""):  # run as a script: make ``bench`` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import gpu_env  # noqa: E402

gpu_env.use_checkout()  # the checkout's rfsq_kernels and tests/ (official_rfsq) on sys.path

import torch  # noqa: E402

from official_rfsq import CASES, check_against_official  # noqa: E402

EPS = torch.finfo(torch.float32).eps
STRATEGIES = ("none", "scale", "layernorm")


def measure(strategy: str, seeds: int) -> dict:
    """Index flips (first differing stage of a position) and, over the images without a flip, the
    largest value and input-gradient differences in ulp, over ``seeds`` seeds of every case."""
    flips = total = 0
    q_ulp = g_ulp = 0.0
    for seed in range(seeds):
        for K, levels in CASES:
            _, (q1, i1, gz1, _), (q2, i2, gz2, _) = check_against_official(strategy, K, levels, seed)
            differ = i1 != i2
            flips += int((differ & (differ.int().cumsum(-1) == 1)).sum())
            total += i1.numel()
            clean = ~differ.flatten(1).any(1)
            if clean.any():
                q_ulp = max(q_ulp, float((q2 - q1)[clean].abs().max() / (EPS * q1[clean].abs().max())))
                g_ulp = max(g_ulp, float((gz2 - gz1)[clean].abs().max() / (EPS * gz1[clean].abs().max())))
    return dict(strategy=strategy, flips=flips, indices=total, max_value_ulp=round(q_ulp, 2),
                max_grad_ulp=round(g_ulp, 2))


def main(argv: Optional[List[str]] = None) -> int:
    """Print :func:`measure` of every strategy, one dict per line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("seeds", nargs="?", type=int, default=20, help="seeds per case (default 20)")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("seeds must be at least 1")
    for strategy in STRATEGIES:
        print(measure(strategy, args.seeds), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
