"""Reliability of the predicted IoU and the gain of refinement per predicted-IoU bin (CPU, real Detectron2 evaluator
and pycocotools on a hand-written COCO json): the evaluator's ``"reliability"`` json, markdown table and pictures
against a plain-loop float64 reference, with empty bins, detections without a matching ground truth (wrong class, an
image without ground truth, a crowd box) and refined boxes that get better, worse or stay put."""

import json
import math
import os

import pytest

pytest.importorskip("detectron2")
pytest.importorskip("pycocotools")

import torch  # noqa: E402
from coco_files import register_gt  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from reference import reference_true_iou  # noqa: E402

from prroi_d2.evaluation.iounet_evaluator import IoUNetEvaluator  # noqa: E402
from prroi_d2.evaluation.reliability import refinement_reliability, reliability_bins  # noqa: E402

CATEGORIES = (1, 2)  # dataset ids; contiguous 0, 1
W, H = 100, 80
# image -> [(category id, XYWH, iscrowd)]; image 3 has no ground truth.
GT = {
    1: [(1, [0, 0, 10, 10], 0), (2, [20, 20, 10, 10], 0)],
    2: [(1, [0, 0, 20, 20], 0), (1, [50, 50, 10, 10], 1)],
    3: [],
}
# Detections of the refined stage: (image, category id, box before refinement, its predicted IoU, refined box).
DETECTIONS = [
    (1, 1, [0, 0, 10, 10], 0.95, [1, 0, 10, 10]),  # true 1.0 -> 0.82: worse
    (1, 1, [2, 2, 10, 10], 0.92, [1, 1, 10, 10]),  # true 0.47 -> 0.68: better
    (1, 1, [20, 20, 10, 10], 0.55, [21, 21, 10, 10]),  # on a ground truth of the other class: 0 -> 0
    (3, 1, [5, 5, 10, 10], 0.15, [6, 6, 10, 10]),  # image without ground truth: 0 -> 0
    (2, 1, [0, 0, 10, 20], 0.5, [0, 0, 15, 20]),  # on an inner edge (bin 0.5-0.6); true 0.5 -> 0.75: better
    (2, 1, [50, 50, 10, 10], 0.35, [50, 50, 10, 10]),  # exactly on the crowd box: 0, unchanged
    (2, 2, [0, 0, 20, 20], 0.0, [0, 0, 20, 20]),  # predicted IoU 0 (first edge), no ground truth of class 2 here
    (1, 2, [20, 20, 10, 10], 1.0, [20, 20, 10, 12]),  # predicted IoU 1 (last edge, closed): true 1.0 -> 0.83: worse
]
NUM_BINS = 10


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    name, json_file, annotations = register_gt(root, "tiny.json", GT, W, H, CATEGORIES, "reliability_test")
    yield {"name": name, "json": json_file, "annotations": annotations}
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def reference_bins(triples):
    """Per bin b of [b/10, (b+1)/10) (the last one closed): count, mean predicted, mean / population std of the true
    IoU, mean gain, improved / worsened share of (predicted, true initial, true refined) triples; None if empty."""
    rows = []
    for b in range(NUM_BINS):
        low, high = b / NUM_BINS, (b + 1) / NUM_BINS
        members = [t for t in triples if low <= t[0] < high or (b == NUM_BINS - 1 and t[0] == high)]
        n = len(members)
        if n == 0:
            rows.append({"count": 0})
            continue
        mean_true = sum(t[1] for t in members) / n
        rows.append(
            {
                "count": n,
                "mean_predicted": sum(t[0] for t in members) / n,
                "mean_true": mean_true,
                "std_true": math.sqrt(sum((t[1] - mean_true) ** 2 for t in members) / n),
                "mean_true_gain": sum(t[2] - t[1] for t in members) / n,
                "improved_fraction": sum(1 for t in members if t[2] > t[1]) / n,
                "worsened_fraction": sum(1 for t in members if t[2] < t[1]) / n,
            }
        )
    return rows


def instances(dets, refined):
    """The ``Instances`` of one image's detections (contiguous classes), with the boxes before refinement if
    ``refined``, else the initial boxes as the stage's own."""

    def xyxy(boxes):
        t = torch.tensor(boxes, dtype=torch.float64)
        return Boxes(torch.cat([t[:, :2], t[:, :2] + t[:, 2:]], dim=1))

    inst = Instances((H, W))
    inst.pred_boxes = xyxy([d[4] if refined else d[2] for d in dets])
    inst.scores = torch.linspace(0.9, 0.5, len(dets))
    inst.pred_classes = torch.tensor([CATEGORIES.index(d[1]) for d in dets], dtype=torch.int64)
    inst.pred_ious = torch.tensor([d[3] for d in dets], dtype=torch.float32)
    if refined:
        inst.pred_boxes_initial = xyxy([d[2] for d in dets])
        inst.pred_ious_initial = torch.tensor([d[3] for d in dets], dtype=torch.float32)
    return inst


def evaluate(dataset, output_dir, stages):
    evaluator = IoUNetEvaluator(dataset["name"], output_dir=str(output_dir), distributed=False, stages=stages)
    for img in GT:
        dets = [d for d in DETECTIONS if d[0] == img]
        found = {"iou_nms": instances(dets, refined=False), "refined": instances(dets, refined=True)}
        evaluator.process([{"image_id": img}], [{"instances": found["refined"], "stages": found}])
    evaluator.evaluate()
    with open(os.path.join(output_dir, "iounet_stages.json")) as f:
        return json.load(f)


def check_bins(bins, expected, refined):
    assert len(bins) == NUM_BINS
    for b, (got, want) in enumerate(zip(bins, expected)):
        assert got["low"] == pytest.approx(b / NUM_BINS) and got["high"] == pytest.approx((b + 1) / NUM_BINS)
        assert got["count"] == want["count"], b
        for key in ("mean_predicted", "mean_true", "std_true", "mean_true_gain", "improved_fraction",
                    "worsened_fraction"):  # fmt: skip
            if want["count"] == 0 or (not refined and key in ("mean_true_gain", "improved_fraction",
                                                               "worsened_fraction")):  # fmt: skip
                assert got[key] is None, (b, key)  # NaN, written as null
            else:
                assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), (b, key)


def png_written(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000


def test_reliability_of_refined_stage_equals_plain_loop_reference(dataset, tmp_path):
    summary = evaluate(dataset, tmp_path, ("iou_nms", "refined"))
    with open(tmp_path / "coco_instances_results_refined.json") as f:
        records = json.load(f)
    assert len(records) == len(DETECTIONS)
    triples = [
        (
            float(r["iou_initial"]),  # as written (float32 predictions widened to float64)
            reference_true_iou(dataset["annotations"], r["image_id"], r["category_id"], r["bbox_initial"]),
            reference_true_iou(dataset["annotations"], r["image_id"], r["category_id"], r["bbox"]),
        )
        for r in records
    ]
    # The data cover every case: unmatched boxes, refined boxes better, worse and unchanged, and empty bins.
    assert sum(t[1] == 0 for t in triples) == 4
    assert sum(t[2] > t[1] for t in triples) == 2 and sum(t[2] < t[1] for t in triples) == 2
    expected = reference_bins(triples)
    assert [row["count"] for row in expected] == [1, 1, 0, 1, 0, 2, 0, 0, 0, 3]

    reliability = summary["reliability"]
    assert reliability["stage"] == "refined" and reliability["predicted_key"] == "iou_initial"
    assert reliability["refined"] is True
    check_bins(reliability["bins"], expected, refined=True)
    overall = reliability["all"]
    n = len(triples)
    assert overall["count"] == n
    assert overall["mean_true"] == pytest.approx(sum(t[1] for t in triples) / n, rel=1e-9)
    assert overall["mean_true_gain"] == pytest.approx(sum(t[2] - t[1] for t in triples) / n, rel=1e-9)
    assert overall["improved_fraction"] == overall["worsened_fraction"] == pytest.approx(2 / n)

    with open(tmp_path / "iounet_stages.md") as f:
        markdown = f.read()
    top = expected[-1]
    row = (
        f"| 0.9-1.0 | 3 | {top['mean_predicted']:.3f} | {top['mean_true']:.3f} | {top['std_true']:.3f} | "
        f"{top['mean_true_gain']:.4f} | {top['improved_fraction']:.3f} | {top['worsened_fraction']:.3f} |"
    )
    assert row in markdown
    assert "| 0.2-0.3 | 0 | - | - | - | - | - | - |" in markdown
    for name in ("iou_reliability.png", "refinement_gain_by_iou.png", "ap_vs_iou.png"):
        assert png_written(tmp_path / name), name


def test_without_refinement_bins_the_iou_nms_stage(dataset, tmp_path):
    summary = evaluate(dataset, tmp_path, ("iou_nms",))
    reliability = summary["reliability"]
    assert reliability["stage"] == "iou_nms" and reliability["predicted_key"] == "iou"
    assert reliability["refined"] is False
    with open(tmp_path / "coco_instances_results_iou_nms.json") as f:
        records = json.load(f)
    triples = [
        (float(r["iou"]), reference_true_iou(dataset["annotations"], r["image_id"], r["category_id"], r["bbox"]), 0.0)
        for r in records
    ]
    check_bins(reliability["bins"], reference_bins(triples), refined=False)
    assert png_written(tmp_path / "iou_reliability.png")
    assert not os.path.exists(tmp_path / "refinement_gain_by_iou.png")
    with open(tmp_path / "iounet_stages.md") as f:
        assert "(no refinement in these records)" in f.read()


def test_refinement_reliability_edge_cases(dataset):
    coco = COCO(dataset["json"])
    assert refinement_reliability(coco, {}) == {}
    assert refinement_reliability(coco, {"refined": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}]}) == {}
    with pytest.raises(ValueError, match="true_iou has 1"):
        reliability_bins([0.5, 0.6], [0.5])
    # Predicted IoUs outside [0, 1] fall into the end bins.
    bins = reliability_bins([-0.2, 1.3], [0.1, 0.9])
    assert [b["count"] for b in bins] == [1] + [0] * 8 + [1]
