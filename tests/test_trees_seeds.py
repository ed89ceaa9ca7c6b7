"""tools/experiments: the seed runner interrupts runs past the time limit (SIGINT) and, if they ignore it, kills
them after the grace period, so a device call always ends, and runs at most ``parallel`` at once; trees_seeds reads a
resumed run's strip evaluations (metrics.json appended to) once per iteration."""

import json
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tools.experiments import runner, trees_seeds  # noqa: E402

IGNORES_SIGINT = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"
STOPS_ON_SIGINT = "import time; time.sleep(60)"
FINISHES = "print('done')"


def test_time_limit_interrupts_then_kills(tmp_path):
    commands = [[sys.executable, "-c", code] for code in (IGNORES_SIGINT, STOPS_ON_SIGINT, FINISHES)]
    logs = [str(tmp_path / f"{i}.log") for i in range(3)]
    start = time.monotonic()
    codes = [f.returncode for f in runner.run_processes(commands, logs, time_limit=3.0, grace=2.0)]
    elapsed = time.monotonic() - start
    assert codes[0] == -signal.SIGKILL  # SIGKILL after the grace period
    assert codes[1] == -signal.SIGINT  # KeyboardInterrupt: Python ends itself by the same signal
    assert codes[2] == 0
    assert 3.0 <= elapsed < 20.0, elapsed
    assert open(logs[2]).read() == "done\n"


def test_parallel_limit_and_runs_not_started_before_the_time_limit(tmp_path):
    """Two at a time: the third starts only when the first ends; the fourth, still queued at the time limit behind
    two long runs, is never started."""
    stamp = "import sys, time; open(sys.argv[1], 'w').write(repr(time.monotonic())); time.sleep(float(sys.argv[2]))"
    marks = [tmp_path / f"{i}.start" for i in range(4)]
    commands = [[sys.executable, "-c", stamp, str(m), s] for m, s in zip(marks, ["0.5", "60", "60", "0"])]
    logs = [str(tmp_path / f"{i}.log") for i in range(4)]
    ended = []
    finished = runner.run_processes(commands, logs, parallel=2, time_limit=2.5, grace=1.0,
                                    on_exit=lambda i, f: ended.append(i))  # fmt: skip
    assert [f.returncode for f in finished] == [0, -signal.SIGINT, -signal.SIGINT, None]
    assert float(marks[2].read_text()) >= float(marks[0].read_text()) + 0.5  # waited for a free slot
    assert not marks[3].exists() and ended[0] == 0 and sorted(ended) == [0, 1, 2]


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
