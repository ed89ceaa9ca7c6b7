"""IoUNetEvaluator on a dense scene (CPU, real Detectron2 and pycocotools): one image with 300 ground-truth boxes, as in
aerial tree crowns, where COCO's default cap of 100 detections per image hides two thirds of the objects. The AP of each
stage at ``max_dets_per_image=400`` must equal pycocotools' own computation at that cap."""

import contextlib
import io
import json
import logging
import os
import uuid

import numpy as np
import pytest

pytest.importorskip("detectron2")
pytest.importorskip("pycocotools")

import torch  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data.datasets import register_coco_instances  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from prroi_d2.evaluation import IoUNetEvaluator, coco_max_dets  # noqa: E402

CATEGORY = 4
DENSE_IMAGE, SPARSE_IMAGE = 11, 12
W, H = 2000, 1500
NUM_DENSE = 300  # a 20 x 15 grid, 100 px apart, boxes 16..60 px: small and medium COCO areas
STAGES = ("baseline", "iou_nms", "refined")


def grid_boxes(rng):
    boxes = []
    for row in range(15):
        for col in range(20):
            w, h = rng.uniform(16, 60, size=2)
            boxes.append([col * 100 + 10.0, row * 100 + 10.0, float(w), float(h)])
    return boxes


def shifted(box, iou):
    """``box`` moved right so that its IoU with ``box`` is ``iou``."""
    x, y, w, h = box
    return [x + w * (1 - iou) / (1 + iou), y, w, h]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense_eval")
    rng = np.random.default_rng(3)
    gt = {DENSE_IMAGE: grid_boxes(rng), SPARSE_IMAGE: [[20.0, 30.0, 50.0, 40.0], [300.0, 200.0, 120.0, 90.0]]}
    annotations = [
        {"image_id": img, "category_id": CATEGORY, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
        for img, boxes in gt.items()
        for box in boxes
    ]
    for i, ann in enumerate(annotations):
        ann["id"] = i + 1
    coco = {
        "images": [{"id": img, "file_name": f"{img}.png", "width": W, "height": H} for img in gt],
        "annotations": annotations,
        "categories": [{"id": CATEGORY, "name": "crown"}],
    }
    json_file = root / "dense.json"
    json_file.write_text(json.dumps(coco))
    name = f"dense_eval_test_{uuid.uuid4().hex[:8]}"
    register_coco_instances(name, {}, str(json_file), str(root))
    DatasetCatalog.get(name)
    assert len(gt[DENSE_IMAGE]) == NUM_DENSE

    # Per stage and image: detections of known IoU with their object (plus 20 false positives in the dense image).
    detections = {}
    for stage, (low, high) in zip(STAGES, ((0.52, 0.95), (0.52, 0.95), (0.6, 0.99))):
        detections[stage] = {}
        for img, boxes in gt.items():
            ious = rng.uniform(low, high, size=len(boxes))
            dets = [
                (shifted(b, q), float(rng.uniform(0.3, 1)), float(rng.uniform(0.3, 1))) for b, q in zip(boxes, ious)
            ]
            initial = [(shifted(b, q * 0.9), float(rng.uniform(0.3, 1.0))) for b, q in zip(boxes, ious)]
            if img == DENSE_IMAGE:
                for k in range(20):  # in the gaps between crowns: no ground truth overlaps them
                    dets.append(([k * 100 + 75.0, 1475.0, 20.0, 20.0], float(rng.uniform(0.0, 0.5)), 0.2))
                    initial.append(([k * 100 + 74.0, 1474.0, 20.0, 20.0], 0.3))
            detections[stage][img] = (dets, initial)
    yield {"name": name, "json": str(json_file), "detections": detections}
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def instances(dets, initial):
    inst = Instances((H, W))
    b = torch.tensor([d[0] for d in dets], dtype=torch.float64)
    inst.pred_boxes = Boxes(torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1))
    inst.scores = torch.tensor([d[1] for d in dets], dtype=torch.float32)
    inst.pred_classes = torch.zeros(len(dets), dtype=torch.int64)
    inst.pred_ious = torch.tensor([d[2] for d in dets], dtype=torch.float32)
    b0 = torch.tensor([i[0] for i in initial], dtype=torch.float64)
    inst.pred_boxes_initial = Boxes(torch.cat([b0[:, :2], b0[:, :2] + b0[:, 2:]], dim=1))
    inst.pred_ious_initial = torch.tensor([i[1] for i in initial], dtype=torch.float32)
    return inst


def run_evaluator(dense, output_dir, **kwargs):
    evaluator = IoUNetEvaluator(dense["name"], output_dir=str(output_dir), distributed=False, **kwargs)
    for img in (DENSE_IMAGE, SPARSE_IMAGE):
        stages = {s: instances(*dense["detections"][s][img]) for s in STAGES}
        evaluator.process([{"image_id": img}], [{"instances": stages["refined"], "stages": stages}])
    return evaluator.evaluate()


def pycocotools_at_cap(json_file, results_file, max_dets):
    """pycocotools run by hand with maxDets [1, 10, max_dets]: returns the COCOeval after summarize()."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(json_file)
        ev = COCOeval(gt, gt.loadRes(results_file), "bbox")
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.fixture(scope="module")
def evaluated_400(dense, tmp_path_factory):
    out = tmp_path_factory.mktemp("dense_400")
    return run_evaluator(dense, out, max_dets_per_image=400), str(out)


def test_coco_max_dets():
    assert coco_max_dets() == coco_max_dets(None) == [1, 10, 100]
    assert coco_max_dets(400) == [1, 10, 400]
    assert coco_max_dets(5) == [1, 5] and coco_max_dets(1) == [1]  # the cap is always the last entry
    for bad in (0, -3, 2.5, "400", True):
        with pytest.raises(ValueError, match="max_dets_per_image"):
            coco_max_dets(bad)
    with pytest.raises(ValueError, match="max_dets_per_image"):
        IoUNetEvaluator("coco_2017_val", max_dets_per_image=0)


def test_dense_ap_equals_pycocotools_at_400(dense, evaluated_400):
    results, out = evaluated_400
    with open(os.path.join(out, "iounet_stages.json")) as f:
        assert json.load(f)["max_dets_per_image"] == 400
    for stage in STAGES:
        ev = pycocotools_at_cap(dense["json"], os.path.join(out, f"coco_instances_results_{stage}.json"), 400)
        assert ev.params.maxDets[-1] == 400
        # stats[1..5] (AP50, AP75, APs, APm, APl) are read at maxDets[2] = 400 by summarize().
        expected = dict(zip(("AP50", "AP75", "APs", "APm", "APl"), ev.stats[1:6] * 100))
        # AP over 0.50:0.95 at the cap, from the precision array (summarize's stats[0] looks for maxDets=100).
        p = ev.eval["precision"][:, :, :, 0, -1]
        expected["AP"] = 100 * np.mean(p[p > -1])
        for t, metric in ((0.6, "AP60"), (0.7, "AP70"), (0.8, "AP80"), (0.9, "AP90")):
            t_index = int(np.argmin(np.abs(ev.params.iouThrs - t)))
            p = ev.eval["precision"][t_index, :, :, 0, -1]
            expected[metric] = 100 * np.mean(p[p > -1])
        for metric, value in expected.items():
            assert results[stage][metric] == pytest.approx(value, abs=1e-9), (stage, metric)
        # All 302 objects are found at IoU 0.5 (recall 1 at the cap): AP50 is high.
        assert ev.eval["recall"][0, 0, 0, -1] == pytest.approx(1.0)
        assert results[stage]["AP50"] > 90
    assert results["refined"]["AP90"] > results["baseline"]["AP90"]


def test_cap_of_100_lowers_recall(dense, tmp_path, evaluated_400, caplog):
    with caplog.at_level(logging.WARNING, logger="prroi_d2"):
        results_100 = run_evaluator(dense, tmp_path)
    assert "more than max_dets_per_image=100" in caplog.text
    results_400, _ = evaluated_400
    ev = pycocotools_at_cap(dense["json"], str(tmp_path / "coco_instances_results_baseline.json"), 100)
    # At most 100 of the dense image's 300 crowns + the sparse image's 2 can be found.
    assert ev.eval["recall"][0, 0, 0, -1] <= 102 / 302 + 1e-9
    assert results_100["baseline"]["AP50"] == pytest.approx(ev.stats[1] * 100, abs=1e-9)
    for stage in STAGES:
        assert results_100[stage]["AP50"] < 40 < 90 < results_400[stage]["AP50"], stage


def test_dense_iou_statistics_equal_plain_loop_reference(dense, evaluated_400):
    from test_iou_statistics import check_against_reference

    results, out = evaluated_400
    with open(dense["json"]) as f:
        annotations = json.load(f)["annotations"]
    records = {}
    for stage in STAGES:
        with open(os.path.join(out, f"coco_instances_results_{stage}.json")) as f:
            records[stage] = json.load(f)
    check_against_reference(results["localization"], annotations, records, "refined")
    # 20 false positives per stage: counted over all detections, not among the matches.
    assert results["localization"]["num_detections_baseline"] == 322
    assert results["localization"]["num_matches_baseline"] == 302
