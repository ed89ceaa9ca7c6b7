#!/usr/bin/env python
"""End-to-end demo: Faster R-CNN R50-FPN with ``POOLER_TYPE: PrRoIPoolV2`` trained and COCO-evaluated on CPU.

The default dataset is synthetic and embedded: images of coloured rectangles on noise, written as real COCO json
and PNG files under --output, registered with Detectron2's ``register_coco_instances``, trained for --iters
iterations and evaluated with ``COCOEvaluator`` (pycocotools). Small input sizes keep it to a few minutes on 2 cores.

    python tools/demo_pooler_swap.py [--config configs/faster_rcnn_R_50_FPN_1x_prroi.yaml] [--iters 20]
"""

import argparse
import json
import os

import numpy as np
from detectron2.config import get_cfg
from detectron2.data import build_detection_test_loader
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from PIL import Image

import prroi_d2  # noqa: F401  (registers the PrRoIPool pooler types)

CLASSES = ("red", "green", "blue")


def write_synthetic_coco(root, split, num_images, seed, size=(160, 192)):
    """Write ``root/split/*.png`` and ``root/split.json``; boxes are the rectangles' exact extents."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, split), exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        h, w = size
        pixels = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
        for _ in range(rng.integers(1, 4)):
            cls = int(rng.integers(0, len(CLASSES)))
            bw, bh = int(rng.integers(24, 90)), int(rng.integers(24, 90))
            x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            pixels[y0 : y0 + bh, x0 : x0 + bw] = 40
            pixels[y0 : y0 + bh, x0 : x0 + bw, cls] = 220
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cls + 1,
                    "bbox": [x0, y0, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
        name = f"{image_id:05d}.png"
        Image.fromarray(pixels).save(os.path.join(root, split, name))
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
    path = os.path.join(root, f"{split}.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return path


def build_cfg(args):
    cfg = get_cfg()
    cfg.merge_from_file(args.config)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(CLASSES)
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 200
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.PIXEL_STD = [57.375, 57.120, 58.395]
    cfg.DATASETS.TRAIN = ("prroi_demo_train",)
    cfg.DATASETS.TEST = ("prroi_demo_val",)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.INPUT.MIN_SIZE_TRAIN = (160,)
    cfg.INPUT.MAX_SIZE_TRAIN = 192
    cfg.INPUT.MIN_SIZE_TEST = 160
    cfg.INPUT.MAX_SIZE_TEST = 192
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.BASE_LR = 0.001
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True  # a randomly initialised R50 (no download) needs it
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1.0
    cfg.SOLVER.MAX_ITER = args.iters
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.CHECKPOINT_PERIOD = args.iters
    cfg.TEST.EVAL_PERIOD = 0
    cfg.OUTPUT_DIR = args.output
    cfg.freeze()
    return cfg


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/faster_rcnn_R_50_FPN_1x_prroi.yaml")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--output", default="output/demo_pooler_swap")
    args = parser.parse_args()

    data = os.path.join(args.output, "data")
    for split, n, seed in (("train", 16, 0), ("val", 8, 1)):
        json_path = write_synthetic_coco(data, split, n, seed)
        register_coco_instances(f"prroi_demo_{split}", {}, json_path, os.path.join(data, split))

    cfg = build_cfg(args)
    trainer = DefaultTrainer(cfg)
    pooler = trainer.model.roi_heads.box_pooler.level_poolers[0]
    print(f"box pooler: {type(pooler).__name__}({pooler.extra_repr()})")
    trainer.resume_or_load(resume=False)
    trainer.train()

    evaluator = COCOEvaluator("prroi_demo_val", output_dir=args.output, use_fast_impl=False)
    loader = build_detection_test_loader(cfg, "prroi_demo_val")
    results = inference_on_dataset(trainer.model, loader, evaluator)
    print(f"COCO bbox AP after {args.iters} iterations on the synthetic set: {results['bbox']['AP']:.2f}")


if __name__ == "__main__":
    main()
