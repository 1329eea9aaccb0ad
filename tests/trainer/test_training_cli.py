"""Flags, presets and the comparison table of training/."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.compare import main as compare_main
from training.compare import markdown_table
from training.model import AutoEncoder, build_quantizer, quantizer_kwargs
from training.presets import PAPER_TABLE1, PRESETS, preset_of
from training.run_state import lr_lambda
from training.train import build_parser, parse_args

ROOT = Path(__file__).resolve().parents[2]

EXPECTED = {  # preset -> (quantizer, stages, codes per stage, bits/token, latent channels)
    "vq-ema": ("ema", 1, 4096, 12.0, 6), "fsq": ("fsq", 1, 4096, 12.0, 4), "lfq": ("lfq", 1, 4096, 12.0, 12),
    "rfsq2-none": ("rfsq", 2, 2048, 22.0, 4), "rfsq2-scale": ("rfsq", 2, 2048, 22.0, 4),
    "rfsq2-ln": ("rfsq", 2, 2048, 22.0, 4), "rfsq4-none": ("rfsq", 4, 1024, 40.0, 5),
    "rfsq4-scale": ("rfsq", 4, 1024, 40.0, 5), "rfsq4-ln": ("rfsq", 4, 1024, 40.0, 5),
}


def test_paper_defaults():
    a = parse_args(["--train-dir", "x", "--val-dir", "y"])
    assert (a.quantizer, a.rfsq_stages, a.rfsq_strategy, a.rfsq_initial_scale) == ("rfsq", 2, "layernorm", 1.0)
    assert (a.batch_size, a.lr, a.max_train_epochs, a.weight_decay, a.warmup, a.grad_clip) == (128, 8e-4, 50, 5e-5, 0.01, 1.0)
    assert (a.amp, a.quantizer_backend, a.channels_last, a.compile, a.no_lpips) == ("none", "auto", False, False, False)
    if not torch.cuda.is_available():
        assert parse_args([]).batch_size == 4  # embedded photos on CPU


def test_official_flags_parse():
    a = parse_args(["--quantizer", "rfsq", "--rfsq-stages", "4", "--rfsq-strategy", "scale", "--rfsq-initial-scale", "2",
                    "--levels", "4", "4", "4", "4", "4", "--batch-size", "64", "--lr", "0.001", "--max-train-epochs", "3",
                    "--weight-decay", "0", "--warmup", "50", "--embed-dim", "8", "--n-embed", "512", "--lfq-dim", "10",
                    "--amp", "bf16", "--channels-last", "--compile", "--max-steps", "10", "--eval-every", "5",
                    "--save-every", "5", "--num-workers", "2", "--resume", "--seed", "3", "--no-lpips",
                    "--quantizer-backend", "reference", "--output-dir", "o"])
    assert a.levels == [4, 4, 4, 4, 4] and a.rfsq_initial_scale == 2.0 and a.resume == "auto" and a.warmup == 50
    assert parse_args(["--resume", "some.pt"]).resume == "some.pt"
    text = build_parser().format_help()
    for flag in ("--preset", "--quantizer-backend", "--lpips-weights", "--no-lpips", "--max-steps", "--resume",
                 "--channels-last", "--compile", "--amp", "training.lpips_weights", "--fetch"):
        assert flag in text


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_build_the_paper_models(preset):
    a = parse_args(["--preset", preset])
    kind, stages, codes, bits, channels = EXPECTED[preset]
    q = build_quantizer(a.quantizer, **quantizer_kwargs(a, backend="reference"))
    assert (q.kind, q.stages, q.codebook_size, q.bits_per_token) == (kind, stages, codes, bits)
    model = AutoEncoder(q, width=8)
    recon, z, idx, aux = model(torch.randn(2, 3, 32, 32))
    assert recon.shape == (2, 3, 32, 32) and z.shape == (2, channels, 8, 8) and idx.shape == (2, 8, 8, stages)
    assert aux.ndim == 0 and int(idx.min()) >= 0 and int(idx.max()) < codes
    assert preset_of(vars(a)) == preset and a.output_dir.endswith(preset)


def test_preset_is_overridable():
    a = parse_args(["--preset", "rfsq4-ln", "--rfsq-strategy", "none"])
    assert (a.rfsq_stages, a.rfsq_strategy) == (4, "none") and preset_of(vars(a)) == "rfsq4-none"
    assert preset_of(vars(parse_args(["--levels", "5", "5", "5"]))) == "custom"


def test_lr_schedule_warmup_then_linear_decay():
    f = lr_lambda(1000, 0.01)
    assert f(0) == pytest.approx(0.1) and f(9) == 1.0 and f(10) == 1.0
    assert f(505) == pytest.approx(0.5) and f(999) == pytest.approx(1 / 990) and f(1000) == 0.0


def test_help_runs_as_a_script():
    r = subprocess.run([sys.executable, "training/train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--preset" in r.stdout


def _fake_run(tmp_path, name, preset, l1, lpips):
    d = tmp_path / name
    d.mkdir()
    p = PAPER_TABLE1.get(preset)
    (d / "results.json").write_text(json.dumps({
        "preset": preset, "bits_per_token": {"fsq": 12.0, "rfsq4-ln": 40.0}.get(preset, 22.0), "steps": 10,
        "data": "embedded scikit-image photos", "val": {"l1": l1, "lpips": lpips, "psnr": 20.0},
        "paper": None if p is None else {"name": p[0], "l1": p[1], "lpips": p[2], "psnr": p[3]}}))
    return str(d)


def test_compare_table(tmp_path, capsys):
    dirs = [_fake_run(tmp_path, "b", "rfsq4-ln", 0.1, None), _fake_run(tmp_path, "a", "fsq", 0.2, 0.3)]
    out = tmp_path / "t.md"
    assert compare_main([*dirs, str(tmp_path / "missing"), "--out", str(out)]) == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| run | method | bits/token")
    assert rows[1].startswith("| a | FSQ | 12.0 | 0.200 | 0.300 | 20.0 | 0.143 | 0.182 | 20.3 |")
    assert rows[2].startswith("| b | RFSQ-4x1024-LN | 40.0 | 0.100 | n/a | 20.0 | 0.102 | 0.100 | 22.9 |")
    assert text in capsys.readouterr().out
    assert markdown_table([]).count("\n") >= 2
