"""Atomic checkpoints that load with ``torch.load(..., weights_only=True)``.

Everything stored is tensors or plain Python types (RNG states included), so loading never
unpickles arbitrary objects. ``ckpt_last.pt`` is the latest state, ``ckpt_best.pt`` the one with the
best validation score so far.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

LAST = "ckpt_last.pt"
BEST = "ckpt_best.pt"


def atomic_save(obj: Dict[str, Any], path: str) -> None:
    """``torch.save`` to a temp file in the same directory, fsync, then ``os.replace`` (atomic)."""
    path = str(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str, map_location: str = "cpu") -> Dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def find_resume(output_dir: str, resume: Optional[str]) -> Optional[str]:
    """``--resume`` value -> checkpoint path: ``auto`` = ``OUTPUT_DIR/ckpt_last.pt`` if present (else
    None: fresh start); a path must exist."""
    if not resume:
        return None
    if resume == "auto":
        p = Path(output_dir) / LAST
        return str(p) if p.is_file() else None
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
    return resume


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
