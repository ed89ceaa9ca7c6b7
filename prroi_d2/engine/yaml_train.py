"""Training and evaluation from a YAML config (the path ``tools/train_net.py`` takes for ``--config-file X.yaml``),
as Detectron2's ``train_net.py``: ``get_cfg`` with ``MODEL.IOU_NET`` (:func:`~prroi_d2.config.add_iounet_config`)
and ``INPUT.AERIAL_AUGMENT``, the file and trailing ``KEY VALUE`` overrides merged, every value checked
(:mod:`~prroi_d2.config_checks`), then Detectron2's ``DefaultTrainer`` with this project's evaluator, checkpointer,
loaders and hooks. Dataset registration, the evaluator, the checkpointer, seeding and the report are the LazyConfig
path's too (:mod:`prroi_d2.engine.steps`).

Evaluation reports the baseline (Detectron2's NMS), +IoU-guided NMS and +refinement from one pass (COCO AP at
several IoU thresholds, predicted-vs-true IoU correlation) and writes OUTPUT_DIR/inference/: iounet_stages.{json,md},
coco_instances_results_<stage>.json, ap_vs_iou.png, iou_histogram.png and refinement_examples/*.png.
"""

import os

import yaml
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer
from detectron2.engine.hooks import EvalHook
from detectron2.utils import comm

from prroi_d2.config import add_iounet_config
from prroi_d2.config_checks import config_problems, raise_problems, resolve_device
from prroi_d2.config_files import config_file_problem
from prroi_d2.data.augmentation import AerialDatasetMapper, add_aerial_augment_config
from prroi_d2.data.named_decode import EndRunOnDecodeError, NamedDecodeErrors
from prroi_d2.data.preflight import run_preflight
from prroi_d2.engine.calibration import CalibrateAfterTraining
from prroi_d2.engine.checkpoint import SafeCheckpointer, check_frozen_weights_loaded, load_weights_for_eval
from prroi_d2.engine.checkpoint_hook import add_checkpoint_config, with_checkpoint_retention
from prroi_d2.engine.iou_learning_monitor import IoULearningMonitor
from prroi_d2.engine.steps import build_evaluator, build_writers, prepare_datasets, report, setup_run
from prroi_d2.safe_loading import safe_merge_from_file

__all__ = ["Trainer", "config_from_args", "main", "new_config", "setup"]


class Trainer(EndRunOnDecodeError, DefaultTrainer):
    """Detectron2's ``DefaultTrainer`` evaluating with :class:`~prroi_d2.evaluation.IoUNetEvaluator` (every
    IoU-Net stage) and, for Mask R-CNN configs, COCO mask AP too."""

    def state_dict(self):
        """Also the inner trainer's state (optimizer momentum, AMP grad scaler): Detectron2 v0.6's DefaultTrainer
        leaves it out of checkpoints, so ``--resume`` would restart the optimizer from scratch (later versions save
        it under the same key)."""
        ret = super().state_dict()
        ret.setdefault("_trainer", self._trainer.state_dict())
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])

    def build_hooks(self):
        """Detectron2's hooks, checkpointing with :class:`~prroi_d2.engine.checkpoint.SafeCheckpointer` (atomic
        writes; ``--resume`` skips an unreadable latest checkpoint), plus a warning if the IoU head still learns
        nothing well after warm-up (before the writers, so it lands in the same iteration's log)."""
        self.checkpointer = SafeCheckpointer.from_checkpointer(self.checkpointer)
        hooks = with_checkpoint_retention(super().build_hooks(), self.cfg.SOLVER.CHECKPOINT_KEEP)
        start = max(3 * self.cfg.SOLVER.WARMUP_ITERS, 300)
        hooks.insert(len(hooks) - 1, IoULearningMonitor(start_iter=start))
        if self.cfg.MODEL.IOU_NET.CALIBRATION.DATASET:  # before the final evaluation, which then uses the choice
            evals = [i for i, h in enumerate(hooks) if isinstance(h, EvalHook)]
            calibration = CalibrateAfterTraining(self.cfg, self.build_test_loader)
            hooks.insert(evals[0] if evals else len(hooks) - 1, calibration)
        return hooks

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        check_frozen_weights_loaded(self.checkpointer, self.cfg.MODEL.IOU_NET.TRAIN_ONLY_IOU_HEAD)

    @classmethod
    def build_train_loader(cls, cfg):
        """Detectron2's loader (with ``INPUT.AERIAL_AUGMENT.ENABLED``: the aerial augmentations and crop-edge rule);
        an image that fails to decode is named with its dataset."""
        mapper = AerialDatasetMapper(cfg, True) if cfg.INPUT.AERIAL_AUGMENT.ENABLED else DatasetMapper(cfg, True)
        return build_detection_train_loader(cfg, mapper=NamedDecodeErrors(mapper, cfg.DATASETS.TRAIN))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """Detectron2's loader (with ``INPUT.AERIAL_AUGMENT.ENABLED``: whole images rescaled by its TEST_SCALE); an
        image that fails to decode is named with its dataset."""
        mapper = AerialDatasetMapper(cfg, False) if cfg.INPUT.AERIAL_AUGMENT.ENABLED else DatasetMapper(cfg, False)
        return build_detection_test_loader(cfg, dataset_name, mapper=NamedDecodeErrors(mapper, dataset_name))

    def build_writers(self):
        """Detectron2's writers; without the ``tensorboard`` package, the console and metrics.json ones only."""
        return build_writers(self.cfg.OUTPUT_DIR, self.max_iter)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
            if len(cfg.DATASETS.TEST) > 1:
                output_folder = os.path.join(output_folder, dataset_name)
        return build_evaluator(
            dataset_name, output_folder, mask_on=cfg.MODEL.MASK_ON, max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE
        )


def new_config() -> CfgNode:
    """Detectron2's defaults with every key this project adds (``MODEL.IOU_NET``, ``INPUT.AERIAL_AUGMENT``,
    ``SOLVER.CHECKPOINT_KEEP``): what a config file, and the ``config.yaml`` a run writes, is merged into."""
    cfg = get_cfg()
    add_iounet_config(cfg)
    add_aerial_augment_config(cfg)
    add_checkpoint_config(cfg)
    return cfg


def config_from_args(args, world_size: int = 1) -> CfgNode:
    """The frozen config of ``args.config_file`` with ``args.opts`` (``KEY VALUE`` pairs), every value checked:
    exits with one line naming the file or each bad key. ``world_size``: the number of processes the batch is
    split over. Without CUDA, a ``cuda`` device from the file (or Detectron2's default) becomes ``cpu``; one given
    in ``args.opts`` is refused."""
    problem = config_file_problem(args.config_file)
    if problem:
        raise SystemExit(problem)
    cfg = new_config()
    try:
        safe_merge_from_file(cfg, args.config_file)
        cfg.merge_from_list(args.opts)
    except (KeyError, ValueError, AssertionError, TypeError, yaml.YAMLError) as e:  # unknown key, type mismatch, ...
        raise SystemExit(f"Config {args.config_file} (and overrides): {e.args[0] if e.args else e}") from None
    device, device_problem = resolve_device("MODEL.DEVICE", cfg.MODEL.DEVICE, "MODEL.DEVICE" in args.opts[0::2])
    problems = config_problems(cfg, training=not args.eval_only, world_size=world_size)
    try:
        raise_problems(problems + ([device_problem] if device_problem else []))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    cfg.MODEL.DEVICE = device
    cfg.freeze()
    return cfg


def setup(args) -> CfgNode:
    """:func:`config_from_args` for this process's share of the run, then logging, seeding and the saved config."""
    cfg = config_from_args(args, world_size=comm.get_world_size())
    setup_run(cfg, args)
    return cfg


def main(args):
    """``tools/train_net.py --config-file X.yaml [KEY VALUE ...]``: train (``--resume``: continue the last
    checkpoint) or ``--eval-only`` evaluate ``MODEL.WEIGHTS``, then report."""
    cfg = setup(args)
    names = list(cfg.DATASETS.TEST) + ([] if args.eval_only else list(cfg.DATASETS.TRAIN))
    prepare_datasets(names, args.register, replace=args.register_replace)
    run_preflight(cfg, eval_only=args.eval_only, check_images=args.check_images, invalid_boxes=args.invalid_boxes)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        load_weights_for_eval(model, cfg, resume=args.resume, allow_partial=args.allow_partial_weights)
        results = Trainer.test(cfg, model)
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        results = trainer.train()
    if comm.is_main_process():
        report(cfg.OUTPUT_DIR, list(cfg.DATASETS.TEST))
    return results
