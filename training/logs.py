"""train.py's logging: rank 0 to the terminal (through tqdm, so that log lines do not break the progress
bar) and, once --output-dir is claimed, to OUTPUT_DIR/train.log; other ranks only warnings."""
from __future__ import annotations

import logging
import os
import sys
from typing import List

log = logging.getLogger("rfsq.train")  # the one logger of the training modules


class _TqdmHandler(logging.Handler):
    def emit(self, record):
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")


def setup_logging(master: bool) -> List[logging.Handler]:
    """Rank 0 logs INFO to the terminal, other ranks only warnings; :func:`log_to_file` adds train.log."""
    log.setLevel(logging.INFO if master else logging.WARNING)
    log.propagate = False
    handler = _TqdmHandler()
    handler.setFormatter(_FORMAT)
    log.addHandler(handler)
    return [handler]


def log_to_file(output_dir: str) -> logging.Handler:
    """Also log to OUTPUT_DIR/train.log (rank 0, once the directory is known to be ours)."""
    handler = logging.FileHandler(os.path.join(output_dir, "train.log"))
    handler.setFormatter(_FORMAT)
    log.addHandler(handler)
    return handler
