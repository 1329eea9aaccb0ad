"""pytest-benchmark suite: RFSQ forward and forward+backward, every case x backend x mode.

Each test builds the backend, runs it on a fresh seeded input and gates its output against the
eager reference (bench/gate.py) before timing; a backend that disagrees fails with ``WRONG: ...``.
GPU timings synchronize inside the timed call. ``extra_info`` carries the byte floor, GB/s and the
percentage of the copy bandwidth measured in the same session.

    pytest bench --benchmark-only                  # time (GPU: full shapes; CPU: tiny shapes)
    pytest -q tests bench --benchmark-disable      # run everything once (CI / CPU)
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.backends import BACKENDS, FUSED_CPU_SKIP, skip_reason
from bench.cases import MODES, select_cases
from bench.timing import synchronized
from bench.workload import prepare

CASES = select_cases()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rfsq(benchmark, request: pytest.FixtureRequest, device: torch.device, case, backend: str, mode: str) -> None:
    """Gate, then time one (case, backend, mode)."""
    reason = skip_reason(backend, case, device, gate_only_ok=True)
    if reason:
        pytest.skip(reason)
    work = prepare(case, backend, mode, device)
    if not work.gate.ok:
        pytest.fail(f"WRONG: {backend} disagrees with the reference on {case.name} ({mode}): {work.gate.detail}")
    if backend == "fused" and device.type != "cuda":
        pytest.skip(f"gate passed in the Triton interpreter ({work.gate.detail}); not timed: {FUSED_CPU_SKIP}")
    copy_gbs = request.getfixturevalue("copy_gbs")
    benchmark.group = f"{case.name}-{mode}"
    benchmark.extra_info.update(
        dataclasses.asdict(case), case=case.name, backend=backend, mode=mode, device=str(device),
        gate=work.gate.detail, floor_bytes=work.floor_bytes, copy_gbs=round(copy_gbs, 2),
        floor_ms=work.floor_bytes / (copy_gbs * 1e9) * 1e3, bits_per_token=case.bits_per_token)
    benchmark(synchronized(work.call, device))
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        median_s = stats.stats.median
        gbs = work.floor_bytes / median_s / 1e9
        benchmark.extra_info.update(gbs=round(gbs, 3), pct_copy=round(100 * gbs / copy_gbs, 2))
