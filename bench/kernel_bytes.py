"""Bytes each fused launch reads and writes, counted by instrumenting the Triton interpreter.

    TRITON_INTERPRET=1 python -m bench.kernel_bytes --json out.json [--groups training]

Every ``tl.load`` / ``tl.store`` the interpreter executes adds ``(unmasked lanes) x (element
size)`` to a counter, so the count is what a launch requests from memory with no cache reuse
(a re-read of data an earlier pass touched counts again, although on a GPU it may hit L2).
Each case runs on ``--images`` images (default 1) and the counts are scaled to the case's batch:
every program of these kernels works on one image (or a tile of one), so bytes are exactly
linear in the batch -- once the split layernorm forward cuts each image as it would at the case's
real batch (its plan, :func:`rfsq_kernels.kernels.config.layernorm_split_plan`, depends on the
batch, and every program reads the partials of all programs of its image). Counts are also kept
per launch, in launch order (the split forward is K + 1 launches). ``bench/kernel_report.py``
runs this in a subprocess.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Dict, Iterator, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


@contextlib.contextmanager
def counting_memory() -> Iterator[Dict[str, int]]:
    """Count bytes loaded/stored by interpreted kernels while the block runs."""
    from triton.runtime.interpreter import InterpreterBuilder

    from triton.runtime.interpreter import InterpretedFunction

    counts = {"load": 0, "store": 0, "launches": []}
    load, store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store
    run = InterpretedFunction.run

    def nbytes(ptrs, mask) -> int:
        return int(mask.data.sum()) * (ptrs.get_element_ty().primitive_bitwidth // 8)

    def counted_load(self, ptrs, mask, *args, **kwargs):
        counts["load"] += nbytes(ptrs, mask)
        return load(self, ptrs, mask, *args, **kwargs)

    def counted_store(self, ptrs, value, mask, *args, **kwargs):
        counts["store"] += nbytes(ptrs, mask)
        return store(self, ptrs, value, mask, *args, **kwargs)

    def counted_run(self, *args, warmup=False, **kwargs):
        before = counts["load"], counts["store"]
        out = run(self, *args, warmup=warmup, **kwargs)
        if not warmup:  # one kernel launch: its own loads and stores
            counts["launches"].append([counts["load"] - before[0], counts["store"] - before[1]])
        return out

    InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store = counted_load, counted_store
    InterpretedFunction.run = counted_run
    try:
        yield counts
    finally:
        InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store = load, store
        InterpretedFunction.run = run


@contextlib.contextmanager
def split_plan_of_batch(batch: int) -> Iterator[None]:
    """Make the split layernorm forward plan its programs per image as for ``batch`` images,
    whatever batch it is given: a few images then cut exactly as the case's real batch does."""
    from rfsq_kernels.kernels import config

    plan = config.layernorm_split_plan
    config.layernorm_split_plan = lambda _batch, spatial, tiles: plan(batch, spatial, tiles)
    try:
        yield
    finally:
        config.layernorm_split_plan = plan


@contextlib.contextmanager
def tiles_of_arch(arch: Optional[int]) -> Iterator[None]:
    """Make the launchers choose the tiles they choose for ``sm_<arch>`` (None: the interpreter's,
    which are sm_80/90's) while the kernels still run in the interpreter: the layernorm tile policy
    depends on the target (``config.SMALL_ONE_TILE_ARCH``), and so do the launches and bytes."""
    from rfsq_kernels.kernels import config

    target = config.target_arch
    if arch is not None:
        config.target_arch = lambda _t: arch
    try:
        yield
    finally:
        config.target_arch = target


def case_bytes(case, images: int = 1, arch: Optional[int] = None) -> Dict[str, object]:
    """``{fwd_load, fwd_store, bwd_load, bwd_store}`` of one case, scaled to its batch, and
    ``fwd_launches`` / ``bwd_launches``: ``[load, store]`` of each launch, in launch order, with
    the tiles of ``sm_<arch>`` (:func:`tiles_of_arch`)."""
    from bench.cases import make_input
    from rfsq_kernels.kernels.launch import rfsq_backward_launch, rfsq_forward_launch
    from rfsq_kernels.reference import get_strategy

    small = type(case)(case.group, (images, *case.shape[1:]), case.levels, case.stages, case.strategy, case.dtype)
    z = make_input(small, torch.device("cpu"))
    k, c = case.stages, case.shape[1]
    # The initial parameters in kernel form (bytes do not depend on the values).
    params = tuple(p.kernel_form(torch.full(p.shape(k, c), p.initial_value(1.0)))
                   for p in get_strategy(case.strategy).params)
    levels = list(case.levels)
    with split_plan_of_batch(case.shape[0]), tiles_of_arch(arch):
        with counting_memory() as fwd:
            q, indices, mean, std = rfsq_forward_launch(z, levels, k, case.strategy, params)
        with counting_memory() as bwd:
            rfsq_backward_launch(torch.randn_like(q), z, levels, k, case.strategy, params, mean, std,
                                 indices=indices)
    factor = case.shape[0] / images
    out: Dict[str, object] = {}
    for d, counts in (("fwd", fwd), ("bwd", bwd)):
        out[f"{d}_load"], out[f"{d}_store"] = round(counts["load"] * factor), round(counts["store"] * factor)
        out[f"{d}_launches"] = [[round(ld * factor), round(st * factor)] for ld, st in counts["launches"]]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--groups", nargs="*", default=None)
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--arch", type=int, default=None, help="count with the tiles of sm_<arch> (default: sm_80/90's)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1 (bytes are counted in the interpreter)", file=sys.stderr)
        return 2
    from bench.cases import select_cases
    out = {case.name: case_bytes(case, args.images, args.arch) for case in select_cases(tiny=False, groups=args.groups)}
    Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
