"""Timers and the copy-bandwidth ceiling.

GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed before each repetition, median). The
timed function synchronizes first (:func:`host_inclusive`), so the start event cannot be recorded
while the CPU is still ahead of the GPU: launch and Python overhead between the events is counted,
as it is in a training step. CPU: ``time.perf_counter`` medians after warm-up; these are not GPU
numbers. Copy bandwidth: a large device-to-device ``copy_``, bytes read + bytes written, measured
once per process (cached).
"""
from __future__ import annotations

import functools
import re
import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_inclusive(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """``fn`` preceded by a device sync (GPU), so a timer around it sees host overhead too."""
    def call() -> None:
        sync(device)
        fn()
    return call


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """``fn`` followed by a device sync: a wall-clock timer around it (pytest-benchmark) measures
    the whole step, not just the enqueueing."""
    def call() -> None:
        fn()
        sync(device)
    return call


def time_ms(fn: Callable[[], object], device: torch.device, warmup_ms: float = 25.0, rep_ms: float = 100.0,
            min_reps: int = 5, host: bool = True) -> float:
    """Median milliseconds of one call of ``fn`` after warm-up.

    GPU: ``do_bench(host_inclusive(fn), warmup_ms, rep_ms, return_mode='median')``; with
    ``host=False`` plain ``do_bench(fn)`` (events only: while do_bench flushes L2 before each
    repetition the CPU can run ahead, so host overhead up to the flush time is hidden). CPU: at least two
    warm-up calls (or ``warmup_ms``), then ``perf_counter`` around each call until ``rep_ms`` and
    ``min_reps`` are both reached.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(host_inclusive(fn, device) if host else fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    start = time.perf_counter()
    for i in range(1000):
        fn()
        if i >= 1 and (time.perf_counter() - start) * 1e3 >= warmup_ms:
            break
    samples = []
    begin = time.perf_counter()
    while len(samples) < min_reps or (time.perf_counter() - begin) * 1e3 < rep_ms:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbs(device_str: str) -> float:
    """Copy bandwidth in GB/s (1e9 bytes/s, read + write) of ``dst.copy_(src)`` on ``device_str``:
    2 x 512 MiB buffers on CUDA (median of do_bench), 2 x 64 MiB on CPU (wall-clock median).
    Measured once per process."""
    device = torch.device(device_str)
    nbytes = (512 if device.type == "cuda" else 64) * 2**20
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup_ms=50.0, rep_ms=200.0)
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def device_label(device: torch.device) -> str:
    """``'cpu'`` or the GPU name in lower case with ``-`` (``nvidia-h100-80gb-hbm3``); for file names."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def default_device() -> torch.device:
    """``cuda`` when available, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
