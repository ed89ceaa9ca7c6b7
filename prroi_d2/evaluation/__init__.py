"""Evaluation of IoU-Net: COCO AP of every stage (baseline NMS, IoU-guided NMS, refinement) from one inference pass,
the correlation of predicted and true IoU, and pictures of the refinement."""

from prroi_d2.evaluation.iounet_evaluator import (
    AP_THRESHOLDS,
    COCO_IOU_THRESHOLDS,
    STAGE_METRICS,
    IoUNetEvaluator,
    ap_at_iou,
    best_ground_truth_iou,
    coco_stage_evaluation,
    coco_stage_metrics,
    format_stage_table,
    instances_to_records,
    iou_histogram,
    match_to_ground_truth,
    pearson,
    plot_ap_vs_iou,
    plot_iou_histogram,
)
from prroi_d2.evaluation.visualize import draw_refinement_examples, select_examples

__all__ = [
    "AP_THRESHOLDS",
    "COCO_IOU_THRESHOLDS",
    "IoUNetEvaluator",
    "STAGE_METRICS",
    "ap_at_iou",
    "best_ground_truth_iou",
    "coco_stage_evaluation",
    "coco_stage_metrics",
    "draw_refinement_examples",
    "format_stage_table",
    "instances_to_records",
    "iou_histogram",
    "match_to_ground_truth",
    "pearson",
    "plot_ap_vs_iou",
    "plot_iou_histogram",
    "select_examples",
]
