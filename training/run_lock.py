"""One process per run directory: an advisory ``fcntl.flock`` on ``OUTPUT_DIR/.train.lock``.

The kernel drops the lock when its holder exits, however it exits (a crash, SIGKILL, a lost node's
process), so a dead run never leaves the directory stuck; the file itself stays (it is only where
the lock lives and says which pid last held it).
"""
from __future__ import annotations

import errno
import logging
import os
import socket
from typing import Optional

log = logging.getLogger("rfsq.train")
LOCK_NAME = ".train.lock"


class RunDirBusy(RuntimeError):
    """Another live process holds the run directory."""


class RunDirLock:
    """Holds the lock of one run directory until :meth:`release` (or the process ends)."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.fd: Optional[int] = None

    def acquire(self) -> "RunDirLock":
        """Take the lock now, or raise :class:`RunDirBusy` naming the holder (never waits)."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirBusy(f"--output-dir {os.path.dirname(self.path)} is in use by another training "
                                 f"process ({holder or 'holder unknown'}; lock {self.path}): wait for it to "
                                 "finish or stop it, or choose another --output-dir") from None
            # a file system without locks (some network mounts): say so, do not block the run
            log.warning("cannot lock %s (%s): nothing stops a second run from writing into this directory",
                        self.path, e.strerror or e)
            return self
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (closing the file releases it)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""
