"""The IoU-Net evaluation's reports: the stage table (markdown, also printed), ``iounet_stages.json`` /
``iounet_stages.md``, and the plots ``ap_vs_iou.png`` (AP versus IoU threshold per stage) and ``iou_histogram.png``
(true IoU of matched detections before and after refinement)."""

import json
import math
import os
from collections import OrderedDict

import numpy as np
from detectron2.utils.file_io import PathManager

from prroi_d2.evaluation.coco_stages import COCO_IOU_THRESHOLDS, STAGE_METRICS
from prroi_d2.evaluation.iou_statistics import MATCH_IOU
from prroi_d2.evaluation.reliability import format_reliability_table
from prroi_d2.modeling.stages import localization_stage

__all__ = ["format_stage_table", "json_safe", "plot_ap_vs_iou", "plot_iou_histogram", "write_stage_reports"]

# Columns of the localisation table: (title, key prefix of the evaluator's "localization" dict, digits).
_LOCALIZATION_COLUMNS = (
    ("n matched", "num_matches", 0),
    ("Pearson r", "iou_pearson", 4),
    ("mean abs err", "mean_abs_iou_error", 4),
    ("n all", "num_detections", 0),
    ("Pearson r (all)", "iou_pearson_all", 4),
    ("mean abs err (all)", "iou_mae_all", 4),
)


def _stage_rows(results):
    return [(name, value) for name, value in results.items() if name != "localization" and isinstance(value, dict)]


def _fmt(value, digits=2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return f"{value:.{digits}f}"


def _localization_rows(results):
    """(row label, key suffix) of the localisation table: every stage, and the localisation stage's boxes before
    refinement just above it when it has them."""
    loc = results["localization"]
    names = [name for name, _ in _stage_rows(results)]
    stage = localization_stage(names)  # as the statistics'
    rows = []
    for name in names:
        if f"iou_pearson_{name}" not in loc:
            continue
        if name == stage and loc.get("num_detections_initial", 0) > 0:
            rows.append((f"{name}, before refinement", "_initial"))
        rows.append((name, f"_{name}"))
    return rows


def format_stage_table(results) -> str:
    """Markdown table of the evaluator's results: one row per stage, columns :data:`STAGE_METRICS`, followed, when
    ``results["localization"]`` is present, by a table of predicted vs true IoU per stage: Pearson r and mean
    |predicted - true IoU| over the matches (true IoU >= 0.5) and over all detections."""
    lines = ["| stage | " + " | ".join(STAGE_METRICS) + " |", "|:---|" + "---:|" * len(STAGE_METRICS)]
    for name, metrics in _stage_rows(results):
        lines.append(f"| {name} | " + " | ".join(_fmt(metrics.get(m, float("nan"))) for m in STAGE_METRICS) + " |")
    loc = results.get("localization")
    if loc:
        lines += [
            "",
            f"Predicted vs true IoU (true IoU: best overlap with a ground-truth box of the class, 0 if none; "
            f"matched: true IoU >= {MATCH_IOU}):",
            "",
            "| boxes | " + " | ".join(title for title, _, _ in _LOCALIZATION_COLUMNS) + " |",
            "|:---|" + "---:|" * len(_LOCALIZATION_COLUMNS),
        ]
        for label, suffix in _localization_rows(results):
            cells = [_fmt(loc.get(key + suffix, float("nan")), digits) for _, key, digits in _LOCALIZATION_COLUMNS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
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


def write_stage_reports(output_dir, dataset_name, results, curves, histogram, max_dets_per_image, reliability=None):
    """Write ``iounet_stages.json`` / ``.md``, ``ap_vs_iou.png`` and (with a histogram) ``iou_histogram.png``.

    ``results``: the evaluator's results (stage -> metrics, and ``"localization"``); ``curves``: stage -> AP at each of
    COCO's ten IoU thresholds; ``histogram``: from :func:`localization_statistics`; ``reliability``: from
    :func:`refinement_reliability`, written under the json's ``"reliability"`` key and as a table in the markdown.
    """
    summary = OrderedDict((name, metrics) for name, metrics in _stage_rows(results))
    loc = results.get("localization", {})
    for key in ("iou_pearson", "iou_pearson_initial", "iou_pearson_all", "iou_pearson_all_initial"):
        summary[key] = loc.get(key, float("nan"))
    for key in ("iou_mae_all", "iou_mae_all_initial"):
        summary[key] = loc.get(key, float("nan"))
    summary["localization"] = loc
    summary["localization_stage"] = histogram.get("stage")
    summary["max_dets_per_image"] = int(max_dets_per_image)
    summary["ap_per_iou_threshold"] = {"iou_thresholds": COCO_IOU_THRESHOLDS.round(2).tolist(), **curves}
    summary["iou_histogram"] = histogram
    summary["reliability"] = reliability or {}
    with PathManager.open(os.path.join(output_dir, "iounet_stages.json"), "w") as f:
        json.dump(json_safe(summary), f, indent=2, allow_nan=False)
    with PathManager.open(os.path.join(output_dir, "iounet_stages.md"), "w") as f:
        f.write(f"# IoU-Net stages on {dataset_name}\n\n")
        f.write(f"COCOeval maxDets {max_dets_per_image} (detections per image and class).\n\n")
        f.write(format_stage_table(results))
        if reliability:
            f.write("\n" + format_reliability_table(reliability))
    plot_ap_vs_iou(curves, os.path.join(output_dir, "ap_vs_iou.png"))
    if histogram:
        plot_iou_histogram(histogram, os.path.join(output_dir, "iou_histogram.png"))
