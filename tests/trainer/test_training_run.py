"""End-to-end runs of training/train.py on tiny images (CPU): outputs, resume exactness, failure modes."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

import training.run_state as run_state
from training import checkpoint as ckpt
from training.data import DataError, SafeImageFolder
from training.lpips_loss import ReconstructionLoss
from training_helpers import read_jsonl, results, train


def test_short_run_writes_metrics_results_and_pngs(tmp_path):
    out = tmp_path / "run"
    assert train(out, "--preset", "rfsq2-ln", "--max-steps", "4", "--eval-every", "2", "--lpips-weights", "random") == 0
    for name in ("metrics.jsonl", "results.json", "config.json", "train.log", "ckpt_last.pt", "ckpt_best.pt",
                 "reconstructions.png", "loss.png", "val_metrics.png"):
        assert (out / name).stat().st_size > 0, name
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if r["split"] == "val"] == [2, 4]
    r = results(out)
    v = r["val"]
    assert r["preset"] == "rfsq2-ln" and r["bits_per_token"] == 22.0 and r["steps"] == 4 and r["paper"]["lpips"] == 0.148
    assert v["lpips"] is not None and v["l1"] > 0 and 0 < v["psnr"] < 60 and v["images"] == 57
    assert len(v["codebook_usage"]) == len(v["perplexity"]) == len(v["residual_rms"]) == 2
    assert all(0 < u <= 1 for u in v["codebook_usage"]) and v["residual_rms"][1] <= v["latent_rms"]
    grid = Image.open(out / "reconstructions.png")
    assert grid.size == (8 * 32, 2 * 32 + 2)
    state = ckpt.load(str(out / "ckpt_last.pt"))  # weights_only=True
    assert state["step"] == 4 and "ln_weight" in "".join(state["model"])


def test_no_lpips_reports_null(tmp_path):
    out = tmp_path / "run"
    assert train(out, "--preset", "lfq", "--max-steps", "2", "--no-lpips") == 0
    assert results(out)["val"]["lpips"] is None
    assert all(r["lpips"] is None for r in read_jsonl(out / "metrics.jsonl"))


@pytest.mark.parametrize("preset", ["rfsq2-scale", "vq-ema"])
def test_resume_is_exact(tmp_path, preset):
    """6 steps straight == 3 steps, stop, resume, 3 steps: weights, EMA buffers, optimizer, LR."""
    common = ["--preset", preset, "--max-steps", "6", "--no-lpips", "--eval-every", "4"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(a, *common) == 0
    assert train(b, *common, "--stop-at-step", "3") == 0
    assert ckpt.load(str(b / "ckpt_last.pt"))["step"] == 3 and not (b / "results.json").exists()
    assert train(b, *common, "--resume") == 0
    sa, sb = ckpt.load(str(a / "ckpt_last.pt")), ckpt.load(str(b / "ckpt_last.pt"))
    assert sa["model"].keys() == sb["model"].keys()
    for k, va in sa["model"].items():  # quantizers also store their configuration (a dict: _extra_state)
        vb = sb["model"][k]
        assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, k
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert sa["scheduler"] == sb["scheduler"] and (sa["step"], sa["epoch"]) == (sb["step"], sb["epoch"])
    assert results(a)["val"] == results(b)["val"]
    steps = [r["step"] for r in read_jsonl(b / "metrics.jsonl") if r["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path):
    assert train(tmp_path / "r", "--max-steps", "1", "--no-lpips", "--resume", "auto") == 0


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    class NanAtStep3(ReconstructionLoss):
        calls = 0

        def forward(self, recon, x, aux):
            total, parts = super().forward(recon, x, aux)
            NanAtStep3.calls += 1
            return (total * float("nan") if NanAtStep3.calls == 3 else total), parts

    monkeypatch.setattr(run_state, "ReconstructionLoss", NanAtStep3)
    out = tmp_path / "run"
    assert train(out, "--max-steps", "5", "--no-lpips", "--save-every", "2") == 1
    assert ckpt.load(str(out / "ckpt_last.pt"))["step"] == 2
    assert not (out / "results.json").exists()
    assert "non-finite loss" in (out / "train.log").read_text()


def _image_folder(root, n_good: int, n_bad: int):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n_good):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
        for i in range(n_bad):
            (root / c / f"bad{i}.png").write_bytes(b"this is not a png")
    return str(root)


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    train_dir = _image_folder(tmp_path / "train", 4, 2)
    val_dir = _image_folder(tmp_path / "val", 2, 1)
    out = tmp_path / "run"
    assert train(out, "--train-dir", train_dir, "--val-dir", val_dir, "--max-steps", "4", "--no-lpips",
                 "--batch-size", "3", "--num-workers", "0") == 0
    r = results(out)
    assert r["skipped_images"] > 0 and r["val"]["images"] == 4 and r["data"] == "imagefolder"
    assert "unreadable" in (out / "train.log").read_text()


def test_missing_and_empty_data_dirs_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        SafeImageFolder(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        SafeImageFolder(str(tmp_path / "empty"))
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        SafeImageFolder(str(tmp_path / "noimg"))
    out = tmp_path / "run"
    assert train(out, "--train-dir", str(tmp_path / "nope"), "--val-dir", str(tmp_path / "empty"), "--no-lpips") == 1
    assert "does not exist" in (out / "train.log").read_text()
    assert train(tmp_path / "run2", "--train-dir", str(tmp_path / "empty"), "--no-lpips") == 1


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from training_helpers import TINY

    out = tmp_path / "run"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "training/train.py", *TINY, "--max-steps", "100000", "--no-lpips",
                             "--eval-every", "100000", "--output-dir", str(out)], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300  # startup (imports, data) is slow on a loaded 2-core machine
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output[-2000:]
    state = ckpt.load(str(out / "ckpt_last.pt"))
    assert state["step"] >= 1 and "Traceback" not in output and "--resume" in output
