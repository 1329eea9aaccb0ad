"""Failure modes of training/train.py (issue 10): no hangs, no silent overwrites, clear errors, safe resume."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import training.run_state as run_state
import training.train as train_mod
from training import checkpoint as ckpt
from training.compare import markdown_table
from training.data import Unreadable
from training.jsonio import read_jsonl as read_metrics
from training_helpers import read_jsonl, results, skip_outputs_for_speed, train


@pytest.fixture(autouse=True)
def fast_runs(monkeypatch):
    skip_outputs_for_speed(monkeypatch)


def _folder(root: Path, n_good: int, n_bad: int) -> str:
    rng = np.random.default_rng(0)
    (root / "c").mkdir(parents=True)
    for i in range(n_good):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "c" / f"{i}.png")
    for i in range(n_bad):
        (root / "c" / f"bad{i}.png").write_bytes(b"this is not a png")
    return str(root)


def _log(out) -> str:
    return (Path(out) / "train.log").read_text()


# -- 1. hang ----------------------------------------------------------------------------------------
def test_all_unreadable_training_images_is_a_clear_error_not_a_hang(tmp_path, capsys):
    def hung(*_):
        raise TimeoutError("training spun for 60 s on unreadable data")

    train_dir, val_dir = _folder(tmp_path / "train", 0, 6), _folder(tmp_path / "val", 2, 0)
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        code = train(tmp_path / "run", "--train-dir", train_dir, "--val-dir", val_dir, "--no-lpips", "--num-workers", "0")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    err = capsys.readouterr().err
    assert code == 1 and "no readable image" in err and "bad0.png" in err
    train_dir, val_dir = _folder(tmp_path / "train2", 4, 0), _folder(tmp_path / "val2", 0, 3)
    code = train(tmp_path / "run2", "--train-dir", train_dir, "--val-dir", val_dir, "--no-lpips", "--num-workers", "0",
                 "--max-steps", "1")
    err = capsys.readouterr().err
    assert code == 1 and "no readable validation image" in err and "bad0.png" in err


def test_stop_request_is_honoured_while_batches_are_empty(tmp_path, monkeypatch):
    calls = {"n": 0}

    def empty_batches(batch):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return torch.empty(0), [Unreadable("x.png", "test")] * len(batch)

    monkeypatch.setattr(run_state, "collate_skip", empty_batches)
    out = tmp_path / "run"
    assert train(out, "--max-steps", "5", "--no-lpips", "--embedded-epoch-size", "4000") == 130
    assert calls["n"] < 10 and "SIGTERM" in _log(out)


def test_second_ctrl_c_aborts_without_a_traceback(tmp_path, monkeypatch, capsys):
    real = run_state.ReconstructionLoss

    class TwoCtrlC(real):
        def forward(self, *a):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            return super().forward(*a)

    monkeypatch.setattr(run_state, "ReconstructionLoss", TwoCtrlC)
    assert train(tmp_path / "run", "--max-steps", "5", "--no-lpips") == 130
    err = capsys.readouterr().err
    assert "aborted" in err and "Traceback" not in err
    # before the first checkpoint (issue 18): nothing to resume is said, and the log left is not a run
    assert "nothing to resume" in err and "--resume" not in err
    monkeypatch.setattr(run_state, "ReconstructionLoss", real)
    assert train(tmp_path / "run", "--max-steps", "1", "--no-lpips") == 0


# -- 2. overwrite -----------------------------------------------------------------------------------
def test_existing_run_is_never_overwritten_without_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--max-steps", "2", "--no-lpips") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert train(out, "--max-steps", "3", "--no-lpips") == 1
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched, not even train.log
    assert train(out, "--max-steps", "3", "--no-lpips", "--overwrite") == 0
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"] == [1, 2, 3]
    assert ckpt.load(str(out / "ckpt_last.pt"))["step"] == 3
    # what `make demo` does the second time: a complete run is evaluated again, its rows not duplicated
    rows = read_jsonl(out / "metrics.jsonl")
    assert train(out, "--max-steps", "3", "--no-lpips", "--resume") == 0
    assert "already complete" in _log(out) and [r["split"] for r in read_jsonl(out / "metrics.jsonl")] == \
        [r["split"] for r in rows]


# -- bad --output-dir ----------------------------------------------------------------------------------
def test_bad_output_dir_is_a_clear_error(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    assert train(tmp_path / "file" / "run", "--max-steps", "1", "--no-lpips") == 1
    assert "--output-dir" in capsys.readouterr().err

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr(train_mod.os, "makedirs", denied)
    assert train(tmp_path / "ro", "--max-steps", "1", "--no-lpips") == 1
    err = capsys.readouterr().err
    assert "--output-dir" in err and "Permission denied" in err and "Traceback" not in err


# -- 5. evaluation memory, checkpoint before evaluation ----------------------------------------------
def test_lfq_40_bits_evaluates_without_a_codebook_sized_histogram(tmp_path):
    out = tmp_path / "run"
    assert train(out, "--quantizer", "lfq", "--lfq-dim", "40", "--max-steps", "2", "--no-lpips") == 0
    v = results(out)["val"]
    assert 0 < v["codebook_usage"][0] < 1e-6 and v["perplexity"][0] >= 1


def test_checkpoint_is_saved_before_evaluation(tmp_path, monkeypatch):
    def crash(*a, **k):
        raise MemoryError("evaluation ran out of memory")

    monkeypatch.setattr(train_mod, "compute_metrics", crash)
    out = tmp_path / "run"
    with pytest.raises(MemoryError):
        train(out, "--max-steps", "4", "--eval-every", "2", "--no-lpips")
    assert ckpt.load(str(out / "ckpt_last.pt"))["step"] == 2


# -- 6. resume after a crash ----------------------------------------------------------------------------
def _stopped_run(out, *extra):
    assert train(out, "--max-steps", "6", "--eval-every", "2", "--no-lpips", "--stop-at-step", "3", *extra) == 0


def test_crash_leftovers_resume_from_best_with_a_torn_metrics_line(tmp_path):
    """A truncated ckpt_last.pt, a half-written last metrics line and a temp file of a killed save."""
    out = tmp_path / "run"
    _stopped_run(out)
    last = out / "ckpt_last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "step": 4, "lo')
    (out / "ckpt_last.pt.tmp12345").write_bytes(b"half a checkpoint")
    assert train(out, "--max-steps", "6", "--eval-every", "2", "--no-lpips", "--resume") == 0
    log = _log(out)
    assert "ckpt_last.pt is unreadable" in log and "falling back to" in log and "ckpt_best.pt (step 2)" in log
    assert "metrics.jsonl: ignoring an incomplete last line" in log
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert not list(out.glob("*.tmp*"))


def test_junk_and_truncated_checkpoints_are_named_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"junk" * 100)
    good = tmp_path / "good.pt"
    ckpt.atomic_save({"model": {}}, str(good))
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:50])
    for name, why in (("junk.pt", "readable checkpoint"), ("cut.pt", "readable checkpoint"),
                      ("good.pt", "training checkpoint of train.py .missing optimizer")):
        with pytest.raises(ckpt.CheckpointError, match=f"{name} is not a .*{why}"):
            ckpt.load(str(tmp_path / name))


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    _stopped_run(out)
    for name in ("ckpt_last.pt", "ckpt_best.pt"):
        (out / name).write_bytes(b"junk")
    assert train(out, "--max-steps", "6", "--no-lpips", "--resume") == 1
    assert "no readable checkpoint" in _log(out) and "--overwrite" in _log(out)
    (out / "x.pt").write_bytes(b"junk")
    assert train(out, "--max-steps", "6", "--no-lpips", "--resume", str(out / "x.pt")) == 1
    assert "x.pt is not a readable checkpoint" in _log(out)


def test_corrupt_metrics_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": \n{"step": 3}\n')
    with pytest.raises(ValueError, match=f"{path}, line 2 is not valid JSON"):
        read_metrics(str(path))


# -- 7. resume mismatch ------------------------------------------------------------------------------
def test_resume_mismatch_names_only_the_differing_keys(tmp_path):
    out = tmp_path / "run"
    _stopped_run(out)
    assert train(out, "--max-steps", "6", "--no-lpips", "--resume", "--rfsq-strategy", "scale",
                 "--model-width", "16") == 1
    msg = [line for line in _log(out).splitlines() if "different" in line][-1]
    assert "rfsq_strategy: layernorm in the checkpoint, scale now" in msg and "model_width: 8" in msg
    assert "levels" not in msg and "n_embed" not in msg and "lfq_dim" not in msg
    # levels=None == the explicit default; settings RFSQ ignores (VQ/LFQ sizes) do not count
    assert train(out, "--max-steps", "6", "--no-lpips", "--resume", "--levels", "8", "8", "8", "4",
                 "--n-embed", "17", "--lfq-dim", "3", "--embed-dim", "2") == 0


# -- 11. operations ------------------------------------------------------------------------------------
def test_skipped_images_are_counted_per_file_and_named(tmp_path):
    train_dir, val_dir = _folder(tmp_path / "train", 6, 2), _folder(tmp_path / "val", 2, 1)
    out = tmp_path / "run"
    assert train(out, "--train-dir", train_dir, "--val-dir", val_dir, "--max-steps", "6", "--no-lpips",
                 "--batch-size", "2", "--num-workers", "0", "--eval-every", "3") == 0
    r = results(out)
    names = sorted(os.path.basename(p) for p in r["skipped_files"])
    assert r["skipped_images"] == 3 and names == ["bad0.png", "bad0.png", "bad1.png"]
    assert "bad1.png" in _log(out)


def test_run_outputs_standard_json_full_wall_time_no_cr_and_honest_labels(tmp_path, monkeypatch, capsys):
    """One run: results.json without Infinity/NaN, wall time covering evaluation and start-up, no tqdm
    \\r frames when stderr is not a terminal, a custom --n-embed not labelled as the paper's VQ-EMA."""
    real = train_mod.compute_metrics

    def slow_inf_eval(*a, **k):
        time.sleep(0.3)
        metrics, sample = real(*a, **k)
        return {**metrics, "psnr": float("inf"), "latent_rms": float("nan")}, sample

    monkeypatch.setattr(train_mod, "compute_metrics", slow_inf_eval)
    out = tmp_path / "run"
    t = time.time()
    assert train(out, "--preset", "vq-ema", "--n-embed", "64", "--max-steps", "2", "--eval-every", "1",
                 "--no-lpips") == 0
    elapsed = time.time() - t

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    r = strict((out / "results.json").read_text())
    assert r["val"]["psnr"] is None and r["val"]["latent_rms"] is None
    for line in (out / "metrics.jsonl").read_text().splitlines():
        strict(line)
    # The three times are each rounded to 0.1 s, so their sum may pass the wall time by up to 0.15 s.
    assert r["eval_time_s"] >= 0.6 and r["wall_time_s"] >= elapsed - 0.5
    assert r["wall_time_s"] >= r["eval_time_s"] + r["train_time_s"] - 0.15 - 1e-9
    assert f"in {r['wall_time_s']:.1f} s" in _log(out)
    err = capsys.readouterr().err
    assert "\r" not in err and "step 2/2" in err
    assert r["preset"] == "custom" and r["paper"] is None
    row = markdown_table([{**r, "run_dir": str(out)}]).splitlines()[2]
    assert "VQ-EMA" not in row and "custom (ema" in row


def test_compare_does_not_trust_a_preset_whose_bits_differ():
    r = {"preset": "vq-ema", "bits_per_token": 6.0, "steps": 1, "data": "d", "run_dir": "runs/x",
         "val": {"l1": 0.1, "lpips": None, "psnr": 20.0}, "paper": {"name": "VQ-EMA", "l1": 0.355, "lpips": 0.489, "psnr": 12.7}}
    row = markdown_table([r]).splitlines()[2]
    assert "| x | custom (6.0 bits/token, not the paper's VQ-EMA) |" in row and "0.355" not in row
