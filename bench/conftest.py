"""pytest setup for bench/: collect ``bench_*.py`` here and provide session fixtures.

The repo's pytest config only collects ``test_*.py`` (testpaths = tests); :func:`pytest_collect_file`
adds ``bench/bench_*.py`` so ``pytest -q tests bench --benchmark-disable`` (from the repo root) and
``pytest bench`` both run the suite. Without CUDA, ``TRITON_INTERPRET=1`` is set before anything
imports triton (as tests/conftest.py does), and tiny shapes are selected (see bench/cases.py).
"""
from __future__ import annotations

import fnmatch
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    assert "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1", (
        "triton was imported before bench/conftest.py could set TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HERE = Path(__file__).resolve().parent


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    """Collect ``bench/bench_*.py`` unless ``python_files`` already matches it (no double collection)."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_") or file_path.parent != HERE:
        return None
    if any(fnmatch.fnmatch(file_path.name, pat) for pat in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """``cuda`` when available, else ``cpu``."""
    from bench.timing import default_device

    return default_device()


@pytest.fixture(scope="session")
def copy_gbs(device: torch.device) -> float:
    """Device-to-device copy bandwidth (GB/s, read + write), measured once per session."""
    from bench.timing import copy_bandwidth_gbs

    return copy_bandwidth_gbs(str(device))
