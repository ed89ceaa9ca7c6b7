"""Pictures of IoU-Net's box refinement: ground truth, the box before refinement and after, with predicted IoUs; and
the reliability of the predicted IoU with the gain of refinement per predicted-IoU bin (:mod:`.reliability`).

Reads the results json of the refined stage written by :class:`prroi_d2.evaluation.IoUNetEvaluator`
(``coco_instances_results_refined.json``: records with ``bbox``, ``bbox_initial``, ``iou``, ``iou_initial``) and the
dataset's COCO json and images.
"""

import json
import logging
import os
from collections import defaultdict

import numpy as np
from detectron2.utils.file_io import PathManager

from prroi_d2.evaluation.reports import _new_figure
from prroi_d2.modeling.stages import RECORD_BOX, RECORD_BOX_INITIAL, RECORD_IOU, RECORD_IOU_INITIAL, REFINED

__all__ = ["draw_refinement_examples", "draw_reliability", "select_examples"]

logger = logging.getLogger(__name__)

GT_COLOR = "#2ca02c"  # green
INITIAL_COLOR = "#ff7f0e"  # orange
REFINED_COLOR = "#1f77b4"  # blue


def _load_json(path_or_obj):
    if isinstance(path_or_obj, (list, dict)):
        return path_or_obj
    with open(path_or_obj) as f:
        return json.load(f)


def select_examples(records, num_images=6, score_threshold=0.3, max_dets_per_image=20):
    """The ``num_images`` images whose best detection scores highest, each with its detections of score >=
    ``score_threshold`` (at most ``max_dets_per_image``, highest scores first): a list of (image_id, records)."""
    by_image = defaultdict(list)
    for r in records:
        if r.get("score", 0.0) >= score_threshold:
            by_image[r["image_id"]].append(r)
    ranked = sorted(by_image.items(), key=lambda kv: max(r["score"] for r in kv[1]), reverse=True)
    return [
        (image_id, sorted(dets, key=lambda r: r["score"], reverse=True)[:max_dets_per_image])
        for image_id, dets in ranked[:num_images]
    ]


def _read_image(path, width, height):
    from PIL import Image

    if path and os.path.exists(path):
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    logger.warning(f"Image {path} not found; drawing on a blank canvas")
    return np.full((int(height or 480), int(width or 640), 3), 255, dtype=np.uint8)


def _label(record):
    iou = record.get(RECORD_IOU)
    final = f"{iou:.2f}" if iou is not None else "?"
    if RECORD_BOX_INITIAL in record:
        initial = record.get(RECORD_IOU_INITIAL)
        return (f"{initial:.2f}" if initial is not None else "?") + "\u2192" + final
    return final


def draw_refinement_examples(
    results_json, coco_json, image_root, output_dir, num_images=6, score_threshold=0.3, max_dets_per_image=20
):
    """Draw, for ``num_images`` images (highest-scoring detections first), the ground truth (green), each detection's
    box before refinement (orange, dashed) and after (blue), labelled with the predicted IoUs ``before→after``.

    ``results_json``/``coco_json`` are paths (or the loaded list/dict). Writes one PNG per image into ``output_dir``
    and returns their paths.
    """
    from matplotlib.patches import Rectangle

    records = _load_json(results_json)
    dataset = _load_json(coco_json)
    images = {img["id"]: img for img in dataset.get("images", [])}
    categories = {c["id"]: c.get("name", str(c["id"])) for c in dataset.get("categories", [])}
    gt_by_image = defaultdict(list)
    for ann in dataset.get("annotations", []):
        gt_by_image[ann["image_id"]].append(ann)

    os.makedirs(output_dir, exist_ok=True)
    paths = []
    for rank, (image_id, dets) in enumerate(select_examples(records, num_images, score_threshold, max_dets_per_image)):
        info = images.get(image_id, {})
        file_name = info.get("file_name")
        image = _read_image(
            os.path.join(image_root, file_name) if file_name else None, info.get("width"), info.get("height")
        )
        h, w = image.shape[:2]
        scale = 8.0 / max(w, h)
        fig = _new_figure(max(w * scale, 2.0), max(h * scale, 2.0))
        ax = fig.add_axes([0, 0, 1, 1])
        ax.imshow(image)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.axis("off")
        for ann in gt_by_image.get(image_id, []):
            x, y, bw, bh = ann["bbox"]
            ax.add_patch(Rectangle((x, y), bw, bh, fill=False, edgecolor=GT_COLOR, linewidth=2.5))
        for det in dets:
            if RECORD_BOX_INITIAL in det:
                x, y, bw, bh = det[RECORD_BOX_INITIAL]
                ax.add_patch(
                    Rectangle((x, y), bw, bh, fill=False, edgecolor=INITIAL_COLOR, linewidth=2.2, linestyle="--")
                )
            x, y, bw, bh = det[RECORD_BOX]
            ax.add_patch(Rectangle((x, y), bw, bh, fill=False, edgecolor=REFINED_COLOR, linewidth=2.2))
            name = categories.get(det.get("category_id"), "")
            inside = y < 0.06 * h  # no room above the box: label inside it
            ax.text(
                x,
                y + 2 if inside else y - 2,
                f"{name} {_label(det)}".strip(),
                color="white",
                fontsize=8,
                va="top" if inside else "bottom",
                bbox=dict(facecolor=REFINED_COLOR, alpha=0.75, pad=1, edgecolor="none"),
            )
        ax.text(
            2,
            h - 2,
            "green: ground truth   orange (dashed): before refinement   blue: after",
            color="black",
            fontsize=7,
            va="bottom",
            bbox=dict(facecolor="white", alpha=0.7, pad=1, edgecolor="none"),
        )
        path = os.path.join(output_dir, f"refinement_{rank:02d}_image{image_id}.png")
        fig.savefig(path, format="png", dpi=100)
        paths.append(path)
    if not paths:
        logger.warning(f"No detection with score >= {score_threshold} in {results_json}: no picture written")
    return paths


def _column(bins, key) -> np.ndarray:
    """(B,) float64 of ``bin[key]`` over ``bins`` (None, as read back from json, becomes NaN)."""
    return np.asarray([np.nan if b.get(key) is None else b[key] for b in bins], dtype=np.float64)


def _save(fig, path) -> str:
    fig.tight_layout()
    with PathManager.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return path


def _count_axes(fig, cell, top, bins):
    """Bar plot, in the gridspec ``cell`` under the axes ``top``, of the detections per predicted-IoU bin, each bar
    labelled with its count."""
    low, high, count = _column(bins, "low"), _column(bins, "high"), _column(bins, "count")
    ax = fig.add_subplot(cell, sharex=top)
    ax.bar((low + high) / 2, count, width=(high - low) * 0.9, color="#7f7f7f")
    for x, n in zip((low + high) / 2, count):
        ax.text(x, n, f"{n:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, max(count.max(initial=0) * 1.25, 1))
    ax.set_ylabel("detections")
    return ax


def draw_reliability(reliability, output_dir) -> list:
    """Write ``iou_reliability.png`` (mean true IoU +- std per predicted-IoU bin against the diagonal, over the
    detections per bin) and, when the records were refined, ``refinement_gain_by_iou.png`` (mean change of true IoU
    and the share of detections improved / worsened per bin, over the counts) into ``output_dir``.

    ``reliability``: :func:`prroi_d2.evaluation.reliability.refinement_reliability`'s result (or read back from
    ``iounet_stages.json``); an empty one writes nothing. Returns the paths written.
    """
    if not reliability:
        return []
    bins = reliability["bins"]
    low, high = _column(bins, "low"), _column(bins, "high")
    centers, width = (low + high) / 2, high - low
    xlabel = f"predicted IoU ({reliability['source']})"

    fig = _new_figure(6, 6)
    grid = fig.add_gridspec(2, 1, height_ratios=(3, 1))
    ax = fig.add_subplot(grid[0])
    ax.plot([low[0], high[-1]], [low[0], high[-1]], "--", color="#7f7f7f", label="true = predicted")
    mean_pred, mean_true, std_true = (_column(bins, k) for k in ("mean_predicted", "mean_true", "std_true"))
    filled = _column(bins, "count") > 0
    ax.errorbar(mean_pred[filled], mean_true[filled], yerr=std_true[filled], fmt="o-", capsize=3, color=REFINED_COLOR,
                label="mean true IoU +- std per bin")  # fmt: skip
    ax.set_xlim(low[0], high[-1])
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("true IoU")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_title("Reliability of the predicted IoU")
    _count_axes(fig, grid[1], ax, bins).set_xlabel(xlabel)
    paths = [_save(fig, os.path.join(output_dir, "iou_reliability.png"))]
    if not reliability.get(REFINED):
        return paths

    fig = _new_figure(6, 6)
    grid = fig.add_gridspec(3, 1, height_ratios=(2, 1.5, 1))
    ax = fig.add_subplot(grid[0])
    gain = np.nan_to_num(_column(bins, "mean_true_gain"))
    ax.bar(centers, gain, width=width * 0.9, color=np.where(gain >= 0, GT_COLOR, "#d62728"))
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("mean true-IoU gain")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title("What refinement did to the true IoU, per predicted IoU")
    share = fig.add_subplot(grid[1], sharex=ax)
    for key, label, color, offset in (("improved_fraction", "improved", GT_COLOR, -0.25),
                                      ("worsened_fraction", "worsened", "#d62728", 0.25)):  # fmt: skip
        share.bar(centers + offset * width, np.nan_to_num(_column(bins, key)), width=width * 0.45, color=color,
                  label=label)  # fmt: skip
    share.set_ylim(0, 1)
    share.set_ylabel("share of bin")
    share.legend(loc="upper left", fontsize=8)
    _count_axes(fig, grid[2], ax, bins).set_xlabel(xlabel)
    paths.append(_save(fig, os.path.join(output_dir, "refinement_gain_by_iou.png")))
    return paths
