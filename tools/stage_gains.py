#!/usr/bin/env python
"""Refined-minus-baseline gains of IoU-Net runs, per run and mean, as a Markdown table.

    python tools/stage_gains.py output/cascade_gain/faster_s1 output/cascade_gain/faster_s2 ... [--metrics AP AP75 AP90]

Each argument is a training's OUTPUT_DIR (its inference/iounet_stages.json, written by tools/train_net.py); runs are
grouped by their name without a trailing ``_s<seed>`` (``faster_s1``, ``faster_s2`` -> ``faster``).
"""

import argparse
import json
import os
import re
import statistics
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="OUTPUT_DIRs of trainings")
    parser.add_argument("--metrics", nargs="+", default=["AP", "AP75", "AP90"])
    args = parser.parse_args(argv)
    groups = {}
    for run in args.runs:
        path = os.path.join(run, "inference", "iounet_stages.json")
        if not os.path.exists(path):
            sys.exit(f"{path} not found: is {run!r} the OUTPUT_DIR of a finished training?")
        with open(path) as f:
            stages = json.load(f)
        name = os.path.basename(os.path.normpath(run))
        gains = [stages["refined"][m] - stages["baseline"][m] for m in args.metrics]
        groups.setdefault(re.sub(r"_s\d+$", "", name), []).append((name, stages["baseline"]["AP"], gains))
    cols = " | ".join(f"{m} gain" for m in args.metrics)
    print(f"| run | baseline AP | {cols} |")
    print("|---|---:|" + "---:|" * len(args.metrics))
    for group, rows in groups.items():
        for name, base, gains in rows:
            print(f"| {name} | {base:.2f} | " + " | ".join(f"{g:+.2f}" for g in gains) + " |")
        means = [statistics.fmean(r[2][i] for r in rows) for i in range(len(args.metrics))]
        base = statistics.fmean(r[1] for r in rows)
        print(f"| **{group} mean of {len(rows)}** | {base:.2f} | " + " | ".join(f"**{g:+.2f}**" for g in means) + " |")


if __name__ == "__main__":
    main()
