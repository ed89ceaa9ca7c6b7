"""tools/trees_seeds.py: runs past the time limit are interrupted (SIGINT) and, if they ignore it, killed after the
grace period, so a device call always ends; a resumed run's strip evaluations (metrics.json appended to) are read
once per iteration."""

import json
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import trees_seeds  # noqa: E402

IGNORES_SIGINT = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"
STOPS_ON_SIGINT = "import time; time.sleep(60)"
FINISHES = "print('done')"


def test_time_limit_interrupts_then_kills(tmp_path):
    commands = [[sys.executable, "-c", code] for code in (IGNORES_SIGINT, STOPS_ON_SIGINT, FINISHES)]
    logs = [str(tmp_path / f"{i}.log") for i in range(3)]
    start = time.monotonic()
    codes = trees_seeds._run_all(commands, logs, time_limit=3.0, grace=2.0)
    elapsed = time.monotonic() - start
    assert codes[0] == -signal.SIGKILL  # SIGKILL after the grace period
    assert codes[1] == -signal.SIGINT  # KeyboardInterrupt: Python ends itself by the same signal
    assert codes[2] == 0
    assert 3.0 <= elapsed < 20.0, elapsed
    assert open(logs[2]).read() == "done\n"


def test_holdout_curve_of_a_resumed_run(tmp_path):
    run = tmp_path / "seed0"
    run.mkdir()
    records = [
        {"iteration": 199, "baseline/AP": 8.0, "iou_nms/AP": 8.5, "refined/AP": 9.0},
        {"iteration": 210, "total_loss": 3.0},
        # the run was cut after iteration 210 and resumed from the checkpoint of 199: Detectron2 appends
        {"iteration": 399, "baseline/AP": 17.0, "iou_nms/AP": 17.5, "refined/AP": 18.0},
    ]
    with open(run / "metrics.json", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    curve = trees_seeds._holdout_curve(str(run))
    assert curve == {
        199: {"baseline": 8.0, "iou_nms": 8.5, "refined": 9.0},
        399: {"baseline": 17.0, "iou_nms": 17.5, "refined": 18.0},
    }
