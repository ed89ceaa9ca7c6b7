"""``check_iounet_config(cfg)``: every ``MODEL.IOU_NET`` value checked for type and range from the config alone,
before the model is built, so a bad value fails in the first second rather than at evaluation.

Each key of ``add_iounet_config`` has a rule in ``RULES`` (a test keeps the two in step); keys without a rule (added
by other code) are left to their own checks.
"""

import math
from typing import Callable, Dict, List, Tuple

__all__ = ["RULES", "check_iounet_config"]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_float(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bool():
    return (lambda v: isinstance(v, bool)), "a bool (True or False)"


def _int(low: int):
    return (lambda v: _is_int(v) and v >= low), f"an integer >= {low}"


def _float(test: Callable[[float], bool], text: str):
    return (lambda v: _is_float(v) and test(v)), f"a finite number {text}"


def _choice(choices):
    return (lambda v: v in choices), "one of " + ", ".join(repr(c) for c in choices)


def _str_list():
    return (
        lambda v: isinstance(v, (list, tuple)) and all(isinstance(s, str) and s for s in v) and len(set(v)) == len(v)
    ), "a list of distinct feature names (empty: MODEL.ROI_HEADS.IN_FEATURES)"


def _unit_range():
    return (
        lambda v: (
            isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_float(x) for x in v) and 0 <= v[0] <= v[1] <= 1
        )
    ), "a pair [low, high] with 0 <= low <= high <= 1"


def _list_of(test: Callable, text: str):
    return (
        lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(test(x) for x in v)
    ), f"a non-empty list of {text}"


def _nonempty_str():
    return (lambda v: isinstance(v, str) and bool(v)), "a non-empty string"


# key (under MODEL.IOU_NET) -> (test, what a valid value is)
RULES: Dict[str, Tuple[Callable, str]] = {
    "TRAIN_ONLY_IOU_HEAD": _bool(),
    "OUTPUT_STAGES": _bool(),
    "IN_FEATURES": _str_list(),
    "POOLER_TYPE": _nonempty_str(),
    "POOLER_RESOLUTION": _int(1),
    "HEAD.NAME": _nonempty_str(),
    "HEAD.NUM_FC": _int(0),
    "HEAD.FC_DIM": _int(1),
    "HEAD.CLS_AGNOSTIC": _bool(),
    "HEAD.LOSS_TYPE": _choice(("smooth_l1", "bce")),
    "HEAD.SMOOTH_L1_BETA": _float(lambda v: v >= 0, ">= 0"),
    "HEAD.LOSS_WEIGHT": _float(lambda v: v >= 0, ">= 0"),
    "HEAD.PRED_INIT_STD": _float(lambda v: v >= 0, ">= 0"),
    "HEAD.NORM": _choice(("", "LN")),
    "HEAD.NUM_CONV": _int(0),
    "HEAD.CONV_DIM": _int(1),
    "HEAD.TARGET": _choice(("iou", "decoupled")),
    "JITTER.NUM_PER_IMAGE": _int(1),
    "JITTER.NUM_BINS": _int(1),
    "JITTER.MIN_IOU": _float(lambda v: 0 <= v < 1, "in [0, 1)"),
    "JITTER.MAX_SHIFT": _float(lambda v: v >= 0, ">= 0"),
    "JITTER.MAX_SCALE": _float(lambda v: v >= 1, ">= 1"),
    "JITTER.CANDIDATES_PER_SAMPLE": _int(1),
    "JITTER.ADD_PROPOSALS": _bool(),
    "NMS.ENABLED": _bool(),
    "NMS.IOU_THRESH": _float(lambda v: 0 <= v <= 1, "in [0, 1]"),
    "NMS.RANK": _choice(("iou", "score_x_iou")),
    "REFINE.ENABLED": _bool(),
    "REFINE.STEP": _float(lambda v: v > 0, "> 0 (lambda, the step size)"),
    "REFINE.MAX_ITER": _int(0),
    "REFINE.STOP_DELTA": _float(lambda v: v >= 0, ">= 0 (a change of predicted IoU)"),
    "REFINE.STOP_DROP": _float(lambda v: v <= 0, "<= 0 (a drop of predicted IoU)"),
    "REFINE.CUDA_GRAPHS": _int(0),
    "REFINE.ACCEPT_MARGIN": _float(lambda v: v >= 0, ">= 0 (a gain of predicted IoU)"),
    "REFINE.ACCEPT_IOU_RANGE": _unit_range(),
    "CALIBRATION.DATASET": ((lambda v: isinstance(v, str)), "a dataset name (empty: no calibration)"),
    "CALIBRATION.STEPS": _list_of(lambda v: _is_float(v) and v > 0, "numbers > 0"),
    "CALIBRATION.MAX_ITERS": _list_of(lambda v: _is_int(v) and v >= 1, "integers >= 1"),
    "CALIBRATION.MARGINS": _list_of(lambda v: _is_float(v) and v >= 0, "numbers >= 0"),
    "CALIBRATION.IOU_RANGES": _list_of(lambda v: _unit_range()[0](v), "pairs [low, high], 0 <= low <= high <= 1"),
    "TF32": _bool(),
    "SCORE": _choice(("cls", "iou", "cls_x_iou")),
}


def _lookup(node, dotted: str):
    for part in dotted.split("."):
        if part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def _cross_checks(cfg) -> List[str]:
    iou = cfg.MODEL.IOU_NET
    problems = []
    if iou.REFINE.ENABLED and iou.POOLER_TYPE not in ("PrRoIPool", "PrRoIPoolV2"):
        problems.append(
            f"MODEL.IOU_NET.REFINE.ENABLED needs MODEL.IOU_NET.POOLER_TYPE PrRoIPool or PrRoIPoolV2 (got "
            f"{iou.POOLER_TYPE!r}: other poolers have no gradient with respect to the box coordinates)"
        )
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    if not _is_int(num_classes) or num_classes < 1:
        problems.append(f"MODEL.ROI_HEADS.NUM_CLASSES must be an integer >= 1, got {num_classes!r}")
    return problems


def check_iounet_config(cfg) -> None:
    """Raise ``ValueError`` listing every ``MODEL.IOU_NET`` value of the wrong type or out of range (with the key,
    the value and what is expected); nothing if ``cfg`` has no ``MODEL.IOU_NET``. Also checks the registered
    names (IoU head, pooler type) and that refinement has a Precise RoI Pooling pooler."""
    if "IOU_NET" not in cfg.MODEL:
        return
    problems = []
    for key, (test, expected) in RULES.items():
        try:
            value = _lookup(cfg.MODEL.IOU_NET, key)
        except KeyError:
            continue
        if not test(value):
            problems.append(f"MODEL.IOU_NET.{key} must be {expected}, got {value!r}")
    if not problems:
        problems += _registered_names(cfg) + _cross_checks(cfg)
    if problems:
        raise ValueError("Invalid config value(s):\n  " + "\n  ".join(problems))


def _registered_names(cfg) -> List[str]:
    from detectron2.modeling.poolers import ROIPooler  # noqa: F401 - the pooler registry wraps its __init__

    from prroi_d2.modeling import poolers
    from prroi_d2.modeling.iou_head import IOU_HEAD_REGISTRY

    iou = cfg.MODEL.IOU_NET
    problems = []
    if iou.HEAD.NAME not in IOU_HEAD_REGISTRY:
        names = sorted(name for name, _ in IOU_HEAD_REGISTRY)
        problems.append(f"MODEL.IOU_NET.HEAD.NAME {iou.HEAD.NAME!r} is not in IOU_HEAD_REGISTRY ({', '.join(names)})")
    known = poolers._is_detectron2_pooler_type(iou.POOLER_TYPE) or iou.POOLER_TYPE in poolers._install()
    if not known:
        problems.append(f"MODEL.IOU_NET.POOLER_TYPE {iou.POOLER_TYPE!r} is not a known pooler type")
    return problems
