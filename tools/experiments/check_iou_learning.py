#!/usr/bin/env python
"""Check that the IoU head learns: short trainings of a config (the main job's by default) on the CPU, one per seed,
with the IoU head's training signal read back from each run's metrics.json.

    python tools/experiments/check_iou_learning.py --seeds 18661646 101 102 103 104      # 300 iterations each
    python tools/experiments/check_iou_learning.py --seeds 0 --iters 500 --at 100 300 500 \
        MODEL.IOU_NET.HEAD.LOSS_TYPE bce

For each seed it prints ``iou_net/loss_ratio`` (1: no better than a constant predictor, 0: perfect) and
``iou_net/train_pearson`` at the iterations of ``--at`` (each the median of the 20 iterations before it, as
Detectron2's writers smooth them), and exits with status 1 if any seed's loss ratio at the last iteration is above
``--max-ratio``. Trailing ``KEY VALUE`` pairs override the config, as in tools/train_net.py (run by
:mod:`tools.experiments.runner`).
"""

import argparse
import json
import os
import sys
import time
from typing import Dict, List

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:  # run as a script: the repository's packages (prroi_d2, tools) importable
    sys.path.insert(0, _REPO)

from tools.experiments.runner import ROOT, run_processes, train_net_command  # noqa: E402

SIGNALS = ("iou_net/loss_ratio", "iou_net/train_pearson")


def read_metrics(path: str) -> Dict[int, Dict[str, float]]:
    """{iteration (1-based): {name: value}} of a Detectron2 metrics.json (one json object per line)."""
    rows: Dict[int, Dict[str, float]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                rows.setdefault(record["iteration"] + 1, {}).update(record)
    return rows


def train_one(config: str, seed: int, iters: int, output_dir: str, overrides: List[str]) -> Dict[int, Dict]:
    """Train ``config`` with ``SEED seed`` for ``iters`` iterations into ``output_dir`` (no evaluation, no
    checkpoint but the final one); returns its metrics by iteration. Raises ``RuntimeError`` with the log's end if
    the training fails."""
    os.makedirs(output_dir, exist_ok=True)
    metrics = os.path.join(output_dir, "metrics.json")
    if os.path.exists(metrics):
        os.remove(metrics)
    command = train_net_command(config, "SEED", str(seed), "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", str(iters),
                                "SOLVER.CHECKPOINT_PERIOD", str(10 * iters), "DATASETS.TEST", "()",
                                "MODEL.IOU_NET.CALIBRATION.DATASET", "",
                                "OUTPUT_DIR", output_dir, *overrides)  # fmt: skip
    log = os.path.join(output_dir, "check.log")
    (done,) = run_processes([command], [log], cwd=ROOT)
    if done.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"training seed {seed} failed (exit {done.returncode}); end of {log}:\n{tail}")
    return read_metrics(metrics)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=os.path.join(ROOT, "configs", "iounet_synthetic_R18.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[18661646, 101, 102, 103, 104])
    parser.add_argument("--iters", type=int, default=300, help="training iterations per seed")
    parser.add_argument("--at", type=int, nargs="+", default=None, help="iterations to report (default: 100, ...)")
    parser.add_argument("--max-ratio", type=float, default=0.7, help="largest loss ratio allowed at the last one")
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "output", "check_iou_learning"))
    parser.add_argument("--json", default=None, help="also write the table as json here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    at = sorted(args.at or list(range(100, args.iters + 1, 100)) or [args.iters])
    if at[-1] > args.iters or at[0] < 20:
        parser.error(f"--at must lie in [20, --iters]; got {at} with --iters {args.iters}")

    table = {}
    for seed in args.seeds:
        start = time.perf_counter()
        rows = train_one(args.config_file, seed, args.iters, os.path.join(args.output_dir, f"seed_{seed}"), args.opts)
        table[seed] = {it: {name: rows.get(it, {}).get(name, float("nan")) for name in SIGNALS} for it in at}
        table[seed]["seconds"] = time.perf_counter() - start
        print(f"seed {seed}: {table[seed]['seconds']:.0f} s", flush=True)

    header = " ".join(f"{'ratio@' + str(it):>10}" for it in at) + " " + " ".join(f"{'r@' + str(it):>8}" for it in at)
    print(f"\n{'seed':>10} {header}")
    failed = []
    for seed in args.seeds:
        ratios = " ".join(f"{table[seed][it][SIGNALS[0]]:>10.3f}" for it in at)
        pearsons = " ".join(f"{table[seed][it][SIGNALS[1]]:>8.3f}" for it in at)
        print(f"{seed:>10} {ratios} {pearsons}")
        last = table[seed][at[-1]][SIGNALS[0]]
        if not last <= args.max_ratio:  # NaN fails too
            failed.append(seed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({str(k): {str(i): v for i, v in row.items()} for k, row in table.items()}, f, indent=1)
    if failed:
        print(f"\nloss ratio above {args.max_ratio} at iteration {at[-1]} for seeds {failed}: the IoU head stalls")
        return 1
    print(f"\nevery seed's loss ratio <= {args.max_ratio} at iteration {at[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
