"""One run per OUTPUT_DIR, with real processes: a second run (the real tools/train_net.py) refuses naming the folder
and the owner's pid; a lock left by a killed run is taken over with a warning; the lock goes at exit, Ctrl-C or an
exception; and two processes saving the same checkpoint name at once do not collide on a temporary file."""

import json
import os
import signal
import sys

import pytest
import tool_processes
import torch

pytest.importorskip("detectron2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
SYNTHETIC = os.path.join(REPO, "configs", "iounet_synthetic_R18.yaml")
LOCK = ".prroi_d2.lock"
ENV = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")

# A process that takes OUTPUT_DIR's lock as a run does, says so, then does what argv[2] says.
HOLDER = """
import logging, os, sys, time
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
from prroi_d2.engine.output_lock import hold_output_dir
hold_output_dir(sys.argv[1])
print("locked", flush=True)
if sys.argv[2] == "raise":
    raise RuntimeError("boom")
if sys.argv[2] == "wait":
    time.sleep(300)
"""


def _holder(output_dir, then):
    proc = tool_processes.start([sys.executable, "-c", HOLDER, str(output_dir), then], env=ENV)
    assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
    return proc


def test_a_second_run_refuses_a_folder_in_use(tmp_path):
    out = tmp_path / "out"
    owner = _holder(out, "wait")
    try:
        record = json.loads((out / LOCK).read_text())
        assert record["pid"] == owner.pid
        cmd = [sys.executable, TRAIN_NET, "--config-file", SYNTHETIC, "OUTPUT_DIR", str(out), "MODEL.DEVICE", "cpu"]
        second = tool_processes.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode != 0
        assert "Traceback" not in second.stderr, second.stderr[-3000:]
        expected = f"OUTPUT_DIR {out} is in use by another run (pid {owner.pid} on {record['host']}, started"
        lines = [line for line in second.stderr.splitlines() if "OUTPUT_DIR" in line]
        assert len(lines) == 1 and lines[0].startswith(expected), second.stderr[-3000:]
        assert sorted(os.listdir(out)) == [LOCK]  # the refused run wrote nothing there (no config.yaml, no log)
        assert owner.poll() is None
    finally:
        owner.kill()
        owner.wait()


def test_a_killed_runs_lock_is_taken_over_with_a_warning(tmp_path):
    out = tmp_path / "out"
    dead = _holder(out, "wait")
    dead.send_signal(signal.SIGKILL)  # no exit handler runs: the file stays, naming a dead pid
    dead.wait()
    assert json.loads((out / LOCK).read_text())["pid"] == dead.pid

    heir = tool_processes.run([sys.executable, "-c", HOLDER, str(out), "exit"], env=ENV, timeout=120)
    assert heir.returncode == 0, heir.stderr[-3000:]
    assert f"OUTPUT_DIR {out}: taking over the lock left by a run that ended without releasing it (pid {dead.pid}" in (
        heir.stderr
    )
    assert not (out / LOCK).exists()  # released at a normal exit


@pytest.mark.parametrize("how", ["sigint", "exception"])
def test_the_lock_is_released_on_ctrl_c_and_on_an_exception(tmp_path, how):
    out = tmp_path / "out"
    proc = _holder(out, "wait" if how == "sigint" else "raise")
    if how == "sigint":
        proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not (out / LOCK).exists()
    follower = _holder(out, "exit")  # no warning: nothing was left behind
    assert follower.wait(timeout=60) == 0 and "taking over" not in follower.stderr.read()


# Saves the same checkpoint name over and over, as two runs sharing a folder would.
SAVER = """
import sys, torch
from prroi_d2.engine.checkpoint import SafeCheckpointer
torch.manual_seed(int(sys.argv[2]))
checkpointer = SafeCheckpointer(torch.nn.Linear(512, 512), save_dir=sys.argv[1])
for i in range(30):
    checkpointer.save("model_final", iteration=i)
"""


def test_two_processes_saving_one_checkpoint_name_do_not_collide(tmp_path):
    """With one temporary name for every process (NAME.pth.tmp), one of them dies renaming a file the other
    already renamed. Each process now writes its own NAME.pth.tmp.<pid>."""
    procs = [tool_processes.start([sys.executable, "-c", SAVER, str(tmp_path), str(seed)], env=ENV) for seed in (0, 1)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth"]
    final = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert final["iteration"] == 29 and final["model"]["weight"].shape == (512, 512)
