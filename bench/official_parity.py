"""How close ``from_official`` + ``fsq_shift='tan'`` comes to the official RFSQ math (issue 30,
item 4): over seeds and the two paper configurations, counts index flips and measures the largest
value and input-gradient differences in float32 ulp of the image's largest magnitude, against the
re-implementation in ``tests/official_rfsq.py``. Numbers are quoted in docs/semantics.md.

Run: ``python bench/official_parity.py [seeds]`` (reference path, CPU).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import test_official as T  # noqa: E402

EPS = torch.finfo(torch.float32).eps


def measure(strategy: str, seeds: int) -> dict:
    flips = total = 0
    q_ulp = g_ulp = 0.0
    for seed in range(seeds):
        for K, levels in T.CASES:
            _, (q1, i1, gz1, _), (q2, i2, gz2, _) = T._check_against_official(strategy, K, levels, seed)
            differ = i1 != i2
            flips += int((differ & (differ.int().cumsum(-1) == 1)).sum())
            total += i1.numel()
            clean = ~differ.flatten(1).any(1)
            if clean.any():
                q_ulp = max(q_ulp, float((q2 - q1)[clean].abs().max() / (EPS * q1[clean].abs().max())))
                g_ulp = max(g_ulp, float((gz2 - gz1)[clean].abs().max() / (EPS * gz1[clean].abs().max())))
    return dict(strategy=strategy, flips=flips, indices=total, max_value_ulp=round(q_ulp, 2),
                max_grad_ulp=round(g_ulp, 2))


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    for strategy in ("none", "scale", "layernorm"):
        print(measure(strategy, n), flush=True)
