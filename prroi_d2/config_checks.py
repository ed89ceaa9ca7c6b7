"""Config values checked for type and range from the config alone, before any model is built, with the same rules
on both config paths: a YAML ``CfgNode`` and a LazyConfig.

* IoU-Net options: the rules of :data:`prroi_d2.options.OPTIONS`, on ``MODEL.IOU_NET.<key>`` (YAML) and on
  ``model.roi_heads.iou_branch.<arg>`` (LazyConfig), plus the registered names and the refinement pooler.
* Detectron2 settings that fail late or cryptically (``SETTINGS``): iterations, checkpoint period, batch size and its
  split over the processes, learning-rate steps, detections per image, number of classes, device.

``config_problems(cfg)`` / ``lazy_config_problems(cfg)`` list every problem as one line naming the key;
``raise_problems`` raises them as one ``ValueError``.
"""

from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple

from prroi_d2.options import OPTIONS, Rule, integer

__all__ = [
    "PRROI_POOLERS",
    "SETTINGS",
    "Setting",
    "check_iounet_config",
    "config_problems",
    "lazy_config_problems",
    "raise_problems",
    "resolve_device",
]

PRROI_POOLERS = ("PrRoIPool", "PrRoIPoolV2")  # the pooler types with a gradient with respect to the box coordinates
LAZY_BRANCH = "model.roi_heads.iou_branch"  # where lazy_config.with_iou_net puts the IoU branch


def _steps() -> Rule:
    def test(v) -> bool:
        v = list(v)
        return all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in v) and v == sorted(set(v))

    return Rule(test, "increasing integers >= 1 (the iterations at which the learning rate drops)")


@dataclass(frozen=True)
class Setting:
    """A Detectron2 setting checked on both paths: ``key`` of a YAML config, ``lazy`` of a LazyConfig (``*`` stands
    for every entry of a list, e.g. each box predictor of a cascade); ``training``: checked only when training."""

    key: str
    lazy: str
    rule: Rule
    training: bool


SETTINGS: Tuple[Setting, ...] = (
    Setting("SOLVER.MAX_ITER", "train.max_iter", integer(1), True),
    Setting("SOLVER.CHECKPOINT_PERIOD", "train.checkpointer.period", integer(1), True),
    Setting("SOLVER.IMS_PER_BATCH", "dataloader.train.total_batch_size", integer(1), True),
    Setting("SOLVER.STEPS", "lr_multiplier.scheduler.milestones", _steps(), True),
    Setting("TEST.EVAL_PERIOD", "train.eval_period", integer(0), True),
    Setting("TEST.DETECTIONS_PER_IMAGE", "model.roi_heads.box_predictor.test_topk_per_image", integer(1), False),
    Setting("TEST.DETECTIONS_PER_IMAGE", "model.roi_heads.box_predictors.*.test_topk_per_image", integer(1), False),
    Setting("MODEL.ROI_HEADS.NUM_CLASSES", "model.roi_heads.num_classes", integer(1), False),
)


def raise_problems(problems: List[str]) -> None:
    """Raise ``ValueError`` listing ``problems`` one per line (nothing if there are none)."""
    if problems:
        raise ValueError("Invalid config value(s):\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------------------------------------------
# YAML (CfgNode)
# ----------------------------------------------------------------------------------------------------------------


def _lookup(node, dotted: str):
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def check_iounet_config(cfg) -> None:
    """Raise ``ValueError`` listing every ``MODEL.IOU_NET`` value of the wrong type or out of range (with the key,
    the value and what is expected); nothing if ``cfg`` has no ``MODEL.IOU_NET``. Also checks the registered
    names (IoU head, pooler type) and that refinement has a Precise RoI Pooling pooler."""
    raise_problems(_iounet_problems(cfg))


def _iounet_problems(cfg) -> List[str]:
    if "IOU_NET" not in cfg.MODEL:
        return []
    problems = []
    for option in OPTIONS:
        try:
            value = _lookup(cfg.MODEL.IOU_NET, option.key)
        except KeyError:
            continue
        problems.append(option.rule.problem(f"MODEL.IOU_NET.{option.key}", value))
    problems = [p for p in problems if p]
    if problems:
        return problems
    iou = cfg.MODEL.IOU_NET
    problems += _pooler_problems("MODEL.IOU_NET.POOLER_TYPE", iou.POOLER_TYPE)
    problems += _head_name_problems(iou.HEAD.NAME)
    if iou.REFINE.ENABLED and iou.POOLER_TYPE not in PRROI_POOLERS:
        problems.append(_refine_pooler_problem("MODEL.IOU_NET.REFINE.ENABLED", "MODEL.IOU_NET.POOLER_TYPE", iou))
    return problems


def config_problems(cfg, *, training: bool = True, world_size: int = 1) -> List[str]:
    """Every problem of the YAML config ``cfg``: its IoU-Net options and :data:`SETTINGS` (those of training only
    if ``training``), and ``SOLVER.IMS_PER_BATCH`` divisible by ``world_size`` processes."""
    problems = _iounet_problems(cfg)
    for setting in SETTINGS:
        if setting.training and not training:
            continue
        try:
            value = _lookup(cfg, setting.key)
        except KeyError:
            continue
        problem = setting.rule.problem(setting.key, value)
        if problem and problem not in problems:
            problems.append(problem)
    if training and not problems:
        problems += _split_problems("SOLVER.IMS_PER_BATCH", cfg.SOLVER.IMS_PER_BATCH, world_size)
    held_out = cfg.MODEL.IOU_NET.CALIBRATION.DATASET if "IOU_NET" in cfg.MODEL else ""
    if training and held_out and held_out in tuple(cfg.DATASETS.TEST) + tuple(cfg.DATASETS.TRAIN):
        problems.append(
            f"MODEL.IOU_NET.CALIBRATION.DATASET {held_out!r} is also in DATASETS.TRAIN or DATASETS.TEST: calibrate "
            "on a held-out split the model neither trains on nor reports"
        )
    return problems


# ----------------------------------------------------------------------------------------------------------------
# LazyConfig (OmegaConf DictConfig)
# ----------------------------------------------------------------------------------------------------------------

_MISSING = object()


def _select(cfg, key: str) -> Iterator[Tuple[str, Any]]:
    """``(key, value)`` of every node ``key`` names in the LazyConfig ``cfg`` (``*``: each entry of a list or
    dict), with interpolations resolved and containers as plain lists / dicts; nothing where a key is absent."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    head, star, tail = key.partition(".*.")
    if not star:
        try:
            value = OmegaConf.select(cfg, key, default=_MISSING)
        except Exception:  # an interpolation that does not resolve: Detectron2 reports it when it builds the node
            return
        if value is _MISSING:
            return
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        yield key, value
        return
    parent = OmegaConf.select(cfg, head, default=None)
    if isinstance(parent, ListConfig):
        names = [str(i) for i in range(len(parent))]
    elif isinstance(parent, DictConfig):
        names = list(parent.keys())
    else:
        return
    for name in names:
        yield from _select(cfg, f"{head}.{name}.{tail}")


def _lazy_iounet_problems(cfg) -> List[str]:
    from omegaconf import OmegaConf

    if OmegaConf.select(cfg, LAZY_BRANCH, default=None) is None:
        return []
    problems = []
    for option in OPTIONS:
        if option.arg is None:
            continue
        for key, value in _select(cfg, f"{LAZY_BRANCH}.{option.arg}"):
            problems.append(option.rule.problem(key, value))
    problems = [p for p in problems if p]
    if problems:
        return problems
    pooler_key, refine_key = f"{LAZY_BRANCH}.pooler.pooler_type", f"{LAZY_BRANCH}.refine_enabled"
    pooler_type = dict(_select(cfg, pooler_key)).get(pooler_key)
    if pooler_type is not None:
        problems += _pooler_problems(pooler_key, pooler_type)
        if dict(_select(cfg, refine_key)).get(refine_key) and pooler_type not in PRROI_POOLERS:
            problems.append(_refine_pooler_problem(refine_key, pooler_key, None, pooler_type))
    return problems


def lazy_config_problems(cfg, *, training: bool = True, world_size: int = 1) -> List[str]:
    """Every problem of the LazyConfig ``cfg``: the IoU-Net option rules on ``model.roi_heads.iou_branch.*`` and
    :data:`SETTINGS` at their LazyConfig keys (those of training only if ``training``), and
    ``dataloader.train.total_batch_size`` divisible by ``world_size`` processes."""
    problems = _lazy_iounet_problems(cfg)
    for setting in SETTINGS:
        if setting.training and not training:
            continue
        for key, value in _select(cfg, setting.lazy):
            problem = setting.rule.problem(key, value)
            if problem:
                problems.append(problem)
    batch_key = "dataloader.train.total_batch_size"
    batch = dict(_select(cfg, batch_key)).get(batch_key)
    if training and not problems and batch is not None:
        problems += _split_problems(batch_key, batch, world_size)
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Shared
# ----------------------------------------------------------------------------------------------------------------


def _split_problems(key: str, batch: int, world_size: int) -> List[str]:
    if world_size > 1 and batch % world_size:
        return [
            f"{key} ({batch}) must be divisible by the number of processes ({world_size}: --num-gpus x "
            "--num-machines); every process loads an equal share of the batch"
        ]
    return []


def _refine_pooler_problem(refine_key: str, pooler_key: str, iou=None, pooler_type: Optional[str] = None) -> str:
    pooler_type = iou.POOLER_TYPE if iou is not None else pooler_type
    return (
        f"{refine_key} needs {pooler_key} PrRoIPool or PrRoIPoolV2 (got {pooler_type!r}: other poolers have no "
        "gradient with respect to the box coordinates)"
    )


def _pooler_problems(key: str, pooler_type: str) -> List[str]:
    from detectron2.modeling.poolers import ROIPooler  # noqa: F401 - the pooler registry wraps its __init__

    from prroi_d2.modeling import poolers

    if poolers._is_detectron2_pooler_type(pooler_type) or pooler_type in poolers._install():
        return []
    return [f"{key} {pooler_type!r} is not a known pooler type"]


def _head_name_problems(name: str) -> List[str]:
    from prroi_d2.modeling.iou_head import IOU_HEAD_REGISTRY

    if name in IOU_HEAD_REGISTRY:
        return []
    names = sorted(n for n, _ in IOU_HEAD_REGISTRY)
    return [f"MODEL.IOU_NET.HEAD.NAME {name!r} is not in IOU_HEAD_REGISTRY ({', '.join(names)})"]


def resolve_device(key: str, value: Any, explicit: bool) -> Tuple[str, Optional[str]]:
    """``(device, problem)`` for the device setting ``key`` (``MODEL.DEVICE`` / ``train.device``) of ``value``.
    ``cpu``, ``cuda`` and ``cuda:N`` are devices; without a CUDA GPU, a ``cuda`` device from a config file (or
    Detectron2's default) becomes ``cpu`` (the CPU workflow), one given on the command line (``explicit``) is a
    problem, as is an index past the visible GPUs."""
    import torch

    devices = "a device: 'cpu', 'cuda' or 'cuda:N'"
    try:
        device = torch.device(value) if isinstance(value, str) else None
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        return str(value), f"{key} must be {devices}, got {value!r}"
    if device.type == "cpu":
        return value, None
    if not torch.cuda.is_available():
        if explicit:
            return value, (
                f"{key} is {value!r} but PyTorch sees no CUDA GPU (torch.cuda.is_available() is False); set it to "
                "'cpu' (or leave it unset: the CPU is used when there is no GPU)"
            )
        return "cpu", None
    if device.index is not None and device.index >= torch.cuda.device_count():
        return value, f"{key} is {value!r} but PyTorch sees {torch.cuda.device_count()} CUDA GPU(s)"
    return value, None
