"""Shared helpers of the training tests: tiny, fast runs of training/train.py in-process."""
from __future__ import annotations

import json
import os
from typing import List

TINY = ["--image-size", "32", "--model-width", "8", "--batch-size", "4", "--embedded-epoch-size", "16",
        "--log-every", "1"]


def train(out, *argv: str) -> int:
    """Run ``training.train.main`` with the tiny settings and ``--output-dir out``; return its exit code."""
    from training.train import main

    return main([*TINY, "--output-dir", str(out), *argv])


def read_jsonl(path) -> List[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def results(out) -> dict:
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def skip_outputs_for_speed(monkeypatch) -> None:
    """For tests of control flow, not outputs: 8 validation crops instead of 57, no PNGs."""
    import training.run_state as run_state
    import training.train as train_mod

    class SmallVal(run_state.EmbeddedVal):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.items = self.items[:8]

    monkeypatch.setattr(run_state, "EmbeddedVal", SmallVal)
    monkeypatch.setattr(train_mod, "plot_curves", lambda *a, **k: [])
    monkeypatch.setattr(train_mod, "save_grid", lambda *a, **k: None)
