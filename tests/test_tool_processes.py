"""The suite's runner of command-line tools (tests/tool_processes.py) behaves as ``python script.py`` in a new process:
same exit status, stdout and stderr as subprocess.run for a script that reads its arguments, environment and working
folder, exits in each way Python can, and registers exit handlers; a run past its timeout raises as subprocess.run
does; a started ``python -c`` streams its output and dies by SIGINT as Popen's does; Detectron2's builtin datasets
follow the command's ``$DETECTRON2_DATASETS``; another changed import-time variable falls back to a plain
subprocess."""

import os
import signal
import subprocess
import sys

import pytest
import tool_processes

SCRIPT = """
import atexit, os, sys
atexit.register(lambda: print("exit handler ran", flush=True))
print("argv", sys.argv[1:], "cwd", os.path.basename(os.getcwd()), "var", os.environ.get("PROBE_VAR"))
print("script dir first on sys.path:", sys.path[0] == os.path.dirname(os.path.abspath(__file__)))
print("to stderr", file=sys.stderr)
how = sys.argv[1]
if how == "exit3":
    sys.exit(3)
if how == "message":
    sys.exit("stopped: a message")
if how == "raise":
    raise ValueError("boom")
if how == "sleep":
    import time
    time.sleep(60)
"""


@pytest.fixture()
def script(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(SCRIPT)
    (tmp_path / "work").mkdir()
    return str(path)


@pytest.mark.parametrize("how", ["ok", "exit3", "message", "raise"])
def test_same_status_and_output_as_a_new_python(script, tmp_path, how):
    env = dict(os.environ, PROBE_VAR="seen")
    command = [sys.executable, script, how, "second arg"]
    want = subprocess.run(command, env=env, cwd=tmp_path / "work", capture_output=True, text=True, timeout=60)
    got = tool_processes.run(command, env=env, cwd=str(tmp_path / "work"), timeout=60)
    assert got.returncode == want.returncode == {"ok": 0, "exit3": 3, "message": 1, "raise": 1}[how]
    assert got.stdout == want.stdout
    assert "exit handler ran" in got.stdout and "'second arg'" in got.stdout and "var seen" in got.stdout
    if how == "raise":  # the traceback's frames differ (runpy's own frames); its last line does not
        assert got.stderr.splitlines()[-1] == want.stderr.splitlines()[-1] == "ValueError: boom"
        assert got.stderr.startswith("to stderr\nTraceback (most recent call last):")
    else:
        assert got.stderr == want.stderr


def test_a_run_past_its_timeout_raises_and_is_killed(script):
    with pytest.raises(subprocess.TimeoutExpired):
        tool_processes.run([sys.executable, script, "sleep"], timeout=3)


def test_a_changed_import_time_variable_runs_a_plain_subprocess(script, monkeypatch):
    forked = []
    monkeypatch.setattr(tool_processes, "_forkserver", lambda: forked.append(1))
    env = dict(os.environ, MPLBACKEND="pdf")
    done = tool_processes.run([sys.executable, script, "ok"], env=env, timeout=60)
    assert done.returncode == 0 and "exit handler ran" in done.stdout and not forked


def test_started_code_streams_its_output_and_dies_by_sigint_after_its_exit_handlers():
    code = (
        "import atexit, sys, time\n"
        "atexit.register(lambda: print('exit handler ran', flush=True))\n"
        "print('ready', sys.argv[1:], flush=True)\n"
        "time.sleep(60)\n"
    )
    for starter in (tool_processes.start, subprocess_popen):
        proc = starter([sys.executable, "-c", code, "an arg"])
        assert proc.stdout.readline() == "ready ['an arg']\n"
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == -signal.SIGINT
        assert proc.stdout.read() == "exit handler ran\n"
        assert proc.stderr.read().splitlines()[-1] == "KeyboardInterrupt"


def subprocess_popen(command):
    return subprocess.Popen(command, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_builtin_datasets_follow_the_commands_detectron2_datasets(tmp_path):
    code = (
        "from detectron2.data import DatasetCatalog, MetadataCatalog\n"
        "print(MetadataCatalog.get('coco_2017_val').json_file, MetadataCatalog.get('coco_2017_val').image_root)\n"
        "print(len(DatasetCatalog.list()), 'datasets')\n"
    )
    command = [sys.executable, "-c", code]
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path))
    want = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    got = tool_processes.run(command, env=env, timeout=120)
    assert got.returncode == want.returncode == 0, got.stderr[-2000:]
    assert got.stdout == want.stdout and str(tmp_path / "coco" / "val2017") in got.stdout
