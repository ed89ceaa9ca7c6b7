"""One run per output folder: a lock file ``OUTPUT_DIR/.prroi_d2.lock`` held by the main process of a run.

The lock is an advisory ``flock`` on that file, so the kernel drops it when its process ends, however it ends
(exit, exception, Ctrl-C, SIGKILL). The file records the owner's pid, host and start time for the message a second
run gets; a file left by a run that ended without removing it is taken over with a warning. Released (and removed)
at exit.
"""

import atexit
import fcntl
import json
import logging
import os
import socket
import time
from typing import Optional

__all__ = ["LOCK_NAME", "OutputDirBusy", "OutputDirLock", "hold_output_dir"]

LOCK_NAME = ".prroi_d2.lock"
logger = logging.getLogger(__name__)


class OutputDirBusy(RuntimeError):
    """Another live run holds the output folder; the message names the folder and the owner's pid and host."""


def _owner_text(path: str) -> str:
    try:
        with open(path) as f:
            owner = json.load(f)
        return f"pid {owner['pid']} on {owner['host']}, started {owner['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "owner unknown"


class OutputDirLock:
    """The lock of ``output_dir`` (created if missing). :meth:`acquire` raises :class:`OutputDirBusy` while
    another process holds it and ``OSError`` when the folder cannot be written; :meth:`release` is idempotent."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> "OutputDirLock":
        os.makedirs(self.output_dir, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputDirBusy(
                    f"OUTPUT_DIR {self.output_dir} is in use by another run ({_owner_text(self.path)}; lock file "
                    f"{self.path}): wait for it to end or set another OUTPUT_DIR"
                ) from None
            try:
                same_file = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:  # its owner removed it between our open and flock: try again
                same_file = False
            if same_file:
                break
            os.close(fd)
        previous = os.read(fd, 4096)
        if previous.strip():
            logger.warning(
                f"OUTPUT_DIR {self.output_dir}: taking over the lock left by a run that ended without releasing it "
                f"({_owner_text(self.path)})"
            )
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it: a waiting run then finds the new file, not this one
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


_held = {}


def hold_output_dir(output_dir: str) -> Optional[OutputDirLock]:
    """Take ``output_dir``'s lock for the rest of this process (main process only; every process of a
    distributed run learns the outcome). Exits with one line when another run holds it or the folder cannot be
    written. Returns the lock (None on the other processes)."""
    from detectron2.utils import comm

    lock, failure = None, None
    if comm.is_main_process():
        key = os.path.abspath(output_dir)
        lock = _held.get(key)
        if lock is None:
            try:
                lock = OutputDirLock(output_dir).acquire()
            except OutputDirBusy as e:
                failure = str(e)
            except OSError as e:
                failure = f"OUTPUT_DIR {output_dir} is not writable: {e.strerror or e} ({e.filename or output_dir})"
            else:
                _held[key] = lock
                atexit.register(lock.release)
    if comm.get_world_size() > 1:  # no process waits for a main process that stopped
        failure = comm.all_gather(failure)[0]
    if failure is not None:
        raise SystemExit(failure)
    return lock
