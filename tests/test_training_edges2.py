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

import training.train as train_mod
from training.data import SafeImageFolder, denormalize, read_rgb, walk_files
from training.evaluate import load_folder_photos
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
    schedule = train_mod.lr_lambda(3, 4)
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
