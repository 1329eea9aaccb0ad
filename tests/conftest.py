"""Test-session setup: run Triton kernels in the CPU interpreter when no CUDA device exists.

TRITON_INTERPRET must be set before `triton` is first imported, hence at the top of conftest.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    assert "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1", (
        "triton was imported before tests/conftest.py could set TRITON_INTERPRET=1"
    )
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Import triton now, under the interpreter setting: a test that later changes TRITON_INTERPRET
    # (to check our error messages) must not decide the mode triton is loaded in.
    try:
        import triton  # noqa: F401
    except ImportError:
        pass

import pytest  # noqa: E402


@pytest.fixture
def seed(request) -> int:
    """A per-test seed derived from the test id: fresh inputs per test, reproducible failures.

    Set RFSQ_TEST_SEED to shift every seed (to draw new inputs run after run).
    """
    import zlib

    base = int(os.environ.get("RFSQ_TEST_SEED", "0"))
    s = (zlib.crc32(request.node.nodeid.encode()) + base) % (2**31)
    torch.manual_seed(s)
    return s
