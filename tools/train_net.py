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

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.engine import DefaultTrainer, default_argument_parser  # noqa: E402
from detectron2.utils import comm  # noqa: E402

from prroi_d2 import add_iounet_config  # noqa: E402
from prroi_d2.engine import IoULearningMonitor, launch  # noqa: E402
from prroi_d2.engine.steps import (  # noqa: E402
    build_checkpointer,
    build_evaluator,
    build_writers,
    prepare_datasets,
    report,
    setup_run,
)

logger = logging.getLogger("prroi_d2.train_net")


class Trainer(DefaultTrainer):
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
        """Detectron2's hooks, plus a warning if the IoU head still learns nothing well after warm-up (before the
        writers, so the warning lands in the same iteration's log)."""
        hooks = super().build_hooks()
        start = max(3 * self.cfg.SOLVER.WARMUP_ITERS, 300)
        hooks.insert(len(hooks) - 1, IoULearningMonitor(start_iter=start))
        return hooks

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
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    setup_run(cfg, args)
    return cfg


def main(args):
    if args.config_file.endswith(".py"):  # a LazyConfig: prroi_d2.engine.lazy_train
        from prroi_d2.engine.lazy_train import main as lazy_main

        return lazy_main(args)
    cfg = setup(args)
    names = list(cfg.DATASETS.TEST) + ([] if args.eval_only else list(cfg.DATASETS.TRAIN))
    prepare_datasets(names, args.register)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        build_checkpointer(model, cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
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
