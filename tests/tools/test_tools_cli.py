"""Tool command lines (issue 18, item 8): ``gpucheck --arch`` says what it checked and refuses
targets it cannot compile for; ``bench/report.py`` refuses unknown groups and never overwrites a
run of the same day."""
from __future__ import annotations

import ast
import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest

import rfsq_kernels.gpucheck.__main__ as gpucheck_cli
from bench.report import main as report_main
from bench.report import results_stem


def _without_interpreter(monkeypatch) -> None:
    """Unset ``TRITON_INTERPRET`` for one test (the gpucheck CLI refuses to run under it), with
    every kernel module imported first: ``@triton.jit`` decides at decoration time whether a kernel
    is interpreted, so a kernel module first imported while the variable is unset would keep real
    GPU kernels for the rest of the session, and later interpreter tests would fail in Triton's
    driver."""
    from rfsq_kernels.gpucheck.sweep import kernel_modules

    kernel_modules()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("archs", [["12"], ["90", "77"], ["0"]])
def test_gpucheck_refuses_targets_it_cannot_compile_for(archs, monkeypatch, capsys):
    _without_interpreter(monkeypatch)
    monkeypatch.setattr(gpucheck_cli, "run_parallel", lambda *a, **k: pytest.fail("compiled an unknown target"))
    with pytest.raises(SystemExit) as e:
        gpucheck_cli.main(["--arch", *archs])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not a target of this check; choose from 80 90" in err and "Traceback" not in err


def test_gpucheck_reports_only_the_targets_it_compiled(monkeypatch, capsys):
    _without_interpreter(monkeypatch)
    seen = {}
    monkeypatch.setattr(gpucheck_cli, "run_parallel",
                        lambda archs, **k: (seen.update(archs=archs, sass=k["sass"]), ([], []))[1])
    monkeypatch.setattr(gpucheck_cli, "check", lambda *a, **k: [])
    assert gpucheck_cli.main(["--arch", "90"]) == 0
    out = capsys.readouterr().out
    assert seen["archs"] == [90] and "compiled for sm_90, no spills on sm_90" in out and "sm_80" not in out
    assert seen["sass"] is False  # no --json: nothing would read the SASS counts and digests


def test_gpucheck_says_what_to_do_when_a_compiler_worker_dies(monkeypatch, capsys):
    from concurrent.futures.process import BrokenProcessPool

    _without_interpreter(monkeypatch)

    def broken(*a, **k):
        raise BrokenProcessPool("A process in the process pool was terminated abruptly")

    monkeypatch.setattr(gpucheck_cli, "run_parallel", broken)
    assert gpucheck_cli.main(["--arch", "80"]) == 1
    assert "--jobs 1" in capsys.readouterr().err


def test_report_refuses_unknown_groups_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as e:
        report_main(["--groups", "nonsense", "training"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown case groups ['nonsense']" in err and "training" in err.split("choose from")[1]


def test_report_files_of_the_same_day_get_distinct_names(tmp_path):
    day = dt.date(2026, 11, 30)
    assert results_stem(tmp_path, "cpu", day) == "cpu-2026-11-30"
    (tmp_path / "cpu-2026-11-30.json").write_text("{}")
    assert results_stem(tmp_path, "cpu", day) == "cpu-2026-11-30-2"
    (tmp_path / "cpu-2026-11-30-2.png").write_bytes(b"")
    assert results_stem(tmp_path, "cpu", day) == "cpu-2026-11-30-3"
    assert results_stem(tmp_path, "h100", day) == "h100-2026-11-30"


# -- issue 25, item 13: outputs and names checked before the work ----------------------------------------
def _no_sweep(monkeypatch):
    _without_interpreter(monkeypatch)
    monkeypatch.setattr(gpucheck_cli, "run_parallel", lambda *a, **k: pytest.fail("swept before checking the flags"))


@pytest.mark.parametrize("argv,match", [
    (["--json", "/proc/no/such/dir/out.json"], r"--json /proc/no/such/dir/out.json: cannot write there \(No such file"),
    (["--strategy", "nosuch"], r"--strategy nosuch: unknown strategy; choose from none scale layernorm"),
    (["--plugin", "/missing.py"], r"--plugin /missing.py: no such file"),
])
def test_gpucheck_refuses_bad_outputs_and_names_before_the_sweep(argv, match, monkeypatch, capsys):
    import re

    _no_sweep(monkeypatch)
    with pytest.raises(SystemExit) as e:
        gpucheck_cli.main(["--arch", "80", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(match, err) and "Traceback" not in err


def test_gpucheck_json_is_written_at_the_end_only(tmp_path, monkeypatch, capsys):
    _without_interpreter(monkeypatch)
    out = tmp_path / "r.json"
    seen = {}

    def sweep(*a, **k):
        seen["files"] = sorted(p.name for p in tmp_path.iterdir())  # claimed before the sweep
        seen["sass"] = k["sass"]
        return [], []

    monkeypatch.setattr(gpucheck_cli, "run_parallel", sweep)
    monkeypatch.setattr(gpucheck_cli, "check", lambda *a, **k: [])
    assert gpucheck_cli.main(["--arch", "80", "--json", str(out)]) == 0
    assert len(seen["files"]) == 1 and seen["files"][0].startswith("r.json.") and seen["sass"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"] and '"archs": [' in out.read_text()


def test_compare_refuses_an_unwritable_out_before_reading(tmp_path, capsys):
    from training import compare

    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        compare.main([str(tmp_path / "missing_run"), "--out", str(tmp_path / "file" / "table.md")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--out {tmp_path / 'file' / 'table.md'}: cannot write there" in err
    assert "Traceback" not in err and "not found" not in err  # refused before the run dirs were read
    assert compare.main([str(tmp_path / "missing_run"), "--out", str(tmp_path / "t.md")]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no temp file left behind


def test_kernel_report_model_time_is_the_larger_of_bytes_and_instructions():
    """bench/kernel_report.py's `µs model` column: bytes counted at the copy bandwidth or the
    instruction time, whichever is larger; the instruction time alone without a byte count."""
    from bench.kernel_report import COPY_BYTES_PER_S, model_us

    row = {"instr_us": 10.0}
    assert model_us(row, {"fwd_load": 3e6 * COPY_BYTES_PER_S / 1e12, "fwd_store": 0}, "fwd") == 10.0
    assert model_us(row, {"bwd_load": 40e-6 * COPY_BYTES_PER_S, "bwd_store": 20e-6 * COPY_BYTES_PER_S},
                    "bwd") == pytest.approx(60.0)
    assert model_us(row, {}, "fwd") == 10.0


def test_official_parity_runs_as_a_script_from_anywhere(tmp_path):
    """``bench/official_parity.py`` imports its harness from ``tests/official_rfsq.py`` through its
    own ``sys.path`` setup: run it as docs/semantics.md does (one seed, from another folder) so a
    moved helper cannot break it silently; ``none`` is bitwise (as tests/dropins/test_official.py
    asserts), so its line must show no flip and 0 ulp."""
    script = Path(__file__).resolve().parents[2] / "bench" / "official_parity.py"
    done = subprocess.run([sys.executable, str(script), "1"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [ast.literal_eval(line) for line in done.stdout.splitlines()]
    assert [r["strategy"] for r in rows] == ["none", "scale", "layernorm"]
    assert all(r["indices"] == 1536 and r["flips"] <= 4 for r in rows)
    assert rows[0]["max_value_ulp"] == rows[0]["max_grad_ulp"] == 0.0 and rows[0]["flips"] == 0
