"""COCO AP of one IoU-Net stage with pycocotools' ``COCOeval`` (bbox): AP over 0.50:0.95, at single IoU thresholds
(AP50 ... AP90) and per object size, all read at the evaluation's cap of detections per image (``maxDets``)."""

import contextlib
import io
import logging
from collections import Counter, OrderedDict

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = [
    "AP_THRESHOLDS",
    "COCO_IOU_THRESHOLDS",
    "STAGE_METRICS",
    "ap_at_iou",
    "coco_max_dets",
    "coco_stage_evaluation",
    "coco_stage_metrics",
]

logger = logging.getLogger(__name__)

# Columns of the stage table, in order.
STAGE_METRICS = ("AP", "AP50", "AP60", "AP70", "AP75", "AP80", "AP90", "APs", "APm", "APl")
# The single-threshold APs among them.
AP_THRESHOLDS = OrderedDict([("AP50", 0.5), ("AP60", 0.6), ("AP70", 0.7), ("AP75", 0.75), ("AP80", 0.8), ("AP90", 0.9)])
# COCO's ten IoU thresholds 0.50:0.05:0.95 (the same values as COCOeval's params.iouThrs).
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)


def _quiet(fn, *args, **kwargs):
    """Call ``fn`` with pycocotools' progress prints swallowed."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def coco_max_dets(max_dets_per_image=100) -> list:
    """COCOeval's ``params.maxDets`` for a cap of ``max_dets_per_image`` detections per image (and class): COCO's
    ``[1, 10, 100]`` by default, ``[1, 10, N]`` for a larger cap, as Detectron2's ``COCOEvaluator`` sets it; the cap
    is always the last (largest) entry, which every AP here is read at. None means 100."""
    if max_dets_per_image is None:
        max_dets_per_image = 100
    if isinstance(max_dets_per_image, bool) or not isinstance(max_dets_per_image, (int, np.integer)):
        raise ValueError(f"max_dets_per_image must be an integer >= 1, got {max_dets_per_image!r}")
    if max_dets_per_image < 1:
        raise ValueError(f"max_dets_per_image must be >= 1 (TEST.DETECTIONS_PER_IMAGE), got {max_dets_per_image}")
    return [m for m in (1, 10) if m < max_dets_per_image] + [int(max_dets_per_image)]


def ap_at_iou(coco_eval: COCOeval, iou_threshold=None, area="all", max_dets=None) -> float:
    """AP in percent from an accumulated ``COCOeval``, as ``COCOeval.summarize`` computes it.

    The mean of ``eval["precision"][t, :, :, area, m]`` over the entries > -1 (-1 marks categories without ground
    truth), where ``m`` indexes ``max_dets`` in ``params.maxDets`` (default: the last, largest entry, the cap that
    ``evaluate`` applied); ``iou_threshold=None`` averages over all ten thresholds. NaN when no entry is defined.
    """
    params = coco_eval.params
    precision = coco_eval.eval["precision"]
    area_index = list(params.areaRngLbl).index(area)
    if max_dets is None:
        max_dets_index = len(params.maxDets) - 1
    elif max_dets in list(params.maxDets):
        max_dets_index = list(params.maxDets).index(max_dets)
    else:
        raise ValueError(f"max_dets {max_dets} is not one of COCOeval's maxDets {list(params.maxDets)}")
    if iou_threshold is None:
        values = precision[:, :, :, area_index, max_dets_index]
    else:
        thresholds = np.asarray(params.iouThrs)
        t = int(np.argmin(np.abs(thresholds - iou_threshold)))
        if abs(thresholds[t] - iou_threshold) > 1e-6:
            raise ValueError(f"IoU threshold {iou_threshold} is not one of COCOeval's {thresholds.tolist()}")
        values = precision[t, :, :, area_index, max_dets_index]
    values = values[values > -1]
    return float(np.mean(values) * 100) if values.size else float("nan")


def _empty_evaluation():
    return OrderedDict((name, 0.0) for name in STAGE_METRICS), [0.0] * len(COCO_IOU_THRESHOLDS)


def _warn_if_capped(records, max_dets):
    """Log how many (image, class) pairs have more than ``max_dets`` detections: COCOeval ignores the excess."""
    counts = Counter((r["image_id"], r["category_id"]) for r in records)
    over = [n for n in counts.values() if n > max_dets]
    if over:
        logger.warning(
            f"{len(over)} (image, class) pairs have more than max_dets_per_image={max_dets} detections (up to "
            f"{max(over)}): COCOeval counts only the {max_dets} highest-scoring of each; raise "
            f"TEST.DETECTIONS_PER_IMAGE (the evaluator's max_dets_per_image) for dense scenes."
        )


def coco_stage_evaluation(coco_gt: COCO, records, img_ids=None, max_dets_per_image=100):
    """Run ``COCOeval`` (bbox) on ``records``; returns ``(metrics, ap_per_threshold)``.

    ``metrics`` is an OrderedDict of :data:`STAGE_METRICS` in percent; ``ap_per_threshold`` lists the AP (percent) at
    each of COCO's ten IoU thresholds 0.50..0.95. ``img_ids`` restricts the evaluation to those images (default: all
    images of ``coco_gt``). COCOeval keeps the ``max_dets_per_image`` highest-scoring detections of each image and
    class (``params.maxDets`` from :func:`coco_max_dets`) and every AP is read at that cap; a warning says when
    detections were dropped by it. No records: every value is 0 and a warning is logged.
    """
    max_dets = coco_max_dets(max_dets_per_image)
    if len(records) == 0:
        logger.warning("No detections to evaluate: every AP is reported as 0.")
        return _empty_evaluation()
    _warn_if_capped(records, max_dets[-1])
    # loadRes writes area/id/segmentation/iscrowd into the records it gets (top-level keys only): give it copies.
    coco_dt = _quiet(coco_gt.loadRes, [dict(r) for r in records])
    coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
    if img_ids is not None:
        coco_eval.params.imgIds = sorted(img_ids)
    coco_eval.params.maxDets = max_dets
    _quiet(coco_eval.evaluate)
    _quiet(coco_eval.accumulate)
    metrics = OrderedDict()
    metrics["AP"] = ap_at_iou(coco_eval)
    for name, threshold in AP_THRESHOLDS.items():
        metrics[name] = ap_at_iou(coco_eval, threshold)
    for name, area in (("APs", "small"), ("APm", "medium"), ("APl", "large")):
        metrics[name] = ap_at_iou(coco_eval, area=area)
    curve = [ap_at_iou(coco_eval, float(t)) for t in coco_eval.params.iouThrs]
    return OrderedDict((name, metrics[name]) for name in STAGE_METRICS), curve


def coco_stage_metrics(coco_gt: COCO, records, img_ids=None, max_dets_per_image=100) -> dict:
    """AP, AP50, AP60, AP70, AP75, AP80, AP90, APs, APm, APl (percent) of ``records`` on ``coco_gt``."""
    return coco_stage_evaluation(coco_gt, records, img_ids=img_ids, max_dets_per_image=max_dets_per_image)[0]
