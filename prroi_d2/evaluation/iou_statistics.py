"""Localisation confidence: how well IoU-Net's predicted IoU agrees with the true IoU of each detection.

The true IoU of a detection is its best overlap with a non-crowd ground-truth box of the same class in the same image
(0 when there is none). Agreement is reported over the detections matched at true IoU >= 0.5 (the paper's view) and
over all detections of a stage, where a confident false positive counts against the IoU head.
"""

from collections import OrderedDict, defaultdict

import numpy as np
from pycocotools.coco import COCO

from prroi_d2.modeling.stages import RECORD_BOX, RECORD_BOX_INITIAL, RECORD_IOU_OF_BOX, localization_stage

__all__ = [
    "HISTOGRAM_EDGES",
    "MATCH_IOU",
    "best_ground_truth_iou",
    "iou_agreement",
    "iou_histogram",
    "localization_statistics",
    "match_to_ground_truth",
    "pairwise_iou_xywh",
    "pearson",
    "true_and_predicted_iou",
]

# Bin edges of the true-IoU histogram of matched detections.
HISTOGRAM_EDGES = np.linspace(0.5, 1.0, 11)
# A detection is "matched" when its true IoU reaches this.
MATCH_IOU = 0.5
# Detections compared with an image's ground truth at once (bounds the (D, G) IoU matrix).
_CHUNK_ELEMENTS = 4_000_000


def pairwise_iou_xywh(dets: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """IoU of boxes ``dets`` (D, 4) with ``gts`` (G, 4), XYWH, continuous areas as in COCO: (D, G) float64."""
    d = np.asarray(dets, dtype=np.float64).reshape(-1, 1, 4)
    g = np.asarray(gts, dtype=np.float64).reshape(1, -1, 4)
    x1 = np.maximum(d[..., 0], g[..., 0])
    y1 = np.maximum(d[..., 1], g[..., 1])
    x2 = np.minimum(d[..., 0] + d[..., 2], g[..., 0] + g[..., 2])
    y2 = np.minimum(d[..., 1] + d[..., 3], g[..., 1] + g[..., 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    union = d[..., 2] * d[..., 3] + g[..., 2] * g[..., 3] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _ground_truth_by_image(coco_gt: COCO) -> dict:
    """image id -> (boxes (G, 4) float64 XYWH, category ids (G,) int64) of its non-crowd ground truth."""
    boxes, categories = defaultdict(list), defaultdict(list)
    for ann in coco_gt.dataset.get("annotations", []):
        if not ann.get("iscrowd", 0):
            boxes[ann["image_id"]].append(ann["bbox"])
            categories[ann["image_id"]].append(ann["category_id"])
    return {
        img: (np.asarray(boxes[img], dtype=np.float64).reshape(-1, 4), np.asarray(categories[img], dtype=np.int64))
        for img in boxes
    }


def best_ground_truth_iou(coco_gt: COCO, records, box_key=RECORD_BOX) -> np.ndarray:
    """(N,) float64: for each record, the highest IoU of ``record[box_key]`` (XYWH) with a non-crowd ground-truth box
    of the same category in the same image, 0 when there is none. One (D, G) numpy IoU matrix per image."""
    num = len(records)
    best = np.zeros(num, dtype=np.float64)
    if num == 0:
        return best
    gt = _ground_truth_by_image(coco_gt)
    det_boxes = np.asarray([r[box_key] for r in records], dtype=np.float64).reshape(-1, 4)
    det_categories = np.asarray([r["category_id"] for r in records], dtype=np.int64)
    image_index = {}
    det_image = np.asarray([image_index.setdefault(r["image_id"], len(image_index)) for r in records], dtype=np.int64)
    order = np.argsort(det_image, kind="stable")
    ends = np.cumsum(np.bincount(det_image, minlength=len(image_index)))
    for img, rows in zip(image_index, np.split(order, ends[:-1])):
        if img not in gt:
            continue
        gt_boxes, gt_categories = gt[img]
        chunk = max(1, _CHUNK_ELEMENTS // len(gt_boxes))
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            ious = pairwise_iou_xywh(det_boxes[part], gt_boxes)
            ious[det_categories[part, None] != gt_categories[None, :]] = 0.0
            best[part] = ious.max(axis=1)
    return best


def true_and_predicted_iou(coco_gt: COCO, records, box_key=RECORD_BOX, iou_key=None):
    """``(true_iou, pred_iou)``: float64 arrays over every record that has ``box_key`` and ``iou_key``.

    ``iou_key`` (the record field of the predicted IoU) defaults to the one of ``box_key``
    (:data:`~prroi_d2.modeling.stages.RECORD_IOU_OF_BOX`: ``"iou"`` for ``"bbox"``, ``"iou_initial"`` for
    ``"bbox_initial"``). True IoU as in :func:`best_ground_truth_iou`.
    """
    if iou_key is None:
        iou_key = RECORD_IOU_OF_BOX[box_key]
    usable = [r for r in records if box_key in r and iou_key in r]
    true_iou = best_ground_truth_iou(coco_gt, usable, box_key=box_key)
    pred_iou = np.asarray([r[iou_key] for r in usable], dtype=np.float64).reshape(-1)
    return true_iou, pred_iou


def match_to_ground_truth(coco_gt: COCO, records, box_key=RECORD_BOX, iou_key=None, min_iou=MATCH_IOU):
    """Match each record to the same-category, same-image non-crowd ground-truth box of highest IoU.

    Returns ``(true_iou, pred_iou)``, float64 arrays over the matches with true IoU >= ``min_iou``. ``iou_key`` (the
    record field of the predicted IoU) defaults to the one of ``box_key``, as in :func:`true_and_predicted_iou`;
    records without ``box_key`` or ``iou_key`` are skipped.
    """
    true_iou, pred_iou = true_and_predicted_iou(coco_gt, records, box_key=box_key, iou_key=iou_key)
    keep = true_iou >= min_iou
    return true_iou[keep], pred_iou[keep]


def pearson(x, y) -> float:
    """Pearson correlation of two 1-D arrays; NaN with fewer than 2 pairs or a constant array."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.size < 2 or x.size != y.size or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def iou_histogram(true_iou, edges=HISTOGRAM_EDGES) -> list:
    """Counts of ``true_iou`` in the bins ``edges`` (the last bin includes 1.0)."""
    return [int(c) for c in np.histogram(np.asarray(true_iou, dtype=np.float64), bins=edges)[0]]


def _mean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()) if values.size else float("nan")


def iou_agreement(true_iou, pred_iou, min_iou=MATCH_IOU) -> OrderedDict:
    """Agreement of predicted and true IoU, (N,) arrays over all detections of a stage:

    ``pearson``, ``mean_abs_error``, ``num``, ``mean_true_iou`` over the matches (true IoU >= ``min_iou``) and
    ``pearson_all``, ``mean_abs_error_all``, ``num_all`` over all N. NaN where undefined (no or constant pairs).
    """
    true_iou = np.asarray(true_iou, dtype=np.float64).reshape(-1)
    pred_iou = np.asarray(pred_iou, dtype=np.float64).reshape(-1)
    keep = true_iou >= min_iou
    error = np.abs(pred_iou - true_iou)
    return OrderedDict(
        pearson=pearson(pred_iou[keep], true_iou[keep]),
        mean_abs_error=_mean(error[keep]),
        num=float(keep.sum()),
        mean_true_iou=_mean(true_iou[keep]),
        pearson_all=pearson(pred_iou, true_iou),
        mean_abs_error_all=_mean(error),
        num_all=float(true_iou.size),
    )


def _flat_keys(agreement, suffix="") -> OrderedDict:
    """The evaluator's names of :func:`iou_agreement`'s values (``suffix`` "", "_initial" or "_<stage>")."""
    return OrderedDict(
        [
            (f"iou_pearson{suffix}", agreement["pearson"]),
            (f"num_matches{suffix}", agreement["num"]),
            (f"mean_abs_iou_error{suffix}", agreement["mean_abs_error"]),
            (f"iou_pearson_all{suffix}", agreement["pearson_all"]),
            (f"iou_mae_all{suffix}", agreement["mean_abs_error_all"]),
            (f"num_detections{suffix}", agreement["num_all"]),
        ]
    )


def localization_statistics(coco_gt: COCO, records):
    """Predicted vs true IoU of every stage; ``records``: OrderedDict stage -> COCO result records (dataset ids).

    The localisation stage is ``"refined"``, else ``"final"``, else the last one
    (:func:`~prroi_d2.modeling.stages.localization_stage`); for it the flat keys have no suffix
    (final boxes) or ``_initial`` (boxes before refinement: ``bbox_initial`` / ``iou_initial``), for every stage the
    suffix ``_<stage>``. Keys: ``iou_pearson`` / ``mean_abs_iou_error`` / ``num_matches`` over matches (true IoU >=
    0.5), ``iou_pearson_all`` / ``iou_mae_all`` / ``num_detections`` over all detections, ``mean_true_iou`` of the
    matches. Returns ``(localization, histogram)``: a flat OrderedDict of floats, and the true-IoU histogram of the
    localisation stage's matches before and after refinement (empty without records).
    """
    loc = OrderedDict()
    if not records:
        return loc, {}
    stage = localization_stage(records)
    pairs = OrderedDict((name, true_and_predicted_iou(coco_gt, r)) for name, r in records.items())
    per_stage = OrderedDict((name, iou_agreement(*pair)) for name, pair in pairs.items())
    true_init, pred_init = true_and_predicted_iou(coco_gt, records[stage], RECORD_BOX_INITIAL)
    final, initial = per_stage[stage], iou_agreement(true_init, pred_init)
    loc.update(_flat_keys(final))
    loc.update(_flat_keys(initial, "_initial"))
    loc["mean_true_iou"] = final["mean_true_iou"]
    loc["mean_true_iou_initial"] = initial["mean_true_iou"]
    for name, agreement in per_stage.items():
        loc.update(_flat_keys(agreement, f"_{name}"))

    true_final = pairs[stage][0]
    histogram = {
        "stage": stage,
        "bin_edges": HISTOGRAM_EDGES.tolist(),
        "final": iou_histogram(true_final[true_final >= MATCH_IOU]),
        "mean_abs_error_final": loc["mean_abs_iou_error"],
    }
    if any(RECORD_BOX_INITIAL in r for r in records[stage]):
        histogram["initial"] = iou_histogram(true_init[true_init >= MATCH_IOU])
        histogram["mean_abs_error_initial"] = loc["mean_abs_iou_error_initial"]
    return loc, histogram
