"""Claiming a command-line tool's output file before the work, so an unwritable path fails at once."""
from __future__ import annotations

import argparse
import os
import tempfile


def claim_output(parser: argparse.ArgumentParser, flag: str, path: str, make_dirs: bool = False) -> str:
    """Create the temp file beside ``path`` that the tool writes to and renames onto ``path`` at the
    end; an unwritable ``path`` (or a directory) is an argparse error (exit 2) naming ``flag``, the
    path and the cause. ``make_dirs`` creates the missing folders first. Returns the temp file's name."""
    if os.path.isdir(path):
        parser.error(f"{flag} {path}: is a directory; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        if make_dirs:
            os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    except OSError as e:
        parser.error(f"{flag} {path}: cannot write there ({e.strerror or e}); give a writable path")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # the mode open(path, "w") would give, not mkstemp's 0600
    return tmp
