"""Where refinement can be trusted: the reliability of the predicted IoU that refinement follows, and what refinement
did to the true IoU, per bin of that predicted IoU.

Refinement trusts the IoU head's prediction for the boxes before refinement, so the binned quantity is the predicted
IoU of those boxes: ``iou_initial`` of the localisation stage's records (``bbox_initial`` their boxes), else the
``iou`` of the IoU-guided NMS stage (``iou_nms``), else the localisation stage's own ``iou``. True IoU is the best
overlap with a non-crowd ground-truth box of the same class (0 when there is none), from
:func:`prroi_d2.evaluation.iou_statistics.best_ground_truth_iou`. The gain of a detection is the true IoU of its refined
box minus that of its box before refinement (only where the records have both boxes).
"""

import math
from collections import OrderedDict

import numpy as np
from pycocotools.coco import COCO

from prroi_d2.evaluation.iou_statistics import best_ground_truth_iou
from prroi_d2.modeling.stages import IOU_NMS, REFINED

__all__ = ["RELIABILITY_EDGES", "format_reliability_table", "refinement_reliability", "reliability_bins"]

# Bin edges of the predicted IoU (the last bin includes 1.0; values outside [0, 1] fall into the end bins).
RELIABILITY_EDGES = np.linspace(0.0, 1.0, 11)
# The stage whose predicted IoU is binned when the localisation stage has no boxes before refinement.
_FALLBACK_STAGE = IOU_NMS


def _bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(N,) int64 bin of each of ``values`` (N,): ``edges[b] <= v < edges[b + 1]``, the last bin closed, values below
    the first or above the last edge in the end bins."""
    index = np.searchsorted(edges, values, side="right") - 1
    return np.clip(index, 0, len(edges) - 2)


def reliability_bins(pred_iou, true_iou, true_iou_refined=None, edges=RELIABILITY_EDGES) -> list:
    """Per bin of the predicted IoU, the agreement with the true IoU and (optionally) the gain of refinement.

    Args:
        pred_iou: (N,) predicted IoU of the boxes before refinement.
        true_iou: (N,) true IoU of the same boxes.
        true_iou_refined: (N,) true IoU of the same detections' refined boxes, or None (no refinement).
        edges: (B + 1,) increasing bin edges of ``pred_iou``.

    Returns a list of B OrderedDicts with ``low, high, count, mean_predicted, mean_true, std_true`` (population std)
    and ``mean_true_gain`` (refined - initial true IoU), ``improved_fraction`` / ``worsened_fraction`` (share of the
    bin's detections whose true IoU rose / fell), all floats except ``count``; NaN where a bin is empty or there is
    no refinement.
    """
    pred = np.asarray(pred_iou, dtype=np.float64).reshape(-1)
    true = np.asarray(true_iou, dtype=np.float64).reshape(-1)
    edges = np.asarray(edges, dtype=np.float64).reshape(-1)
    num_bins = len(edges) - 1
    if true.shape != pred.shape:
        raise ValueError(f"pred_iou has {pred.size} values but true_iou has {true.size}")
    index = _bin_index(pred, edges)
    count = np.bincount(index, minlength=num_bins).astype(np.float64)
    safe = np.where(count > 0, count, 1.0)
    empty = count == 0

    def bin_mean(values):  # (N,) -> (B,), NaN in empty bins
        return np.where(empty, np.nan, np.bincount(index, weights=values, minlength=num_bins) / safe)

    mean_pred = bin_mean(pred)
    mean_true = bin_mean(true)
    std_true = np.sqrt(bin_mean((true - np.nan_to_num(mean_true)[index]) ** 2))
    nan = np.full(num_bins, np.nan)
    gain_mean, improved, worsened = nan, nan, nan
    if true_iou_refined is not None:
        gain = np.asarray(true_iou_refined, dtype=np.float64).reshape(-1) - true
        if gain.shape != true.shape:
            raise ValueError(f"true_iou_refined has {gain.size} values but true_iou has {true.size}")
        gain_mean = bin_mean(gain)
        improved = bin_mean((gain > 0).astype(np.float64))
        worsened = bin_mean((gain < 0).astype(np.float64))
    columns = OrderedDict(
        low=edges[:-1],
        high=edges[1:],
        count=count,
        mean_predicted=mean_pred,
        mean_true=mean_true,
        std_true=std_true,
        mean_true_gain=gain_mean,
        improved_fraction=improved,
        worsened_fraction=worsened,
    )
    rows = [OrderedDict((k, float(v[b])) for k, v in columns.items()) for b in range(num_bins)]
    for row in rows:
        row["count"] = int(row["count"])
    return rows


def _usable(records, box_key, iou_key) -> list:
    return [r for r in records or [] if box_key in r and iou_key in r]


def refinement_reliability(coco_gt: COCO, records, stage=None) -> OrderedDict:
    """Reliability of the predicted IoU before refinement and the gain of refinement per predicted-IoU bin.

    ``records``: OrderedDict stage -> COCO result records (dataset category ids); ``stage``: the localisation stage
    (default: the last one). Returns an empty dict when no record has a predicted IoU, else an OrderedDict with
    ``stage`` and ``source`` (which records and field were binned), ``predicted_key``, ``refined`` (whether the gain
    is defined), ``bin_edges``, ``bins`` (:func:`reliability_bins` over :data:`RELIABILITY_EDGES`) and ``all`` (the
    same statistics over all detections, ``low`` 0 and ``high`` 1).
    """
    if not records:
        return OrderedDict()
    stage = stage if stage in records else list(records)[-1]
    refined_true = None
    usable = _usable(records[stage], "bbox_initial", "iou_initial")
    if usable:
        source, box_key, iou_key = f"{stage}, before refinement", "bbox_initial", "iou_initial"
        refined_true = best_ground_truth_iou(coco_gt, usable, box_key="bbox")
    else:
        stage = _FALLBACK_STAGE if _usable(records.get(_FALLBACK_STAGE), "bbox", "iou") else stage
        usable = _usable(records[stage], "bbox", "iou")
        source, box_key, iou_key = stage, "bbox", "iou"
    if not usable:
        return OrderedDict()
    true = best_ground_truth_iou(coco_gt, usable, box_key=box_key)
    pred = np.asarray([r[iou_key] for r in usable], dtype=np.float64).reshape(-1)
    whole = np.asarray([RELIABILITY_EDGES[0], RELIABILITY_EDGES[-1]])
    return OrderedDict(
        stage=stage,
        source=source,
        predicted_key=iou_key,
        **{REFINED: refined_true is not None},
        bin_edges=RELIABILITY_EDGES.tolist(),
        bins=reliability_bins(pred, true, refined_true),
        all=reliability_bins(pred, true, refined_true, whole)[0],
    )


def _cell(value, digits) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


# Columns of the markdown table: (title, key, digits).
_COLUMNS = (
    ("n", "count", 0),
    ("mean predicted", "mean_predicted", 3),
    ("mean true", "mean_true", 3),
    ("std true", "std_true", 3),
    ("mean true-IoU gain", "mean_true_gain", 4),
    ("improved", "improved_fraction", 3),
    ("worsened", "worsened_fraction", 3),
)


def format_reliability_table(reliability) -> str:
    """Markdown table of :func:`refinement_reliability`'s result (one row per bin and one for all detections); an
    empty string for an empty result."""
    if not reliability:
        return ""
    columns = _COLUMNS if reliability.get(REFINED) else _COLUMNS[:4]
    lines = [
        f"Reliability of the predicted IoU ({reliability['source']}: `{reliability['predicted_key']}`) per "
        "predicted-IoU bin: mean and std of the true IoU"
        + (
            ", and what refinement did to the true IoU (gain = refined - initial; improved / worsened: share of the "
            "bin's detections whose true IoU rose / fell):"
            if reliability.get(REFINED)
            else " (no refinement in these records):"
        ),
        "",
        "| predicted IoU | " + " | ".join(title for title, _, _ in columns) + " |",
        "|:---|" + "---:|" * len(columns),
    ]
    for label, row in [(f"{b['low']:.1f}-{b['high']:.1f}", b) for b in reliability["bins"]] + [
        ("all", reliability["all"])
    ]:
        lines.append(f"| {label} | " + " | ".join(_cell(row.get(key), digits) for _, key, digits in columns) + " |")
    return "\n".join(lines) + "\n"
