#!/usr/bin/env python
"""Train and evaluate IoU-Net with Detectron2 (Detectron2's train_net conventions).

    python tools/train_net.py --config-file configs/iounet_synthetic_R18.yaml             # the embedded synthetic set
    python tools/train_net.py --config-file configs/iounet_R50.yaml --num-gpus 8           # COCO 2017
    python tools/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS model.pth     # evaluate every stage
    python tools/train_net.py --config-file CONFIG --resume                                # continue a killed run
    python tools/train_net.py --config-file configs/lazy/iounet_cascade_R50_FPN.py train.max_iter=1000  # LazyConfig
    python tools/train_net.py --config-file configs/iounet_synthetic_R18.yaml \\
        --register mine_train train.json images/ --register mine_val val.json images/ \\
        DATASETS.TRAIN '("mine_train",)' DATASETS.TEST '("mine_val",)' MODEL.ROI_HEADS.NUM_CLASSES 3   # own data

A YAML config is trained by prroi_d2/engine/yaml_train.py, a LazyConfig ``.py`` by prroi_d2/engine/lazy_train.py;
either checks the config before anything is built (with several processes, this tool checks it before they start).
Without CUDA, training runs on the CPU; --num-gpus N then starts N CPU processes (gloo).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.engine import default_argument_parser  # noqa: E402

from prroi_d2.data.preflight import CHECK_IMAGES, INVALID_BOXES  # noqa: E402
from prroi_d2.engine import launch  # noqa: E402
from prroi_d2.engine.steps import one_line_errors  # noqa: E402


def trainer_of(config_file: str):
    """The trainer module of a config file: lazy_train for a LazyConfig ``.py``, yaml_train otherwise."""
    if config_file.endswith(".py"):
        from prroi_d2.engine import lazy_train

        return lazy_train
    from prroi_d2.engine import yaml_train

    return yaml_train


def main(args):
    with one_line_errors():
        return trainer_of(args.config_file).main(args)


def argument_parser():
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
    return parser


def invoke_main() -> None:
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    launch_checked(main, args)


def launch_checked(main_fn, args) -> None:
    """``launch(main_fn, ...)`` over ``args.num_gpus`` x ``args.num_machines`` processes; with several, the config
    is checked before they start (a single process checks it first thing in ``main_fn``)."""
    world_size = args.num_gpus * args.num_machines
    if world_size > 1:
        trainer_of(args.config_file).config_from_args(args, world_size=world_size)
    launch(
        main_fn,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
