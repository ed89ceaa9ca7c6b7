"""An OUTPUT_DIR that cannot be written, and a disk that fills while a checkpoint is written, in real processes: one
line naming the folder or file and the system's reason, no temporary file left, nothing already saved lost.

The full disk is real: a child process with a file-size limit (``RLIMIT_FSIZE``) gets ``EFBIG`` ("File too large")
from the kernel on the write that crosses it, as a full disk gives ``ENOSPC``; both go through the same path."""

import os
import resource
import subprocess
import sys

import pytest
import tool_processes
import torch

pytest.importorskip("detectron2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
SYNTHETIC = os.path.join(REPO, "configs", "iounet_synthetic_R18.yaml")
ENV = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")


def _limit_file_size(limit_bytes):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return apply


def _unwritable_dirs(tmp_path):
    """Folders this process cannot write: sysfs (even for root), or a folder without write permission (not root)."""
    dirs = []
    if os.path.isdir("/sys/kernel"):
        dirs += ["/sys/kernel", "/sys/kernel/prroi_d2_out"]
    if os.geteuid() != 0:
        locked = tmp_path / "read_only"
        locked.mkdir(mode=0o555)
        dirs.append(str(locked))
    return dirs


def test_train_net_names_an_unwritable_output_dir(tmp_path):
    dirs = _unwritable_dirs(tmp_path)
    if not dirs:
        pytest.skip("no folder here that this user cannot write")
    for out in dirs[:1]:  # an existing folder (a missing one fails the same way, at its creation)
        cmd = [sys.executable, TRAIN_NET, "--config-file", SYNTHETIC, "OUTPUT_DIR", out, "MODEL.DEVICE", "cpu"]
        result = tool_processes.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        lines = [line for line in result.stderr.splitlines() if line.startswith("OUTPUT_DIR")]
        assert len(lines) == 1 and lines[0].startswith(f"OUTPUT_DIR {out} is not writable: "), result.stderr[-2000:]
        reason = lines[0].split("is not writable: ", 1)[1]
        assert reason.split(" (")[0] in ("Permission denied", "Operation not permitted", "Read-only file system")


# Saves a small checkpoint, then (under a 1 MB file-size limit) a 4 MB one: the second write fails midway.
SAVER = """
import os, resource, sys, torch
from prroi_d2.engine.checkpoint import CheckpointWriteError, SafeCheckpointer
SafeCheckpointer(torch.nn.Linear(256, 256), save_dir=sys.argv[1]).save("model_0000001", iteration=1)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    SafeCheckpointer(torch.nn.Linear(1024, 1024), save_dir=sys.argv[1]).save("model_0000003", iteration=3)
except CheckpointWriteError as e:
    print(e)
"""


def test_a_checkpoint_that_does_not_fit_leaves_nothing_behind(tmp_path):
    result = tool_processes.run([sys.executable, "-c", SAVER, str(tmp_path)], env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith(f"Cannot write checkpoint {tmp_path / 'model_0000003.pth'}: File too large")
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]  # no .tmp, nothing replaced
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert torch.load(tmp_path / "model_0000001.pth", weights_only=True)["iteration"] == 1


def test_training_stops_with_one_line_when_a_checkpoint_does_not_fit(tmp_path):
    """A real training run whose first checkpoint crosses the file-size limit: one line naming the file and the
    reason, exit code 1, no traceback and no temporary file (before: a raw RuntimeError of torch's zip writer, a
    traceback from Detectron2's trainer and the partial NAME.pth.tmp)."""
    opts = [
        "MODEL.DEVICE", "cpu", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
        "MODEL.IOU_NET.HEAD.FC_DIM", "32", "MODEL.IOU_NET.JITTER.NUM_PER_IMAGE", "16",
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "32",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "1", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path),
        "MODEL.IOU_NET.CALIBRATION.DATASET", "",
    ]  # fmt: skip
    cmd = [sys.executable, TRAIN_NET, "--config-file", SYNTHETIC] + opts
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600,
                            preexec_fn=_limit_file_size(8 << 20))  # fmt: skip
    printed = result.stdout + result.stderr
    assert result.returncode == 1, printed[-3000:]
    assert "Traceback" not in printed, printed[-3000:]
    expected = f"Cannot write checkpoint {tmp_path / 'model_0000000.pth'}: File too large"
    assert [line for line in printed.splitlines() if "Cannot write" in line] == [
        expected + "; nothing was replaced (no temporary file is left)"
    ]
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name or name.endswith(".pth")]
