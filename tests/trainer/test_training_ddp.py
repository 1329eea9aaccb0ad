"""Multi-process training: torchrun with 2 gloo processes on CPU (tiny images and model)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


from training import checkpoint as ckpt
from training_helpers import TINY, read_jsonl, results

ROOT = Path(__file__).resolve().parents[2]


def test_torchrun_two_gloo_processes(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "training/train.py",
           *TINY, "--batch-size", "2", "--preset", "vq-ema", "--max-steps", "3", "--no-lpips",
           "--output-dir", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = results(out)
    assert res["world_size"] == 2 and res["steps"] == 3 and res["images_seen"] == 3 * 2 * 2
    assert res["val"]["images"] == 57  # val shards of both ranks summed
    rows = read_jsonl(out / "metrics.jsonl")  # rank 0 writes once per step
    assert [x["step"] for x in rows if x["split"] == "train"] == [1, 2, 3]
    state = ckpt.load(str(out / "ckpt_last.pt"))
    assert state["step"] == 3 and state["model"]["quantizer.quantizer.cluster_size"].sum() > 0
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
