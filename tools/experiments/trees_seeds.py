#!/usr/bin/env python
"""Train a tree-crown config with several seeds side by side, choose the checkpoint on the held-out strip, report
the validation image (docs/trees.md's table).

    python tools/experiments/trees_seeds.py --seeds 0 1 2 --output output/trees_seeds     # one GPU, side by side
    python tools/experiments/trees_seeds.py --seeds 0 1 2 --time-limit 240 -- SOLVER.WEIGHT_DECAY 0.0005

Runs cut by ``--time-limit`` resume from their last checkpoint when the same command is repeated (the evaluations
on the strip already made are kept); finished runs are not trained again.

Each run trains on ``neon_trees_train_fit`` (the training image without its bottom strip) and evaluates every
``--eval-period`` iterations on ``neon_trees_train_holdout`` (the strip). The iteration whose mean refined AP on the
strip over the seeds is highest is chosen; only then is each seed's checkpoint of that iteration evaluated on
``neon_trees_val``, which therefore never influences a choice. Writes ``<output>/summary.{json,md}`` (mean +- std
and per-seed tables), ``ap_vs_iou.png`` (mean over seeds) and ``refinement_val.png`` (the first seed).
"""

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:  # run as a script: the repository's packages (prroi_d2, tools) importable
    sys.path.insert(0, _REPO)

from prroi_d2.modeling.stages import REFINED, STAGES  # noqa: E402
from tools.experiments.runner import run_processes, run_state, train_net_command  # noqa: E402
from tools.experiments.tables import format_mean_std  # noqa: E402

METRICS = ("AP", "AP50", "AP75", "AP90")


def _run_all(commands, logs, time_limit):
    """Every command at once (logs appended to), interrupted at ``time_limit`` seconds; returns exit codes."""
    return [f.returncode for f in run_processes(commands, logs, time_limit=time_limit, log_mode="a")]


def _holdout_curve(run_dir):
    """{iteration: {stage: AP}} on the strip, from metrics.json."""
    curve = {}
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.exists(path):
        return curve
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if f"{REFINED}/AP" in record:
                curve[int(record["iteration"])] = {s: record.get(f"{s}/AP") for s in STAGES}
    return curve


def _checkpoint(run_dir, iteration):
    for name in (f"model_{iteration:07d}.pth", "model_final.pth"):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no checkpoint of iteration {iteration} in {run_dir}")


def _table(per_seed):
    """Markdown table: one row per stage, mean +- std over seeds of AP, AP50, AP75, AP90 and Pearson."""
    lines = ["| stage | AP | AP50 | AP75 | AP90 | Pearson (matched) | Pearson (all) |", "|---|---|---|---|---|---|---|"]
    for stage in STAGES:
        cells = [format_mean_std([r["stages"][stage].get(m) for r in per_seed], 1, "-") for m in METRICS]
        for key in (f"iou_pearson_{stage}", f"iou_pearson_all_{stage}"):
            cells.append(format_mean_std([r["stages"]["localization"].get(key) for r in per_seed], 2, "-"))
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _per_seed_rows(per_seed):
    """Markdown table: one row per seed and stage."""
    lines = ["| seed | stage | AP | AP50 | AP75 | AP90 | Pearson (matched) |", "|---|---|---|---|---|---|---|"]
    for r in per_seed:
        for stage in STAGES:
            row = r["stages"][stage]
            pearson = r["stages"]["localization"].get(f"iou_pearson_{stage}")
            cells = [f"{row.get(m, float('nan')):.1f}" for m in METRICS]
            cells.append("-" if pearson is None else f"{pearson:.2f}")
            lines.append(f"| {r['seed']} | {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _figures(output, runs, per_seed):
    """``ap_vs_iou.png`` (mean over seeds, per stage) and ``refinement_val.png`` (the first seed's picture)."""
    import shutil

    from prroi_d2.evaluation.reports import plot_ap_vs_iou

    curves = [r["stages"].get("ap_per_iou_threshold") for r in per_seed]
    if all(curves):
        mean = {s: [statistics.fmean(c[s][i] for c in curves) for i in range(len(curves[0][s]))] for s in STAGES}
        plot_ap_vs_iou(mean, os.path.join(output, "ap_vs_iou.png"))
    pictures = sorted(glob.glob(os.path.join(runs[0], "val", "inference", "refinement_examples", "*.png")))
    if pictures:
        shutil.copyfile(pictures[0], os.path.join(output, "refinement_val.png"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/iounet_trees_R18.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", default="output/trees_seeds")
    parser.add_argument("--eval-period", type=int, default=200)
    parser.add_argument("--time-limit", type=float, default=480.0, help="seconds of training before SIGINT")
    parser.add_argument("--eval-time-limit", type=float, default=600.0, help="seconds for the validation runs")
    parser.add_argument("--train-only", action="store_true", help="stop after training (repeat to continue)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, after --")
    args = parser.parse_args()
    opts = [o for o in args.opts if o != "--"]
    os.makedirs(args.output, exist_ok=True)
    # Fetch / convert the data once, before the runs start side by side.
    subprocess.run(
        [sys.executable, "-c", "from prroi_d2.data.neon_trees import prepare_neon_trees as p; p()"], check=True
    )

    start = time.monotonic()
    runs = [os.path.join(args.output, f"seed{s}") for s in args.seeds]
    # --resume: a run cut by the time limit continues from its last checkpoint when the command is repeated; a
    # finished run (model_final.pth) is not trained again.
    unfinished = [(s, d) for s, d in zip(args.seeds, runs) if run_state(d) != "finished"]
    train = [
        train_net_command(args.config_file)
        + ["--resume", "SEED", str(s), "OUTPUT_DIR", d, "DATASETS.TRAIN", '("neon_trees_train_fit",)']
        + ["DATASETS.TEST", '("neon_trees_train_holdout",)', "TEST.EVAL_PERIOD", str(args.eval_period)]
        + ["SOLVER.CHECKPOINT_PERIOD", str(args.eval_period)]
        + opts
        for s, d in unfinished
    ]
    codes = _run_all(train, [d + ".train.log" for _, d in unfinished], args.time_limit)
    if args.train_only:
        return
    train_s = time.monotonic() - start
    curves = [_holdout_curve(d) for d in runs]
    # A run that diverged (Detectron2 stops it with FloatingPointError) is reported, and left out of the choice.
    alive = [c for c in curves if c]
    common = sorted(set.intersection(*(set(c) for c in alive))) if alive else []
    if not common:
        raise SystemExit(f"no held-out evaluation common to the runs (exit codes {codes}); see {args.output}/*.log")
    chosen = max(common, key=lambda it: statistics.fmean(c[it][REFINED] for c in alive))
    runs = [d for d, c in zip(runs, curves) if chosen in c]
    seeds = [s for s, c in zip(args.seeds, curves) if chosen in c]

    evals = [
        train_net_command(args.config_file)
        + ["--eval-only", "MODEL.WEIGHTS", _checkpoint(d, chosen), "OUTPUT_DIR", os.path.join(d, "val")]
        + ["DATASETS.TEST", '("neon_trees_val",)']
        + opts
        for d in runs
    ]
    eval_codes = _run_all(evals, [d + ".val.log" for d in runs], args.eval_time_limit)
    per_seed = []
    for s, d in zip(seeds, runs):
        path = os.path.join(d, "val", "inference", "iounet_stages.json")
        stages = json.load(open(path, encoding="utf-8")) if os.path.exists(path) else None
        per_seed.append({"seed": s, "stages": stages})
    summary = {
        "config": args.config_file,
        "opts": opts,
        "seeds": args.seeds,
        "seeds_reported": seeds,
        "train_exit_codes": codes,
        "eval_exit_codes": eval_codes,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.monotonic() - start, 1),
        "holdout_refined_AP": {str(s): c for s, c in zip(args.seeds, curves)},
        "chosen_iteration": chosen,
        "val": per_seed,
    }
    with open(os.path.join(args.output, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    text = f"Chosen on the strip: iteration {chosen}; neon_trees_val, seeds {seeds} (of {args.seeds}):\n\n"
    if all(r["stages"] for r in per_seed):
        text += _table(per_seed) + "\n\n" + _per_seed_rows(per_seed) + "\n"
        _figures(args.output, runs, per_seed)
    with open(os.path.join(args.output, "summary.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    for path in sorted(glob.glob(os.path.join(args.output, "*.log"))):
        print(path)


if __name__ == "__main__":
    main()
