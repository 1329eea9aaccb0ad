"""Fault injection: SIGKILL a training run at random moments (one of them in the middle of a checkpoint
write), resume after each kill, and require the final state to equal an uninterrupted run bit for bit,
with no corrupt or left-over file (issue 10).

The killed runs are forked from the test process (``os.fork``): a fresh interpreter would spend most of
the test's time importing torch. Everything runs single-threaded so that the uninterrupted run and the
killed ones compute identical floats.
"""
from __future__ import annotations

import io
import json
import os
import random
import signal
import time

import pytest
import torch
from PIL import Image

import training.run_state as run_state
from training import checkpoint as ckpt
from training_helpers import read_jsonl, train

ARGS = ["--max-steps", "16", "--save-every", "1", "--eval-every", "5", "--no-lpips"]
KILLS = int(os.environ.get("RFSQ_FAULT_KILLS", "6"))


@pytest.fixture(autouse=True)
def small_single_threaded(monkeypatch):
    class SmallVal(run_state.EmbeddedVal):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.items = self.items[:8]

    monkeypatch.setattr(run_state, "EmbeddedVal", SmallVal)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _start(out, torn_save: bool) -> int:
    """Fork a child that resumes (or starts) the run in ``out``; ``torn_save``: every checkpoint write
    stalls half-way, so that the kill lands inside ``atomic_save``."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1), os.dup2(devnull, 2)
        if torn_save:
            real_save = torch.save

            def stalling_save(obj, f, *a, **k):
                buf = io.BytesIO()
                real_save(obj, buf, *a, **k)
                data = buf.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                time.sleep(60)  # killed here
                f.write(data[len(data) // 2:])

            torch.save = stalling_save
        code = train(out, *ARGS, "--resume")
    finally:
        os._exit(code)


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _wait_for_temp_file(out, pid: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if [p for p in out.glob("ckpt_*.pt.tmp*") if p.stat().st_size > 0]:
            return
        time.sleep(0.01)
    _kill(pid)
    pytest.fail("no checkpoint write started")


def _wait_for_saves(out, pid: int, saves: int, timeout: float = 60.0) -> bool:
    """Wait until the child has replaced ``ckpt_last.pt`` ``saves`` times (one save per step with
    ``--save-every 1``). False if the child exited first (it is then reaped). Kills are placed by the
    run's progress, not by wall time, so that a fast machine cannot finish the run before the kills."""
    path = out / "ckpt_last.pt"

    def stamp():
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    last, seen = stamp(), 0
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return False
        now = stamp()
        if now != last:
            seen, last = seen + 1, now
            if seen >= saves:
                return True
        time.sleep(0.001)
    _kill(pid)
    pytest.fail(f"no progress: {seen} of {saves} checkpoint saves in {timeout} s")


def _assert_nothing_corrupt(out) -> None:
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if ".tmp" in n], names
    for name in ("ckpt_last.pt", "ckpt_best.pt"):
        ckpt.load(str(out / name))
    for name in ("results.json", "config.json"):
        json.loads((out / name).read_text())
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())
    for name in ("reconstructions.png", "loss.png", "val_metrics.png"):
        Image.open(out / name).verify()


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path, seed):
    rng = random.Random(seed)
    ref, out = tmp_path / "ref", tmp_path / "killed"
    assert train(ref, *ARGS) == 0

    kills, mid_write = 0, 0
    for i in range(KILLS):
        torn = i == 1  # one kill inside a checkpoint write; the others wherever they land
        pid = _start(out, torn)
        if torn:
            _wait_for_temp_file(out, pid)
            mid_write += 1
        else:
            # one or two steps of progress, then a random moment inside the next step (training,
            # evaluation or a save: wherever it lands)
            if not _wait_for_saves(out, pid, rng.randint(1, 2)):
                break  # finished before the kill
            time.sleep(rng.uniform(0.0, 0.05))
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            break  # finished before the kill
        _kill(pid)
        kills += 1
    pid = _start(out, False)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0

    print(f"survived {kills} SIGKILL(s), {mid_write} of them inside a checkpoint write")
    assert kills >= min(KILLS, 4) and mid_write == 1  # the run may complete before the last kills
    _assert_nothing_corrupt(out)
    a, b = ckpt.load(str(ref / "ckpt_last.pt")), ckpt.load(str(out / "ckpt_last.pt"))
    assert a["model"].keys() == b["model"].keys()
    for k, va in a["model"].items():  # quantizers also store their configuration (a dict: _extra_state)
        vb = b["model"][k]
        assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, k
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert (a["step"], a["epoch"], a["best"], a["scheduler"]) == (b["step"], b["epoch"], b["best"], b["scheduler"])

    def rows(d):
        keep = ("split", "step", "loss", "l1", "aux", "lr", "psnr", "codebook_usage")
        return [{k: r[k] for k in keep if k in r} for r in read_jsonl(d / "metrics.jsonl")]

    assert rows(ref) == rows(out)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (ref, out))
    assert ra["val"] == rb["val"] and ra["steps"] == rb["steps"] == 16
