"""Smoke test of the rate–distortion study (training/study.py): the whole grid at a toy scale, its
skip/resume/lock logic, the report it writes, and training/evaluate.py on a folder of images."""
from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("matplotlib")

from training import study  # noqa: E402

# 1 step per run, 16x16 crops, width 4, no LPIPS (the VGG is what makes a run cost seconds).
TOY = ["--steps", "1", "--image-size", "16", "--model-width", "4", "--batch-size", "2", "--no-lpips",
       "--embedded-epoch-size", "4", "--threads", "1"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """The whole grid (every configuration, one seed) at the toy scale, then the report."""
    root = tmp_path_factory.mktemp("study")
    results = root / "results"
    code = study.main([*TOY, "--seeds", "0", "--length", "short", "--root", str(root / "runs"),
                       "--results-dir", str(results)])
    return root, results, code


def test_grid_runs_every_configuration_and_reports(grid):
    root, results, code = grid
    assert code == 0
    names = [n for n in study.CONFIGS if study.lucidrains_available() or n not in study.LUCIDRAINS]
    for name in names:
        d = study.run_dir(str(root / "runs"), name, 0, 1)
        assert study.is_finished(d, 1), name
        with open(os.path.join(d, "eval_heldout", "eval.json")) as f:
            ev = json.load(f)
        K = len(ev["residual_rms"])
        assert len(ev["psnr_by_stages"]) == len(ev["codebook_usage"]) == len(ev["perplexity"]) == K
        assert ev["photos"] == len(study.HELDOUT) and ev["lpips"] is None
        with open(os.path.join(d, "config.json")) as f:
            assert json.load(f)["holdout_photos"] == list(study.HELDOUT)
    for f in ("table.md", "summary.json", "rate_distortion.png", "residual_decay.png", "reconstructions.png"):
        assert (results / f).is_file(), f
    table = (results / "table.md").read_text()
    assert "| fsq22 |" in table and "| rfsq4-ln |" in table and "Pairwise verdicts" in table
    # bits/token of the matched-bit single-stage FSQ equal the RFSQs'
    assert "| fsq22 | FSQ [64,64,64,16] (22 bit) | 22 |" in table and "| fsq40 | FSQ [256]*5 (40 bit) | 40 |" in table


def test_finished_runs_are_skipped_and_busy_ones_left_alone(grid, capsys):
    root, results, _ = grid
    runs = str(root / "runs")
    assert study.main([*TOY, "--seeds", "0", "--only", "fsq", "--length", "short", "--root", runs, "--no-report"]) == 0
    assert "skipped" in capsys.readouterr().err
    # a run held by a live process (this one) is not touched
    d = study.run_dir(runs, "lfq", 5, 1)
    assert study.acquire_lock(d)
    assert study.main([*TOY, "--seeds", "5", "--only", "lfq", "--length", "short", "--root", runs, "--no-report"]) == 1
    assert "busy" in capsys.readouterr().err and not os.path.exists(os.path.join(d, "results.json"))
    study.release_lock(d)


def test_interrupted_run_is_continued(tmp_path):
    from training.train import main as train_main

    runs = str(tmp_path / "runs")
    d = study.run_dir(runs, "rfsq2-ln", 0, 4)
    scale = {"image_size": 16, "model_width": 4, "batch_size": 2, "no_lpips": True, "embedded_epoch_size": 4}
    assert train_main(study.train_argv("rfsq2-ln", 0, 4, d, scale) + ["--stop-at-step", "2"]) == 0
    assert not os.path.exists(os.path.join(d, "results.json"))
    assert study.main(["--steps", "4", "--image-size", "16", "--model-width", "4", "--batch-size", "2", "--no-lpips",
                       "--embedded-epoch-size", "4", "--seeds", "0", "--only", "rfsq2-ln", "--length", "short",
                       "--root", runs, "--no-report"]) == 0
    assert "resumed from" in open(os.path.join(d, "train.log")).read()
    assert study.is_finished(d, 4)


def test_long_runs_are_the_main_configurations_ten_times_longer():
    runs = study.plan(None, [0, 1], 100, "long")
    assert sorted({n for n, _, _ in runs}) == sorted(study.MAIN)
    assert {s for _, _, s in runs} == {100 * study.LONG_FACTOR} and len(runs) == 2 * len(study.MAIN)


def test_evaluate_cli_on_a_folder_of_images(grid, tmp_path, capsys):
    from PIL import Image

    import numpy as np
    from training.evaluate import main as evaluate_main

    root, _, _ = grid
    folder = tmp_path / "photos" / "nested"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (70, 33), dtype=np.uint8)).save(folder / "b.jpg")  # greyscale
    (folder / "broken.png").write_bytes(b"not an image")
    d = study.run_dir(str(root / "runs"), "rfsq4-ln", 0, 1)
    assert evaluate_main([d, "--val-dir", str(tmp_path / "photos")]) == 0
    out = os.path.join(d, "eval_photos")
    with open(os.path.join(out, "eval.json")) as f:
        ev = json.load(f)
    assert ev["photos"] == 2 and len(ev["psnr_by_stages"]) == 4 and ev["bits_per_token"] == 40.0
    assert os.path.isfile(os.path.join(out, "reconstructions.png"))
    assert "broken.png is unreadable" in capsys.readouterr().err
    assert evaluate_main([d, "--val-dir", str(tmp_path / "missing")]) == 1
    assert evaluate_main([str(tmp_path)]) == 1  # not a run directory


def test_holdout_split_is_by_image_and_keeps_the_stereo_pair_together():
    import torch

    from training.data import DataError, embedded_photo_names, split_embedded

    names = embedded_photo_names()
    photos = [torch.full((3, 4, 4), float(i)) for i in range(len(names))]
    train, val = split_embedded(photos, ["chelsea", "stereo_motorcycle"])
    held = {int(p[0, 0, 0]) for p in val}
    assert {names[i] for i in held} == {"chelsea", "stereo_motorcycle:left", "stereo_motorcycle:right"}
    assert held.isdisjoint(int(p[0, 0, 0]) for p in train) and len(train) + len(val) == len(photos)
    with pytest.raises(DataError, match="unknown photo"):
        split_embedded(photos, ["nope"])
