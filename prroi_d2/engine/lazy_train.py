"""Training and evaluation from a LazyConfig ``.py`` (the path ``tools/train_net.py`` takes for ``--config-file
X.py``), as Detectron2's ``lazyconfig_train_net.py``: ``LazyConfig.load``, trailing ``key=value`` overrides, every
value checked with the YAML path's rules (:mod:`prroi_d2.config_checks`), ``instantiate`` of ``model``,
``optimizer``, ``dataloader.train`` / ``test``, a ``SimpleTrainer`` (``AMPTrainer`` with ``train.amp.enabled``) with
Detectron2's hooks. Dataset registration, the evaluator, the checkpointer, seeding
and the report are the YAML path's (:mod:`prroi_d2.engine.steps`).

Config keys read: ``model``, ``optimizer``, ``lr_multiplier``, ``dataloader.{train,test,evaluator}``, ``train.{
output_dir, init_checkpoint, max_iter, amp.enabled, ddp, checkpointer, eval_period, log_period, device, seed}``, and
two of this project: ``train.clip_gradients`` (optional; ``enabled``, ``clip_type``, ``clip_value``, ``norm_type`` as
the YAML configs' ``SOLVER.CLIP_GRADIENTS``) and ``model.train_only_iou_head`` (then every frozen key must load from
``train.init_checkpoint``). The loaders' mappers name an image that fails to decode, as on the YAML path.
"""

import inspect
import logging
from typing import List

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, defaults, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.registry import locate
from omegaconf import DictConfig, OmegaConf, open_dict

from prroi_d2.config_checks import lazy_config_problems, raise_problems, resolve_device
from prroi_d2.config_files import config_file_problem
from prroi_d2.data.named_decode import EndRunOnDecodeError, NamedDecodeErrors
from prroi_d2.data.preflight import run_preflight
from prroi_d2.engine.checkpoint import check_frozen_weights_loaded, load_weights_for_eval
from prroi_d2.engine.checkpoint_hook import PeriodicCheckpointer
from prroi_d2.engine.iou_learning_monitor import IoULearningMonitor
from prroi_d2.engine.steps import build_checkpointer, build_writers, prepare_datasets, report, setup_run

__all__ = ["apply_overrides", "config_from_args", "do_test", "do_train", "load_config", "main"]

logger = logging.getLogger("prroi_d2.lazy_train")
_MISSING = object()


def load_config(config_file: str, overrides: List[str], *, training: bool = True, world_size: int = 1) -> DictConfig:
    """``LazyConfig.load(config_file)`` with ``overrides`` applied and every value checked (the IoU-Net option rules
    of the YAML path on ``model.roi_heads.iou_branch.*``, Detectron2's settings, those of training only if
    ``training``; the batch split over ``world_size`` processes): exits with one line naming the file or each bad
    key. Without CUDA, a ``cuda`` device from the file becomes ``cpu``; ``train.device=cuda`` given as an override
    is refused."""
    problem = config_file_problem(config_file)
    if problem:
        raise SystemExit(problem)
    try:
        cfg = LazyConfig.load(config_file)
    except Exception as e:  # the config's own code: a syntax error, an import that does not resolve, ...
        cause = e.__cause__ if isinstance(e.__cause__, SyntaxError) else e
        raise SystemExit(f"Config file {config_file} does not load: {type(cause).__name__}: {cause}") from None
    for key in ("model", "train", "dataloader"):
        if key not in cfg:
            raise SystemExit(f"{config_file}: a LazyConfig for tools/train_net.py needs a top-level {key!r}")
    apply_overrides(cfg, overrides, config_file)
    explicit = any(o.split("=", 1)[0].strip().lstrip("+~") == "train.device" for o in overrides)
    device, device_problem = resolve_device("train.device", cfg.train.get("device", "cuda"), explicit)
    problems = lazy_config_problems(cfg, training=training, world_size=world_size)
    try:
        raise_problems(problems + ([device_problem] if device_problem else []))
    except ValueError as e:
        raise SystemExit(f"{config_file}: {e}") from None
    cfg.train.device = device
    return cfg


def config_from_args(args, world_size: int = 1) -> DictConfig:
    """:func:`load_config` of ``args.config_file`` with ``args.opts`` (``--eval-only``: no training settings)."""
    return load_config(args.config_file, list(args.opts), training=not args.eval_only, world_size=world_size)


def apply_overrides(cfg: DictConfig, overrides: List[str], config_file: str = "the config") -> DictConfig:
    """Detectron2's ``LazyConfig.apply_overrides`` after checking every key: it must exist, or name an argument
    of the object its parent builds (``model.roi_heads.iou_branch.refine_step=1.0``); otherwise exit naming it."""
    for override in overrides:
        if "=" not in override:
            raise SystemExit(f"Override {override!r}: expected key=value (a LazyConfig takes key=value overrides)")
        key = override.split("=", 1)[0].strip().lstrip("+~")
        if OmegaConf.select(cfg, key, default=_MISSING) is not _MISSING:
            continue
        parent_key, _, name = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
        if not _accepts(parent, name):
            known = sorted(parent.keys()) if isinstance(parent, DictConfig) else []
            raise SystemExit(f"Override {override!r}: {config_file} has no key {key!r} (keys there: {known})")
    return LazyConfig.apply_overrides(cfg, overrides)


def _accepts(node, name: str) -> bool:
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return False
    target = node._target_
    target = locate(target) if isinstance(target, str) else target
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _detections_per_image(model):
    """The model's cap on detections per image (``test_topk_per_image`` of its box predictor, the last one of a
    cascade), or None."""
    model = getattr(model, "module", model)  # unwrapped from DistributedDataParallel
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    if isinstance(predictor, torch.nn.ModuleList):
        predictor = predictor[-1]
    return getattr(predictor, "test_topk_per_image", None)


def do_test(cfg: DictConfig, model):
    """Every IoU-Net stage (and mask AP, where configured) on ``dataloader.test`` with ``dataloader.evaluator``.
    An evaluator that takes ``max_dets_per_image`` and is not given one counts as many detections per image as the
    model outputs (as the YAML path passes ``TEST.DETECTIONS_PER_IMAGE``)."""
    if "evaluator" not in cfg.dataloader:
        return {}
    evaluator = cfg.dataloader.evaluator
    cap = _detections_per_image(model)
    if cap and "max_dets_per_image" not in evaluator and _accepts(evaluator, "max_dets_per_image"):
        with open_dict(evaluator):
            evaluator.max_dets_per_image = int(cap)
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(evaluator))
    if comm.is_main_process():
        print_csv_format(results)
    return results


def do_train(args, cfg: DictConfig):
    """Train ``cfg.model`` for ``train.max_iter`` iterations (resuming with ``--resume``), evaluating every
    ``train.eval_period`` and at the end; returns the last evaluation's results."""
    model = instantiate(cfg.model)
    logger.info("Model:\n%s", model)
    model.to(cfg.train.device)
    cfg.optimizer.params.model = model
    optimizer = _with_gradient_clipping(instantiate(cfg.optimizer), cfg.train.get("clip_gradients"))
    train_loader = instantiate(cfg.dataloader.train)
    model = defaults.create_ddp_model(model, **cfg.train.ddp)
    trainer = (_AMPTrainer if cfg.train.amp.enabled else _SimpleTrainer)(model, train_loader, optimizer)
    checkpointer = build_checkpointer(model, cfg.train.output_dir, trainer=trainer)
    results = {}

    def evaluate():
        results.update(do_test(cfg, model))
        return results

    main_process = comm.is_main_process()
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main_process else None,
            hooks.EvalHook(cfg.train.eval_period, evaluate),
            IoULearningMonitor(start_iter=_monitor_start(cfg)),
            hooks.PeriodicWriter(build_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
            if main_process
            else None,
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    check_frozen_weights_loaded(
        checkpointer,
        bool(OmegaConf.select(cfg, "model.train_only_iou_head", default=False)),
        flag_key="model.train_only_iou_head",
        weights_key="train.init_checkpoint",
    )
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return results


class _SimpleTrainer(EndRunOnDecodeError, SimpleTrainer):
    pass


class _AMPTrainer(EndRunOnDecodeError, AMPTrainer):
    pass


def _with_gradient_clipping(optimizer, clip):
    """``optimizer`` clipping gradients as Detectron2 does for ``SOLVER.CLIP_GRADIENTS``, when ``clip`` (the
    LazyConfig's ``train.clip_gradients``) is given and enabled."""
    if not clip or not clip.get("enabled", True):
        return optimizer
    settings = {"ENABLED": True, "CLIP_TYPE": "value", "CLIP_VALUE": 1.0, "NORM_TYPE": 2.0}
    for key, value in clip.items():
        if key.upper() not in settings:
            raise SystemExit(
                f"train.clip_gradients.{key}: unknown key (known: enabled, clip_type, clip_value, norm_type)"
            )
        settings[key.upper()] = value
    if settings["CLIP_TYPE"] not in ("value", "norm"):
        raise SystemExit(f"train.clip_gradients.clip_type must be 'value' or 'norm', got {settings['CLIP_TYPE']!r}")
    return maybe_add_gradient_clipping(CN({"SOLVER": {"CLIP_GRADIENTS": settings}}), optimizer)


def _name_decode_errors(loaders: List) -> None:
    """Wrap each ``(loader config, dataset names)``'s ``mapper`` so that an image failing to decode is named with
    its dataset. The mappers' interpolations (``${...train.mapper.image_format}``) are resolved first: wrapping
    moves the nodes they are relative to."""
    loaders = [(loader, names) for loader, names in loaders if "mapper" in loader]
    for loader, _ in loaders:
        OmegaConf.resolve(loader.mapper)
    for loader, names in loaders:
        loader.mapper = L(NamedDecodeErrors)(mapper=loader.mapper, dataset_names=list(names))


def _monitor_start(cfg: DictConfig) -> int:
    """When the stall warning may fire: three warm-ups (``lr_multiplier.warmup_length`` of ``train.max_iter``) or
    iteration 300, whichever is later (as for YAML configs)."""
    warmup = cfg.get("lr_multiplier", {}).get("warmup_length", 0) or 0
    return max(int(3 * warmup * cfg.train.max_iter), 300)


def _preflight_view(cfg: DictConfig, train_names: List[str], test_names: List[str]) -> CN:
    """What the pre-flight check reads of a config (datasets, number of classes), from a LazyConfig."""
    heads = cfg.model.get("roi_heads")
    num_classes = heads.get("num_classes") if heads is not None else None
    return CN(
        {
            "DATASETS": {"TRAIN": list(train_names), "TEST": list(test_names)},
            "MODEL": {"META_ARCHITECTURE": "GeneralizedRCNN", "ROI_HEADS": {"NUM_CLASSES": num_classes}},
        }
    )


def _dataset_names(node) -> List[str]:
    names = node.dataset.names
    return [names] if isinstance(names, str) else list(names)


def main(args):
    """``tools/train_net.py --config-file X.py [key=value ...]``: train (or ``--eval-only``: evaluate
    ``train.init_checkpoint``) and report as the YAML path does."""
    cfg = config_from_args(args, world_size=comm.get_world_size())
    setup_run(cfg, args)
    test_names = _dataset_names(cfg.dataloader.test)
    train_names = [] if args.eval_only else _dataset_names(cfg.dataloader.train)
    loaders = [(cfg.dataloader.test, test_names)]
    if train_names:
        loaders.append((cfg.dataloader.train, train_names))
    _name_decode_errors(loaders)
    prepare_datasets(
        test_names + train_names, getattr(args, "register", None), getattr(args, "register_replace", False)
    )
    run_preflight(
        _preflight_view(cfg, train_names, test_names),
        eval_only=args.eval_only,
        check_images=getattr(args, "check_images", "header"),
        invalid_boxes=getattr(args, "invalid_boxes", "error"),
    )
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        weights = CN({"MODEL": {"WEIGHTS": cfg.train.init_checkpoint}, "OUTPUT_DIR": cfg.train.output_dir})
        load_weights_for_eval(
            model, weights, resume=args.resume, allow_partial=getattr(args, "allow_partial_weights", False)
        )
        model = defaults.create_ddp_model(model)
        results = do_test(cfg, model)
    else:
        results = do_train(args, cfg)
    if comm.is_main_process():
        report(cfg.train.output_dir, test_names)
    return results
