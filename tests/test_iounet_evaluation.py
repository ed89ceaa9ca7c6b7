"""IoUNetEvaluator and the refinement pictures, on a tiny COCO dataset written into tmp_path (CPU, real Detectron2 and
pycocotools). Detections are ground-truth boxes shifted sideways by known amounts, so their IoUs are known exactly."""

import contextlib
import importlib.util
import io
import json
import logging
import math
import os
import uuid

import numpy as np
import pytest

pytest.importorskip("detectron2")
pytest.importorskip("pycocotools")

import torch  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data.datasets import register_coco_instances  # noqa: E402
from detectron2.evaluation import print_csv_format, verify_results  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402
from reference import reference_box_iou  # noqa: E402

from prroi_d2.evaluation import (  # noqa: E402
    STAGE_METRICS,
    IoUNetEvaluator,
    ap_at_iou,
    coco_stage_metrics,
    draw_refinement_examples,
    format_stage_table,
    match_to_ground_truth,
    pearson,
)

W, H = 160, 128
CAT_IDS = (3, 7)  # dataset ids; contiguous 0, 1
# image id -> [(dataset category id, [x, y, w, h])]
GT = {
    1: [(3, [10, 10, 40, 40]), (7, [60, 10, 96, 100])],
    2: [(3, [20, 30, 20, 20]), (7, [50, 10, 100, 100])],
    3: [(3, [5, 5, 60, 60]), (3, [80, 60, 24, 24]), (7, [30, 70, 50, 40])],
    4: [(7, [10, 10, 30, 30])],
}
CROWD = (4, 3, [60, 60, 50, 50])
# Per ground-truth box (in GT order): IoU of the baseline box, IoU of the refined box, scores, predicted IoUs.
BASE_IOU = [0.97, 0.92, 0.87, 0.82, 0.77, 0.72, 0.57, 0.40]
REFINED_IOU = [0.991, 0.962, 0.985, 0.958, 0.975, 0.999, 0.968, 0.981]
SCORES = [0.55, 0.91, 0.62, 0.83, 0.97, 0.44, 0.76, 0.68]
PRED_IOU_INITIAL = [0.81, 0.85, 0.70, 0.74, 0.69, 0.66, 0.58, 0.52]
PRED_IOU_REFINED = [0.90, 0.86, 0.93, 0.84, 0.88, 0.95, 0.83, 0.91]
# A false positive (image 2, category 3, no overlap with any box), lowest score.
FALSE_POSITIVE = (2, 3, [100, 110, 20, 15], 0.30)


def shifted(box, iou):
    """``box`` moved right by dx so that its IoU with ``box`` is ``iou``: (w - dx) / (w + dx) = iou."""
    x, y, w, h = box
    dx = w * (1 - iou) / (1 + iou)
    return [x + dx, y, w, h]


def iou_xywh(a, b):
    return reference_box_iou([a[0], a[1], a[0] + a[2], a[1] + a[3]], [b[0], b[1], b[0] + b[2], b[1] + b[3]])


def gt_list():
    return [(img, cat, box) for img, anns in GT.items() for cat, box in anns]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("iounet_eval")
    image_root = root / "images"
    image_root.mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for img_id in GT:
        name = f"img{img_id}.png"
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(image_root / name)
        images.append({"id": img_id, "file_name": name, "width": W, "height": H})
    for img, cat, box in gt_list():
        annotations.append({"image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    img, cat, box = CROWD
    annotations.append({"image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": 1})
    for i, ann in enumerate(annotations):
        ann["id"] = i + 1
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 3, "name": "square"}, {"id": 7, "name": "rect"}],
    }
    json_file = root / "instances.json"
    json_file.write_text(json.dumps(coco))
    name = f"iounet_eval_test_{uuid.uuid4().hex[:8]}"
    register_coco_instances(name, {}, str(json_file), str(image_root))
    DatasetCatalog.get(name)  # loading sets thing_dataset_id_to_contiguous_id, as the test data loader would
    assert MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id == {3: 0, 7: 1}
    yield {"name": name, "json": str(json_file), "image_root": str(image_root)}
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def xyxy(boxes):
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return Boxes(torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1))


def make_instances(dets, initial=None):
    """dets: list of (category id, xywh box, score, pred_iou); initial: list of (xywh box, pred_iou) or None."""
    inst = Instances((H, W))
    inst.pred_boxes = xyxy([d[1] for d in dets])
    inst.scores = torch.tensor([d[2] for d in dets], dtype=torch.float32)
    inst.pred_classes = torch.tensor([CAT_IDS.index(d[0]) for d in dets], dtype=torch.int64)
    inst.pred_ious = torch.tensor([d[3] for d in dets], dtype=torch.float32)
    if initial is not None:
        inst.pred_boxes_initial = xyxy([i[0] for i in initial])
        inst.pred_ious_initial = torch.tensor([i[1] for i in initial], dtype=torch.float32)
    return inst


def stage_outputs(with_stages=True, empty=False):
    """Per image: (inputs, outputs) with baseline / iou_nms / refined stages built from the known shifts."""
    per_image = {img: {"baseline": [], "iou_nms": [], "refined": [], "initial": []} for img in GT}
    for k, (img, cat, box) in enumerate(gt_list()):
        base = shifted(box, BASE_IOU[k])
        per_image[img]["baseline"].append((cat, base, SCORES[k], PRED_IOU_INITIAL[k]))
        # IoU-guided NMS keeps the same boxes here but ranks them by true localisation quality.
        per_image[img]["iou_nms"].append((cat, base, 0.2 + 0.5 * BASE_IOU[k], PRED_IOU_INITIAL[k]))
        per_image[img]["refined"].append((cat, shifted(box, REFINED_IOU[k]), SCORES[k], PRED_IOU_REFINED[k]))
        per_image[img]["initial"].append((base, PRED_IOU_INITIAL[k]))
    img, cat, box, score = FALSE_POSITIVE
    for stage in ("baseline", "iou_nms", "refined"):
        per_image[img][stage].append((cat, box, score, 0.6))
    per_image[img]["initial"].append((box, 0.55))

    inputs, outputs = [], []
    for img, dets in per_image.items():
        inputs.append({"image_id": img, "height": H, "width": W})
        if empty:
            stages = {s: make_instances([], [] if s == "refined" else None) for s in ("baseline", "iou_nms", "refined")}
        else:
            stages = {
                "baseline": make_instances(dets["baseline"]),
                "iou_nms": make_instances(dets["iou_nms"]),
                "refined": make_instances(dets["refined"], dets["initial"]),
            }
        out = {"instances": stages["refined"]}
        if with_stages:
            out["stages"] = stages
        outputs.append(out)
    return inputs, outputs


@pytest.fixture(scope="module")
def evaluated(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("iounet_eval_out")
    evaluator = IoUNetEvaluator(dataset["name"], output_dir=str(out))
    evaluator.reset()
    inputs, outputs = stage_outputs()
    for i in range(0, len(inputs), 2):  # batches of 2 images
        evaluator.process(inputs[i : i + 2], outputs[i : i + 2])
    return evaluator.evaluate(), str(out)


def pycocotools_eval(json_file, results_file):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(json_file)
        dt = gt.loadRes(results_file)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def independent_ap(gt_json, records, threshold):
    """COCO-style AP (percent) at one IoU threshold, written from the definition: per category, greedy matching of
    detections in score order to the best unmatched ground truth with IoU >= threshold, 101-point interpolated
    precision, mean over categories. (No crowd overlaps or area ranges involved in the test data.)"""
    with open(gt_json) as f:
        gt = json.load(f)
    aps = []
    for cat in CAT_IDS:
        gts = [a for a in gt["annotations"] if a["category_id"] == cat and not a["iscrowd"]]
        dets = sorted([r for r in records if r["category_id"] == cat], key=lambda r: -r["score"])
        used = set()
        tp = []
        for d in dets:
            best, best_iou = None, threshold
            for g in gts:
                if g["image_id"] != d["image_id"] or g["id"] in used:
                    continue
                iou = iou_xywh(d["bbox"], g["bbox"])
                if iou >= best_iou:
                    best, best_iou = g["id"], iou
            tp.append(best is not None)
            if best is not None:
                used.add(best)
        tp = np.asarray(tp, dtype=np.float64)
        recall = np.cumsum(tp) / len(gts)
        precision = np.cumsum(tp) / np.arange(1, len(tp) + 1)
        precision = np.maximum.accumulate(precision[::-1])[::-1]
        values = []
        for r in np.linspace(0, 1, 101):
            idx = np.nonzero(recall >= r)[0]
            values.append(precision[idx[0]] if idx.size else 0.0)
        aps.append(np.mean(values))
    return 100 * float(np.mean(aps))


def test_metrics_equal_pycocotools_on_saved_results(dataset, evaluated):
    results, out = evaluated
    assert list(results) == ["baseline", "iou_nms", "refined", "localization"]
    for stage in ("baseline", "iou_nms", "refined"):
        assert list(results[stage]) == list(STAGE_METRICS)
        path = os.path.join(out, f"coco_instances_results_{stage}.json")
        ev = pycocotools_eval(dataset["json"], path)
        expected = dict(zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), ev.stats[:6] * 100))
        for metric, value in expected.items():
            assert results[stage][metric] == pytest.approx(value, abs=1e-9), (stage, metric)
        # AP50 as the mean of precision[t=0.5, :, :, area=all, maxDets=last] over entries > -1 is stats[1].
        p = ev.eval["precision"][0, :, :, 0, -1]
        assert np.mean(p[p > -1]) == pytest.approx(ev.stats[1], abs=1e-12)
        assert ap_at_iou(ev, 0.5) == pytest.approx(ev.stats[1] * 100, abs=1e-9)
        assert ap_at_iou(ev, 0.75) == pytest.approx(ev.stats[2] * 100, abs=1e-9)
        with open(path) as f:
            records = json.load(f)
        for metric, t in (("AP50", 0.5), ("AP60", 0.6), ("AP70", 0.7), ("AP75", 0.75), ("AP80", 0.8), ("AP90", 0.9)):
            assert results[stage][metric] == pytest.approx(independent_ap(dataset["json"], records, t), abs=1e-6), (
                stage,
                metric,
            )


def test_stage_rows_differ_as_the_boxes_do(evaluated):
    results, _ = evaluated
    # Refined boxes all have IoU > 0.95 and the false positive scores lowest: AP 100 at every threshold.
    for metric in STAGE_METRICS:
        assert results["refined"][metric] == pytest.approx(100.0), metric
    # Baseline: only 2 of 8 boxes reach IoU 0.9, one misses 0.5.
    assert results["baseline"]["AP90"] < 50
    assert results["baseline"]["AP50"] < 100
    assert results["baseline"]["AP90"] < results["baseline"]["AP70"] < results["baseline"]["AP50"]
    # Same boxes, better ranking: IoU-guided NMS' scores follow the true IoU, so its AP is at least baseline's.
    assert results["iou_nms"]["AP"] > results["baseline"]["AP"]


def test_localization_pearson(evaluated):
    results, _ = evaluated
    loc = results["localization"]
    # All 8 refined boxes match (IoU > 0.95); the false positive has no overlap.
    assert loc["num_matches"] == 8
    assert loc["iou_pearson"] == pytest.approx(np.corrcoef(PRED_IOU_REFINED, REFINED_IOU)[0, 1], abs=1e-6)
    # Before refinement the box at IoU 0.40 is not a match.
    keep = np.asarray(BASE_IOU) >= 0.5
    assert loc["num_matches_initial"] == keep.sum() == 7
    expected0 = np.corrcoef(np.asarray(PRED_IOU_INITIAL)[keep], np.asarray(BASE_IOU)[keep])[0, 1]
    assert loc["iou_pearson_initial"] == pytest.approx(expected0, abs=1e-6)
    assert loc["iou_pearson_baseline"] == pytest.approx(expected0, abs=1e-6)
    assert loc["iou_pearson_refined"] == pytest.approx(loc["iou_pearson"])
    mae = np.mean(np.abs(np.asarray(PRED_IOU_REFINED) - REFINED_IOU))
    assert loc["mean_abs_iou_error"] == pytest.approx(mae, abs=1e-6)


def test_match_to_ground_truth_helper(dataset):
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(dataset["json"])
    records = []
    for k, (img, cat, box) in enumerate(gt_list()):
        records.append({"image_id": img, "category_id": cat, "bbox": shifted(box, BASE_IOU[k]), "iou": SCORES[k]})
    # Exactly on the crowd box: crowd ground truth is never a match.
    records.append({"image_id": CROWD[0], "category_id": CROWD[1], "bbox": CROWD[2], "iou": 0.9})
    # Exactly on a category-7 box but labelled 3: no match across categories.
    records.append({"image_id": 1, "category_id": 3, "bbox": GT[1][1][1], "iou": 0.9})
    # Two ground truths of category 3 in image 3: the one of highest IoU is taken.
    records.append({"image_id": 3, "category_id": 3, "bbox": shifted(GT[3][1][1], 0.88), "iou": 0.1})
    true_iou, pred_iou = match_to_ground_truth(coco_gt, records)
    expected_true = [q for q in BASE_IOU if q >= 0.5] + [0.88]
    expected_pred = [s for s, q in zip(SCORES, BASE_IOU) if q >= 0.5] + [0.1]
    np.testing.assert_allclose(true_iou, expected_true, atol=1e-9)
    np.testing.assert_allclose(pred_iou, expected_pred)
    assert pearson(pred_iou, true_iou) == pytest.approx(np.corrcoef(expected_pred, expected_true)[0, 1])
    assert math.isnan(pearson([0.5], [0.7]))
    assert math.isnan(pearson([0.5, 0.6], [0.7, 0.7]))


def test_files_written(evaluated):
    results, out = evaluated
    for name in ("iounet_stages.json", "iounet_stages.md", "ap_vs_iou.png", "iou_histogram.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    for name in ("ap_vs_iou.png", "iou_histogram.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "iounet_stages.json")) as f:
        summary = json.load(f)
    assert summary["refined"]["AP90"] == pytest.approx(100.0)
    assert summary["baseline"] == pytest.approx(dict(results["baseline"]))
    assert summary["iou_pearson"] == pytest.approx(results["localization"]["iou_pearson"])
    curves = summary["ap_per_iou_threshold"]
    assert len(curves["iou_thresholds"]) == len(curves["baseline"]) == 10
    assert curves["baseline"][0] == pytest.approx(results["baseline"]["AP50"])
    assert curves["baseline"][8] == pytest.approx(results["baseline"]["AP90"])
    hist = summary["iou_histogram"]
    assert sum(hist["final"]) == 8 and sum(hist["initial"]) == 7
    assert hist["final"][-1] == 8  # every refined box has IoU in [0.95, 1]
    with open(os.path.join(out, "iounet_stages.md")) as f:
        md = f.read()
    assert "| stage | AP | AP50 | AP60 | AP70 | AP75 | AP80 | AP90 | APs | APm | APl |" in md
    assert f"| refined | {' | '.join(['100.00'] * 10)} |" in md
    assert format_stage_table(results) in md


def test_results_accepted_by_detectron2(evaluated, caplog):
    from detectron2.config import get_cfg

    results, _ = evaluated
    for task, metrics in results.items():
        assert all(isinstance(v, float) for v in metrics.values()), task
    with caplog.at_level(logging.INFO):
        print_csv_format(results)
    assert "copypaste: Task: refined" in caplog.text
    cfg = get_cfg()
    cfg.TEST.EXPECTED_RESULTS = [["refined", "AP90", 100.0, 0.01], ["localization", "num_matches", 8.0, 0.0]]
    assert verify_results(cfg, results)


def test_outputs_without_stages_are_one_final_stage(dataset, tmp_path):
    evaluator = IoUNetEvaluator(dataset["name"], output_dir=str(tmp_path), distributed=False)
    inputs, outputs = stage_outputs(with_stages=False)
    evaluator.process(inputs, outputs)
    results = evaluator.evaluate()
    assert list(results) == ["final", "localization"]
    assert results["final"]["AP"] == pytest.approx(100.0)
    assert os.path.exists(tmp_path / "coco_instances_results_final.json")
    # The "instances" are the refined ones here: their initial boxes are the baseline boxes.
    assert results["localization"]["num_matches_initial"] == 7


def test_stage_selection(dataset):
    evaluator = IoUNetEvaluator(dataset["name"], distributed=False, stages=["refined", "baseline"])
    evaluator.process(*stage_outputs())
    results = evaluator.evaluate()
    assert list(results) == ["refined", "baseline", "localization"]


def test_empty_detections(dataset, tmp_path, caplog):
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(dataset["json"])
    with caplog.at_level(logging.WARNING):
        metrics = coco_stage_metrics(coco_gt, [])
    assert metrics == {m: 0.0 for m in STAGE_METRICS}
    assert "No detections" in caplog.text

    evaluator = IoUNetEvaluator(dataset["name"], output_dir=str(tmp_path))
    evaluator.process(*stage_outputs(empty=True))
    results = evaluator.evaluate()
    for stage in ("baseline", "iou_nms", "refined"):
        assert results[stage] == {m: 0.0 for m in STAGE_METRICS}
    assert math.isnan(results["localization"]["iou_pearson"])
    assert results["localization"]["num_matches"] == 0
    assert (tmp_path / "iounet_stages.json").exists() and (tmp_path / "ap_vs_iou.png").exists()
    with open(tmp_path / "iounet_stages.json") as f:
        assert json.load(f)["iou_pearson"] is None  # NaN is written as null


def test_draw_refinement_examples(dataset, evaluated, tmp_path):
    _, out = evaluated
    results_json = os.path.join(out, "coco_instances_results_refined.json")
    paths = draw_refinement_examples(results_json, dataset["json"], dataset["image_root"], str(tmp_path / "a"), 2)
    assert len(paths) == 2
    # Images ranked by their best score: image 3 has the 0.97 detection, image 1 the 0.91 one.
    assert [os.path.basename(p) for p in paths] == ["refinement_00_image3.png", "refinement_01_image1.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # Nothing reaches the threshold: no picture.
    assert (
        draw_refinement_examples(results_json, dataset["json"], dataset["image_root"], str(tmp_path / "b"), 6, 0.99)
        == []
    )


def test_visualize_cli(dataset, evaluated, tmp_path, capsys):
    _, out = evaluated
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "visualize_refinement", os.path.join(root, "tools", "visualize_refinement.py")
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    results_json = os.path.join(out, "coco_instances_results_refined.json")
    argv = ["--results", results_json, "--num-images", "3", "--output", str(tmp_path / "json")]
    assert cli.main(argv + ["--json", dataset["json"], "--image-root", dataset["image_root"]]) == 0
    assert len(os.listdir(tmp_path / "json")) == 3
    argv = ["--results", results_json, "--num-images", "6", "--output", str(tmp_path / "registered")]
    assert cli.main(argv + ["--dataset", dataset["name"]]) == 0
    assert len(os.listdir(tmp_path / "registered")) == 4
    assert str(tmp_path / "registered") in capsys.readouterr().out
