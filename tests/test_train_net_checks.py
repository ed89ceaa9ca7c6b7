"""The probes of a new user, through tools/train_net.py as a real process on real files: each ends in one clear
message naming the file or setting (no traceback), before any model is built where it can."""

import argparse
import os
import sys

import pytest
import torch

pytest.importorskip("detectron2")

import tool_processes
from coco_files import write_coco_set

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
SYNTHETIC = os.path.join(REPO, "configs", "iounet_synthetic_R18.yaml")
BUILT = "Starting training"  # printed once the model, optimizer and data loader exist


def _run(tmp_path, *args, timeout=300, after=(), config=SYNTHETIC):
    """tools/train_net.py on ``config`` with ``args``, the tiny CPU settings, then ``after``: (rc, everything
    printed, stderr lines)."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    tiny = ["MODEL.DEVICE", "cpu", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
            "MODEL.IOU_NET.HEAD.FC_DIM", "32", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
            "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96", "DATALOADER.NUM_WORKERS", "1",
            "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(tmp_path / "out")]  # fmt: skip
    proc = tool_processes.run(
        [sys.executable, TRAIN_NET, "--config-file", config, *args, *tiny, *after], env=env, timeout=timeout
    )
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


def test_settings_that_failed_late_are_refused_before_training_with_their_keys(tmp_path):
    """Issue 31 item 8: each setting named in one message, before any model or process is built."""
    bad = ["TEST.DETECTIONS_PER_IMAGE", "0", "SOLVER.CHECKPOINT_PERIOD", "0", "SOLVER.MAX_ITER", "0",
           "SOLVER.IMS_PER_BATCH", "0", "SOLVER.STEPS", "(700, 550)", "MODEL.DEVICE", "gpu"]  # fmt: skip
    rc, printed, stderr = _run(tmp_path, after=bad)
    assert rc != 0 and "Traceback" not in printed and BUILT not in printed
    assert stderr[-7:] == [
        "Invalid config value(s):",
        "  SOLVER.MAX_ITER must be an integer >= 1, got 0",
        "  SOLVER.CHECKPOINT_PERIOD must be an integer >= 1, got 0",
        "  SOLVER.IMS_PER_BATCH must be an integer >= 1, got 0",
        "  SOLVER.STEPS must be increasing integers >= 1 (the iterations at which the learning rate drops), got "
        "(700, 550)",
        "  TEST.DETECTIONS_PER_IMAGE must be an integer >= 1, got 0",
        "  MODEL.DEVICE must be a device: 'cpu', 'cuda' or 'cuda:N', got 'gpu'",
    ]


def test_a_batch_that_does_not_split_over_the_processes_fails_before_they_start(tmp_path):
    rc, printed, stderr = _run(tmp_path, "--num-gpus", "2", after=["SOLVER.IMS_PER_BATCH", "3"])
    assert rc != 0 and "Traceback" not in printed and BUILT not in printed
    assert stderr[-1] == (
        "  SOLVER.IMS_PER_BATCH (3) must be divisible by the number of processes (2: --num-gpus x --num-machines); "
        "every process loads an equal share of the batch"
    )


def _args(config, *opts, eval_only=False):
    """The arguments tools/train_net.py parses, for the trainers' config_from_args in this process."""
    return argparse.Namespace(config_file=config, opts=list(opts), eval_only=eval_only)


def test_more_settings_in_process():
    """The same check as the command line's (yaml_train.config_from_args), without a process per case."""
    from prroi_d2.engine.yaml_train import config_from_args

    with pytest.raises(SystemExit) as info:
        config_from_args(_args(SYNTHETIC, "TEST.DETECTIONS_PER_IMAGE", "-1"))
    assert str(info.value).splitlines()[-1] == "  TEST.DETECTIONS_PER_IMAGE must be an integer >= 1, got -1"
    assert config_from_args(_args(SYNTHETIC, "SOLVER.MAX_ITER", "0", eval_only=True)).SOLVER.MAX_ITER == 0
    if torch.cuda.is_available():
        return
    assert config_from_args(_args(SYNTHETIC)).MODEL.DEVICE == "cpu"  # Detectron2's default cuda: the CPU workflow
    with pytest.raises(SystemExit, match="  MODEL.DEVICE is 'cuda' but PyTorch sees no CUDA GPU"):
        config_from_args(_args(SYNTHETIC, "MODEL.DEVICE", "cuda"))  # asked for on the command line


def _config_cases(tmp_path):
    """Issue 31 item 11: (config file, the one line expected), each a real file."""
    copied = tmp_path / "copied.yaml"  # a shipped config copied out of configs/: its relative _BASE_ stays behind
    with open(SYNTHETIC) as f:
        copied.write_text(f.read())
    (tmp_path / "empty.yaml").write_text("# nothing here\n")
    (tmp_path / "list.yaml").write_text("- MODEL\n- SOLVER\n")
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "broken.yaml").write_text("MODEL:\n  DEVICE: [cpu\n")
    base = tmp_path / "Base-IoUNet-RCNN-FPN.yaml"
    return [
        (str(copied), f"Config file {copied}: its _BASE_ {base} does not exist (a relative _BASE_ is read from the "
         "folder of the config that names it: copy the base config there too, or give its absolute path)"),
        (str(tmp_path / "empty.yaml"), f"Config file {tmp_path / 'empty.yaml'} is empty; a YAML config maps keys "
         "to values (MODEL: ..., SOLVER: ...)"),
        (str(tmp_path / "list.yaml"), f"Config file {tmp_path / 'list.yaml'} holds a list; a YAML config maps keys "
         "to values (MODEL: ..., SOLVER: ...)"),
        (str(tmp_path / "binary.yaml"), f"Config file {tmp_path / 'binary.yaml'} is not a text file (binary "
         "content); a config is YAML or Python text"),
        (str(tmp_path / "broken.yaml"), f"Config file {tmp_path / 'broken.yaml'} is not valid YAML at line 3, "
         "column 1: expected ',' or ']', but got '<stream end>'"),
        (str(tmp_path / "missing.yaml"), f"Config file {tmp_path / 'missing.yaml'} does not exist"),
        (str(tmp_path / "missing.py"), f"Config file {tmp_path / 'missing.py'} does not exist"),
    ]  # fmt: skip


def test_config_files_that_cannot_be_read_are_named_in_one_line(tmp_path):
    """Issue 31 item 11: through the command line for the copied config, in this process (the same check,
    yaml_train / lazy_train.config_from_args) for the others."""
    from prroi_d2.engine import lazy_train, yaml_train

    cases = _config_cases(tmp_path)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = tool_processes.run([sys.executable, TRAIN_NET, "--config-file", cases[0][0]], env=env, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == cases[0][1]
    for config, expected in cases:
        trainer = lazy_train if config.endswith(".py") else yaml_train
        with pytest.raises(SystemExit) as info:
            trainer.config_from_args(_args(config))
        assert str(info.value) == expected


def test_missing_files_of_a_registered_dataset_are_named_as_the_users_own(tmp_path, mine):
    """Issue 30: --register NAME JSON DIR with files that are not there: the --register argument is named, no COCO
    download steps."""
    json_file = str(tmp_path / "nowhere" / "train.json")
    rc, printed, stderr = _run(tmp_path, "--register", "mine_train", json_file, mine[1], "--register", "mine_val",
                               *mine, "DATASETS.TRAIN", '("mine_train",)', "DATASETS.TEST", '("mine_val",)',
                               "MODEL.ROI_HEADS.NUM_CLASSES", "3")  # fmt: skip
    assert rc != 0 and "Traceback" not in printed and BUILT not in printed
    assert stderr[-2:] == ["Dataset files not found:", f"  --register mine_train: JSON {json_file} does not exist"]
    assert "COCO" not in printed and "Download" not in printed
