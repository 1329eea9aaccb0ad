"""The study's committed progress: one small JSON record per finished run.

A run's directory (checkpoints, logs, images) lives in the git-ignored ``runs/`` and is lost with the
machine; its **record** is what the report needs of it (a few KB: the run's results, its config, the
held-out evaluation and the per-photo metrics) and is committed under ``training/results/records/``:

    records/<group>/<steps>steps/fold<f>/<config>-seed<k>.json

``group`` is ``main`` for the grid and ``losscheck-<variant>`` for the loss check. The runner treats a
record as a finished run (a fresh clone continues where the last commit stopped), and the report is
built from every record, so running part of the study never drops a committed result.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from typing import Dict, List, Optional

#: results.json keys left out of a record (a list of unreadable files: unbounded, not needed by the report)
DROP_RESULT_KEYS = ("skipped_files",)
MAIN_GROUP = "main"
#: the lock file that serialises git operations on the landing checkout (shared with tools that merge)
GIT_LOCK = "/tmp/main-merge.lock"

Data = Dict[int, Dict[str, List[dict]]]


def record_path(records_dir: str, group: str, name: str, seed: int, steps: int, fold: int) -> str:
    """Where the record of run (``name``, ``seed``, ``fold``, ``steps``) of ``group`` lives."""
    return os.path.join(records_dir, group, f"{steps}steps", f"fold{fold}", f"{name}-seed{seed}.json")


def make_record(run_dir: str, name: str, seed: int, fold: int) -> dict:
    """The record of a finished run directory (results.json, config.json, eval_heldout/{eval,photos}.json)."""
    def load(*parts):
        with open(os.path.join(run_dir, *parts)) as f:
            return json.load(f)

    results, config = load("results.json"), load("config.json")
    return {
        "config_name": name, "seed": seed, "fold": fold,
        "results": {k: v for k, v in results.items() if k not in DROP_RESULT_KEYS},
        "config": config,
        "heldout": load("eval_heldout", "eval.json"),
        "photos": load("eval_heldout", "photos.json")["photos"],
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
    }


def write_record(path: str, record: dict) -> None:
    """Write ``record`` to ``path`` atomically (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def load_records(records_dir: str, group: str = MAIN_GROUP) -> Data:
    """``{steps: {config: [run, ...]}}`` of every record of ``group``; a run has the report's fields
    (results.json's keys at the top, ``config``, ``heldout``, ``photos``, ``seed``, ``fold``)."""
    out: Data = defaultdict(lambda: defaultdict(list))
    base = os.path.join(records_dir, group)
    if not os.path.isdir(base):
        return {}
    for steps_dir in sorted(os.listdir(base)):
        m = re.fullmatch(r"(\d+)steps", steps_dir)
        if not m:
            continue
        for fold_dir in sorted(os.listdir(os.path.join(base, steps_dir))):
            if not re.fullmatch(r"fold\d+", fold_dir):
                continue
            for fn in sorted(os.listdir(os.path.join(base, steps_dir, fold_dir))):
                if not fn.endswith(".json"):
                    continue
                with open(os.path.join(base, steps_dir, fold_dir, fn)) as f:
                    rec = json.load(f)
                run = dict(rec["results"])
                run.update(config=rec["config"], heldout=rec["heldout"], photos=rec["photos"], seed=rec["seed"],
                           fold=rec["fold"], finished_utc=rec.get("finished_utc"), run_dir=None)
                if run.get("steps") != int(m.group(1)):
                    continue
                out[int(m.group(1))][rec["config_name"]].append(run)
    return {s: dict(v) for s, v in sorted(out.items())}


def record_groups(records_dir: str) -> List[str]:
    """The groups that have records (``main`` first)."""
    if not os.path.isdir(records_dir):
        return []
    groups = sorted(g for g in os.listdir(records_dir) if os.path.isdir(os.path.join(records_dir, g)))
    return sorted(groups, key=lambda g: g != MAIN_GROUP)


def commit_records(paths: List[str], message: str, attempts: int = 20) -> bool:
    """``git add`` + ``git commit`` exactly ``paths`` (nothing else that is staged) in the repository
    that holds them, under :data:`GIT_LOCK`, retrying while another git operation holds the index.
    Returns whether the commit was made; a failure is reported on stderr, never raised (the record
    stays on disk and is committed with the next one)."""
    if not paths:
        return True
    repo = os.path.dirname(os.path.abspath(paths[0]))
    err = ""
    for i in range(attempts):
        with open(GIT_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                add = subprocess.run(["git", "add", "--", *paths], cwd=repo, capture_output=True, text=True)
                if add.returncode == 0:
                    com = subprocess.run(["git", "commit", "-q", "-m", message, "--", *paths], cwd=repo,
                                         capture_output=True, text=True)
                    if com.returncode == 0:
                        return True
                    err = com.stdout + com.stderr
                else:
                    err = add.stderr
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        time.sleep(min(30, 2 + 2 * i))
    print(f"warning: could not commit {len(paths)} study record(s): {err.strip()[:300]}", file=sys.stderr)
    return False


def uncommitted_records(records_dir: str) -> List[str]:
    """Record files under ``records_dir`` that git does not track yet or that differ from HEAD."""
    if not os.path.isdir(records_dir):
        return []
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", "."], cwd=records_dir,
                         capture_output=True, text=True)
    if out.returncode != 0:
        return []
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=records_dir, capture_output=True,
                         text=True).stdout.strip()
    paths = [os.path.join(top, ln[3:].strip()) for ln in out.stdout.splitlines() if ln.strip()]
    return [p for p in paths if p.endswith(".json")]


def covered(data: Data) -> set:
    """``{(steps, config, seed, fold)}`` of the runs in ``data``."""
    return {(int(s), n, r["seed"], r["fold"]) for s, by in data.items() for n, runs in by.items() for r in runs}


def summary_runs(summary_path: str, key: str = "main") -> Optional[set]:
    """``{(steps, config, seed, fold)}`` of the runs a committed ``summary.json`` reports (None if absent)."""
    if not os.path.isfile(summary_path):
        return None
    with open(summary_path) as f:
        summ = json.load(f).get(key, {})
    return {(int(s), n, r["seed"], r["fold"]) for s, by in summ.items() for n, runs in by.items() for r in runs}
