"""The option table prroi_d2.options.OPTIONS against every place that reads it: the YAML defaults, IoUBranch's and
IoUHead's keywords (from_config and their defaults), the LazyConfig keys, the README table, and each rule rejecting a
bad value with the key named on both config paths."""

import copy
import inspect
import os

import pytest

pytest.importorskip("detectron2")

from detectron2.config import LazyConfig, get_cfg
from detectron2.modeling import build_model
from omegaconf import OmegaConf
from test_config_checks import BAD

from prroi_d2 import add_iounet_config
from prroi_d2.config_checks import lazy_config_problems
from prroi_d2.lazy_config import iou_branch
from prroi_d2.modeling import IoUBranch, IoUHead
from prroi_d2.modeling.iou_branch import NMS_RANKS, SCORE_MODES
from prroi_d2.modeling.iou_head import LOSS_TYPES, NORMS
from prroi_d2.options import ARG_DEFAULTS, OPTIONS, markdown_table, readme_table_span

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The defaults every option had before the table existed (written out here, not read from the table).
DEFAULTS = {
    "TRAIN_ONLY_IOU_HEAD": False, "OUTPUT_STAGES": False, "IN_FEATURES": [], "POOLER_TYPE": "PrRoIPoolV2",
    "POOLER_RESOLUTION": 7, "HEAD.NAME": "IoUHead", "HEAD.NUM_FC": 2, "HEAD.FC_DIM": 1024, "HEAD.CLS_AGNOSTIC": False,
    "HEAD.LOSS_TYPE": "smooth_l1", "HEAD.SMOOTH_L1_BETA": 1.0, "HEAD.LOSS_WEIGHT": 5.0, "HEAD.PRED_INIT_STD": 0.01,
    "HEAD.NORM": "", "JITTER.NUM_PER_IMAGE": 128, "JITTER.NUM_BINS": 5, "JITTER.MIN_IOU": 0.5,
    "JITTER.MAX_SHIFT": 0.3, "JITTER.MAX_SCALE": 1.6, "JITTER.CANDIDATES_PER_SAMPLE": 8,
    "JITTER.ADD_PROPOSALS": False, "NMS.ENABLED": True, "NMS.IOU_THRESH": 0.5, "NMS.RANK": "iou",
    "REFINE.ENABLED": True, "REFINE.STEP": 0.5, "REFINE.MAX_ITER": 5, "REFINE.STOP_DELTA": 0.001,
    "REFINE.STOP_DROP": -0.01, "REFINE.CUDA_GRAPHS": 8, "TF32": True, "SCORE": "cls",
    # added with the calibration and the IoU-head candidates
    "HEAD.NUM_CONV": 0, "HEAD.CONV_DIM": 256, "HEAD.TARGET": "iou", "REFINE.ACCEPT_MARGIN": 0.0,
    "REFINE.ACCEPT_IOU_RANGE": [0.0, 1.0], "CALIBRATION.DATASET": "", "CALIBRATION.STEPS": [0.5, 1.0, 2.0],
    "CALIBRATION.MAX_ITERS": [5, 10], "CALIBRATION.MARGINS": [0.0, 0.01, 0.03],
    "CALIBRATION.IOU_RANGES": [[0.0, 1.0], [0.0, 0.9], [0.5, 1.0], [0.5, 0.9]],
}  # fmt: skip

# A valid value other than the default per key, and where the built model shows it (an independent reading).
CHANGED = {
    "TRAIN_ONLY_IOU_HEAD": (True, lambda b: b.train_only_iou_head),
    "OUTPUT_STAGES": (True, lambda b: b.output_stages),
    "IN_FEATURES": (["p3", "p4"], lambda b: b.in_features),
    "POOLER_TYPE": ("PrRoIPool", lambda b: "PrRoIPoolV2" if b.pooler.prroi_aligned else "PrRoIPool"),
    "POOLER_RESOLUTION": (5, lambda b: b.pooler.output_size[0]),
    "HEAD.NAME": ("IoUHead", lambda b: type(b.iou_head).__name__),
    "HEAD.NUM_FC": (1, lambda b: sum(type(m).__name__ == "Linear" for m in b.iou_head.fcs)),
    "HEAD.FC_DIM": (48, lambda b: b.iou_head.predictor.in_features),
    "HEAD.CLS_AGNOSTIC": (True, lambda b: b.iou_head.class_agnostic),
    "HEAD.LOSS_TYPE": ("bce", lambda b: b.iou_head.loss_type),
    "HEAD.SMOOTH_L1_BETA": (0.25, lambda b: b.iou_head.smooth_l1_beta),
    "HEAD.LOSS_WEIGHT": (2.0, lambda b: b.iou_head.loss_weight),
    "HEAD.PRED_INIT_STD": (0.0, lambda b: float(b.iou_head.predictor.weight.detach().abs().max())),
    "HEAD.NORM": ("LN", lambda b: "LN" if any(type(m).__name__ == "LayerNorm" for m in b.iou_head.fcs) else ""),
    "JITTER.NUM_PER_IMAGE": (16, lambda b: b.jitter["num_samples"]),
    "JITTER.NUM_BINS": (3, lambda b: b.jitter["num_bins"]),
    "JITTER.MIN_IOU": (0.4, lambda b: b.jitter["min_iou"]),
    "JITTER.MAX_SHIFT": (0.2, lambda b: b.jitter["max_shift"]),
    "JITTER.MAX_SCALE": (1.3, lambda b: b.jitter["max_scale"]),
    "JITTER.CANDIDATES_PER_SAMPLE": (4, lambda b: b.jitter["candidates_per_sample"]),
    "JITTER.ADD_PROPOSALS": (True, lambda b: b.jitter["add_proposals"]),
    "NMS.ENABLED": (False, lambda b: b.nms_enabled),
    "NMS.IOU_THRESH": (0.6, lambda b: b.nms_thresh),
    "NMS.RANK": ("score_x_iou", lambda b: b.nms_rank),
    "REFINE.ENABLED": (False, lambda b: b.refine_enabled),
    "REFINE.STEP": (0.7, lambda b: b.refine_step),
    "REFINE.MAX_ITER": (3, lambda b: b.refine_max_iter),
    "REFINE.STOP_DELTA": (0.01, lambda b: b.refine_stop_delta),
    "REFINE.STOP_DROP": (-0.1, lambda b: b.refine_stop_drop),
    "REFINE.CUDA_GRAPHS": (2, lambda b: b.refine_graphs.max_graphs),
    "TF32": (False, lambda b: b.tf32),
    "SCORE": ("cls_x_iou", lambda b: b.score_mode),
    "HEAD.NUM_CONV": (2, lambda b: sum(type(m).__name__ == "Conv2d" for m in b.iou_head.convs)),
    "HEAD.CONV_DIM": (32, lambda b: b.iou_head.convs[0].out_channels),
    "HEAD.TARGET": ("decoupled", lambda b: b.iou_head.target),
    "REFINE.ACCEPT_MARGIN": (0.02, lambda b: b.refine_accept_margin),
    "REFINE.ACCEPT_IOU_RANGE": ([0.2, 0.9], lambda b: list(b.refine_accept_iou_range)),
}
# Keys the calibration reads (prroi_d2.engine.calibration), not the model.
CALIBRATION_ONLY = {o.key for o in OPTIONS if o.key.startswith("CALIBRATION.")}


def _flat(node, prefix=""):
    for key, value in node.items():
        if hasattr(value, "items"):
            yield from _flat(value, prefix + key + ".")
        else:
            yield prefix + key, value


def test_yaml_defaults_are_the_table_and_unchanged():
    cfg = add_iounet_config(get_cfg())
    yaml_defaults = dict(_flat(cfg.MODEL.IOU_NET))
    assert yaml_defaults == {o.key: o.default for o in OPTIONS} == DEFAULTS
    assert all(type(yaml_defaults[k]) is type(v) for k, v in DEFAULTS.items())  # 1.0 stays a float, 7 an int


def _defaults(function):
    return {
        name: p.default
        for name, p in inspect.signature(function).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def test_constructor_defaults_are_the_table():
    branch = _defaults(IoUBranch.__init__)
    branch.pop("jitter")  # None: the box sampler's defaults, IoUBranch.jitter
    expected = {o.arg: o.default for o in OPTIONS if o.arg and "." not in o.arg and o.arg != "in_features"}
    assert branch == expected
    head = _defaults(IoUHead.__init__)
    assert head == {o.arg.split(".")[1]: o.default for o in OPTIONS if (o.arg or "").startswith("iou_head.")}
    assert ARG_DEFAULTS["jitter"] == {o.arg.split(".")[1]: o.default for o in OPTIONS if o.key.startswith("JITTER.")}


def test_choices_are_the_modules_own():
    rules = {o.key: o.rule for o in OPTIONS}
    for key, choices in (("NMS.RANK", NMS_RANKS), ("SCORE", SCORE_MODES), ("HEAD.LOSS_TYPE", LOSS_TYPES),
                         ("HEAD.NORM", NORMS)):  # fmt: skip
        assert all(rules[key].problem(key, c) is None for c in choices)
        assert rules[key].problem(key, "not-a-choice") is not None


def test_every_option_reaches_the_built_model():
    """from_config maps every key: a model built with every option changed shows each changed value."""
    assert set(CHANGED) == set(DEFAULTS) - CALIBRATION_ONLY
    cfg = add_iounet_config(get_cfg())
    cfg.merge_from_file(os.path.join(REPO, "configs", "iounet_synthetic_R18.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    for key, (value, _) in CHANGED.items():
        *path, last = key.split(".")
        node = cfg.MODEL.IOU_NET
        for part in path:
            node = node[part]
        node[last] = value
    branch = build_model(cfg).roi_heads.iou_branch
    for key, (value, read) in CHANGED.items():
        assert read(branch) == value, key


def test_lazy_keys_are_the_table():
    branch = OmegaConf.to_container(OmegaConf.create(iou_branch(output_stages=False), flags={"allow_objects": True}))
    for option in OPTIONS:
        if option.arg is None:
            continue
        node = branch
        for part in option.arg.split("."):
            node = node[part]
        assert node == ("${..box_in_features}" if option.arg == "in_features" else option.default), option.arg


def test_readme_table_is_the_table():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start, end = readme_table_span(text)
    assert text[start:end] == markdown_table(), "regenerate: python -m prroi_d2.options --write-readme README.md"
    for option in OPTIONS:  # independent of the generator: each key, its default and its LazyConfig key in one row
        row = next(line for line in text[start:end].splitlines() if line.startswith(f"| `{option.key}` |"))
        assert str(option.default) in row or (option.default == "" and '`""`' in row)
        assert option.arg is None or f"`{option.arg}`" in row


@pytest.fixture(scope="module")
def lazy_cfg():
    return LazyConfig.load(os.path.join(REPO, "configs", "lazy", "iounet_synthetic_R18.py"))


def test_shipped_lazy_configs_pass(lazy_cfg):
    assert lazy_config_problems(lazy_cfg) == []
    for name in ("iounet_cascade_synthetic_R18.py", "iounet_R50_FPN.py", "iounet_cascade_R50_FPN.py"):
        assert lazy_config_problems(LazyConfig.load(os.path.join(REPO, "configs", "lazy", name))) == [], name


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.arg], ids=lambda o: o.key)
def test_each_rule_rejects_a_bad_value_at_its_lazy_key(lazy_cfg, option):
    """The YAML path's rule (tests/test_config_checks.py: the same bad values) on model.roi_heads.iou_branch.<arg>."""
    cfg = copy.deepcopy(lazy_cfg)
    key = f"model.roi_heads.iou_branch.{option.arg}"
    OmegaConf.update(cfg, key, BAD[option.key], merge=False)
    problems = lazy_config_problems(cfg)
    assert problems == [f"{key} must be {option.rule.expected}, got {BAD[option.key]!r}"]
