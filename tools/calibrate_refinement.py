#!/usr/bin/env python
"""Calibrate IoU-Net's refinement of a trained model on a held-out split (prroi_d2.engine.calibration).

    python tools/calibrate_refinement.py --config-file output/iounet_synthetic_R18/config.yaml \
        MODEL.WEIGHTS output/iounet_synthetic_R18/model_final.pth
    python tools/calibrate_refinement.py --config-file configs/iounet_synthetic_R18.yaml --dataset my_holdout \
        --register my_holdout holdout.json images/ MODEL.WEIGHTS model_final.pth OUTPUT_DIR output/mine

Chooses IoU-guided NMS on/off, the refinement step and iterations, and the per-box acceptance rule on ``--dataset``
(default ``MODEL.IOU_NET.CALIBRATION.DATASET``), never on the reporting split, and writes ``OUTPUT_DIR/config.yaml``
(the config with the chosen ``MODEL.IOU_NET`` keys; use it with ``--eval-only`` or ``DefaultPredictor``) and
``OUTPUT_DIR/calibration.{json,md}`` (the held-out table). ``--eval-only`` training options (``--register``,
``--check-images``, ``--allow-partial-weights``, ``--resume``) work as in ``tools/train_net.py``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from detectron2.utils import comm  # noqa: E402
from train_net import argument_parser, launch_checked  # noqa: E402

from prroi_d2.data.preflight import run_preflight  # noqa: E402
from prroi_d2.engine.calibration import calibrate_and_save  # noqa: E402
from prroi_d2.engine.checkpoint import load_weights_for_eval  # noqa: E402
from prroi_d2.engine.steps import one_line_errors, prepare_datasets  # noqa: E402
from prroi_d2.engine.yaml_train import Trainer, setup  # noqa: E402


def main(args):
    with one_line_errors():
        return calibrate(args)


def calibrate(args):
    cfg = setup(args)
    dataset = args.dataset or cfg.MODEL.IOU_NET.CALIBRATION.DATASET
    if not dataset:
        raise SystemExit(
            "calibrate_refinement: no held-out dataset: give --dataset NAME or set MODEL.IOU_NET.CALIBRATION.DATASET"
        )
    for role, names in (
        ("a reporting split (DATASETS.TEST)", cfg.DATASETS.TEST),
        ("a training split", cfg.DATASETS.TRAIN),
    ):
        if dataset in names:
            raise SystemExit(
                f"calibrate_refinement: {dataset} is {role}: calibrate on a held-out split the model did not train "
                "on and that does not report"
            )
    prepare_datasets([dataset], args.register, replace=args.register_replace)
    held_out = cfg.clone()
    held_out.defrost()
    held_out.DATASETS.TEST = (dataset,)
    held_out.DATASETS.TRAIN = ()
    run_preflight(held_out, eval_only=True, check_images=args.check_images, invalid_boxes="error")
    model = Trainer.build_model(cfg)
    load_weights_for_eval(model, cfg, resume=args.resume, allow_partial=args.allow_partial_weights)
    loader = Trainer.build_test_loader(cfg, dataset)
    chosen = calibrate_and_save(model, cfg, dataset, loader, cfg.OUTPUT_DIR)
    if comm.is_main_process():
        print(f"chosen on {dataset}: {chosen.name}; written to {os.path.join(cfg.OUTPUT_DIR, 'config.yaml')}")
    return chosen


if __name__ == "__main__":
    parser = argument_parser()
    parser.add_argument(
        "--dataset", default="", help="the held-out dataset (default MODEL.IOU_NET.CALIBRATION.DATASET)"
    )
    args = parser.parse_args()
    if args.config_file.endswith(".py"):
        parser.error(
            f"--config-file {args.config_file}: a LazyConfig; the calibration reads YAML configs only (a LazyConfig "
            "takes chosen values under model.roi_heads.iou_branch, named in the README's option table)"
        )
    args.eval_only = True
    launch_checked(main, args)
