"""The quick demo (examples/demo.py) runs end to end and writes its reconstructions."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_and_writes_reconstructions(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--steps", "3", "--batch-size", "2",
         "--size", "32", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={"TRITON_INTERPRET": "0", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "PSNR" in out.stdout and "22 bits/token" in out.stdout
    assert (tmp_path / "reconstructions.png").stat().st_size > 0
