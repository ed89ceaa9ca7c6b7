"""The experiments' one seed runner: ``tools/train_net.py`` processes for (variant, seed) runs, side by side, each
with its own log; a run cut short resumes from its ``last_checkpoint``, a finished one is not trained again; a time
limit interrupts the runs (SIGINT, as Ctrl-C would) and kills those still running after a grace period, so a call
always ends."""

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_NET = os.path.join(ROOT, "tools", "train_net.py")
POLL_SECONDS = 0.2

__all__ = ["ROOT", "TRAIN_NET", "Finished", "run_processes", "run_state", "train_net_command"]


@dataclass
class Finished:
    """How one process ended: its exit status (negative: the signal that ended it; None: never started because the
    time limit came first) and its seconds of wall time."""

    returncode: Optional[int]
    seconds: float


def train_net_command(config: str, *args: str) -> List[str]:
    """The command line of ``tools/train_net.py --config-file config args...`` with this Python."""
    return [sys.executable, TRAIN_NET, "--config-file", config, *args]


def run_state(run_dir: str, finished_when: Callable[[str], bool] = lambda run_dir: True) -> str:
    """``"finished"`` (``model_final.pth`` there and ``finished_when(run_dir)``), ``"cut"`` (a ``last_checkpoint`` to
    resume from) or ``"new"``."""
    if os.path.exists(os.path.join(run_dir, "model_final.pth")) and finished_when(run_dir):
        return "finished"
    if os.path.exists(os.path.join(run_dir, "last_checkpoint")):
        return "cut"
    return "new"


def run_processes(
    commands: Sequence[Sequence[str]],
    logs: Sequence[str],
    parallel: Optional[int] = None,
    time_limit: Optional[float] = None,
    grace: float = 30.0,
    cwd: Optional[str] = None,
    log_mode: str = "w",
    on_exit: Optional[Callable[[int, Finished], None]] = None,
) -> List[Finished]:
    """Run ``commands`` with stdout and stderr to ``logs`` (opened with ``log_mode``), at most ``parallel`` at once
    (None: all at once), in order. ``time_limit`` seconds after the start, the running ones get SIGINT and those not
    started are not started; any still running ``grace`` seconds later get SIGKILL. ``on_exit(index, finished)`` is
    called as each one ends. Returns one :class:`Finished` per command, in order."""
    count = len(commands)
    limit = max(1, parallel or count or 1)
    start = time.monotonic()
    deadline = start + time_limit if time_limit is not None else float("inf")
    results: List[Optional[Finished]] = [None] * count
    pending = list(range(count))
    running = {}  # index -> (process, log file, start time)
    interrupted_at = None
    try:
        while pending or running:
            now = time.monotonic()
            if interrupted_at is None and now >= deadline:
                interrupted_at = now
                for i in pending:
                    results[i] = Finished(None, 0.0)
                pending = []
                for process, _, _ in running.values():
                    process.send_signal(signal.SIGINT)
            if interrupted_at is not None and now >= interrupted_at + grace:
                for process, _, _ in running.values():
                    if process.poll() is None:
                        process.kill()
            while pending and len(running) < limit:
                i = pending.pop(0)
                log = open(logs[i], log_mode)
                process = subprocess.Popen(list(commands[i]), stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
                running[i] = (process, log, time.monotonic())
            for i, (process, log, began) in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                log.close()
                del running[i]
                results[i] = Finished(code, time.monotonic() - began)
                if on_exit is not None:
                    on_exit(i, results[i])
            if running:
                time.sleep(POLL_SECONDS)
    finally:  # an exception here (e.g. Ctrl-C of the runner) leaves no process behind
        for process, log, _ in running.values():
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
    return results
