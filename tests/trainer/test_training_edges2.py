"""Training and tool edges of issue 25 (items 3, 4, 6, 12, 13 and 14's logged lr and 8-bit mode-I
TIFF): resumed runs with changed optimisation flags, one process per run directory, link loops in a
data folder, a full disk while checkpointing, tool outputs checked before the work, the logged rate."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import training.run_state as run_state
import training.train as train_mod
from training.data import SafeImageFolder, denormalize, read_rgb, walk_files
from training.evaluate import load_folder_photos
from training.run_lock import RunDirBusy
from training_helpers import read_jsonl, skip_outputs_for_speed, train


@pytest.fixture(autouse=True)
def fast_runs(monkeypatch):
    skip_outputs_for_speed(monkeypatch)


def _png(path: Path, value: int = 100) -> None:
    Image.fromarray(np.full((40, 48, 3), value, dtype=np.uint8)).save(path)


# -- item 14: the logged lr is the rate the step used --------------------------------------------------
def test_logged_lr_is_the_rate_of_that_step(tmp_path):
    out = tmp_path / "run"
    assert train(out, "--max-steps", "3", "--warmup", "4", "--lr", "1e-3", "--no-lpips") == 0
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"]
    schedule = run_state.lr_lambda(3, 4)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * schedule(s - 1) for s in (1, 2, 3)], rel=1e-12)
    assert rows[0]["lr"] == pytest.approx(0.25e-3)  # warmup step 1 of 4: a quarter of the peak


# -- item 14: a mode-I TIFF holding 8-bit data ---------------------------------------------------------
@pytest.mark.parametrize("value,expected", [(128, 128), (255, 255), (0, 0), (32768, 128), (65535, 255)])
def test_mode_i_tiff_is_scaled_by_its_value_range(tmp_path, value, expected):
    path = tmp_path / "grey.tif"
    a = np.full((20, 24), value, dtype=np.int32)
    a[0, 0] = 0
    Image.fromarray(a).save(path)
    with Image.open(path) as im:
        assert im.mode == "I" and im.tag_v2[258] in (32, (32,))  # a 32-bit container, no useful depth
    rgb = np.asarray(read_rgb(str(path)))
    assert rgb.shape == (20, 24, 3) and rgb[5, 5, 0] == expected and rgb[0, 0, 0] == 0


def test_declared_bit_depth_decides_and_out_of_range_values_are_refused(tmp_path):
    png16 = tmp_path / "dark16.png"  # 16-bit PNG: white is 65535 even when the image is dark
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint16)).save(png16)
    assert np.asarray(read_rgb(str(png16)))[0, 0, 0] == 1
    neg = tmp_path / "neg.tif"
    Image.fromarray(np.full((8, 8), -5, dtype=np.int32)).save(neg)
    with pytest.raises(ValueError, match=r"values in \[-5, -5\], outside \[0, 255\].*no defined white level"):
        read_rgb(str(neg))
    big = tmp_path / "big.tif"
    Image.fromarray(np.full((8, 8), 70000, dtype=np.int32)).save(big)
    with pytest.raises(ValueError, match=r"outside \[0, 65535\]"):
        read_rgb(str(big))


# -- item 6: symbolic-link loops do not multiply the data set -----------------------------------------
def _looped_folder(root: Path) -> Path:
    (root / "cls").mkdir(parents=True)
    (root / "other").mkdir()
    _png(root / "cls" / "a.png")
    _png(root / "cls" / "b.png")
    _png(root / "other" / "c.png")
    os.symlink(".", root / "cls" / "loop")  # cls/loop/loop/... -> cls
    os.symlink("..", root / "cls" / "up")  # back to the root: would add other/ under cls
    os.symlink("../other", root / "cls" / "to_other")  # another class's folder
    os.symlink("a.png", root / "cls" / "alias.png")  # the same file twice
    ext = root.parent / "outside"
    ext.mkdir()
    _png(ext / "d.png")
    os.symlink(ext, root / "other" / "linked")  # a real directory reached only through a link: followed
    return root


def test_symlink_loops_do_not_multiply_the_dataset(tmp_path):
    root = _looped_folder(tmp_path / "train")
    folder = SafeImageFolder(str(root), size=32).folder
    names = [(os.path.relpath(p, root), folder.classes[c]) for p, c in folder.samples]
    assert names == [("cls/a.png", "cls"), ("cls/b.png", "cls"), ("other/c.png", "other"),
                     ("other/linked/d.png", "other")]
    assert [os.path.relpath(p, root) for p in walk_files(str(root))] == \
        ["cls/a.png", "cls/b.png", "other/c.png", "other/linked/d.png"]
    assert len(load_folder_photos(str(root), 32)) == 4  # training.evaluate's --val-dir walk too


def test_a_class_folder_linked_to_another_is_refused(tmp_path):
    root = tmp_path / "train"
    (root / "a").mkdir(parents=True)
    _png(root / "a" / "x.png")
    os.symlink("a", root / "b")
    with pytest.raises(train_mod.DataError, match=r"class folder .*b is the same directory as .*a \(a symbolic link\)"):
        SafeImageFolder(str(root), size=32)


def test_plain_folder_order_is_unchanged(tmp_path):
    """Without links the samples (and so the data order of a resumed run) are torchvision's."""
    from torchvision.datasets import ImageFolder

    root = tmp_path / "train"
    for c in ("b", "a", "a/sub", "a/sub/deeper", "c"):
        (root / c).mkdir(parents=True, exist_ok=True)
    for f in ("a/z.png", "a/sub/y.png", "a/sub/deeper/x.png", "a/m.png", "b/k.JPG", "c/q.png", "c/notes.txt"):
        _png(root / f) if not f.endswith(".txt") else (root / f).write_text("x")
    assert SafeImageFolder(str(root), size=32).folder.samples == ImageFolder(str(root)).samples


# -- item 4: one process per run directory -------------------------------------------------------------
def test_a_second_run_into_a_busy_output_dir_is_refused_at_once(tmp_path, capsys):
    from training.run_lock import RunDirLock

    out = tmp_path / "run"
    out.mkdir()
    holder = RunDirLock(str(out)).acquire()  # as a run in progress holds it (flock: per open file)
    try:
        assert train(out, "--max-steps", "1", "--no-lpips") == 1
        err = capsys.readouterr().err
        assert f"--output-dir {out} is in use by another training process (pid {os.getpid()}" in err
        assert "choose another --output-dir" in err and "Traceback" not in err
        assert sorted(p.name for p in out.iterdir()) == [".train.lock"]  # nothing written
        assert train(out, "--max-steps", "1", "--no-lpips", "--resume") == 1  # --resume/--overwrite too
        assert train(out, "--max-steps", "1", "--no-lpips", "--overwrite") == 1
    finally:
        holder.release()
    assert train(out, "--max-steps", "1", "--no-lpips") == 0
    assert train(out, "--max-steps", "1", "--no-lpips", "--resume") == 0  # released when main returned


def test_a_killed_run_does_not_leave_its_directory_locked(tmp_path):
    import signal
    import subprocess
    import sys

    from training.run_lock import RunDirLock

    out = tmp_path / "run"
    out.mkdir()
    code = ("import sys, time; from training.run_lock import RunDirLock; RunDirLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True,
                             cwd=str(Path(__file__).resolve().parents[2]))
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=f"pid {child.pid} on "):
            RunDirLock(str(out)).acquire()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    RunDirLock(str(out)).acquire().release()  # the kernel dropped the dead holder's lock


# -- item 12: a full disk while writing a checkpoint ---------------------------------------------------
def test_full_disk_while_checkpointing_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    import errno
    import io

    from training import checkpoint as ckpt

    out = tmp_path / "run"
    assert train(out, "--max-steps", "2", "--no-lpips", "--stop-at-step", "1") == 0
    before = (out / ckpt.LAST).read_bytes()

    class FullDisk(io.FileIO):
        def write(self, b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "open", lambda path, mode="r": FullDisk(path, mode), raising=False)
    capsys.readouterr()
    assert train(out, "--max-steps", "2", "--no-lpips", "--resume") == 1
    err = capsys.readouterr().err
    assert f"cannot write checkpoint {out / ckpt.LAST}: No space left on device (ENOSPC)" in err
    assert "the previous ckpt_last.pt (if any) is unchanged" in err and "--resume" in err
    assert "inline_container" not in err and "Traceback" not in err
    assert (out / ckpt.LAST).read_bytes() == before and ckpt.load(str(out / ckpt.LAST))["step"] == 1
    assert not list(out.glob("*.tmp*"))


def test_full_disk_while_writing_a_json_output_names_the_file(tmp_path, monkeypatch):
    import errno

    from training import jsonio

    path = tmp_path / "config.json"
    path.write_text("{}\n")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(jsonio.os, "fsync", full)
    with pytest.raises(OSError, match=f"cannot write {path}: No space left on device; the previous file"):
        jsonio.write_json_atomic(str(path), {"a": 1})
    assert path.read_text() == "{}\n" and not list(tmp_path.glob("*.tmp*"))


# -- item 3: a resumed run with changed optimisation flags ---------------------------------------------
def _log(out) -> str:
    return (out / "train.log").read_text()


def test_resume_with_changed_recipe_is_refused_naming_each_flag(tmp_path):
    from training import checkpoint as ckpt

    out = tmp_path / "run"
    assert train(out, "--max-steps", "4", "--no-lpips", "--stop-at-step", "2") == 0
    config = (out / "config.json").read_text()
    assert train(out, "--max-steps", "4", "--no-lpips", "--resume", "--lr", "4e-4", "--weight-decay", "0") == 1
    msg = [line for line in _log(out).splitlines() if "different recipe" in line][-1]
    assert "--lr: 0.0008 in the checkpoint, 0.0004 now" in msg and "--weight-decay: 5e-05 in the checkpoint, 0.0 now" in msg
    assert "add --allow-recipe-change to apply the new ones from step 2 on" in msg and "--overwrite" in msg
    assert (out / "config.json").read_text() == config  # nothing recorded that was not used
    assert ckpt.load(str(out / ckpt.LAST))["args"]["lr"] == 8e-4
    assert train(out, "--max-steps", "6", "--no-lpips", "--resume") == 1
    assert "--max-steps: 4 in the checkpoint, 6 now" in _log(out)
    assert train(out, "--max-steps", "4", "--no-lpips", "--resume", "--batch-size", "2") == 1
    msg = [line for line in _log(out).splitlines() if "cannot continue" in line][-1]
    assert "images per step: 4 x 1 process(es) = 4 in the checkpoint, 2 x 1 = 2 now (resume with --batch-size 4" in msg
    assert train(out, "--max-steps", "4", "--no-lpips", "--resume", "--batch-size", "2", "--allow-recipe-change") == 1
    with pytest.raises(SystemExit):
        train_mod.parse_args(["--allow-recipe-change"])  # only with --resume


def test_changed_epoch_count_is_named_as_the_flag_given(tmp_path):
    """A schedule changed through --max-train-epochs is reported under that flag (in total steps), not
    under --max-steps, which the command did not give."""
    out = tmp_path / "run"
    assert train(out, "--max-train-epochs", "2", "--no-lpips", "--stop-at-step", "1") == 0
    assert train(out, "--max-train-epochs", "3", "--no-lpips", "--resume") == 1
    msg = [line for line in _log(out).splitlines() if "different recipe" in line][-1]
    assert "--max-train-epochs (total steps): " in msg and "--max-steps" not in msg


def test_allowed_recipe_change_is_applied_logged_and_recorded(tmp_path):
    import json

    from training import checkpoint as ckpt

    out = tmp_path / "run"
    assert train(out, "--max-steps", "4", "--warmup", "0", "--no-lpips", "--stop-at-step", "2") == 0
    assert train(out, "--max-steps", "6", "--warmup", "0", "--no-lpips", "--resume", "--allow-recipe-change",
                 "--lr", "4e-4", "--weight-decay", "0.25") == 0
    assert "--allow-recipe-change: from step 2 on, --lr 0.0008 -> 0.0004; --weight-decay 5e-05 -> 0.25; " \
           "--max-steps 4 -> 6" in _log(out)
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"]
    f_old, f_new = run_state.lr_lambda(4, 0), run_state.lr_lambda(6, 0)
    assert [r["lr"] for r in rows] == pytest.approx([8e-4 * f_old(0), 8e-4 * f_old(1)]
                                                    + [4e-4 * f_new(s) for s in (2, 3, 4, 5)], rel=1e-12)
    state = ckpt.load(str(out / ckpt.LAST))
    assert all(g["weight_decay"] == 0.25 for g in state["optimizer"]["param_groups"])
    assert state["args"]["lr"] == 4e-4 and state["total_steps"] == 6
    changes = [{"step": 2, "flag": "--lr", "old": 8e-4, "new": 4e-4},
               {"step": 2, "flag": "--weight-decay", "old": 5e-5, "new": 0.25},
               {"step": 2, "flag": "--max-steps", "old": 4, "new": 6}]
    assert state["recipe_changes"] == changes
    config = json.loads((out / "config.json").read_text())
    assert config["lr"] == 4e-4 and config["weight_decay"] == 0.25 and config["recipe_changes"] == changes
    res = json.loads((out / "results.json").read_text())
    assert res["recipe_changes"] == changes and res["images_seen"] == 6 * 4 and res["steps"] == 6
    # the changed values are now the run's: resuming again with them needs no flag
    assert train(out, "--max-steps", "6", "--warmup", "0", "--no-lpips", "--resume", "--lr", "4e-4",
                 "--weight-decay", "0.25") == 0
