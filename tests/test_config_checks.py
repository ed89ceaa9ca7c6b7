"""check_iounet_config: every MODEL.IOU_NET key has a rule; each rule rejects a wrong type or range with a message
naming the key and value, and passes every shipped config."""

import glob
import os

import pytest

pytest.importorskip("detectron2")

from detectron2.config import get_cfg

from prroi_d2 import add_iounet_config
from prroi_d2.config_checks import RULES, check_iounet_config
from prroi_d2.data.augmentation import add_aerial_augment_config

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
    assert keys == set(RULES) == set(BAD)


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
