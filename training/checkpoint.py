"""Atomic checkpoints that load with ``torch.load(..., weights_only=True)``.

Everything stored is tensors or plain Python types (RNG states included), so loading never
unpickles arbitrary objects. ``ckpt_last.pt`` is the latest state, ``ckpt_best.pt`` the one with the
best validation score so far; :func:`save_checkpoint` writes them from a training run's state
(:func:`checkpoint_state`), :func:`find_resume` finds the one to continue from.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import re
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np
import torch

if TYPE_CHECKING:  # only a type here: run_state imports this module
    from training.run_state import Run

log = logging.getLogger("rfsq.train")
LAST = "ckpt_last.pt"
BEST = "ckpt_best.pt"


def atomic_save(obj: Dict[str, Any], path: str) -> None:
    """``torch.save`` to a temp file in the same directory, fsync, then ``os.replace`` (atomic).

    When the write fails (a full disk, a quota, an I/O error) the temp file is removed and a
    :class:`CheckpointError` names ``path`` and the operating system's cause (``torch.save`` itself
    only says ``[enforce fail at inline_container.cc...]``, the cause hidden in the chained
    traceback); the previous file at ``path`` is untouched."""
    path = str(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        cause = os_error_of(e)
        if cause is None:
            raise
        code = errno.errorcode.get(cause.errno, "")
        raise CheckpointError(f"cannot write checkpoint {path}: {cause.strerror or cause}"
                              f"{f' ({code})' if code else ''}; the previous {os.path.basename(path)} (if any) "
                              "is unchanged. Free space (or fix the file system) and continue with "
                              "--resume") from e


def os_error_of(e: BaseException) -> Optional[OSError]:
    """The ``OSError`` that ``e`` is or was raised from (its ``__cause__``/``__context__`` chain), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read, or is not one of ``train.py``'s."""


#: What every checkpoint of ``train.py`` holds.
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "scaler", "step", "epoch", "batch_in_epoch", "best", "rng",
                 "quantizer_config")


def checkpoint_state(run: Run, eval_pending: bool = False) -> Dict:
    """What ckpt_last.pt / ckpt_best.pt hold of ``run`` (:data:`REQUIRED_KEYS` and more)."""
    return {"model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "step": run.step,
            "epoch": run.epoch, "batch_in_epoch": run.batch_in_epoch, "best": run.best, "rng": rng_state(),
            "quantizer_config": run.identity, "eval_pending": eval_pending,
            "args": {k: v for k, v in vars(run.args).items()}, "world_size": run.dist.world,
            "total_steps": run.total_steps, "recipe_changes": run.recipe_changes}


def save_checkpoint(run: Run, best_too: bool = False, eval_pending: bool = False) -> None:
    """Rank 0 writes ckpt_last.pt (and ckpt_best.pt when ``best_too``) atomically; other ranks do nothing."""
    if run.dist.master:
        state = checkpoint_state(run, eval_pending)
        atomic_save(state, os.path.join(run.args.output_dir, LAST))
        if best_too:
            atomic_save(state, os.path.join(run.args.output_dir, BEST))


def load(path: str, map_location: str = "cpu") -> Dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); :class:`CheckpointError` says why when the file
    is truncated, junk or not a training checkpoint."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip reader, unpickler and EOF errors all mean "unreadable"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, or not written by torch.save: "
                              f"{type(e).__name__}: {first[:200]})") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint of train.py (missing {', '.join(missing)})")
    return state


def find_resume(output_dir: str, resume: Optional[str]) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """``--resume`` value -> ``(path, state)``, or ``(None, None)`` for a fresh start.

    ``auto`` = ``OUTPUT_DIR/ckpt_last.pt``, falling back (with a warning) to ``ckpt_best.pt`` when the
    last one is unreadable (e.g. a disk that lost the file's tail); a fresh start when neither exists.
    An explicit path must exist and be readable.
    """
    if not resume:
        return None, None
    if resume != "auto":
        if not os.path.isfile(resume):
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
        return resume, load(resume)
    last, best = os.path.join(output_dir, LAST), os.path.join(output_dir, BEST)
    if not (os.path.isfile(last) or os.path.isfile(best)):
        return None, None
    problems = []
    for path in (last, best):
        if not os.path.isfile(path):
            problems.append(f"{path} does not exist")
            continue
        try:
            state = load(path)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            log.warning("%s is unreadable: %s; falling back to %s (step %d): the steps after it are trained "
                        "again", last, problems[0], path, state["step"])
        return path, state
    raise CheckpointError(f"no readable checkpoint in {output_dir}: {'; '.join(problems)}. Start a new run with "
                          "--overwrite (or another --output-dir), or pass --resume PATH to a good checkpoint")


def remove_stale_temps(output_dir: str) -> List[str]:
    """Delete the temp files that a run killed mid-write leaves behind (``*.tmp<pid>``); return them."""
    removed = []
    for name in os.listdir(output_dir):
        if re.search(r"\.tmp\d+$", name) or name.endswith(".tmp.png"):
            os.remove(os.path.join(output_dir, name))
            removed.append(name)
    return removed


def rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA RNG states as tensors / plain types."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
