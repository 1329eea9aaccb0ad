"""``bench/gpu_validate.py`` cannot rot: its dry run (every step on the CPU, kernels in the Triton
interpreter) passes, the package imports from the checkout without being installed, and the
correctness step's boundary-flip accounting tells a .5-boundary flip from a real disagreement."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_every_step(tmp_path):
    """One run of the whole dry run (~1 min of interpreter work): every step ok, nothing failed.
    Correctness in 2 processes (the GPU run's sharding); budgets scaled up so that a loaded machine
    slows the run rather than failing it (the default dry-run budgets sum to 115 s)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "bench/gpu_validate.py", "--dry-run", "--no-wheels", "--processes", "2",
                           "--budget-s", "300", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (js,), (md,) = tmp_path.glob("*.json"), tmp_path.glob("*.md")
    record = json.loads(js.read_text())
    assert [s["step"] for s in record["steps"]] == ["environment", "correctness", "graphs", "timing", "model"]
    assert all(s["status"] == "ok" for s in record["steps"]), record["steps"]
    rows = record["rows"]
    assert not [r for r in rows if r["status"] in ("fail", "error")]
    for step in ("environment", "correctness", "graphs", "timing", "model"):
        assert any(r["step"] == step and r["status"] == "ok" for r in rows), step
    env_row = next(r for r in rows if r["name"] == "versions+device")
    assert env_row["reference"] == str(ROOT / "reference")  # the checkout's, mapped like setup.py
    assert sum(r["step"] == "correctness" and r["status"] == "ok" for r in rows) >= 10
    assert record["steps"][1]["processes"] == 2
    assert "CPU DRY RUN" in md.read_text()


def test_checkout_import_without_install():
    """With the editable install's finder removed, use_checkout still resolves rfsq_kernels.reference."""
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
            f"sys.path.insert(0, {str(ROOT)!r}); from bench import gpu_env; gpu_env.use_checkout(); "
            "import rfsq_kernels.reference as r, rfsq_kernels as k; print(r.__file__); print(k.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ref_file, pkg_file = out.stdout.split()
    assert ref_file == str(ROOT / "reference" / "__init__.py") and pkg_file == str(ROOT / "rfsq_kernels" / "__init__.py")


def _pair(z, levels, stages, strategy, params):
    """Reference outputs twice (a stand-in for fused/ref) in the shape compare_counted reads."""
    from fused_helpers import run_both
    from rfsq_kernels.reference import rfsq_forward

    return run_both(rfsq_forward, rfsq_forward, z, levels, stages, strategy, params, grad=torch.randn(z.shape))


def test_flip_accounting():
    """A flip in a sample the float64 oracle puts within BOUNDARY_TOL of a boundary is counted; the
    same flip in a sample clear of boundaries fails."""
    from bench.gpu_correct import compare_counted

    levels, stages, strategy = [8, 8], 1, "none"
    half_l = 7 * (1 - 1e-3) / 2
    shift = math.atanh(0.5 / half_l)
    z = torch.full((2, 2, 3), 0.1)
    z[0, 0, 1] = math.atanh((1.5 + 0.5 + 2e-6) / half_l) - shift  # bounded = 1.5 + 2e-6: at a boundary
    for strategy_params in ({},):
        fused, ref = _pair(z, levels, stages, strategy, strategy_params)
        fused["out"][1][0, 1, 0] += 1  # the flip, in sample 0 (near a boundary)
        info = compare_counted(fused, ref, z, levels, stages, strategy, strategy_params, None, None)
        assert info["flips"] == 1 and info["flip_samples"] == [0] and info["min_flip_margin"] < 1e-4
        fused, ref = _pair(z, levels, stages, strategy, strategy_params)
        fused["out"][1][1, 1, 0] += 1  # the same flip in sample 1 (clear): a real disagreement
        with pytest.raises(AssertionError, match="not a boundary flip"):
            compare_counted(fused, ref, z, levels, stages, strategy, strategy_params, None, None)
