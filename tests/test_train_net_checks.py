"""The probes of a new user, through tools/train_net.py as a real process on real files: each ends in one clear
message naming the file or setting (no traceback), before any model is built where it can."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("detectron2")

from coco_files import write_coco_set

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
SYNTHETIC = os.path.join(REPO, "configs", "iounet_synthetic_R18.yaml")
BUILT = "Starting training"  # printed once the model, optimizer and data loader exist


def _run(tmp_path, *args, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    tiny = ["MODEL.DEVICE", "cpu", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
            "MODEL.IOU_NET.HEAD.FC_DIM", "32", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
            "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96", "DATALOADER.NUM_WORKERS", "1",
            "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(tmp_path / "out")]  # fmt: skip
    cmd = [sys.executable, TRAIN_NET, "--config-file", SYNTHETIC, *args, *tiny]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, proc.stderr.strip().splitlines()


@pytest.fixture(scope="module")
def mine(tmp_path_factory):
    """A 3-category COCO-format set: (json, image folder)."""
    return write_coco_set(str(tmp_path_factory.mktemp("mine")), num_images=2, size=(64, 48))


def _own(mine, *opts):
    return ["--register", "mine_train", *mine, "--register", "mine_val", *mine,
            "DATASETS.TRAIN", '("mine_train",)', "DATASETS.TEST", '("mine_val",)', *opts]  # fmt: skip


def test_a_bad_iou_net_value_fails_before_anything_runs(tmp_path):
    rc, printed, stderr = _run(tmp_path, "MODEL.IOU_NET.REFINE.STOP_DROP", "0.5", "MODEL.IOU_NET.REFINE.STEP", "-1.0")
    assert rc != 0 and "Traceback" not in printed
    assert stderr[-3:] == [
        "Invalid config value(s):",
        "  MODEL.IOU_NET.REFINE.STEP must be a finite number > 0 (lambda, the step size), got -1.0",
        "  MODEL.IOU_NET.REFINE.STOP_DROP must be a finite number <= 0 (a drop of predicted IoU), got 0.5",
    ]


def test_num_classes_against_the_json_before_the_model_is_built(tmp_path, mine):
    rc, printed, stderr = _run(tmp_path, *_own(mine, "MODEL.ROI_HEADS.NUM_CLASSES", "5"))
    assert rc != 0 and "Traceback" not in printed and BUILT not in printed
    assert stderr[-1] == (f"    1 x NUM_CLASSES differs from the json's categories: MODEL.ROI_HEADS.NUM_CLASSES is 5 "
                          f"but {mine[0]} has 3 categories (set MODEL.ROI_HEADS.NUM_CLASSES 3)")  # fmt: skip
    assert "Dataset check failed before training" in printed


def test_taken_register_name_and_eval_only_without_weights(tmp_path, mine):
    args = ["--eval-only", "--register", "coco_2017_val", *mine, "DATASETS.TEST", '("coco_2017_val",)']
    rc, printed, stderr = _run(tmp_path, *args)
    assert rc != 0 and "Traceback" not in printed
    assert stderr[-1].startswith("--register coco_2017_val: a dataset named 'coco_2017_val' is already registered")
    assert stderr[-1].endswith("Choose another name, or add --register-replace to replace it.")

    rc, printed, stderr = _run(tmp_path, "--register-replace", *args, "MODEL.ROI_HEADS.NUM_CLASSES", "3")
    assert rc != 0 and "Traceback" not in printed
    assert "dataset 'coco_2017_val' (json_file='" in printed and f"replaced by json_file={mine[0]!r}" in printed
    assert stderr[-1].startswith("--eval-only needs trained weights, but MODEL.WEIGHTS is empty: evaluation would")


def test_a_truncated_image_is_named_when_training_decodes_it(tmp_path, mine):
    root = tmp_path / "broken"
    json_file, image_root = write_coco_set(str(root), num_images=2, size=(64, 48))
    path = os.path.join(image_root, "1.png")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    args = ["--register", "broken", json_file, image_root, "DATASETS.TRAIN", '("broken",)', "DATASETS.TEST", "()",
            "MODEL.ROI_HEADS.NUM_CLASSES", "3"]  # fmt: skip
    rc, printed, stderr = _run(tmp_path, *args)
    assert rc != 0 and "Traceback" not in printed
    assert stderr[-1].startswith(f"Cannot decode image {path} of dataset 'broken': OSError: image file is truncated")

    rc, printed, stderr = _run(tmp_path, "--check-images", "full", *args)
    assert rc != 0 and BUILT not in printed
    assert stderr[-1].startswith(f"    1 x image file does not decode: {path} (image id 2): OSError")
