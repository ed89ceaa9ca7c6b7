"""COCO evaluation of every IoU-Net stage from one inference pass.

With ``MODEL.IOU_NET.OUTPUT_STAGES`` on, the model returns, besides ``"instances"``, a dict ``"stages"`` of
``Instances``: ``baseline`` (standard NMS), ``iou_nms`` (IoU-guided NMS) and ``refined`` (IoU-guided NMS + box
refinement). :class:`IoUNetEvaluator` turns each stage into COCO result records, runs pycocotools' ``COCOeval`` (bbox)
on each, and reports AP at several IoU thresholds, so the gain of each stage at high IoU (AP80, AP90) is visible
from one pass. It also measures how well the predicted IoU (localisation confidence) correlates with the true IoU of
the matched ground truth, before and after refinement.
"""

import contextlib
import io
import itertools
import json
import logging
import math
import os
from collections import Counter, OrderedDict

import detectron2.utils.comm as comm
import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation.evaluator import DatasetEvaluator
from detectron2.utils.file_io import PathManager
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = [
    "AP_THRESHOLDS",
    "COCO_IOU_THRESHOLDS",
    "IoUNetEvaluator",
    "STAGE_METRICS",
    "ap_at_iou",
    "coco_max_dets",
    "best_ground_truth_iou",
    "coco_stage_evaluation",
    "coco_stage_metrics",
    "format_stage_table",
    "instances_to_records",
    "iou_histogram",
    "match_to_ground_truth",
    "pearson",
    "plot_ap_vs_iou",
    "plot_iou_histogram",
]

logger = logging.getLogger(__name__)

# Columns of the stage table, in order.
STAGE_METRICS = ("AP", "AP50", "AP60", "AP70", "AP75", "AP80", "AP90", "APs", "APm", "APl")
# The single-threshold APs among them.
AP_THRESHOLDS = OrderedDict([("AP50", 0.5), ("AP60", 0.6), ("AP70", 0.7), ("AP75", 0.75), ("AP80", 0.8), ("AP90", 0.9)])
# COCO's ten IoU thresholds 0.50:0.05:0.95 (the same values as COCOeval's params.iouThrs).
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
# Stages in the order they are listed when found.
KNOWN_STAGE_ORDER = ("baseline", "iou_nms", "refined", "final")
# Bin edges of the true-IoU histogram of matched detections.
HISTOGRAM_EDGES = np.linspace(0.5, 1.0, 11)


# ----------------------------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------------------------


def _xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    boxes[:, 2:] -= boxes[:, :2]
    return boxes


def _box_array(boxes) -> np.ndarray:
    tensor = boxes.tensor if hasattr(boxes, "tensor") else torch.as_tensor(boxes)
    return tensor.detach().to("cpu", torch.float64).numpy().reshape(-1, 4)


def _vector(values) -> list:
    return torch.as_tensor(values).detach().to("cpu").reshape(-1).tolist()


def instances_to_records(instances, image_id) -> list:
    """One COCO results record per detection of ``instances`` (an ``Instances`` with XYXY_ABS ``pred_boxes``).

    Each record has ``image_id, category_id, bbox [x, y, w, h], score``, plus ``iou`` (``pred_ious``) and
    ``bbox_initial`` / ``iou_initial`` (``pred_boxes_initial`` / ``pred_ious_initial``) where the instances have them.
    ``category_id`` is the contiguous class id; :class:`IoUNetEvaluator` maps it to the dataset's ids.
    """
    num = len(instances)
    if num == 0:
        return []
    columns = {
        "bbox": _xyxy_to_xywh(_box_array(instances.pred_boxes)).tolist(),
        "score": _vector(instances.scores),
    }
    columns["category_id"] = [int(c) for c in _vector(instances.pred_classes)]
    if instances.has("pred_ious"):
        columns["iou"] = _vector(instances.pred_ious)
    if instances.has("pred_boxes_initial"):
        columns["bbox_initial"] = _xyxy_to_xywh(_box_array(instances.pred_boxes_initial)).tolist()
    if instances.has("pred_ious_initial"):
        columns["iou_initial"] = _vector(instances.pred_ious_initial)
    names = list(columns)
    image_id = int(image_id) if isinstance(image_id, (int, np.integer)) else image_id
    return [dict(image_id=image_id, **dict(zip(names, values))) for values in zip(*columns.values())]


# ----------------------------------------------------------------------------------------------------------------------
# COCO AP
# ----------------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------------
# Localisation confidence: predicted IoU vs true IoU
# ----------------------------------------------------------------------------------------------------------------------


def _pairwise_iou_xywh(dets: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """IoU of ``dets`` (M, 4) with ``gts`` (M, G, 4), XYWH, continuous areas as in COCO: (M, G)."""
    d = dets[:, None, :]
    x1 = np.maximum(d[..., 0], gts[..., 0])
    y1 = np.maximum(d[..., 1], gts[..., 1])
    x2 = np.minimum(d[..., 0] + d[..., 2], gts[..., 0] + gts[..., 2])
    y2 = np.minimum(d[..., 1] + d[..., 3], gts[..., 1] + gts[..., 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    union = d[..., 2] * d[..., 3] + gts[..., 2] * gts[..., 3] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def best_ground_truth_iou(coco_gt: COCO, records, box_key="bbox") -> np.ndarray:
    """For each record, the highest IoU of ``record[box_key]`` (XYWH) with a non-crowd ground-truth box of the same
    category in the same image (0 when there is none). Vectorised: ground truth is grouped by (image, category) and
    padded, and each chunk of detections is compared with its group in one numpy expression."""
    num = len(records)
    best = np.zeros(num, dtype=np.float64)
    if num == 0:
        return best
    group_of_key = {}
    gt_group, gt_boxes = [], []
    for ann in coco_gt.dataset.get("annotations", []):
        if ann.get("iscrowd", 0):
            continue
        key = (ann["image_id"], ann["category_id"])
        gt_group.append(group_of_key.setdefault(key, len(group_of_key)))
        gt_boxes.append(ann["bbox"])
    if not gt_boxes:
        return best
    gt_group = np.asarray(gt_group, dtype=np.int64)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    # Padded (num_groups, G, 4) table; empty slots are zero boxes, whose IoU with anything is 0.
    order = np.argsort(gt_group, kind="stable")
    counts = np.bincount(gt_group, minlength=len(group_of_key))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(len(order)) - starts[gt_group[order]]
    padded = np.zeros((len(group_of_key), int(counts.max()), 4), dtype=np.float64)
    padded[gt_group[order], slot] = gt_boxes[order]

    det_group = np.asarray([group_of_key.get((r["image_id"], r["category_id"]), -1) for r in records], dtype=np.int64)
    det_boxes = np.asarray([r[box_key] for r in records], dtype=np.float64).reshape(-1, 4)
    chunk = max(1, 4_000_000 // padded.shape[1])
    for start in range(0, num, chunk):
        group = det_group[start : start + chunk]
        valid = np.nonzero(group >= 0)[0]
        if valid.size:
            ious = _pairwise_iou_xywh(det_boxes[start + valid], padded[group[valid]])
            best[start + valid] = ious.max(axis=1)
    return best


def match_to_ground_truth(coco_gt: COCO, records, box_key="bbox", iou_key=None, min_iou=0.5):
    """Match each record to the same-category, same-image non-crowd ground-truth box of highest IoU.

    Returns ``(true_iou, pred_iou)``, float64 arrays over the matches with true IoU >= ``min_iou``. ``iou_key`` (the
    record field of the predicted IoU) defaults to ``"iou"`` for ``box_key="bbox"`` and ``"iou_initial"`` for
    ``box_key="bbox_initial"``; records without ``box_key`` or ``iou_key`` are skipped.
    """
    if iou_key is None:
        iou_key = box_key.replace("bbox", "iou")
    usable = [r for r in records if box_key in r and iou_key in r]
    true_iou = best_ground_truth_iou(coco_gt, usable, box_key=box_key)
    pred_iou = np.asarray([r[iou_key] for r in usable], dtype=np.float64)
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


# ----------------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------------


def _stage_rows(results):
    return [(name, value) for name, value in results.items() if name != "localization" and isinstance(value, dict)]


def _fmt(value, digits=2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return f"{value:.{digits}f}"


def format_stage_table(results) -> str:
    """Markdown table of the evaluator's results: one row per stage, columns :data:`STAGE_METRICS`, followed by the
    localisation lines (Pearson r of predicted vs true IoU) when ``results["localization"]`` is present."""
    lines = ["| stage | " + " | ".join(STAGE_METRICS) + " |", "|:---|" + "---:|" * len(STAGE_METRICS)]
    for name, metrics in _stage_rows(results):
        lines.append(f"| {name} | " + " | ".join(_fmt(metrics.get(m, float("nan"))) for m in STAGE_METRICS) + " |")
    loc = results.get("localization")
    if loc:
        lines.append("")
        lines.append(
            f"- IoU Pearson r (predicted vs true IoU, matches with IoU >= 0.5), final boxes: "
            f"{_fmt(loc.get('iou_pearson'), 4)} (n={int(loc.get('num_matches', 0))}, "
            f"mean |pred - true| {_fmt(loc.get('mean_abs_iou_error'), 4)})"
        )
        lines.append(
            f"- IoU Pearson r before refinement (initial boxes): {_fmt(loc.get('iou_pearson_initial'), 4)} "
            f"(n={int(loc.get('num_matches_initial', 0))}, "
            f"mean |pred - true| {_fmt(loc.get('mean_abs_iou_error_initial'), 4)})"
        )
        for name, _ in _stage_rows(results):
            key = f"iou_pearson_{name}"
            if key in loc:
                lines.append(f"- IoU Pearson r, stage {name}: {_fmt(loc[key], 4)}")
    return "\n".join(lines) + "\n"


def _new_figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_ap_vs_iou(curves, path, thresholds=COCO_IOU_THRESHOLDS) -> str:
    """Line plot of AP (percent) versus IoU threshold, one line per stage (``curves``: stage -> 10 APs); PNG."""
    fig = _new_figure(6, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for name, curve in curves.items():
        ax.plot(list(thresholds), curve, marker="o", label=name)
    ax.set_xlabel("IoU threshold")
    ax.set_ylabel("AP (%)")
    ax.set_xticks(list(thresholds))
    ax.set_xlim(thresholds[0] - 0.02, thresholds[-1] + 0.02)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.set_title("AP versus IoU threshold per IoU-Net stage")
    ax.legend()
    fig.tight_layout()
    with PathManager.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return path


def plot_iou_histogram(histogram, path) -> str:
    """Bar plot of the true-IoU histogram of matched detections before and after refinement; PNG."""
    edges = np.asarray(histogram["bin_edges"], dtype=np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    width = np.diff(edges)
    series = [
        (k, label, color)
        for k, label, color in (("initial", "before refinement", "#ff7f0e"), ("final", "after refinement", "#1f77b4"))
        if k in histogram
    ]
    fig = _new_figure(6, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for i, (key, label, color) in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * width / max(len(series), 1)
        mae = histogram.get(f"mean_abs_error_{key}")
        ax.bar(
            centers + offset,
            histogram[key],
            width=width / max(len(series), 1),
            label=f"{label} (mean |pred-true| {_fmt(mae, 3)})",
            color=color,
        )
    ax.set_xlabel("true IoU with matched ground truth")
    ax.set_ylabel("detections")
    ax.set_xticks(list(edges))
    ax.set_title(f"True IoU of matched detections ({histogram.get('stage', '')})")
    if series:
        ax.legend()
    fig.tight_layout()
    with PathManager.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return path


def json_safe(value):
    """``value`` with every non-finite float (nested in dicts, lists, tuples) replaced by None: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------------------------------
# Evaluator
# ----------------------------------------------------------------------------------------------------------------------


class IoUNetEvaluator(DatasetEvaluator):
    """COCO bbox AP of every IoU-Net stage (baseline NMS, IoU-guided NMS, refinement) from one inference pass.

    Args:
        dataset_name: a registered dataset with COCO-format ground truth (``MetadataCatalog.get(name).json_file``; if
            absent, the dataset dicts are converted into one, as ``COCOEvaluator`` does).
        output_dir: where to write ``iounet_stages.json``, ``iounet_stages.md``, ``ap_vs_iou.png``,
            ``iou_histogram.png`` and ``coco_instances_results_<stage>.json``; None writes nothing.
        distributed: gather the predictions of all processes and evaluate on the main one.
        stages: names of the stages to evaluate (keys of ``outputs["stages"]``, or ``"final"`` for
            ``outputs["instances"]``); None evaluates every stage found (``"final"`` when outputs have no stages).
        max_dets_per_image: the most detections per image (and class) that COCOeval counts: its ``params.maxDets``
            is ``[1, 10, max_dets_per_image]`` and every AP is read at that cap. Default 100, COCO's (and Detectron2's)
            standard; ``tools/train_net.py`` passes ``TEST.DETECTIONS_PER_IMAGE`` (>= 300 for dense scenes).
    """

    def __init__(self, dataset_name, output_dir=None, distributed=True, stages=None, max_dets_per_image=100):
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._distributed = distributed
        self._stages = list(stages) if stages is not None else None
        self._max_dets = coco_max_dets(max_dets_per_image)[-1]  # checks the value before any inference runs
        self._metadata = MetadataCatalog.get(dataset_name)
        self._warned_missing = set()
        self.reset()

    def reset(self):
        self._predictions = []

    def _stage_instances(self, output):
        found = output.get("stages") or {}
        names = self._stages if self._stages is not None else (list(found) if found else ["final"])
        selected = OrderedDict()
        for name in names:
            if name in found:
                selected[name] = found[name]
            elif name == "final" and "instances" in output:
                selected[name] = output["instances"]
            elif name not in self._warned_missing:
                self._warned_missing.add(name)
                logger.warning(f"Stage {name!r} is not in the model's outputs (MODEL.IOU_NET.OUTPUT_STAGES off?)")
        return selected

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            stages = OrderedDict(
                (name, instances_to_records(inst, inp["image_id"]))  # reads only the fields it needs
                for name, inst in self._stage_instances(out).items()
            )
            self._predictions.append({"image_id": inp["image_id"], "stages": stages})

    def _contiguous_to_dataset_id(self, coco_gt):
        """Dataset category id of each contiguous class id: from the metadata's thing_dataset_id_to_contiguous_id
        (set when the dataset is loaded), else the json's sorted category ids (what ``load_coco_json`` would set)."""
        mapping = getattr(self._metadata, "thing_dataset_id_to_contiguous_id", None)
        if not mapping:
            return sorted(coco_gt.getCatIds())
        reverse = {v: k for k, v in mapping.items()}
        if sorted(reverse) != list(range(len(reverse))):
            raise ValueError(f"thing_dataset_id_to_contiguous_id of {self._dataset_name} is not onto 0..K-1")
        return [reverse[i] for i in range(len(reverse))]

    def _coco_gt(self):
        json_file = getattr(self._metadata, "json_file", None)
        if json_file is None:
            from detectron2.data.datasets.coco import convert_to_coco_json

            if self._output_dir is None:
                raise ValueError(f"{self._dataset_name} has no json_file; give output_dir to convert it to COCO json")
            json_file = os.path.join(self._output_dir, f"{self._dataset_name}_coco_format.json")
            convert_to_coco_json(self._dataset_name, json_file)
        return _quiet(COCO, PathManager.get_local_path(json_file))

    def evaluate(self):
        if self._distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(self._predictions, dst=0)))
            if not comm.is_main_process():
                return {}
        else:
            predictions = self._predictions
        if not predictions:
            logger.warning("[IoUNetEvaluator] Did not receive any predictions.")
            return {}

        names = []
        for pred in predictions:
            names.extend(n for n in pred["stages"] if n not in names)
        if self._stages is None:
            names.sort(key=lambda n: KNOWN_STAGE_ORDER.index(n) if n in KNOWN_STAGE_ORDER else len(KNOWN_STAGE_ORDER))
        else:
            names = [n for n in self._stages if n in names]
        img_ids = sorted({p["image_id"] for p in predictions})
        coco_gt = self._coco_gt()
        # Contiguous class ids -> dataset category ids, on copies (the predictions stay as process() made them).
        dataset_ids = self._contiguous_to_dataset_id(coco_gt)
        records = OrderedDict()
        for n in names:
            records[n] = [dict(r) for p in predictions for r in p["stages"].get(n, [])]
            for r in records[n]:
                c = r["category_id"]
                if not 0 <= c < len(dataset_ids):
                    raise ValueError(f"a prediction has class {c}, but {self._dataset_name} has {len(dataset_ids)}")
                r["category_id"] = dataset_ids[c]

        results = OrderedDict()
        curves = OrderedDict()
        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
        for name, stage_records in records.items():
            if self._output_dir:
                path = os.path.join(self._output_dir, f"coco_instances_results_{name}.json")
                with PathManager.open(path, "w") as f:
                    json.dump(stage_records, f)
            if not stage_records:
                logger.warning(f"[IoUNetEvaluator] Stage {name!r} has no detections: every AP is 0.")
            results[name], curves[name] = coco_stage_evaluation(coco_gt, stage_records, img_ids, self._max_dets)

        localization, histogram = self._localization(coco_gt, records)
        results["localization"] = localization
        table = format_stage_table(results)
        if self._output_dir:
            self._write_reports(results, curves, histogram, table)
        if logger.isEnabledFor(logging.INFO) and logger.hasHandlers():
            logger.info("IoU-Net stages on %s:\n%s", self._dataset_name, table)
        else:
            print(f"IoU-Net stages on {self._dataset_name}:\n{table}")
        return results

    def _localization(self, coco_gt, records):
        """Pearson r of predicted vs true IoU (matches with IoU >= 0.5) per stage, and before/after refinement for
        the refined stage ("refined", else "final", else the last one)."""
        loc = OrderedDict()
        if not records:
            return loc, {}
        stage = next((n for n in ("refined", "final") if n in records), list(records)[-1])
        true_final, pred_final = match_to_ground_truth(coco_gt, records[stage], "bbox")
        true_init, pred_init = match_to_ground_truth(coco_gt, records[stage], "bbox_initial")
        loc["iou_pearson"] = pearson(pred_final, true_final)
        loc["iou_pearson_initial"] = pearson(pred_init, true_init)
        loc["num_matches"] = float(true_final.size)
        loc["num_matches_initial"] = float(true_init.size)
        loc["mean_abs_iou_error"] = _mean(np.abs(pred_final - true_final))
        loc["mean_abs_iou_error_initial"] = _mean(np.abs(pred_init - true_init))
        loc["mean_true_iou"] = _mean(true_final)
        loc["mean_true_iou_initial"] = _mean(true_init)
        for name, stage_records in records.items():
            if name == stage:  # matched above
                loc[f"iou_pearson_{name}"] = loc["iou_pearson"]
                continue
            true_iou, pred_iou = match_to_ground_truth(coco_gt, stage_records, "bbox")
            loc[f"iou_pearson_{name}"] = pearson(pred_iou, true_iou)
        histogram = {
            "stage": stage,
            "bin_edges": HISTOGRAM_EDGES.tolist(),
            "final": iou_histogram(true_final),
            "mean_abs_error_final": loc["mean_abs_iou_error"],
        }
        if any("bbox_initial" in r for r in records[stage]):
            histogram["initial"] = iou_histogram(true_init)
            histogram["mean_abs_error_initial"] = loc["mean_abs_iou_error_initial"]
        return loc, histogram

    def _write_reports(self, results, curves, histogram, table):
        out = self._output_dir
        summary = OrderedDict((name, metrics) for name, metrics in _stage_rows(results))
        loc = results["localization"]
        summary["iou_pearson"] = loc.get("iou_pearson", float("nan"))
        summary["iou_pearson_initial"] = loc.get("iou_pearson_initial", float("nan"))
        summary["localization"] = loc
        summary["localization_stage"] = histogram.get("stage")
        summary["max_dets_per_image"] = self._max_dets
        summary["ap_per_iou_threshold"] = {"iou_thresholds": COCO_IOU_THRESHOLDS.round(2).tolist(), **curves}
        summary["iou_histogram"] = histogram
        with PathManager.open(os.path.join(out, "iounet_stages.json"), "w") as f:
            json.dump(json_safe(summary), f, indent=2, allow_nan=False)
        with PathManager.open(os.path.join(out, "iounet_stages.md"), "w") as f:
            f.write(f"# IoU-Net stages on {self._dataset_name}\n\n{table}")
        plot_ap_vs_iou(curves, os.path.join(out, "ap_vs_iou.png"))
        if histogram:
            plot_iou_histogram(histogram, os.path.join(out, "iou_histogram.png"))
