"""Evaluation of IoU-Net: COCO AP of every stage (baseline NMS, IoU-guided NMS, refinement) from one inference pass,
the agreement of predicted and true IoU, and pictures of the refinement."""

from prroi_d2.evaluation import coco_stages, iou_statistics, iounet_evaluator, records, reports, visualize
from prroi_d2.evaluation.coco_stages import *  # noqa: F403 - the package re-exports the modules' public names
from prroi_d2.evaluation.iou_statistics import *  # noqa: F403
from prroi_d2.evaluation.iounet_evaluator import *  # noqa: F403
from prroi_d2.evaluation.records import *  # noqa: F403
from prroi_d2.evaluation.reports import *  # noqa: F403
from prroi_d2.evaluation.visualize import *  # noqa: F403

__all__ = [
    name
    for module in (coco_stages, iou_statistics, iounet_evaluator, records, reports, visualize)
    for name in module.__all__
]
