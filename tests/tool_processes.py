"""Run the repository's command-line tools (``python tools/NAME.py ARGS``, or ``python -c CODE ARGS``) as real
processes, without paying for ``import torch`` and Detectron2 in each of them.

A command such as ``tools/train_net.py`` spends about 3.5 s of a 2-core machine importing torch, torchvision and
Detectron2 before it reads its arguments, and the suite starts it dozens of times. :func:`run` and :func:`start`
start each command as a new process forked from one server process that imported those packages once
(``multiprocessing``'s forkserver with a preload list, one server per pytest process). The child is a real process:
its own pid, the given environment, working folder and ``sys.argv``, the tool run as ``__main__``, stdout and stderr
in files or pipes, signals, and Python's exit status (``sys.exit`` codes, 1 after an uncaught exception with its
traceback on stderr, death by SIGINT after an uncaught ``KeyboardInterrupt``; exit handlers run).

What a preloaded module read from the environment when it was imported cannot change per child, so a command
whose environment changes such a variable (:data:`IMPORT_TIME_VARIABLES`) is started as a plain subprocess; the
exception is ``$DETECTRON2_DATASETS``, under which the child registers Detectron2's builtin datasets again.
Tests about a fresh interpreter itself (what gets imported, resource limits) use ``subprocess``.
"""

import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

# Imported once in the server; none of them reads a variable of a test's environment when imported, except those in
# IMPORT_TIME_VARIABLES and $DETECTRON2_DATASETS (detectron2.data registers its builtin datasets under it).
PRELOAD = [
    "torch",
    "torchvision",
    "numpy",
    "matplotlib.pyplot",
    "pycocotools.coco",
    "pycocotools.cocoeval",
    "detectron2.config",
    "detectron2.engine",
    "detectron2.evaluation",
    "detectron2.modeling",
    "detectron2.checkpoint",
]
IMPORT_TIME_VARIABLES = ("DETECTRON2_ENV_MODULE", "DETECTRON2_DISABLE_CV2", "MPLBACKEND")

_context = None


def _forkserver():
    global _context
    if _context is None:
        # the server starts with this process's environment; run() compares IMPORT_TIME_VARIABLES with it
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(command: List[str], env: Dict[str, str], cwd: Optional[str], stdout, stderr) -> None:
    """In the forked process: become ``command`` (``python script.py ...`` or ``python -c CODE ...``) with ``env``
    and ``cwd``, fds 1 and 2 going to ``stdout`` / ``stderr`` (a file path or a pipe's writing end), and exit as
    Python would."""
    import atexit
    import runpy
    import traceback

    server_datasets = os.environ.get("DETECTRON2_DATASETS")
    os.environ.clear()
    os.environ.update(env)
    if env.get("DETECTRON2_DATASETS") != server_datasets:
        _register_builtin_datasets_again()
    if cwd:
        os.chdir(cwd)
    for fd, target in ((1, stdout), (2, stderr)):
        if isinstance(target, str):
            handle = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(handle, fd)
            os.close(handle)
        else:
            os.dup2(target.fileno(), fd)
            target.close()
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    threads = env.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():  # libgomp read the variable when the server loaded torch
        import torch

        torch.set_num_threads(int(threads))
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if command[1] == "-c":
        sys.argv = ["-c"] + command[3:]
        sys.path[:0] = [""] + paths
    else:
        sys.argv = command[1:]
        sys.path[:0] = [os.path.dirname(os.path.abspath(command[1]))] + paths
    code, interrupted = 0, False
    try:
        if command[1] == "-c":
            exec(compile(command[2], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            runpy.run_path(command[1], run_name="__main__")
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        interrupted = True
    except BaseException:  # noqa: BLE001 - reported as Python reports an uncaught exception
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if interrupted:  # as Python does: die by the signal, so that the parent sees -SIGINT
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code)


def _register_builtin_datasets_again() -> None:
    """Detectron2's builtin datasets (COCO, LVIS, ...) under this process's ``$DETECTRON2_DATASETS``: the server's
    import of ``detectron2.data`` registered them under the server's; nothing else is registered in the server."""
    import importlib

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import builtin

    for name in list(DatasetCatalog.keys()):
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    importlib.reload(builtin)


def _forkable(command: Sequence[str], env: Dict[str, str]) -> bool:
    """Whether ``command`` is ``python script.py ...`` or ``python -c CODE ...`` with the server's import-time
    variables."""
    python = len(command) > 1 and command[0] == sys.executable
    shape = python and (command[1].endswith(".py") or (command[1] == "-c" and len(command) > 2))
    return shape and all(env.get(name) == os.environ.get(name) for name in IMPORT_TIME_VARIABLES)


class Started:
    """What the tests use of ``subprocess.Popen`` for a forked command: ``pid``, ``stdout`` / ``stderr`` (text, the
    reading ends of pipes), ``poll``, ``send_signal``, ``kill``, ``wait`` and ``returncode``."""

    def __init__(self, process, stdout, stderr):
        self._process = process
        self.pid = process.pid
        self.stdout, self.stderr = stdout, stderr

    @property
    def returncode(self) -> Optional[int]:
        return self._process.exitcode

    def poll(self) -> Optional[int]:
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self._process.kill()

    def wait(self, timeout: Optional[float] = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(str(self.pid), timeout)
        return self._process.exitcode


def start(command: Sequence[str], *, env: Optional[Dict[str, str]] = None):
    """``subprocess.Popen(command, env=env, text=True, stdout=PIPE, stderr=PIPE)``, forked from the preloaded
    server when :func:`_forkable`."""
    command = [str(c) for c in command]
    env = dict(os.environ if env is None else env)
    if not _forkable(command, env):
        return subprocess.Popen(command, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    context = _forkserver()
    ends = [context.Pipe(duplex=False) for _ in range(2)]
    process = context.Process(target=_child, args=(command, env, None, ends[0][1], ends[1][1]))
    process.start()
    readers = []
    for reader, writer in ends:
        writer.close()  # the child holds the only writing end: reading ends at its exit
        readers.append(os.fdopen(os.dup(reader.fileno()), "r", errors="replace"))
        reader.close()
    return Started(process, *readers)


def run(
    command: Sequence[str],
    *,
    env: Optional[Dict[str, str]] = None,
    cwd: Optional[str] = None,
    timeout: Optional[float] = None,
    capture_output: bool = True,
    text: bool = True,
) -> subprocess.CompletedProcess:
    """``subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)``; forked from
    the preloaded server when :func:`_forkable` (output through files: no pipe to drain)."""
    if not (capture_output and text):
        raise ValueError("tool_processes.run captures text output only")
    command = [str(c) for c in command]
    env = dict(os.environ if env is None else env)
    if not _forkable(command, env):
        return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    with tempfile.TemporaryDirectory() as folder:
        out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        process = _forkserver().Process(target=_child, args=(command, env, cwd, out, err))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(command, timeout)
        with open(out, errors="replace") as f, open(err, errors="replace") as g:
            stdout, stderr = f.read(), g.read()
    return subprocess.CompletedProcess(command, process.exitcode, stdout, stderr)
