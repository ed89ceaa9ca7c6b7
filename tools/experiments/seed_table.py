#!/usr/bin/env python
"""Train variants of a config over several seeds side by side, then tabulate every IoU-Net stage as mean +- std.

    python tools/experiments/seed_table.py --seeds 0 1 2 --parallel 6 --output-dir output/seeds \
        --variant base configs/iounet_synthetic_R18.yaml \
        --variant bce configs/iounet_synthetic_R18.yaml MODEL.IOU_NET.HEAD.LOSS_TYPE bce \
        --common MODEL.DEVICE cuda

Each (variant, seed) is one ``tools/train_net.py`` process of :mod:`tools.experiments.runner` (``SEED s``,
``OUTPUT_DIR <output-dir>/<variant>/seed_s``, the variant's then the common ``KEY VALUE`` overrides, where ``{seed}``
stands for the seed, e.g. ``MODEL.WEIGHTS output/plain/seed_{seed}/model_final.pth``), at most ``--parallel`` at
once. A run that already has its ``model_final.pth`` and results is not trained again, and one with a
``last_checkpoint`` resumes from it, so a table cut short by a time limit is finished by the same command.
``--eval-only`` evaluates the runs' ``model_final.pth`` instead (with other overrides, e.g. refinement settings,
under ``--tag``). The table reads each run's ``inference/[<dataset>/]iounet_stages.json``: per variant and stage,
AP, AP50, AP75, AP90 and the IoU statistics as mean +- std over the seeds, and the refined-minus-baseline gain per
seed. ``--json`` keeps it all.
"""

import argparse
import glob
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:  # run as a script: the repository's packages (prroi_d2, tools) importable
    sys.path.insert(0, _REPO)

from prroi_d2.modeling.stages import BASELINE, REFINED, STAGE_ORDER  # noqa: E402
from tools.experiments.runner import ROOT, run_processes, run_state, train_net_command  # noqa: E402
from tools.experiments.tables import format_mean_std  # noqa: E402

METRICS = ("AP", "AP50", "AP75", "AP90")
STAGES_FILE = "iounet_stages.json"
# A job: (variant name, config, seed, KEY VALUE overrides, run folder).
Job = Tuple[str, str, int, List[str], str]


def plan_job(job: Job, eval_only: bool, tag: str) -> Optional[Tuple[List[str], str]]:
    """``(command, log)`` that trains (or evaluates) one variant with one seed, or None for a run already trained
    and evaluated. A run cut short resumes from its last checkpoint."""
    name, config, seed, overrides, out = job
    args = []
    state = run_state(out, has_results)
    if eval_only:  # into <run>/eval_<tag> when tagged, so the training's own results stay
        weights, out = os.path.join(out, "model_final.pth"), results_dir(out, eval_only, tag)
        args += ["--eval-only", "MODEL.WEIGHTS", weights]
    elif state == "finished":
        print(f"{name} seed {seed}: already trained and evaluated ({out})", flush=True)
        return None
    elif state == "cut":
        args.append("--resume")
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "eval.log" if eval_only else "train.log")
    return train_net_command(config, *args, *overrides, "SEED", str(seed), "OUTPUT_DIR", out), log


def run_jobs(jobs: List[Job], parallel: int, eval_only: bool, tag: str) -> List[Dict]:
    """Run the jobs that need it, at most ``parallel`` at once; per job ``{"seconds", "returncode", "log"}``
    (``seconds`` None for a run trained before)."""
    plans = [plan_job(job, eval_only, tag) for job in jobs]
    todo = [i for i, plan in enumerate(plans) if plan is not None]
    outcomes = [{"seconds": None, "returncode": 0, "log": None} for _ in jobs]

    def report(k, finished):
        i = todo[k]
        name, _, seed, _, _ = jobs[i]
        log = plans[i][1]
        outcomes[i] = {"seconds": finished.seconds, "returncode": finished.returncode, "log": log}
        print(f"{name} seed {seed}: exit {finished.returncode} after {finished.seconds:.0f} s ({log})", flush=True)

    run_processes([plans[i][0] for i in todo], [plans[i][1] for i in todo], parallel, cwd=ROOT, on_exit=report)
    return outcomes


def results_dir(run: str, eval_only: bool, tag: str) -> str:
    """Where a run's evaluation writes: the run's folder, or ``<run>/eval_<tag>`` for a tagged ``--eval-only``."""
    return os.path.join(run, f"eval_{tag}") if eval_only and tag else run


def has_results(run: str) -> bool:
    """Whether the run's evaluation wrote its stages (of one dataset or several)."""
    return bool(glob.glob(os.path.join(run, "inference", "**", STAGES_FILE), recursive=True))


def stage_results(out: str, dataset: str) -> Dict:
    """The iounet_stages.json of a run (of ``dataset`` when it evaluated several), or {}."""
    paths = [os.path.join(out, "inference", dataset, STAGES_FILE)] if dataset else []
    paths += sorted(glob.glob(os.path.join(out, "inference", STAGES_FILE)))
    for path in paths:
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
    return {}


def table(summary: Dict, seeds: List[int]) -> str:
    lines = []
    for name, runs in summary.items():
        results = [runs[str(s)]["stages"] for s in seeds if runs.get(str(s), {}).get("stages")]
        lines.append(f"\n### {name} ({len(results)} of {len(seeds)} seeds)\n")
        if not results:
            continue
        stages = [s for s in STAGE_ORDER if s in results[0]]
        lines.append("| stage | " + " | ".join(METRICS) + " |")
        lines.append("|---|" + "---:|" * len(METRICS))
        for stage in stages:
            cells = [format_mean_std([r.get(stage, {}).get(m) for r in results]) for m in METRICS]
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
        if REFINED in stages and BASELINE in stages:
            gains = {m: [r[REFINED][m] - r[BASELINE][m] for r in results] for m in METRICS}
            lines.append("| refined - baseline | " + " | ".join(format_mean_std(gains[m]) for m in METRICS) + " |")
            per_seed = []
            for s in seeds:
                stages_s = runs.get(str(s), {}).get("stages")
                if stages_s:
                    gain = "/".join(f"{stages_s[REFINED][m] - stages_s[BASELINE][m]:+.2f}" for m in METRICS)
                    per_seed.append(f"{s}: {gain}")
            per_seed = ", ".join(per_seed)
            lines.append(f"\nper seed, refined - baseline {'/'.join(METRICS)}: {per_seed}")
        iou_keys = sorted(k for k in results[0] if k.startswith("iou_") and isinstance(results[0][k], (int, float)))
        if iou_keys:
            lines.append("\n" + "; ".join(f"{k} {format_mean_std([r.get(k) for r in results])}" for k in iou_keys))
        seconds = [runs[str(s)].get("seconds") for s in seeds if str(s) in runs]  # None: trained before
        lines.append(f"\nwall time per run: {format_mean_std(seconds)} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME CONFIG [KEY VALUE]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--common", nargs="*", default=[], help="KEY VALUE overrides for every variant")
    parser.add_argument("--parallel", type=int, default=3)
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "output", "seed_table"))
    parser.add_argument("--dataset", default="", help="which dataset's results to read when runs test several")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the runs' model_final.pth")
    parser.add_argument("--tag", default="", help="with --eval-only: results go to <run>/eval_<tag>")
    parser.add_argument("--collect", action="store_true", help="only tabulate runs made before")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    jobs = []
    for name, config, *overrides in args.variant:
        if len(overrides) % 2:
            parser.error(f"variant {name}: overrides must be KEY VALUE pairs, got {overrides}")
        for seed in args.seeds:
            out = os.path.join(args.output_dir, name, f"seed_{seed}")
            jobs.append((name, config, seed, [o.replace("{seed}", str(seed)) for o in overrides + args.common], out))
    if args.collect:
        done = [{"returncode": 0} for _ in jobs]
    else:
        done = run_jobs(jobs, max(1, args.parallel), args.eval_only, args.tag)

    summary: Dict[str, Dict] = {}
    for (name, _, seed, _, out), outcome in zip(jobs, done):
        where = results_dir(out, args.eval_only, args.tag)
        summary.setdefault(name, {})[str(seed)] = dict(outcome, stages=stage_results(where, args.dataset))
    text = table(summary, args.seeds)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0 if all(o["returncode"] == 0 for o in done) else 1


if __name__ == "__main__":
    sys.exit(main())
