"""check_iounet_config: every MODEL.IOU_NET key has a rule; each rule rejects a wrong type or range with a message
naming the key and value, and passes every shipped config. The Detectron2 settings that failed late (issue 31 item
8) are refused with the key named, at their YAML and LazyConfig keys."""

import glob
import os

import pytest

pytest.importorskip("detectron2")

from detectron2.config import get_cfg

from prroi_d2 import add_iounet_config
from prroi_d2.config_checks import check_iounet_config, config_problems, lazy_config_problems, resolve_device
from prroi_d2.data.augmentation import add_aerial_augment_config
from prroi_d2.options import OPTIONS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One value of the right type but out of range (or of the wrong type where the type has no range) per key.
BAD = {
    "TRAIN_ONLY_IOU_HEAD": 1, "OUTPUT_STAGES": "yes", "IN_FEATURES": ["p2", "p2"], "POOLER_TYPE": "",
    "POOLER_RESOLUTION": 0, "HEAD.NAME": "", "HEAD.NUM_FC": -1, "HEAD.FC_DIM": 0, "HEAD.CLS_AGNOSTIC": None,
    "HEAD.LOSS_TYPE": "l2", "HEAD.NORM": "BN", "HEAD.SMOOTH_L1_BETA": -0.5, "HEAD.LOSS_WEIGHT": float("inf"),
    "HEAD.PRED_INIT_STD": float("nan"), "JITTER.NUM_PER_IMAGE": 0, "JITTER.NUM_BINS": 2.0, "JITTER.MIN_IOU": 1.0,
    "JITTER.MAX_SHIFT": -0.1, "JITTER.MAX_SCALE": 0.9, "JITTER.CANDIDATES_PER_SAMPLE": 0,
    "JITTER.ADD_PROPOSALS": "False", "NMS.ENABLED": 0, "NMS.IOU_THRESH": 1.5, "NMS.RANK": "score",
    "REFINE.ENABLED": "True", "REFINE.STEP": 0.0, "REFINE.MAX_ITER": -1, "REFINE.STOP_DELTA": -0.001,
    "REFINE.STOP_DROP": 0.5, "REFINE.CUDA_GRAPHS": -2, "TF32": 1.0, "SCORE": "max",
    "HEAD.NUM_CONV": -1, "HEAD.CONV_DIM": 0, "HEAD.TARGET": "giou", "REFINE.ACCEPT_MARGIN": -0.01,
    "REFINE.ACCEPT_IOU_RANGE": [0.9, 0.5], "CALIBRATION.DATASET": 3, "CALIBRATION.STEPS": [],
    "CALIBRATION.MAX_ITERS": [0], "CALIBRATION.MARGINS": [float("nan")], "CALIBRATION.IOU_RANGES": [[0.0, 1.5]],
}  # fmt: skip


def _keys(node, prefix=""):
    for key, value in node.items():
        if hasattr(value, "items"):
            yield from _keys(value, prefix + key + ".")
        else:
            yield prefix + key


def _cfg(**values):
    cfg = get_cfg()
    add_iounet_config(cfg)
    for key, value in values.items():
        *path, last = key.split(".")
        node = cfg.MODEL.IOU_NET
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


def test_every_key_has_a_rule_and_a_bad_value():
    keys = set(_keys(_cfg().MODEL.IOU_NET))
    assert keys == {o.key for o in OPTIONS} == set(BAD)


@pytest.mark.parametrize("key", sorted(BAD))
def test_each_bad_value_is_named(key):
    with pytest.raises(ValueError) as info:
        check_iounet_config(_cfg(**{key: BAD[key]}))
    assert f"MODEL.IOU_NET.{key} must be " in str(info.value) and f"got {BAD[key]!r}" in str(info.value)


def test_defaults_and_shipped_configs_pass():
    check_iounet_config(_cfg())
    for path in glob.glob(os.path.join(REPO, "configs", "*.yaml")):
        cfg = add_aerial_augment_config(_cfg())  # the tree-crown config's INPUT.AERIAL_AUGMENT, as train_net adds it
        cfg.merge_from_file(path)
        check_iounet_config(cfg)


def test_registered_names_and_refinement_pooler():
    with pytest.raises(ValueError, match="HEAD.NAME 'NoSuchHead' is not in IOU_HEAD_REGISTRY"):
        check_iounet_config(_cfg(**{"HEAD.NAME": "NoSuchHead"}))
    with pytest.raises(ValueError, match="POOLER_TYPE 'ROIAlignV3' is not a known pooler type"):
        check_iounet_config(_cfg(**{"POOLER_TYPE": "ROIAlignV3"}))
    with pytest.raises(ValueError, match="REFINE.ENABLED needs MODEL.IOU_NET.POOLER_TYPE PrRoIPool or PrRoIPoolV2"):
        check_iounet_config(_cfg(**{"POOLER_TYPE": "ROIAlignV2"}))
    check_iounet_config(_cfg(**{"POOLER_TYPE": "ROIAlignV2", "REFINE.ENABLED": False}))


# Detectron2 settings: (YAML key, LazyConfig key, bad value, what the message says is expected)
SETTING_CASES = [
    ("SOLVER.MAX_ITER", "train.max_iter", 0, "an integer >= 1"),
    ("SOLVER.MAX_ITER", "train.max_iter", "abc", "an integer >= 1"),
    ("SOLVER.CHECKPOINT_PERIOD", "train.checkpointer.period", 0, "an integer >= 1"),
    ("SOLVER.IMS_PER_BATCH", "dataloader.train.total_batch_size", 0, "an integer >= 1"),
    ("SOLVER.STEPS", "lr_multiplier.scheduler.milestones", (700, 550), "increasing integers >= 1"),
    ("SOLVER.STEPS", "lr_multiplier.scheduler.milestones", (0, 550), "increasing integers >= 1"),
    ("TEST.DETECTIONS_PER_IMAGE", "model.roi_heads.box_predictor.test_topk_per_image", 0, "an integer >= 1"),
    ("TEST.DETECTIONS_PER_IMAGE", "model.roi_heads.box_predictor.test_topk_per_image", -1, "an integer >= 1"),
    ("MODEL.ROI_HEADS.NUM_CLASSES", "model.roi_heads.num_classes", 0, "an integer >= 1"),
]


@pytest.mark.parametrize("key, lazy_key, bad, expected", SETTING_CASES)
def test_each_setting_is_refused_with_its_key_on_both_paths(key, lazy_key, bad, expected):
    from detectron2.config import LazyConfig
    from omegaconf import OmegaConf

    cfg = _cfg()
    *path, last = key.split(".")
    node = cfg
    for part in path:
        node = node[part]
    node[last] = bad
    problems = config_problems(cfg)
    assert len(problems) == 1 and problems[0].startswith(f"{key} must be {expected}") and repr(bad) in problems[0]

    lazy = LazyConfig.load(os.path.join(REPO, "configs", "lazy", "iounet_synthetic_R18.py"))
    OmegaConf.update(lazy, lazy_key, list(bad) if isinstance(bad, tuple) else bad, merge=False)
    problems = lazy_config_problems(lazy)
    assert len(problems) == 1 and problems[0].startswith(f"{lazy_key} must be {expected}"), problems


def test_training_settings_are_not_checked_for_evaluation_and_the_batch_splits_over_processes():
    cfg = _cfg()
    cfg.SOLVER.MAX_ITER = 0
    assert config_problems(cfg, training=False) == []
    cfg = _cfg()
    cfg.SOLVER.IMS_PER_BATCH = 6
    assert config_problems(cfg, world_size=3) == [] and config_problems(cfg, world_size=1) == []
    assert config_problems(cfg, world_size=4) == [
        "SOLVER.IMS_PER_BATCH (6) must be divisible by the number of processes (4: --num-gpus x --num-machines); "
        "every process loads an equal share of the batch"
    ]


def test_device_strings():
    import torch

    assert resolve_device("MODEL.DEVICE", "cpu", explicit=True) == ("cpu", None)
    for bad in ("gpu", "cuda:x", "", 0):
        device, problem = resolve_device("MODEL.DEVICE", bad, explicit=False)
        assert problem == f"MODEL.DEVICE must be a device: 'cpu', 'cuda' or 'cuda:N', got {bad!r}"
    if torch.cuda.is_available():
        assert resolve_device("MODEL.DEVICE", "cuda", explicit=True) == ("cuda", None)
        assert "CUDA GPU(s)" in resolve_device("MODEL.DEVICE", f"cuda:{torch.cuda.device_count()}", True)[1]
    else:  # the config's (or Detectron2's default) cuda runs on the CPU; one asked for on the command line is refused
        assert resolve_device("MODEL.DEVICE", "cuda", explicit=False) == ("cpu", None)
        assert "PyTorch sees no CUDA GPU" in resolve_device("MODEL.DEVICE", "cuda", explicit=True)[1]
