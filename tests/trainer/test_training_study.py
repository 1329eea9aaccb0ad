"""The rate–distortion study (training/study/): the whole grid at a toy scale, its skip/resume/lock
logic, the cross-validation split, the real (entropy-coded) rate, the statistics on synthetic data with
known answers, the report, and training/evaluate.py on a folder of images."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from training.study import runner  # noqa: E402
from training.study.grid import (CONFIGS, CV_PHOTOS, LONG_FACTOR, LONG_FOLD, MAIN, N_FOLDS, ON_REQUEST,  # noqa: E402
                                 ORDER, available, folds, plan, run_dir, train_argv)

# 1 step per run, width 4, no LPIPS (the VGG is what makes a run cost seconds); 32x32 crops (the study's
# size) keep the held-out tiles few.
TOY = ["--steps", "1", "--image-size", "32", "--model-width", "4", "--batch-size", "2", "--no-lpips",
       "--embedded-epoch-size", "4", "--threads", "1"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """Every configuration, one seed, fold 0 (and a second seed of two configurations), then the report."""
    root = tmp_path_factory.mktemp("study")
    results = root / "results"
    runs = str(root / "runs")
    assert runner.main([*TOY, "--seeds", "1", "--folds", "0", "--only", "fsq22", "rfsq2-ln", "--length", "short",
                       "--root", runs, "--results-dir", str(results), "--no-report"]) == 0
    if available("vqpy4"):  # not in the grid (same computation as lucid4): run on request
        assert runner.main([*TOY, "--seeds", "0", "--folds", "0", "--only", "vqpy4", "--length", "short",
                           "--root", runs, "--results-dir", str(results), "--no-report"]) == 0
    code = runner.main([*TOY, "--seeds", "0", "--folds", "0", "--length", "short", "--root", runs,
                       "--results-dir", str(results)])
    return root, results, code


def test_grid_runs_every_configuration_and_reports(grid):
    root, results, code = grid
    assert code == 0
    names = [n for n in CONFIGS if available(n)]
    assert {"fsq22", "rfsq4-ln", "vq-ema"} <= set(names)
    for name in names:
        d = run_dir(str(root / "runs"), name, 0, 1, 0)
        assert runner.is_finished(d, 1), name
        with open(os.path.join(d, "eval_heldout", "eval.json")) as f:
            ev = json.load(f)
        K = len(ev["residual_rms"])
        assert len(ev["psnr_by_stages"]) == len(ev["codebook_usage"]) == len(ev["perplexity"]) == K
        assert ev["lpips"] is None
        with open(os.path.join(d, "config.json")) as f:
            assert json.load(f)["holdout_photos"] == list(folds()[0])
        with open(os.path.join(d, "eval_heldout", "photos.json")) as f:
            photos = json.load(f)["photos"]
        assert sorted(photos) == sorted(folds()[0])
        for m in photos.values():  # a real bitstream per photo (above nominal is possible: the 1-step model fits badly)
            assert m["real_bits_per_token"] == 8 * m["bytes"] / m["tokens"] > 0 and m["tiles"] > 0
            assert len(m["ideal_bits_per_stage"]) == K
    if available("vqpy4") and available("lucid4"):  # the exact drop-in reproduces lucidrains' run
        with open(os.path.join(run_dir(str(root / "runs"), "vqpy4", 0, 1, 0), "eval_heldout", "photos.json")) as f:
            a = json.load(f)["photos"]
        with open(os.path.join(run_dir(str(root / "runs"), "lucid4", 0, 1, 0), "eval_heldout", "photos.json")) as f:
            assert a == json.load(f)["photos"]
    for f in ("table.md", "summary.json", "rate_distortion.png", "residual_decay.png", "reconstructions.png"):
        assert (results / f).is_file(), f
    table = (results / "table.md").read_text()
    assert "## What ran" in table and "Pairwise comparisons" in table and "| fsq22 |" in table
    # fsq22 and rfsq2-ln: seeds 0 and 1 on fold 0's 5 photos -> 2 x 5 paired cells
    assert "| 1 | rfsq2-ln | fsq22 | 2 × 5 |" in table
    assert "| 1 | fsq22 | 2 | 0 1 | 0 | 5 |" in table  # coverage: 2 runs, seeds 0 1, fold 0, 5 photos


def test_finished_runs_are_skipped_and_busy_ones_left_alone(grid, capsys):
    root, results, _ = grid
    runs = str(root / "runs")
    args = [*TOY, "--folds", "0", "--length", "short", "--root", runs, "--results-dir", str(results), "--no-report"]
    assert runner.main([*args, "--seeds", "0", "--only", "fsq"]) == 0
    assert "skipped" in capsys.readouterr().err
    d = run_dir(runs, "lfq", 5, 1, 0)  # a run held by a live process (this one) is not touched
    assert runner.acquire_lock(d)
    assert runner.main([*args, "--seeds", "5", "--only", "lfq"]) == 1
    assert "busy" in capsys.readouterr().err and not os.path.exists(os.path.join(d, "results.json"))
    runner.release_lock(d)


def test_interrupted_run_is_continued(tmp_path):
    from training.train import main as train_main

    runs = str(tmp_path / "runs")
    d = run_dir(runs, "rfsq2-ln", 0, 4, 1)
    scale = {"image_size": 32, "model_width": 4, "batch_size": 2, "no_lpips": True, "embedded_epoch_size": 4,
             "lpips_loss_weight": 0.0}  # the study's recipe: resuming with another one is refused
    assert train_main(train_argv("rfsq2-ln", 0, 4, d, scale, 1) + ["--stop-at-step", "2"]) == 0
    assert not os.path.exists(os.path.join(d, "results.json"))
    assert runner.main(["--steps", "4", *TOY[2:], "--seeds", "0", "--folds", "1", "--only", "rfsq2-ln",
                       "--length", "short", "--root", runs, "--results-dir", str(tmp_path / "results"),
                       "--no-report"]) == 0
    assert "resumed from" in open(os.path.join(d, "train.log")).read()
    assert runner.is_finished(d, 4)


def test_plan_is_seed_major_over_every_fold_then_the_long_runs():
    runs = plan(["fsq22", "rfsq2-ln", "rfsq4-ln", "rfsq2-none"], [0, 1], 100, "both")
    short = [r for r in runs if r[2] == 100]
    assert len(short) == 2 * N_FOLDS * 4 and [r[1] for r in short] == [0] * (4 * N_FOLDS) + [1] * (4 * N_FOLDS)
    assert {r[3] for r in short} == set(range(N_FOLDS))
    # within a seed: the headline configurations on every fold, then the others
    assert [(r[0], r[3]) for r in short[:4 * N_FOLDS]] == (
        [(n, f) for f in range(N_FOLDS) for n in ("fsq22", "rfsq2-ln", "rfsq4-ln")] + [("rfsq2-none", f) for f in range(N_FOLDS)])
    long = [r for r in runs if r[2] != 100]
    assert runs[-len(long):] == long and {r[2] for r in long} == {100 * LONG_FACTOR}
    assert {r[0] for r in long} == {"fsq22", "rfsq2-ln", "rfsq4-ln", "rfsq2-none"} and {r[3] for r in long} == {LONG_FOLD}
    assert set(MAIN) >= {r[0] for r in long}
    assert sorted(ORDER + ON_REQUEST) == sorted(CONFIGS) and plan(None, [0], 10, "short")[0][0] == ORDER[0]
    assert "vqpy4" not in {r[0] for r in plan(None, [0], 10, "both")}
    assert {r[0] for r in plan(["vqpy4"], [0], 10, "short")} <= {"vqpy4"}


def test_every_photo_is_held_out_once_and_never_on_both_sides():
    import torch

    from training.data import load_photos
    from training.study.photo_eval import named_split

    fs = folds()
    assert sorted(p for f in fs for p in f) == sorted(CV_PHOTOS) and len(set(CV_PHOTOS)) == len(CV_PHOTOS)
    photos, names = load_photos(64, ("cell", "grace_hopper"))
    scenes = {n.split(":")[0] for n in names}
    assert set(CV_PHOTOS) == scenes - {"colorwheel"}  # every real photo is in some fold
    for f in fs:
        cfg = {"image_size": 32, "holdout_photos": list(f), "extra_photos": ["cell", "grace_hopper"]}
        train, held = named_split(cfg)
        assert {n for n, _ in held} == set(f) and {n for n, _ in train}.isdisjoint(f)
        assert len(train) + len(held) == len(photos) and "colorwheel" in {n for n, _ in train}
        for _, h in held:  # no held-out photo (hence none of its tiles) is among the training photos
            assert not any(t.shape == h.shape and torch.equal(t, h) for _, t in train)
    argv = train_argv("fsq22", 0, 10, "out", {}, 2)
    i = argv.index("--holdout-photos")
    assert argv[i + 1:i + 1 + len(fs[2])] == list(fs[2])


def test_extra_photos_load_offline_and_bad_names_are_refused():
    from training.data import DataError, load_extra_photos
    from training.train import parse_args

    cell, hopper = load_extra_photos(("cell", "grace_hopper"), 64)
    assert cell.shape[0] == hopper.shape[0] == 3 and min(cell.shape[1:]) == min(hopper.shape[1:]) == 64
    assert bool((cell[0] == cell[1]).all()) and not bool((hopper[0] == hopper[1]).all())  # grey / RGB
    with pytest.raises(DataError, match="unknown photo"):
        load_extra_photos(("nope",), 64)
    with pytest.raises(SystemExit):
        parse_args(["--extra-photos", "nope"])


def test_real_rate_round_trip_and_known_entropy():
    from training.entropy_rate import code_tokens, decode, encode, fit_factorized, split_digits

    rng = np.random.default_rng(0)
    sizes = [4, 8]
    p0, p1 = np.array([0.7, 0.1, 0.1, 0.1]), np.full(8, 1 / 8)
    n = 20000
    train = np.stack([rng.choice(4, n, p=p0), rng.choice(8, n, p=p1)], 1)
    test = np.stack([rng.choice(4, n, p=p0), rng.choice(8, n, p=p1)], 1).astype(np.int32)
    probs = fit_factorized(train, sizes)
    r = code_tokens(test, probs)
    entropy = -(p0 * np.log2(p0)).sum() + 3.0  # 1.357 + 3 bits
    assert abs(r["ideal_bits_per_token"] - entropy) < 0.02
    assert r["ideal_bits_per_token"] <= r["bits_per_token"] < r["ideal_bits_per_token"] + 0.01  # real stream
    assert r["bytes"] == len(encode(test, probs)) * 4 and r["ideal_bits_per_column"][0] < 1.4  # fitted, not uniform
    assert np.array_equal(decode(encode(test, probs), probs, n), test)
    # held-out codes spread wider than the training ones: the column falls back to uniform (never much
    # above the nominal log2(4) + log2(8) = 5 bits), and still decodes exactly
    narrow = np.stack([np.zeros(n, int), rng.choice(8, n, p=p1)], 1)
    wide = np.stack([rng.choice(4, 500), rng.choice(8, 500, p=p1)], 1).astype(np.int32)
    r = code_tokens(wide, fit_factorized(narrow, sizes))
    assert r["uniform_columns"] >= 1 and r["bits_per_token"] < 5.1 and r["ideal_bits_per_column"][0] == 2.0
    # a symbol never seen in training stays codable (pseudo-count), and decodes exactly
    probs = fit_factorized(np.zeros((10, 2), np.int32), sizes)
    assert code_tokens(np.array([[3, 7], [0, 0]], np.int32), probs)["tokens"] == 2
    # packed indices -> digits (place values cumprod([1] + levels[:-1])), two stages
    import torch

    idx = torch.tensor([[0 + 4 * 7, 3 + 4 * 2]])
    assert split_digits(idx, sizes).tolist() == [[0, 7, 3, 2]]
    with pytest.raises(ValueError, match="outside the codebook"):
        split_digits(torch.tensor([[32]]), sizes)


def test_statistics_on_synthetic_data_with_known_answers():
    from training.study.stats import NO_DIFFERENCE, bootstrap_ci, compare, paired_matrix, spread, verdict

    # constant difference: the interval is that constant
    assert bootstrap_ci(np.full((3, 5), 0.25)) == pytest.approx((0.25, 0.25, 0.25))
    # coverage of the true mean difference (photo and seed effects + noise), nominal 95 %
    rng = np.random.default_rng(1)
    hits = 0
    for r in range(120):
        d = 0.3 + 0.2 * rng.normal(size=(5, 1)) + 0.8 * rng.normal(size=(1, 17)) + 0.3 * rng.normal(size=(5, 17))
        _, lo, hi = bootstrap_ci(d, n_boot=800, seed=r)
        hits += lo <= 0.3 <= hi
    assert 0.85 <= hits / 120 <= 1.0
    # the expanded percentile: wider at few photos, the plain one as photos grow
    from training.study.stats import expanded_alpha

    assert expanded_alpha(0.025, 5) < expanded_alpha(0.025, 17) < expanded_alpha(0.025, 10**6) == pytest.approx(0.025, abs=1e-4)
    # a clear difference is found with the right sign; none where there is none
    big = 1.0 + 0.1 * rng.normal(size=(5, 17))
    _, lo, hi = bootstrap_ci(big)
    assert verdict(lo, hi, True) == "better" and verdict(lo, hi, False) == "worse"
    _, lo, hi = bootstrap_ci(0.1 * rng.normal(size=(5, 17)) - 0.1 * rng.normal(size=(5, 17)))
    assert verdict(lo, hi, True) == NO_DIFFERENCE
    # pairing: only cells both sides have; differences per (seed, photo)
    a = {(0, "x"): 3.0, (0, "y"): 5.0, (1, "x"): 4.0}
    b = {(0, "x"): 1.0, (0, "y"): 2.0, (2, "x"): 9.0}
    assert paired_matrix(a, b).tolist() == [[2.0, 3.0]]
    c = compare(a, b, higher_is_better=True)
    assert c["mean"] == pytest.approx(2.5) and (c["seeds"], c["photos"]) == (1, 2) and c["verdict"] == "better"
    assert compare(a, {(7, "z"): 1.0}, True) is None
    assert compare(a, a, True)["verdict"] == "identical"
    # spread: SD over seeds of the per-seed photo means, SD over photos of the per-photo seed means
    sp = spread({(0, "x"): 1.0, (0, "y"): 3.0, (1, "x"): 3.0, (1, "y"): 5.0})
    assert sp["mean"] == 3.0 and sp["sd_seeds"] == pytest.approx(np.std([2, 4], ddof=1)) and sp["n_seeds"] == 2
    assert sp["sd_photos"] == pytest.approx(np.std([2, 4], ddof=1)) and sp["n_photos"] == 2
    assert spread({(0, "x"): 1.0})["sd_seeds"] is None


def test_rate_verdicts():
    from training.study.report import rate_verdict
    from training.study.stats import NO_DIFFERENCE

    def v(x):
        return {"verdict": x}

    assert rate_verdict(v("better"), v("worse")) == "better, at more real bits (trade-off)"
    assert rate_verdict(v("better"), v(NO_DIFFERENCE)) == "better"
    assert rate_verdict(v(NO_DIFFERENCE), v("better")) == "better (same PSNR, fewer real bits)"
    assert rate_verdict(v("worse"), v("better")) == "worse, at fewer real bits (trade-off)"
    assert rate_verdict(v(NO_DIFFERENCE), v(NO_DIFFERENCE)) == NO_DIFFERENCE


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        runner.main(["--threads", "0"])
    assert e.value.code == 2 and "--threads: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        runner.main(["--jobs", "0"])
    assert runner.main(["--report", "--root", str(tmp_path / "none"), "--results-dir", str(tmp_path / "r")]) == 1
    assert "no study record" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_runner_and_report_do_not_import_each_other():
    code = ("import sys, training.study.report as r; assert 'training.study.runner' not in sys.modules; "
            "assert not hasattr(r, 'METRICS')")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_evaluate_cli_on_a_folder_of_images(grid, tmp_path, capsys):
    from PIL import Image

    from training.evaluate import main as evaluate_main

    root, _, _ = grid
    folder = tmp_path / "photos" / "nested"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (70, 33), dtype=np.uint8)).save(folder / "b.jpg")  # greyscale
    (folder / "broken.png").write_bytes(b"not an image")
    d = run_dir(str(root / "runs"), "rfsq4-ln", 0, 1, 0)
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


def test_seeds_pair_init_across_configurations_of_one_latent_width():
    """Same seed -> the same encoder/decoder initialisation for every configuration of one latent width
    (the quantizers' own parameters are deterministic or drawn after), as run_state.setup_run builds them."""
    import torch

    from training.model import AutoEncoder, build_quantizer, quantizer_kwargs
    from training.train import parse_args

    for group in (("fsq22", "rfsq2-none", "rfsq2-scale", "rfsq2-ln", "lucid2"),
                  ("fsq40", "rfsq4-none", "rfsq4-scale", "rfsq4-ln", "lucid4", "vqpy4")):
        weights = []
        for name in (n for n in group if available(n)):
            a = parse_args(train_argv(name, 3, 10, "unused", {"model_width": 4}, 0))
            torch.manual_seed(a.seed)
            model = AutoEncoder(build_quantizer(a.quantizer, **quantizer_kwargs(a, backend="reference")), width=4)
            weights.append({k: v for k, v in model.state_dict().items() if k.startswith(("encoder.", "decoder."))})
        for w in weights[1:]:
            assert w.keys() == weights[0].keys() and all(torch.equal(w[k], weights[0][k]) for k in w)


def _copy_records(results, dest):
    import shutil

    shutil.copytree(results / "records", dest / "records")


def test_a_clone_with_records_continues_without_rerunning_them(grid, tmp_path, capsys):
    """A fresh clone has the committed records but no run directories: those runs are finished."""
    _, results, _ = grid
    _copy_records(results, tmp_path)
    runs = tmp_path / "runs"
    assert runner.main([*TOY, "--seeds", "0", "1", "--folds", "0", "--only", "fsq22", "rfsq2-ln", "--length", "short",
                       "--root", str(runs), "--results-dir", str(tmp_path), "--no-report"]) == 0
    err = capsys.readouterr().err
    assert err.count(": skipped") == 4 and ": done" not in err
    assert not runs.exists() or not any((runs / "1steps").rglob("results.json"))


def test_a_worker_that_saw_a_busy_run_is_not_counted_as_a_failed_run(grid, tmp_path, capsys, monkeypatch):
    """With --jobs 2 the copy that ends first exits 1 (it saw this process still on a run): once every
    run has its record, the grid has succeeded, and no run is reported as failed."""
    _, results, _ = grid
    _copy_records(results, tmp_path)

    class EndedEarly:  # a worker whose exit code says "a run was still busy when I ended"
        def wait(self):
            return 1

    monkeypatch.setattr(runner, "_spawn_workers", lambda argv, n: [EndedEarly() for _ in range(n)])
    assert runner.main([*TOY, "--seeds", "0", "--folds", "0", "--only", "fsq22", "--length", "short", "--jobs", "2",
                       "--root", str(tmp_path / "runs"), "--results-dir", str(tmp_path), "--no-report"]) == 0
    assert "failed" not in capsys.readouterr().err


def test_a_partial_run_keeps_every_committed_record(grid, tmp_path, capsys):
    """Running one more run on a clone rebuilds the report from every record, the committed ones included."""
    from training.study.records import covered, load_records

    _, results, _ = grid
    _copy_records(results, tmp_path)
    before = covered(load_records(str(tmp_path / "records")))
    assert runner.main([*TOY, "--seeds", "2", "--folds", "0", "--only", "fsq22", "--length", "short",
                       "--root", str(tmp_path / "runs"), "--results-dir", str(tmp_path)]) == 0
    with open(tmp_path / "summary.json") as f:
        summ = json.load(f)["main"]
    reported = {(int(st), n, r["seed"], r["fold"]) for st, by in summ.items() for n, rs in by.items() for r in rs}
    assert reported == before | {(1, "fsq22", 2, 0)}


def test_a_report_is_never_rebuilt_from_fewer_runs(grid, tmp_path, capsys):
    """A committed report whose runs have no records (older than the records) is left alone."""
    import shutil

    _, results, _ = grid
    shutil.copy(results / "summary.json", tmp_path / "summary.json")
    (tmp_path / "table.md").write_text("committed table")
    assert runner.main([*TOY, "--seeds", "3", "--folds", "0", "--only", "fsq22", "--length", "short",
                       "--root", str(tmp_path / "runs"), "--results-dir", str(tmp_path)]) == 0
    assert "report not written" in capsys.readouterr().err
    assert (tmp_path / "table.md").read_text() == "committed table"
    assert (tmp_path / "records" / "main" / "1steps" / "fold0" / "fsq22-seed3.json").is_file()


def test_commit_lands_each_record(grid, tmp_path):
    """--commit: each record is committed as its run finishes, and nothing else that was staged."""
    _, results, _ = grid
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], cwd=repo, check=True)
    (repo / "other.txt").write_text("staged, not the study's")
    subprocess.run(git + ["add", "other.txt"], cwd=repo, check=True)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    old = dict(os.environ)
    os.environ.update(env)
    try:
        assert runner.main([*TOY, "--seeds", "0", "--folds", "0", "--only", "fsq22", "--length", "short",
                           "--root", str(tmp_path / "runs"), "--results-dir", str(repo), "--commit",
                           "--no-report"]) == 0
    finally:
        os.environ.clear()
        os.environ.update(old)
    files = subprocess.run(["git", "show", "--name-only", "--format=", "HEAD"], cwd=repo, capture_output=True,
                           text=True, check=True).stdout.split()
    assert files == ["records/main/1steps/fold0/fsq22-seed0.json"]
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout
    assert "A  other.txt" in status


def test_loss_check_compares_each_pair_under_both_losses():
    """The report's loss-check section: a pair whose ordering holds under both losses is 'yes', one
    that the paper's loss reverses is '**no**', and each configuration's paper − L1 change is shown
    with its sign (synthetic per-photo values with known differences)."""
    from training.study.report import loss_check

    rng = np.random.default_rng(0)
    photos = [f"p{i}" for i in range(6)]

    def runs(psnr_offset, lpips_offset):
        return [{"seed": s, "photos": {p: {"psnr": 20 + psnr_offset + rng.normal(0, 0.01), "l1": 0.3,
                                           "lpips": 0.4 + lpips_offset + rng.normal(0, 0.001)} for p in photos}}
                for s in range(3)]

    l1 = {250: {"fsq22": runs(0, 0), "rfsq2-ln": runs(1, -0.05)}}
    paper = {250: {"fsq22": runs(-1, -0.1), "rfsq2-ln": runs(-2, -0.2)}}
    text = "\n".join(loss_check({"loss check, l1": l1, "loss check, paper": paper}))
    row = next(line for line in text.splitlines() if line.startswith("| 250 | fsq22 | rfsq2-ln |"))
    assert "worse" in row.split("|")[5] and "better" in row.split("|")[6] and row.endswith("**no** |")
    change = next(line for line in text.splitlines() if line.startswith("| 250 | rfsq2-ln | 3 × 6 |"))
    assert change.split("|")[4].strip().startswith("-3.0") and "worse" in change.split("|")[4]
    assert loss_check({"loss check, l1": l1}) == []  # nothing until both losses have runs
