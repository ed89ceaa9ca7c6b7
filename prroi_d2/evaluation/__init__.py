"""Evaluation of IoU-Net: COCO AP of every stage (baseline NMS, IoU-guided NMS, refinement) from one inference pass,
the correlation of predicted and true IoU, and pictures of the refinement."""

from prroi_d2.evaluation import iounet_evaluator, visualize
from prroi_d2.evaluation.iounet_evaluator import *  # noqa: F403 - the package re-exports the modules' public names
from prroi_d2.evaluation.visualize import *  # noqa: F403

__all__ = list(iounet_evaluator.__all__) + list(visualize.__all__)
