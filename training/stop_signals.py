"""SIGINT/SIGTERM as a request to stop cleanly: the training loop finishes its step, saves and exits."""
from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("rfsq.train")


class StopRequest:
    """Set by the first SIGINT (Ctrl-C) or SIGTERM (torchrun/SLURM shutting workers down); the training
    loop polls :attr:`requested`. Only a second Ctrl-C aborts at once, by raising KeyboardInterrupt
    (torchrun follows a Ctrl-C with a SIGTERM, which must not abort)."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            log.warning("%s: finishing this step, saving a checkpoint and exiting (Ctrl-C again aborts now)",
                        signal.Signals(signum).name)
        self.requested = True


@contextmanager
def stop_on_signals(stop: StopRequest) -> Iterator[StopRequest]:
    """Route SIGINT and SIGTERM to ``stop`` inside the block, restoring the previous handlers after it.
    Off the main thread (where Python cannot install handlers) the block runs without them."""
    signums = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    old_handlers = {s: signal.signal(s, stop) for s in signums}
    try:
        yield stop
    finally:
        for signum, handler in old_handlers.items():
            signal.signal(signum, handler)
