"""tools/train_net.py end to end on CPU: train, evaluate every stage, eval-only on a COCO-layout folder, two
processes (gloo), kill and resume, the missing-COCO message. Real Detectron2, real COCO json, pycocotools."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import tool_processes
import torch

pytest.importorskip("detectron2")

from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from prroi_d2.data import generate_synthetic_coco

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
STAGES = ("baseline", "iou_nms", "refined")


def _tiny(output_dir, max_iter, *extra):
    """Overrides that shrink configs/iounet_R50.yaml to seconds on a CPU (R18-GN, small inputs and heads)."""
    return [
        "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
        "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
        "MODEL.RESNETS.NORM", "GN", "MODEL.RESNETS.STRIDE_IN_1X1", "False", "MODEL.BACKBONE.FREEZE_AT", "0",
        "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.FPN.NORM", "GN", "MODEL.PIXEL_STD", "[50.0, 50.0, 50.0]",
        "MODEL.ANCHOR_GENERATOR.SIZES", "[[16], [32], [64], [128], [256]]",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.IOU_NET.HEAD.FC_DIM", "64",
        "MODEL.IOU_NET.JITTER.NUM_PER_IMAGE", "16",
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
        "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        "TEST.DETECTIONS_PER_IMAGE", "20", "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "160",
        "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "160", "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.01", "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "(4,)",
        "SOLVER.MAX_ITER", str(max_iter), "SOLVER.CHECKPOINT_PERIOD", "3", "OUTPUT_DIR", str(output_dir),
        *extra,
    ]  # fmt: skip


def _run(args, datasets, timeout=600):
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets), PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    cmd = [sys.executable, TRAIN_NET, "--config-file", os.path.join(REPO, "configs", "iounet_R50.yaml"), *args]
    return tool_processes.run(cmd, env=env, timeout=timeout)


def _coco_layout(root, seed=0):
    """``root/coco`` in Detectron2's COCO 2017 layout, from synthetic images; categories are COCO's 80 (the
    synthetic classes 1..5 take COCO ids 1..5), as Detectron2's builtin COCO registration expects."""
    categories = [{"id": c["id"], "name": c["name"], "supercategory": "thing"} for c in COCO_CATEGORIES if c["isthing"]]
    os.makedirs(os.path.join(root, "coco", "annotations"), exist_ok=True)
    for split, n in (("train2017", 6), ("val2017", 4)):
        scratch = os.path.join(root, "scratch")
        path = generate_synthetic_coco(scratch, split, n, seed=seed)
        with open(path) as f:
            data = json.load(f)
        data["categories"] = categories
        with open(os.path.join(root, "coco", "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(data, f)
        shutil.move(os.path.join(scratch, split), os.path.join(root, "coco", split))
        shutil.rmtree(scratch)
    return root


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return _coco_layout(str(tmp_path_factory.mktemp("datasets")))


@pytest.fixture(scope="module")
def trained(coco_root, tmp_path_factory):
    """One run serves several tests: 9 iterations (checkpoints every 3), killed with SIGKILL once its first
    checkpoint is written, then continued with ``--resume`` to the end, where it evaluates every stage. Returns the
    output folder, the resumed process and the checkpoint it resumed from."""
    out = tmp_path_factory.mktemp("train")
    env = dict(os.environ, DETECTRON2_DATASETS=str(coco_root), PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    cfg = os.path.join(REPO, "configs", "iounet_R50.yaml")
    args = _tiny(out, 9)
    proc = subprocess.Popen([sys.executable, TRAIN_NET, "--config-file", cfg, *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    checkpoint = out / "model_0000002.pth"
    deadline = time.time() + 300
    while not (checkpoint.exists() and (out / "last_checkpoint").exists()) and time.time() < deadline:
        assert proc.poll() is None, "training ended before its first checkpoint"
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model_final.pth").exists()
    saved = torch.load(out / (out / "last_checkpoint").read_text().strip(), weights_only=False)

    resumed = _run(["--resume", *args], coco_root)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return out, resumed, saved


def _pycocotools_stats(gt_json, results_json):
    coco = COCO(gt_json)
    with open(results_json) as f:
        dets = json.load(f)
    evaluator = COCOeval(coco, coco.loadRes(dets), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats


@pytest.mark.slow(seconds=20)
def test_train_then_evaluate_every_stage(trained, coco_root):
    out, proc, _ = trained
    assert os.path.exists(out / "model_final.pth")
    folder = out / "inference"
    with open(folder / "iounet_stages.json") as f:
        stages = json.load(f)
    assert set(STAGES) <= set(stages) and "iou_pearson" in stages
    for name in ("iounet_stages.md", "ap_vs_iou.png", "iou_histogram.png"):
        assert (folder / name).stat().st_size > 0
    gt = os.path.join(coco_root, "coco", "annotations", "instances_val2017.json")
    for stage in STAGES:
        stats = _pycocotools_stats(gt, folder / f"coco_instances_results_{stage}.json")
        for key, index in (("AP", 0), ("AP50", 1), ("AP75", 2)):
            assert stages[stage][key] == pytest.approx(100 * max(stats[index], 0.0), abs=1e-6), (stage, key)
    printed = proc.stdout + proc.stderr
    assert "| baseline |" in printed and "| refined |" in printed and "iounet_stages.md" in printed


def test_eval_only_on_the_coco_layout_reproduces_the_table(trained, coco_root, tmp_path):
    out, _, _ = trained
    proc = _run(["--eval-only", *_tiny(tmp_path, 9, "MODEL.WEIGHTS", str(out / "model_final.pth"))], coco_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "inference" / "iounet_stages.json") as f:
        trained_table = json.load(f)
    with open(tmp_path / "inference" / "iounet_stages.json") as f:
        eval_table = json.load(f)
    for stage in STAGES:
        assert eval_table[stage] == pytest.approx(trained_table[stage], abs=1e-9)


def test_missing_coco_gives_one_clear_message(tmp_path):
    proc = _run(_tiny(tmp_path / "out", 2), tmp_path / "empty", timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "not found" in proc.stderr and "instances_train2017.json" in proc.stderr
    assert "configs/iounet_synthetic_R18.yaml" in proc.stderr


@pytest.mark.slow(seconds=20)
def test_two_process_cpu_training(coco_root, tmp_path):
    proc = _run(["--num-gpus", "2", *_tiny(tmp_path, 2, "TEST.EVAL_PERIOD", "0")], coco_root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "World size: 2" in proc.stdout + proc.stderr
    assert os.path.exists(tmp_path / "model_final.pth")


def test_killed_run_resumes_where_it_stopped(trained):
    out, resumed, saved = trained
    assert f"Starting training from iteration {saved['iteration'] + 1}" in resumed.stdout + resumed.stderr
    final = torch.load(out / "model_final.pth", weights_only=False)
    assert final["iteration"] == 8
    # The checkpoint the run resumed from held the optimizer's momentum too, and the LR schedule continued:
    # 9 scheduler steps in all, and the rate after the decay step at iteration 4.
    assert saved["trainer"]["_trainer"]["optimizer"]["state"]
    trainer = final["trainer"]
    assert trainer["hooks"]["LRScheduler"]["last_epoch"] == 9
    assert all(g["lr"] == pytest.approx(0.001) for g in trainer["_trainer"]["optimizer"]["param_groups"])
