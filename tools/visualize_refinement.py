#!/usr/bin/env python
"""Pictures of IoU-Net's box refinement from a saved results json of the refined stage.

    python tools/visualize_refinement.py --results OUTPUT/inference/coco_instances_results_refined.json \
        --dataset <registered name> --output OUTPUT/refinement_pictures
    python tools/visualize_refinement.py --results RESULTS.json --json COCO.json --image-root IMAGES --output DIR

Draws the ground truth (green), each detection before refinement (orange, dashed) and after (blue), labelled with the
predicted IoU before→after.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _dataset_paths(name):
    """The COCO json and image root of a registered dataset. A name Detectron2 does not know yet (the synthetic
    datasets, registered by no import) is registered first with ``prroi_d2.data.register_synthetic_datasets``; names
    already registered (Detectron2's builtin ones, say) generate nothing."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name not in DatasetCatalog.list():
        from prroi_d2.data import register_synthetic_datasets

        register_synthetic_datasets()
    if name not in DatasetCatalog.list():
        raise SystemExit(f"visualize_refinement: dataset {name!r} is not registered")
    meta = MetadataCatalog.get(name)
    json_file = getattr(meta, "json_file", None)
    image_root = getattr(meta, "image_root", None)
    if json_file is None or image_root is None:
        raise SystemExit(f"visualize_refinement: dataset {name!r} has no json_file/image_root in its metadata")
    return json_file, image_root


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, help="coco_instances_results_refined.json of IoUNetEvaluator")
    parser.add_argument("--dataset", help="registered dataset name (gives the COCO json and image root)")
    parser.add_argument("--json", help="COCO json of the dataset (instead of --dataset)")
    parser.add_argument("--image-root", help="folder of the dataset's images (with --json)")
    parser.add_argument("--num-images", type=int, default=6)
    parser.add_argument("--score-threshold", type=float, default=0.3)
    parser.add_argument("--max-dets-per-image", type=int, default=20)
    parser.add_argument("--output", required=True, help="folder for the PNGs")
    args = parser.parse_args(argv)

    if args.dataset:
        json_file, image_root = _dataset_paths(args.dataset)
    elif args.json and args.image_root:
        json_file, image_root = args.json, args.image_root
    else:
        parser.error("give --dataset, or --json and --image-root")

    from prroi_d2.evaluation.visualize import draw_refinement_examples

    paths = draw_refinement_examples(
        args.results,
        json_file,
        image_root,
        args.output,
        num_images=args.num_images,
        score_threshold=args.score_threshold,
        max_dets_per_image=args.max_dets_per_image,
    )
    for path in paths:
        print(path)
    return 0 if paths else 1


if __name__ == "__main__":
    sys.exit(main())
