"""Predicted vs true IoU over all detections of a stage (CPU, real Detectron2 and pycocotools): the evaluator's
Pearson r and mean |predicted - true IoU| against a plain-loop float64 reference, on a small COCO json with two
classes, two overlapping ground truths of one class, a crowd box and an image without ground truth."""

import json
import math
import os

import numpy as np
import pytest

pytest.importorskip("detectron2")
pytest.importorskip("pycocotools")

import torch  # noqa: E402
from coco_files import register_gt  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from reference import reference_true_iou  # noqa: E402

from prroi_d2.evaluation import IoUNetEvaluator, format_stage_table, iou_agreement  # noqa: E402

CATEGORIES = (2, 5)  # dataset ids; contiguous 0, 1
W, H = 200, 160
GT = {
    1: [(2, [10, 10, 40, 40], 0), (5, [60, 10, 50, 60], 0), (2, [20, 20, 30, 30], 0)],
    2: [(5, [5, 5, 80, 80], 0), (2, [100, 100, 40, 40], 1)],  # the second one is a crowd box
    3: [],
}
STAGES = ("baseline", "iou_nms", "refined")


def reference_agreement(annotations, records, box_key="bbox", iou_key="iou", min_iou=0.0):
    """(Pearson r, mean |pred - true|, n) over the records with true IoU >= min_iou, from the textbook formulas."""
    pairs = []
    for record in records:
        true = reference_true_iou(annotations, record["image_id"], record["category_id"], record[box_key])
        if true >= min_iou:
            pairs.append((float(record[iou_key]), true))
    n = len(pairs)
    mean_p = sum(p for p, _ in pairs) / n
    mean_t = sum(t for _, t in pairs) / n
    cov = sum((p - mean_p) * (t - mean_t) for p, t in pairs)
    var_p = sum((p - mean_p) ** 2 for p, _ in pairs)
    var_t = sum((t - mean_t) ** 2 for _, t in pairs)
    return cov / math.sqrt(var_p * var_t), sum(abs(p - t) for p, t in pairs) / n, n


def check_against_reference(loc, annotations, results_of_stage, localization_stage):
    """Every per-stage agreement key of the evaluator's ``localization`` dict equals the plain-loop reference."""
    for stage, records in results_of_stage.items():
        suffixes = [f"_{stage}"] + ([""] if stage == localization_stage else [])
        for suffix in suffixes:
            r_all, mae_all, n_all = reference_agreement(annotations, records)
            assert loc[f"iou_pearson_all{suffix}"] == pytest.approx(r_all, rel=1e-9, abs=1e-12), (stage, suffix)
            assert loc[f"iou_mae_all{suffix}"] == pytest.approx(mae_all, rel=1e-9, abs=1e-12), (stage, suffix)
            assert loc[f"num_detections{suffix}"] == n_all == len(records)
            r, mae, n = reference_agreement(annotations, records, min_iou=0.5)
            assert loc[f"iou_pearson{suffix}"] == pytest.approx(r, rel=1e-9, abs=1e-12), (stage, suffix)
            assert loc[f"mean_abs_iou_error{suffix}"] == pytest.approx(mae, rel=1e-9, abs=1e-12), (stage, suffix)
            assert loc[f"num_matches{suffix}"] == n
    records = results_of_stage[localization_stage]
    r_all, mae_all, n_all = reference_agreement(annotations, records, "bbox_initial", "iou_initial")
    assert loc["iou_pearson_all_initial"] == pytest.approx(r_all, rel=1e-9, abs=1e-12)
    assert loc["iou_mae_all_initial"] == pytest.approx(mae_all, rel=1e-9, abs=1e-12)
    assert loc["num_detections_initial"] == n_all
    r, mae, n = reference_agreement(annotations, records, "bbox_initial", "iou_initial", min_iou=0.5)
    assert loc["iou_pearson_initial"] == pytest.approx(r, rel=1e-9, abs=1e-12)
    assert loc["num_matches_initial"] == n


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("iou_stats")
    name, json_file, annotations = register_gt(root, "small.json", GT, W, H, CATEGORIES, "iou_stats_test")
    DatasetCatalog.get(name)
    yield {"name": name, "json": json_file, "annotations": annotations}
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def random_detections(rng, img, num):
    """``num`` detections in image ``img``: around its ground truth (either class label) or anywhere."""
    targets = [box for _, box, _ in GT[img]]
    boxes = []
    for _ in range(num):
        if targets and rng.random() < 0.7:
            x, y, w, h = targets[rng.integers(len(targets))]
            boxes.append([x + rng.normal(0, 0.15 * w), y + rng.normal(0, 0.15 * h), w * rng.uniform(0.7, 1.3), h])
        else:
            boxes.append([*rng.uniform(0, 150, size=2), *rng.uniform(5, 50, size=2)])
    return torch.tensor(boxes, dtype=torch.float64)


def xyxy(xywh):
    return Boxes(torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1))


def test_all_detection_statistics_equal_plain_loop_reference(small, tmp_path):
    rng = np.random.default_rng(7)
    evaluator = IoUNetEvaluator(small["name"], output_dir=str(tmp_path), distributed=False)
    for img in GT:
        stages = {}
        for stage in STAGES:
            num = 12
            inst = Instances((H, W))
            inst.pred_boxes = xyxy(random_detections(rng, img, num))
            inst.scores = torch.tensor(rng.uniform(0.05, 1, num), dtype=torch.float32)
            inst.pred_classes = torch.tensor(rng.integers(0, 2, num), dtype=torch.int64)
            inst.pred_ious = torch.tensor(rng.uniform(0, 1, num), dtype=torch.float32)
            if stage == "refined":
                inst.pred_boxes_initial = xyxy(random_detections(rng, img, num))
                inst.pred_ious_initial = torch.tensor(rng.uniform(0, 1, num), dtype=torch.float32)
            stages[stage] = inst
        if img == 2:  # exactly on the crowd box, with its class: crowd ground truth never counts
            stages["refined"].pred_boxes.tensor[0] = torch.tensor([100.0, 100.0, 140.0, 140.0])
            stages["refined"].pred_classes[0] = 0
        evaluator.process([{"image_id": img}], [{"instances": stages["refined"], "stages": stages}])
    results = evaluator.evaluate()
    loc = results["localization"]
    records = {}
    for stage in STAGES:
        with open(os.path.join(tmp_path, f"coco_instances_results_{stage}.json")) as f:
            records[stage] = json.load(f)
    crowd_record = next(r for r in records["refined"] if r["image_id"] == 2 and r["bbox"] == [100.0, 100.0, 40.0, 40.0])
    assert (
        reference_true_iou(
            small["annotations"], crowd_record["image_id"], crowd_record["category_id"], crowd_record["bbox"]
        )
        == 0.0
    )
    # The data exercise every case: unmatched detections (true IoU 0 and in (0, 0.5)) and matches.
    true = [
        reference_true_iou(small["annotations"], r["image_id"], r["category_id"], r["bbox"])
        for r in records["baseline"]
    ]
    assert min(true) == 0.0 and any(0 < t < 0.5 for t in true) and sum(t >= 0.5 for t in true) >= 5
    check_against_reference(loc, small["annotations"], records, "refined")
    # Unmatched detections make the all-detection statistics differ from the matched ones.
    assert loc["num_detections"] == 36 > loc["num_matches"]
    assert loc["iou_mae_all"] != pytest.approx(loc["mean_abs_iou_error"])

    with open(tmp_path / "iounet_stages.json") as f:
        summary = json.load(f)
    for key in ("iou_pearson_all", "iou_pearson_all_initial", "iou_mae_all", "iou_mae_all_initial"):
        assert summary[key] == pytest.approx(loc[key]), key
    for stage in STAGES:
        assert summary["localization"][f"iou_mae_all_{stage}"] == pytest.approx(loc[f"iou_mae_all_{stage}"])
    table = format_stage_table(results)
    assert "| boxes | n matched | Pearson r | mean abs err | n all | Pearson r (all) | mean abs err (all) |" in table
    row = f"| refined | {loc['num_matches']:.0f} | {loc['iou_pearson']:.4f} | {loc['mean_abs_iou_error']:.4f} | 36 |"
    assert row in table
    assert f"| refined, before refinement | {loc['num_matches_initial']:.0f} |" in table
    with open(tmp_path / "iounet_stages.md") as f:
        assert table in f.read()


def test_iou_agreement_edge_cases():
    empty = iou_agreement([], [])
    assert empty["num"] == empty["num_all"] == 0
    assert all(math.isnan(empty[k]) for k in ("pearson", "mean_abs_error", "pearson_all", "mean_abs_error_all"))
    # No match: matched statistics undefined, all-detection ones defined.
    a = iou_agreement([0.0, 0.2, 0.4], [0.1, 0.5, 0.6])
    assert a["num"] == 0 and math.isnan(a["pearson"])
    assert a["mean_abs_error_all"] == pytest.approx((0.1 + 0.3 + 0.2) / 3)
    assert a["pearson_all"] == pytest.approx(np.corrcoef([0.1, 0.5, 0.6], [0.0, 0.2, 0.4])[0, 1])
