#!/usr/bin/env python
"""The tables of docs/iounet.md "Calibrated refinement" from the runs of calibration_synthetic.sh /
calibration_trees.sh: per variant, mean +- std over the seeds of the held-out IoU head Pearson, the validation
baseline, uncalibrated refined and calibrated final AP, and the calibrated gains over the baseline stage.

    python tools/experiments/calibration_table.py output/synth --val iounet_synth_val --held-out iounet_synth_holdout
    python tools/experiments/calibration_table.py output/trees

Each run folder ``<root>/<variant>/seed_<s>`` holds the training's evaluation (``inference/[<dataset>/]``), the
calibration (``cal/calibration.json``) and the evaluation with the chosen setting (``cal/inference/``).
"""

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from prroi_d2.modeling.stages import final_stage  # noqa: E402
from tools.experiments.tables import format_mean_std  # noqa: E402

COLUMNS = (
    ("held-out Pearson (matched)", "held_out_pearson"),
    ("val baseline AP", "baseline_AP"),
    ("val refined AP, uncalibrated", "refined_AP"),
    ("val calibrated AP", "calibrated_AP"),
    ("gain AP", "gain_AP"),
    ("gain AP75", "gain_AP75"),
    ("gain AP90", "gain_AP90"),
    ("uncalibrated gain AP90", "uncalibrated_gain_AP90"),
    ("val Pearson (matched)", "val_pearson"),
)


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def run_figures(run: str, val: str, held_out: str) -> dict:
    """The figures of one run folder (missing ones are absent)."""
    sub = (lambda name: os.path.join(run, "inference", name, "iounet_stages.json")) if held_out else None
    trained = _load(sub(val) if sub else os.path.join(run, "inference", "iounet_stages.json"))
    out = {}
    if trained:
        out.update(baseline_AP=trained["baseline"]["AP"], refined_AP=trained["refined"]["AP"])
        out["uncalibrated_gain_AP90"] = trained["refined"]["AP90"] - trained["baseline"]["AP90"]
        out["val_pearson"] = trained["iou_pearson_initial"]
    held = _load(sub(held_out)) if sub else None
    if held:
        out["held_out_pearson"] = held["iou_pearson_initial"]
    calibration = _load(os.path.join(run, "cal", "calibration.json"))
    calibrated = _load(os.path.join(run, "cal", "inference", "iounet_stages.json"))
    if calibration:
        out["chosen"] = calibration["chosen_name"]
    if calibration and calibrated:
        chosen = calibration["chosen"]
        stage = calibrated[final_stage(chosen["nms"], chosen["refine"])]
        out["calibrated_AP"] = stage["AP"]
        for metric in ("AP", "AP75", "AP90"):
            out[f"gain_{metric}"] = stage[metric] - calibrated["baseline"][metric]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="output/synth or output/trees")
    parser.add_argument("--val", default="neon_trees_val")
    parser.add_argument("--held-out", default="", help="the held-out dataset evaluated at the end of training")
    args = parser.parse_args()
    print("| variant | " + " | ".join(title for title, _ in COLUMNS) + " | chosen (per seed) |")
    print("|---|" + "---|" * (len(COLUMNS) + 1))
    for variant in sorted(os.listdir(args.root)):
        runs = sorted(glob.glob(os.path.join(args.root, variant, "seed_*")))
        figures = [run_figures(run, args.val, args.held_out) for run in runs]
        cells = [format_mean_std([f.get(key) for f in figures]) for _, key in COLUMNS]
        chosen = "; ".join(f.get("chosen", "n/a") for f in figures)
        print(f"| {variant} ({len(runs)} seeds) | " + " | ".join(cells) + f" | {chosen} |")


if __name__ == "__main__":
    main()
