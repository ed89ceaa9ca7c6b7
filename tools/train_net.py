#!/usr/bin/env python
"""Train and evaluate IoU-Net with Detectron2 (Detectron2's train_net conventions).

    python tools/train_net.py --config-file configs/iounet_synthetic_R18.yaml             # the embedded synthetic set
    python tools/train_net.py --config-file configs/iounet_trees_R18.yaml                 # NEON tree crowns (GPU)
    python tools/train_net.py --config-file configs/iounet_R50.yaml --num-gpus 8           # COCO 2017
    python tools/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS model.pth     # evaluate every stage
    python tools/train_net.py --config-file CONFIG --resume                                # continue a killed run
    python tools/train_net.py --config-file configs/iounet_synthetic_R18.yaml \
        --register mine_train train.json images/ --register mine_val val.json images/ \
        DATASETS.TRAIN '("mine_train",)' DATASETS.TEST '("mine_val",)' MODEL.ROI_HEADS.NUM_CLASSES 3   # own data

Evaluation reports the baseline (Detectron2's NMS), +IoU-guided NMS and +refinement from one pass (COCO AP at
several IoU thresholds, predicted-vs-true IoU correlation) and writes OUTPUT_DIR/inference/: iounet_stages.{json,md},
coco_instances_results_<stage>.json, ap_vs_iou.png, iou_histogram.png and refinement_examples/*.png.
Without CUDA, training runs on the CPU; --num-gpus N then starts N CPU processes (gloo).
"""

import importlib.util
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import (  # noqa: E402
    DatasetCatalog,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.data.datasets import register_coco_instances  # noqa: E402
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup  # noqa: E402
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.events import CommonMetricPrinter, JSONWriter  # noqa: E402

from prroi_d2 import add_iounet_config  # noqa: E402
from prroi_d2.data import register_synthetic_datasets  # noqa: E402
from prroi_d2.data.augmentation import AerialDatasetMapper, add_aerial_augment_config  # noqa: E402
from prroi_d2.data.neon_trees import NeonTreesDownloadError, register_neon_trees_datasets  # noqa: E402
from prroi_d2.engine import launch  # noqa: E402
from prroi_d2.evaluation import IoUNetEvaluator, draw_refinement_examples  # noqa: E402

SYNTHETIC_PREFIX = "iounet_synth"
NEON_TREES_PREFIX = "neon_trees"
SYNTHETIC_CONFIG = "configs/iounet_synthetic_R18.yaml"
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

    def build_writers(self):
        """Detectron2's writers; without the ``tensorboard`` package, the console and metrics.json ones only."""
        if importlib.util.find_spec("tensorboard") is not None:
            return super().build_writers()
        logger.warning("tensorboard is not installed: no TensorBoard event files are written")
        return [CommonMetricPrinter(self.max_iter), JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"))]

    @classmethod
    def build_train_loader(cls, cfg):
        """Detectron2's loader; with ``INPUT.AERIAL_AUGMENT.ENABLED``, the aerial augmentations and crop-edge rule."""
        if not cfg.INPUT.AERIAL_AUGMENT.ENABLED:
            return super().build_train_loader(cfg)
        return build_detection_train_loader(cfg, mapper=AerialDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """Detectron2's loader; with ``INPUT.AERIAL_AUGMENT.ENABLED``, whole images rescaled by its TEST_SCALE."""
        if not cfg.INPUT.AERIAL_AUGMENT.ENABLED:
            return super().build_test_loader(cfg, dataset_name)
        return build_detection_test_loader(cfg, dataset_name, mapper=AerialDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
            if len(cfg.DATASETS.TEST) > 1:
                output_folder = os.path.join(output_folder, dataset_name)
        evaluator = IoUNetEvaluator(
            dataset_name, output_dir=output_folder, max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE
        )
        if not cfg.MODEL.MASK_ON:
            return evaluator
        masks = COCOEvaluator(dataset_name, tasks=("segm",), output_dir=output_folder, use_fast_impl=False)
        return DatasetEvaluators([evaluator, masks])


def setup(args):
    cfg = get_cfg()
    add_iounet_config(cfg)
    add_aerial_augment_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def register_datasets(names, coco_format=()):
    """Register the ``--register NAME JSON IMAGE_ROOT`` datasets, and the embedded synthetic set (generated on first
    use) or the NEON tree crowns (fetched and converted on first use) if the config names them."""
    for name, json_file, image_root in coco_format or ():
        if name not in DatasetCatalog.list():
            register_coco_instances(name, {}, json_file, image_root)
    if any(name.startswith(SYNTHETIC_PREFIX + "_") for name in names):
        register_synthetic_datasets(prefix=SYNTHETIC_PREFIX)
    if any(name.startswith(NEON_TREES_PREFIX + "_") for name in names):
        try:
            register_neon_trees_datasets(prefix=NEON_TREES_PREFIX)
        except NeonTreesDownloadError as e:
            raise SystemExit(str(e)) from None


def missing_data_message(names):
    """One message naming everything missing for the COCO-format datasets ``names``, or None if all is there."""
    unknown = [name for name in names if name not in DatasetCatalog.list()]
    if unknown:
        return f"Datasets not registered: {', '.join(unknown)} (register them, e.g. with --register NAME JSON DIR)."
    missing = []
    for name in dict.fromkeys(names):
        meta = MetadataCatalog.get(name)
        missing += [p for p in (meta.get("json_file"), meta.get("image_root")) if p and not os.path.exists(p)]
    if not missing:
        return None
    root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    return (
        f"Dataset files not found: {', '.join(missing)}.\n"
        f"COCO is expected in Detectron2's layout under $DETECTRON2_DATASETS (now {root!r}):\n"
        "  coco/annotations/instances_{train,val}2017.json, coco/train2017/, coco/val2017/\n"
        "Download COCO 2017 there, or run on the embedded synthetic dataset instead:\n"
        f"  python tools/train_net.py --config-file {SYNTHETIC_CONFIG}"
    )


def report(cfg):
    """Pictures of the refinement and the paths of everything evaluation wrote (main process)."""
    folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    results = os.path.join(folder, "coco_instances_results_refined.json")
    if not os.path.exists(results) or len(cfg.DATASETS.TEST) != 1:
        return
    meta = MetadataCatalog.get(cfg.DATASETS.TEST[0])
    pictures = draw_refinement_examples(
        results, meta.json_file, meta.image_root, os.path.join(folder, "refinement_examples")
    )
    print("\nWritten by evaluation:")
    for name in ("iounet_stages.md", "iounet_stages.json", "ap_vs_iou.png", "iou_histogram.png"):
        print("  " + os.path.join(folder, name))
    print("Refinement pictures (ground truth green, before refinement orange, after blue):")
    for path in pictures:
        print("  " + path)


def main(args):
    cfg = setup(args)
    names = list(cfg.DATASETS.TEST) + ([] if args.eval_only else list(cfg.DATASETS.TRAIN))
    register_datasets(names, args.register)
    message = missing_data_message(names)
    if message is not None:
        raise SystemExit(message)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        results = trainer.train()
    if comm.is_main_process():
        report(cfg)
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
