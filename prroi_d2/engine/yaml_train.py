#!/usr/bin/env python
"""Train and evaluate IoU-Net with Detectron2 (Detectron2's train_net conventions).

    python tools/train_net.py --config-file configs/iounet_synthetic_R18.yaml             # the embedded synthetic set
    python tools/train_net.py --config-file configs/iounet_R50.yaml --num-gpus 8           # COCO 2017
    python tools/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS model.pth     # evaluate every stage
    python tools/train_net.py --config-file CONFIG --resume                                # continue a killed run
    python tools/train_net.py --config-file configs/lazy/iounet_cascade_R50_FPN.py train.max_iter=1000  # LazyConfig
    python tools/train_net.py --config-file configs/iounet_synthetic_R18.yaml \
        --register mine_train train.json images/ --register mine_val val.json images/ \
        DATASETS.TRAIN '("mine_train",)' DATASETS.TEST '("mine_val",)' MODEL.ROI_HEADS.NUM_CLASSES 3   # own data

Evaluation reports the baseline (Detectron2's NMS), +IoU-guided NMS and +refinement from one pass (COCO AP at
several IoU thresholds, predicted-vs-true IoU correlation) and writes OUTPUT_DIR/inference/: iounet_stages.{json,md},
coco_instances_results_<stage>.json, ap_vs_iou.png, iou_histogram.png and refinement_examples/*.png.
Without CUDA, training runs on the CPU; --num-gpus N then starts N CPU processes (gloo).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader  # noqa: E402
from detectron2.engine import DefaultTrainer, default_argument_parser  # noqa: E402
from detectron2.utils import comm  # noqa: E402

from prroi_d2 import add_iounet_config  # noqa: E402
from prroi_d2.config_checks import check_iounet_config  # noqa: E402
from prroi_d2.data.augmentation import AerialDatasetMapper, add_aerial_augment_config  # noqa: E402
from prroi_d2.data.named_decode import (  # noqa: E402
    EndRunOnDecodeError,
    ImageDecodeError,
    NamedDecodeErrors,
    decode_error_message,
)
from prroi_d2.data.preflight import CHECK_IMAGES, INVALID_BOXES, DatasetCheckError, run_preflight  # noqa: E402
from prroi_d2.engine import IoULearningMonitor, launch  # noqa: E402
from prroi_d2.engine.checkpoint import (  # noqa: E402
    CheckpointReadError,
    SafeCheckpointer,
    WeightsError,
    check_frozen_weights_loaded,
    load_weights_for_eval,
)
from prroi_d2.engine.steps import build_evaluator, build_writers, prepare_datasets, report, setup_run  # noqa: E402


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
        hooks = super().build_hooks()
        start = max(3 * self.cfg.SOLVER.WARMUP_ITERS, 300)
        hooks.insert(len(hooks) - 1, IoULearningMonitor(start_iter=start))
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


def setup(args):
    cfg = get_cfg()
    add_iounet_config(cfg)
    add_aerial_augment_config(cfg)
    try:
        cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(args.opts)
    except (KeyError, ValueError, AssertionError) as e:  # yacs: unknown key, type mismatch, odd-length list
        raise SystemExit(f"Config {args.config_file} (and overrides): {e.args[0] if e.args else e}") from None
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    try:
        check_iounet_config(cfg)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    setup_run(cfg, args)
    return cfg


def main(args):
    try:
        if args.config_file.endswith(".py"):  # a LazyConfig: prroi_d2.engine.lazy_train
            from prroi_d2.engine.lazy_train import main as lazy_main

            return lazy_main(args)
        return run(args)
    except (DatasetCheckError, WeightsError, CheckpointReadError) as e:
        raise SystemExit(str(e)) from None
    except ImageDecodeError as e:
        raise SystemExit(decode_error_message(e)) from None


def run(args):
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


def invoke_main() -> None:
    parser = default_argument_parser()
    parser.add_argument(
        "--register",
        nargs=3,
        action="append",
        metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format dataset (repeatable); name it in DATASETS.TRAIN / DATASETS.TEST",
    )
    parser.add_argument("--register-replace", action="store_true", help="--register may replace a registered name")
    parser.add_argument(
        "--check-images",
        choices=CHECK_IMAGES,
        default="header",
        help="pre-flight image check: header (default: size and mode from the file header), full (decode every "
        "image), none",
    )
    parser.add_argument(
        "--invalid-boxes",
        choices=INVALID_BOXES,
        default="error",
        help="boxes with NaN/inf, negative width/height or fully outside their image in a training set: error "
        "(default) or drop them with a warning",
    )
    parser.add_argument(
        "--allow-partial-weights",
        action="store_true",
        help="--eval-only: evaluate even if some model keys are missing from the checkpoint or skipped",
    )
    args = parser.parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
