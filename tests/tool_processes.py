"""Run the repository's command-line tools (``python tools/NAME.py ARGS``) as real processes, without paying for
``import torch`` and Detectron2 in each of them.

A command such as ``tools/train_net.py`` spends about 3.5 s of a 2-core machine importing torch, torchvision and
Detectron2 before it reads its arguments, and the suite starts it dozens of times. :func:`run_tool` starts each
command as a new process forked from one server process that imported those packages once (``multiprocessing``'s
forkserver with a preload list, one server per pytest process). The child is a real process: its own pid, the
given environment, working folder and ``sys.argv``, the tool run as ``__main__``, stdout and stderr in files, and
Python's exit status (``sys.exit`` codes, 1 after an uncaught exception with its traceback on stderr, exit
handlers run).

What a preloaded module read from the environment when it was imported cannot change per child, so a command
whose environment changes such a variable (:data:`IMPORT_TIME_VARIABLES`) is started as a plain subprocess.
Tests about a fresh interpreter itself (what gets imported, signals, resource limits) use ``subprocess``.
"""

import multiprocessing
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

# Imported once in the server; none of them reads a variable of a test's environment when imported, except those in
# IMPORT_TIME_VARIABLES (detectron2.data registers the builtin datasets under $DETECTRON2_DATASETS).
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
IMPORT_TIME_VARIABLES = ("DETECTRON2_DATASETS", "DETECTRON2_ENV_MODULE", "DETECTRON2_DISABLE_CV2", "MPLBACKEND")

_context = None


def _forkserver():
    global _context
    if _context is None:
        # the server starts with this process's environment; run_tool compares IMPORT_TIME_VARIABLES with it
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(script: str, argv: List[str], env: Dict[str, str], cwd: Optional[str], out: str, err: str) -> None:
    """In the forked process: become ``python script argv...`` and exit as Python would."""
    import atexit as child_atexit
    import runpy
    import traceback

    os.environ.clear()
    os.environ.update(env)
    if cwd:
        os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    threads = env.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():  # libgomp read the variable when the server loaded torch
        import torch

        torch.set_num_threads(int(threads))
    sys.argv = [script] + list(argv)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:0] = [os.path.dirname(os.path.abspath(script))] + paths
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - reported as Python reports an uncaught exception
        traceback.print_exc()
        code = 1
    try:
        child_atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run(
    command: Sequence[str],
    *,
    env: Optional[Dict[str, str]] = None,
    cwd: Optional[str] = None,
    timeout: Optional[float] = None,
    capture_output: bool = True,
    text: bool = True,
) -> subprocess.CompletedProcess:
    """``subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)``; a command
    ``[sys.executable, "path/to/script.py", args...]`` is forked from the preloaded server (see the module's
    docstring) unless its environment changes one of :data:`IMPORT_TIME_VARIABLES`."""
    if not (capture_output and text):
        raise ValueError("tool_processes.run captures text output only")
    command = [str(c) for c in command]
    env = dict(os.environ if env is None else env)
    script = command[1] if len(command) > 1 and command[0] == sys.executable and command[1].endswith(".py") else None
    if script is None or any(env.get(name) != os.environ.get(name) for name in IMPORT_TIME_VARIABLES):
        return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    with tempfile.TemporaryDirectory() as folder:
        out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        process = _forkserver().Process(target=_child, args=(script, command[2:], env, cwd, out, err))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(command, timeout)
        with open(out, errors="replace") as f, open(err, errors="replace") as g:
            stdout, stderr = f.read(), g.read()
    return subprocess.CompletedProcess(command, process.exitcode, stdout, stderr)


def run_tool(script: str, args: Sequence[str] = (), **kwargs) -> subprocess.CompletedProcess:
    """:func:`run` of ``python script args...``."""
    return run([sys.executable, script, *args], **kwargs)
