"""Every numeric flag of training/train.py is range-checked at parse time, with the reason (issue 10: 3, 4)."""
from __future__ import annotations

import pytest

from training.train import parse_args


def _parse_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["--max-steps", "0"], "argument --max-steps: must be >= 1, got 0"),
    (["--max-steps", "-5"], "argument --max-steps: must be >= 1, got -5"),
    (["--log-every", "0"], "argument --log-every: must be >= 1, got 0"),
    (["--save-every", "0"], "argument --save-every: must be >= 1, got 0"),
    (["--eval-every", "-1"], "argument --eval-every: must be >= 1, got -1"),
    (["--warmup", "-0.5"], "argument --warmup: must be >= 0"),
    (["--grad-clip", "-1"], "argument --grad-clip: must be >= 0"),
    (["--grad-clip", "inf"], "argument --grad-clip: must be a finite number"),
    (["--lr", "-1e-3"], "argument --lr: must be > 0, got -0.001"),
    (["--lr", "nan"], "argument --lr: must be a finite number"),
    (["--lr", "abc"], "argument --lr: must be a number, got 'abc'"),
    (["--weight-decay", "-1e-5"], "argument --weight-decay: must be >= 0"),
    (["--image-size", "30"], "argument --image-size: must be a multiple of 4"),
    (["--image-size", "0"], "argument --image-size: must be >= 4"),
    (["--model-width", "0"], "argument --model-width: must be >= 1, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--max-train-epochs", "0"], "argument --max-train-epochs: must be >= 1"),
    (["--embedded-epoch-size", "0"], "argument --embedded-epoch-size: must be >= 1"),
    (["--num-workers", "-1"], "argument --num-workers: must be >= 0"),
    (["--stop-at-step", "0"], "argument --stop-at-step: must be >= 1"),
    (["--seed", "-1"], "argument --seed: must be >= 0"),
    (["--rfsq-stages", "0"], "argument --rfsq-stages: must be >= 1"),
    (["--rfsq-stages", "3"], "--rfsq-stages 3 has no default --levels"),
    (["--rfsq-initial-scale", "0"], "argument --rfsq-initial-scale: must be > 0"),
    (["--levels", "8", "1", "8"], "argument --levels: must be >= 2, got 1"),
    (["--embed-dim", "0"], "argument --embed-dim: must be >= 1"),
    (["--n-embed", "0"], "argument --n-embed: must be >= 1"),
    (["--lfq-dim", "63"], "argument --lfq-dim: must be <= 62"),
    (["--max-steps", "1.5"], "argument --max-steps: must be an integer, got '1.5'"),
    # 1x1 latents: layernorm's statistics would carry the whole image (issue 25, item 5)
    (["--image-size", "4"], "--image-size 4 gives 1x1 latents"),
])
def test_bad_numeric_flags_are_parse_errors_with_the_reason(capsys, argv, match):
    assert match in _parse_error(capsys, argv)


def test_good_edge_values_parse():
    a = parse_args(["--lr", "1e-3", "--warmup", "0", "--grad-clip", "0", "--max-steps", "1", "--image-size", "4",
                    "--weight-decay", "0", "--num-workers", "0", "--seed", "0", "--lfq-dim", "40",
                    "--rfsq-strategy", "scale"])
    assert (a.lr, a.warmup, a.grad_clip, a.max_steps, a.image_size) == (1e-3, 0.0, 0.0, 1, 4)
    assert parse_args(["--lr=2e-4"]).lr == 2e-4
    assert parse_args(["--rfsq-stages", "3", "--levels", "5", "5", "5"]).rfsq_stages == 3
    assert parse_args(["--quantizer", "fsq", "--rfsq-stages", "3"]).rfsq_stages == 3  # unused by FSQ
