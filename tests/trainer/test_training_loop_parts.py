"""The parts of training/train.py's loop on their own (fast): the epoch-aware batch iterator and the
SIGINT/SIGTERM stop request. The end-to-end runs in test_training_run.py and friends prove the whole."""
from __future__ import annotations

import signal
from argparse import Namespace
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from training.data import DataError, ShardedSampler, Unreadable, collate_skip
from training.distributed import Dist
from training.stop_signals import StopRequest, stop_on_signals
from training.train import batches


def _run(items, total_steps: int, step: int = 0, epoch: int = 0, batch_in_epoch: int = 0):
    """The fields of a Run that batches() reads, over ``items`` in order, one per batch."""
    sampler = ShardedSampler(len(items), shuffle=False, drop_last=True)
    loader = DataLoader(items, batch_size=1, sampler=sampler, drop_last=True, collate_fn=collate_skip)
    return SimpleNamespace(args=Namespace(batch_size=1, train_dir="DIR"),
                           dist=Dist(rank=0, world=1, local_rank=0, ddp=False, device=torch.device("cpu")),
                           train_set=items, sampler=sampler, train_loader=loader, stop=StopRequest(),
                           step=step, total_steps=total_steps, epoch=epoch, batch_in_epoch=batch_in_epoch,
                           unreadable={})


def _train(run, stop_after: int = -1):
    """Consume batches() like the loop does (one step per batch); (epoch, item, batch_in_epoch) per step."""
    seen = []
    for epoch, images in batches(run):
        seen.append((epoch, int(images.item()), run.batch_in_epoch))
        run.step += 1
        if len(seen) == stop_after:
            run.stop.requested = True
    return seen


def _items(*spec):
    return [Unreadable(f"bad{i}.png", "broken") if s is None else torch.tensor([float(s)]) for i, s in enumerate(spec)]


def test_epochs_advance_when_the_loader_is_exhausted():
    run = _run(_items(0, 1, 2), total_steps=7)
    assert _train(run) == [(0, 0, 1), (0, 1, 2), (0, 2, 3), (1, 0, 1), (1, 1, 2), (1, 2, 3), (2, 0, 1)]
    assert (run.step, run.epoch, run.batch_in_epoch) == (7, 2, 1)


def test_reaching_the_last_step_on_an_epochs_last_batch_keeps_the_epoch():
    run = _run(_items(0, 1, 2), total_steps=6)
    _train(run)
    assert (run.step, run.epoch, run.batch_in_epoch) == (6, 1, 3)  # what the checkpoint and results record


@pytest.mark.parametrize("position, expected", [
    ((5, 1, 2, 8), [(1, 2, 3), (2, 0, 1), (2, 1, 2)]),  # mid-epoch: the sampler skips the consumed batches
    ((3, 0, 3, 6), [(1, 0, 1), (1, 1, 2), (1, 2, 3)]),  # stopped after an epoch's last batch
], ids=["mid-epoch", "epoch-end"])
def test_resume_continues_with_the_batches_left(position, expected):
    step, epoch, batch_in_epoch, total_steps = position
    run = _run(_items(0, 1, 2), total_steps, step=step, epoch=epoch, batch_in_epoch=batch_in_epoch)
    assert _train(run) == expected


def test_unreadable_batches_are_counted_skipped_and_recorded():
    run = _run(_items(0, None, 2), total_steps=4)
    assert _train(run) == [(0, 0, 1), (0, 2, 3), (1, 0, 1), (1, 2, 3)]
    assert run.unreadable == {"bad1.png": "broken"}


def test_a_stop_request_ends_before_the_next_batch_is_counted():
    run = _run(_items(0, 1, 2), total_steps=6)
    assert _train(run, stop_after=1) == [(0, 0, 1)]
    assert (run.step, run.epoch, run.batch_in_epoch) == (1, 0, 1)


def test_an_epoch_without_a_readable_image_is_an_error():
    with pytest.raises(DataError, match="epoch 0 yielded no readable image in 3 batch"):
        _train(_run(_items(None, None, None), total_steps=2))


def test_first_signal_requests_a_stop_second_ctrl_c_aborts_handlers_restored():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with stop_on_signals(StopRequest()) as stop:
        assert not stop.requested
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested
        signal.raise_signal(signal.SIGTERM)  # torchrun follows a Ctrl-C with a SIGTERM: not an abort
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
