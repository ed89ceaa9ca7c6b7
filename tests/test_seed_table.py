"""tools/experiments/seed_table.py: a run that already has its weights and results is not trained again (so a table
cut short by a time limit is finished by the same command), ``{seed}`` in an override becomes each seed, a tagged
evaluation writes beside the run's own results instead of over them, and the table is the mean +- std of the runs'
files."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tools.experiments import seed_table  # noqa: E402


def _finished_run(run, baseline_ap, refined_ap):
    os.makedirs(os.path.join(run, "inference", "val"))
    open(os.path.join(run, "model_final.pth"), "wb").close()
    stages = {s: {"AP": ap, "AP50": 80.0, "AP75": 60.0, "AP90": 10.0} for s, ap in (("baseline", baseline_ap),
                                                                                 ("refined", refined_ap))}  # fmt: skip
    with open(os.path.join(run, "inference", "val", "iounet_stages.json"), "w") as f:
        json.dump(dict(stages, iou_pearson=0.5), f)


def test_finished_runs_are_not_trained_again_and_are_tabulated(tmp_path, capsys):
    _finished_run(str(tmp_path / "v" / "seed_0"), 50.0, 52.0)
    _finished_run(str(tmp_path / "v" / "seed_1"), 54.0, 57.0)
    argv = ["--seeds", "0", "1", "--output-dir", str(tmp_path), "--dataset", "val",
            "--variant", "v", "configs/does_not_exist.yaml", "--json", str(tmp_path / "t.json")]  # fmt: skip
    code = seed_table.main(argv)  # in this process: no interpreter start (the script path: test_iou_learning)
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert printed.count("already trained and evaluated") == 2  # the missing config was never opened
    assert "| baseline | 52.00 +- 2.83 |" in printed and "| refined - baseline | 2.50 +- 0.71 |" in printed
    assert json.loads((tmp_path / "t.json").read_text())["v"]["1"]["stages"]["refined"]["AP"] == 57.0


def test_seed_placeholder_and_tagged_evaluations(tmp_path, monkeypatch):
    jobs = []

    def run_jobs(planned, *args):  # records the jobs instead of training them
        jobs.extend(planned)
        return [{"seconds": 1.0, "returncode": 0}] * len(planned)

    monkeypatch.setattr(seed_table, "run_jobs", run_jobs)
    weights = ["MODEL.WEIGHTS", "runs/plain/seed_{seed}/model_final.pth"]
    seed_table.main(["--seeds", "3", "4", "--output-dir", str(tmp_path), "--eval-only", "--tag", "step1",
                     "--variant", "head", "c.yaml", *weights])  # fmt: skip
    assert [j[3] for j in jobs] == [["MODEL.WEIGHTS", f"runs/plain/seed_{s}/model_final.pth"] for s in (3, 4)]
    run = str(tmp_path / "head" / "seed_3")
    assert seed_table.results_dir(run, True, "step1") == os.path.join(run, "eval_step1")
    assert seed_table.results_dir(run, True, "") == run and seed_table.results_dir(run, False, "step1") == run
