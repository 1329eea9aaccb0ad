"""Training edges (issue 18, items 1, 2, 6, 7, 9): parse-time checks of the quantizer constants,
high-bit-depth and bomb images under one loader policy, messages that do not mislead, a directory
holding only a log is not a run, and the one host sync of a step placed after the backward."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import training.run_state as run_state
import training.train as train_mod
from training import checkpoint as ckpt
from training.data import SafeImageFolder, denormalize, read_rgb
from training.evaluate import load_folder_photos
from training.lpips_loss import ReconstructionLoss
from training_helpers import TINY, skip_outputs_for_speed, train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fast_runs(monkeypatch):
    skip_outputs_for_speed(monkeypatch)


# -- items 1, 2: refused at parse time ---------------------------------------------------------------
@pytest.mark.parametrize("argv,match", [
    (["--levels", "4294967296", "4294967296"], r"--levels: levels\[0\]=4294967296: every level count must be <= 2\*\*24"),
    (["--levels", *["2"] * 70, "--rfsq-stages", "2"], r"--levels: .*more than the 2\*\*63 that int64 indices"),
    (["--rfsq-initial-scale", "1e-50", "--rfsq-strategy", "scale"], r"--rfsq-initial-scale=1e-50 must lie in \[1e-18"),
    (["--rfsq-initial-scale", "1e39"], r"--rfsq-initial-scale=1e\+39 must lie in"),
])
def test_quantizer_constants_are_refused_at_parse_time(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        train_mod.parse_args(argv)
    assert e.value.code == 2
    import re
    assert re.search(match, capsys.readouterr().err)


# -- item 6: one loader, one policy --------------------------------------------------------------------
def _grey16(path: Path, value: int) -> None:
    Image.fromarray(np.full((40, 48), value, dtype=np.uint16)).save(path)


def test_sixteen_bit_greyscale_is_scaled_not_saturated(tmp_path):
    (tmp_path / "c").mkdir()
    _grey16(tmp_path / "c" / "mid.png", 32768)
    assert Image.open(tmp_path / "c" / "mid.png").mode.startswith("I")
    assert np.asarray(read_rgb(str(tmp_path / "c" / "mid.png"))).max() == 128
    x = SafeImageFolder(str(tmp_path), size=32)[0]  # what train.py sees
    assert isinstance(x, torch.Tensor)
    torch.testing.assert_close(denormalize(x), torch.full_like(x, 128 / 255), atol=1e-4, rtol=0)
    (photo,) = load_folder_photos(str(tmp_path), 32)  # what training.evaluate sees
    torch.testing.assert_close(photo, torch.full_like(photo, 128 / 255), atol=1e-4, rtol=0)


def test_float_image_and_decompression_bomb_are_skipped_with_the_reason_by_both(tmp_path, monkeypatch, capsys):
    (tmp_path / "c").mkdir()
    Image.fromarray(np.full((40, 48, 3), 200, dtype=np.uint8)).save(tmp_path / "c" / "a_good.png")
    Image.fromarray(np.full((40, 48), 0.5, dtype=np.float32)).save(tmp_path / "c" / "b_float.tif")
    Image.fromarray(np.zeros((200, 200, 3), dtype=np.uint8)).save(tmp_path / "c" / "c_bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 200x200 > 2x the limit: a bomb
    folder = SafeImageFolder(str(tmp_path), size=32)
    items = [folder[i] for i in range(len(folder))]
    assert isinstance(items[0], torch.Tensor)
    assert "no defined white level" in items[1].reason and "DecompressionBombError" in items[2].reason
    photos = load_folder_photos(str(tmp_path), 32)
    err = capsys.readouterr().err
    assert len(photos) == 1 and "b_float.tif" in err and "DecompressionBombError" in err and "skipped 2 of 3" in err


# -- item 7: messages, and a directory holding only a log --------------------------------------------
def test_junk_lpips_weights_is_one_clear_error_and_leaves_no_run(tmp_path, capsys):
    out = tmp_path / "run"
    for name, data in (("w.safetensors", b"junkjunkjunk"), ("w.pth", b""), ("w.pth", b"junk")):
        path = tmp_path / name
        path.write_bytes(data)
        assert train(out, "--max-steps", "1", "--lpips-weights", str(path)) == 1
        err = capsys.readouterr().err
        assert "not a usable VGG16 backbone" in err and "Traceback" not in err and "--fetch" in err
    assert (out / "train.log").exists()
    assert train(out, "--max-steps", "1", "--no-lpips") == 0  # a log alone is not a run


def _nan_at(call: int):
    class NanAt(ReconstructionLoss):
        calls = 0

        def forward(self, recon, x, aux):
            total, parts = super().forward(recon, x, aux)
            NanAt.calls += 1
            return (total * float("nan") if NanAt.calls == call else total), parts

    return NanAt


def test_non_finite_first_loss_blames_the_configuration_not_the_lr(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_state, "ReconstructionLoss", _nan_at(1))
    out = tmp_path / "run"
    assert train(out, "--max-steps", "3", "--no-lpips") == 1
    err = capsys.readouterr().err
    assert "before any update" in err and "--lr" not in err and "No checkpoint was written yet" in err
    assert "ckpt_last.pt" not in err and not (out / ckpt.LAST).exists()
    monkeypatch.setattr(run_state, "ReconstructionLoss", _nan_at(3))
    assert train(out, "--max-steps", "5", "--no-lpips", "--save-every", "2") == 1  # no checkpoint: not a run
    err = capsys.readouterr().err
    assert "Try a lower --lr" in err and f"{out / ckpt.LAST} (continue from it with --resume)" in err
    assert ckpt.load(str(out / ckpt.LAST))["step"] == 2


# -- item 9: the step's host sync comes after the backward is queued -----------------------------------
def test_loss_reaches_the_host_after_the_backward_and_a_nan_step_changes_nothing(tmp_path, monkeypatch):
    events = []
    real_tolist = torch.Tensor.tolist

    class Recording(ReconstructionLoss):
        calls = 0

        def forward(self, recon, x, aux):
            total, parts = super().forward(recon, x, aux)
            Recording.calls += 1
            events.append("forward")
            total.register_hook(lambda g: events.append("backward"))
            return (total * float("nan") if Recording.calls == 3 else total), parts

    def tolist(self):
        events.append("tolist")
        return real_tolist(self)

    monkeypatch.setattr(run_state, "ReconstructionLoss", Recording)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    saved = {}
    real_step = train_mod.train_step

    def step(run, images):
        before = {k: v.detach().clone() for k, v in run.raw_model.named_parameters()}
        out = real_step(run, images)
        if out is None:
            saved["unchanged"] = all(torch.equal(before[k], v) for k, v in run.raw_model.named_parameters())
            saved["grads"] = [p.grad for p in run.raw_model.parameters() if p.grad is not None]
        return out

    monkeypatch.setattr(train_mod, "train_step", step)
    assert train(tmp_path / "run", "--max-steps", "5", "--no-lpips") == 1
    steps = [e for e in events if e in ("forward", "backward", "tolist")]
    for i in range(3):  # each step: forward, backward, then (and only then) the sync
        f = [j for j, e in enumerate(steps) if e == "forward"][i]
        nxt = steps[f + 1:f + 3]
        assert nxt == ["backward", "tolist"], steps
    assert saved == {"unchanged": True, "grads": []}


def test_ddp_ranks_agree_to_stop_on_one_ranks_non_finite_loss(tmp_path):
    """torchrun, 2 gloo processes: rank 1 alone sees a NaN loss at step 2; both stop with exit 1 at the
    checkpoint of step 1, and nothing hangs."""
    out = tmp_path / "ddp"
    script = tmp_path / "nan_rank1.py"
    script.write_text(f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
import training.run_state as run_state
from training.lpips_loss import ReconstructionLoss
from training.train import main

class NanOnRank1(ReconstructionLoss):
    calls = 0
    def forward(self, recon, x, aux):
        total, parts = super().forward(recon, x, aux)
        NanOnRank1.calls += 1
        bad = NanOnRank1.calls == 2 and os.environ["RANK"] == "1"
        return (total * float("nan") if bad else total), parts

run_state.ReconstructionLoss = NanOnRank1
sys.exit(main(sys.argv[1:]))
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           *TINY, "--batch-size", "2", "--max-steps", "4", "--save-every", "1", "--no-lpips", "--output-dir", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "non-finite loss" in (out / "train.log").read_text()
    assert ckpt.load(str(out / ckpt.LAST))["step"] == 1
    assert not (out / "results.json").exists()
