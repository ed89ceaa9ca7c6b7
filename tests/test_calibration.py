"""Calibrated refinement (prroi_d2.engine.calibration) on real COCO files and a real Detectron2 model (CPU).

1. The choice: on a held-out set where the IoU head is trustworthy for boxes it rates below 0.9 and wrong above (its
   refinements there move boxes away from their objects), the calibration keeps refinement with the IoU range that
   excludes them, and the chosen setting is safe by the rule.
2. Consistency: the held-out table's post-hoc acceptance rule gives exactly the detections the model itself returns
   with that setting (a random-weight model, real inference on synthetic images).
3. The chosen setting lands in OUTPUT_DIR/config.yaml and is read back by a fresh config.
"""

import json
import os
import sys

import pytest
import tool_processes

pytest.importorskip("detectron2")
pytest.importorskip("pycocotools")

import torch  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader  # noqa: E402
from detectron2.data.datasets import register_coco_instances  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from prroi_d2 import add_iounet_config  # noqa: E402
from prroi_d2.data.synthetic import register_synthetic_datasets  # noqa: E402
from prroi_d2.engine import calibration  # noqa: E402
from prroi_d2.engine.calibration import CalibrationSetting, apply_setting, calibrate_and_save  # noqa: E402
from prroi_d2.modeling.refine_acceptance import accepted_mask  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**grid):
    cfg = get_cfg()
    add_iounet_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "iounet_synthetic_R18.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 96, 128
    for key, value in grid.items():
        cfg.MODEL.IOU_NET.CALIBRATION[key] = value
    return cfg


def _write_gt(path, num_images=12):
    """One 100 x 100 box per image (category 1), images 200 x 200 (the files are never read)."""
    images = [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 200} for i in range(1, num_images + 1)]
    annotations = [
        {"id": i, "image_id": i, "category_id": 1, "bbox": [50, 50, 100, 100], "area": 10000, "iscrowd": 0}
        for i in range(1, num_images + 1)
    ]
    categories = [{"id": c, "name": f"c{c}"} for c in range(1, 6)]
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def _image(image_id, initial, refined, p0, p1, score):
    as_t = torch.tensor
    return {
        "image_id": image_id,
        "baseline": {"boxes": as_t([initial]), "scores": as_t([score]), "classes": as_t([0]), "ious": as_t([p0])},
        "plain": {"boxes": as_t([initial]), "scores": as_t([score]), "classes": as_t([0]), "ious": as_t([p0])},
        "refined": {
            "boxes": as_t([refined]),
            "scores": as_t([score]),
            "classes": as_t([0]),
            "ious": as_t([p1]),
            "boxes_initial": as_t([initial]),
            "ious_initial": as_t([p0]),
        },
    }


def _held_out_detections(step):
    """Per image one detection of the object [50, 50, 150, 150], shifted sideways by d px (IoU (100 - d) / (100 + d)).
    Images 1-6 (the higher scores): 2 px off (IoU 0.96), rated 0.95; refinement moves them 9 * step px further
    away (rated 0.97): the head is wrong above 0.9. Images 7-12: 11 px off (IoU 0.80), rated 0.7; refinement moves
    them 7.5 * step px closer (rated 0.8)."""
    images = []
    for i in range(1, 13):
        good = i > 6
        d0 = 11.0 if good else 2.0
        d1 = d0 - 7.5 * step if good else d0 + 9.0 * step
        initial, refined = [50.0 + d0, 50.0, 150.0 + d0, 150.0], [50.0 + d1, 50.0, 150.0 + d1, 150.0]
        images.append(_image(i, initial, refined, 0.7 if good else 0.95, 0.8 if good else 0.97, 0.9 - 0.01 * i))
    return images


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("calibration") / "held_out.json")
    _write_gt(path)
    name = "calibration_test_held_out"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, path, os.path.dirname(path))
    return name


def test_calibration_excludes_the_range_where_the_head_is_wrong(held_out, tmp_path):
    cfg = _cfg(STEPS=[0.5, 1.0], MAX_ITERS=[5], MARGINS=[0.0, 0.05], IOU_RANGES=[[0.0, 1.0], [0.0, 0.9]])
    model = build_model(cfg)

    def collect(nms, step, max_iter):
        return _held_out_detections(step)

    chosen, rows = calibration.calibrate(model, cfg, held_out, None, collect=collect)
    by_name = {r["setting"]: r for r in rows}
    baseline = by_name["baseline"]
    # Unrestricted refinement costs AP and AP90 (the best-scored half moves away), so it is not safe ...
    unrestricted = by_name[CalibrationSetting(True, True, 1.0, 5).name]
    assert unrestricted["AP90"] < baseline["AP90"] and unrestricted["AP"] < baseline["AP"]
    assert not unrestricted["safe"]
    # ... refinement of the boxes rated <= 0.9 only is, and is chosen.
    assert chosen.refine and chosen.iou_range == (0.0, 0.9) and chosen.step == 1.0
    row = by_name[chosen.name]
    assert row["chosen"] and row["safe"]
    assert row["AP"] >= baseline["AP"] + calibration.MIN_AP_GAIN
    assert all(row[m] >= baseline[m] for m in ("AP75", "AP90"))
    assert sum(r["chosen"] for r in rows) == 1
    assert max(r["AP"] for r in rows if r["safe"]) == row["AP"]


def test_no_safe_setting_switches_refinement_off(held_out):
    cfg = _cfg(STEPS=[1.0], MAX_ITERS=[5], MARGINS=[0.0], IOU_RANGES=[[0.0, 1.0]])
    model = build_model(cfg)

    def collect(nms, step, max_iter):
        images = _held_out_detections(step)
        for image in images:  # every refinement moves boxes away
            image["refined"]["boxes"] = image["refined"]["boxes_initial"] + torch.tensor([[-15.0, 0, -15.0, 0]])
        return images

    chosen, rows = calibration.calibrate(model, cfg, held_out, None, collect=collect)
    assert not chosen.refine and not any(r["safe"] for r in rows)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("calibration_synthetic"))
    register_synthetic_datasets(root=root, num_train=1, num_val=1, prefix="calibration_synth", num_holdout=6)
    return "calibration_synth_holdout"


def _detections(model, loader):
    out = []
    with torch.no_grad():
        model.eval()
        for inputs in loader:
            for inp, o in zip(inputs, model(inputs)):
                inst = o["instances"]
                out.append((inp["image_id"], inst.pred_boxes.tensor, inst.scores, inst.pred_classes))
    return out


def test_table_acceptance_equals_the_model_with_that_setting(synthetic, tmp_path):
    torch.manual_seed(0)
    cfg = _cfg()
    cfg.MODEL.IOU_NET.SCORE = "cls_x_iou"  # the score depends on the accepted predicted IoU
    model = build_model(cfg)
    loader = build_detection_test_loader(cfg, synthetic)
    images = calibration._collect(model, loader, nms=True, step=1.0, max_iter=3)
    assert sum(len(i["refined"]["boxes"]) for i in images) > 50
    setting = CalibrationSetting(nms=True, refine=True, step=1.0, max_iter=3, margin=0.002, iou_range=(0.0, 0.6))
    accept = (setting.margin, setting.iou_range)
    branch = calibration.iou_branch_of(model)
    posthoc = calibration._records(images, "refined", list(range(5)), branch.score, accept)
    moved = sum(
        int((i["refined"]["boxes"] != i["refined"]["boxes_initial"]).any(dim=1).sum()) for i in images
    )  # refinement moved boxes; the rule keeps some and rejects others
    apply_setting(model, setting)
    model_records = [
        (image_id, box, float(s), int(c))
        for image_id, boxes, scores, classes in _detections(model, loader)
        for box, s, c in zip(boxes.tolist(), scores, classes)
    ]
    assert moved > 0 and len(posthoc) == len(model_records)
    for r, (image_id, (x0, y0, x1, y1), score, cls) in zip(posthoc, model_records):
        assert r["image_id"] == image_id and r["category_id"] == cls
        assert r["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=1e-4)
        assert r["score"] == pytest.approx(score, abs=1e-6)
    rejected = 0
    for i in images:
        f = i["refined"]
        kept = accepted_mask(f["ious_initial"], f["ious"], *accept)
        rejected += int(((~kept) & (f["boxes"] != f["boxes_initial"]).any(dim=1)).sum())
    assert rejected > 0


def test_choice_is_written_to_the_run_config(synthetic, tmp_path):
    cfg = _cfg(STEPS=[1.0], MAX_ITERS=[2], MARGINS=[0.0], IOU_RANGES=[[0.0, 1.0]])
    cfg.OUTPUT_DIR = str(tmp_path)
    model = build_model(cfg)
    loader = build_detection_test_loader(cfg, synthetic)
    chosen = calibrate_and_save(model, cfg, synthetic, loader, str(tmp_path))
    assert calibration.setting_of_cfg(cfg) != chosen or not chosen.refine
    saved = get_cfg()
    add_iounet_config(saved)
    saved.merge_from_file(str(tmp_path / "config.yaml"))
    assert calibration.setting_of_cfg(saved) == chosen
    assert calibration.setting_of_cfg(cfg) == CalibrationSetting(True, True, 1.0, 5)  # the input config is unchanged
    record = json.loads((tmp_path / "calibration.json").read_text())
    assert record["chosen_name"] == chosen.name and len(record["rows"]) >= 3
    assert "| setting |" in (tmp_path / "calibration.md").read_text()
    branch = calibration.iou_branch_of(model)  # the model now runs with the choice
    assert (branch.nms_enabled, branch.refine_enabled) == (chosen.nms, chosen.refine)


def _tiny_run(data, output_dir, *extra):
    """A real tools/train_net.py command on the synthetic config, shrunk to seconds, with three tiny splits of
    ``data`` registered (cal_train, cal_holdout, cal_val)."""
    register = [a for split in ("train", "holdout", "val") for a in (
        "--register", f"cal_{split}", os.path.join(data, f"{split}.json"), os.path.join(data, split))]  # fmt: skip
    return register + [
        "MODEL.DEVICE", "cpu", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
        "MODEL.IOU_NET.HEAD.FC_DIM", "32", "MODEL.IOU_NET.JITTER.NUM_PER_IMAGE", "16",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.WARMUP_ITERS", "0", "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "10",
        "DATASETS.TRAIN", "('cal_train',)", "DATASETS.TEST", "('cal_val',)",
        "MODEL.IOU_NET.CALIBRATION.STEPS", "[1.0]", "MODEL.IOU_NET.CALIBRATION.MAX_ITERS", "[2]",
        "MODEL.IOU_NET.CALIBRATION.MARGINS", "[0.0]", "MODEL.IOU_NET.CALIBRATION.IOU_RANGES", "[[0.0, 1.0]]",
        "OUTPUT_DIR", str(output_dir), *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_training_ends_with_calibration_and_the_tool_repeats_it(tmp_path):
    """Real processes: a training calibrates on its held-out split before its final evaluation and writes the
    choice into OUTPUT_DIR/config.yaml; tools/calibrate_refinement.py does the same for the trained model and
    refuses a reporting split as its held-out set."""
    from prroi_d2.data.synthetic import generate_synthetic_coco

    data = str(tmp_path / "data")
    for seed, (split, n) in enumerate((("train", 4), ("holdout", 3), ("val", 3))):
        generate_synthetic_coco(data, split, n, seed=seed)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    train = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file"]
    out = tmp_path / "run"
    done = tool_processes.run(
        train + [os.path.join(ROOT, "configs", "iounet_synthetic_R18.yaml")]
        + _tiny_run(data, out, "MODEL.IOU_NET.CALIBRATION.DATASET", "cal_holdout"),
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed[-3000:]
    assert printed.index("Calibration of refinement on cal_holdout") < printed.index("IoU-Net stages on cal_val")
    record = json.loads((out / "calibration.json").read_text())
    from prroi_d2.engine.yaml_train import new_config

    saved = new_config()
    saved.merge_from_file(str(out / "config.yaml"))
    assert calibration.setting_of_cfg(saved) == CalibrationSetting(**{
        k: tuple(v) if isinstance(v, list) else v for k, v in record["chosen"].items()})  # fmt: skip

    # The run's config (with the choice) exports as it is.
    exported = tool_processes.run(
        [sys.executable, os.path.join(ROOT, "tools", "export_model.py"), "--config-file", str(out / "config.yaml"),
         "--output", str(tmp_path / "export"), "--num-images", "2"]
        + [a for name in sorted(os.listdir(os.path.join(data, "val")))[:2]
           for a in ("--sample-image", os.path.join(data, "val", name))]
        + ["MODEL.WEIGHTS", str(out / "model_final.pth")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert exported.returncode == 0, (exported.stdout + exported.stderr)[-3000:]

    tool = [sys.executable, os.path.join(ROOT, "tools", "calibrate_refinement.py")]
    again = tool_processes.run(
        tool + ["--dataset", "cal_holdout", "--config-file", str(out / "config.yaml")]
        + _tiny_run(data, tmp_path / "again", "MODEL.WEIGHTS", str(out / "model_final.pth")),
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert json.loads((tmp_path / "again" / "calibration.json").read_text())["rows"] == record["rows"]
    refused = tool_processes.run(
        tool + ["--dataset", "cal_val", "--config-file", str(out / "config.yaml")]
        + _tiny_run(data, tmp_path / "refused", "MODEL.WEIGHTS", str(out / "model_final.pth")),
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "cal_val is a reporting split (DATASETS.TEST)" in refused.stderr.strip().splitlines()[-1]


def test_the_tool_names_a_lazy_config_as_unsupported_in_one_line():
    config = os.path.join(ROOT, "configs", "lazy", "iounet_cascade_synthetic_R18.py")
    tool = os.path.join(ROOT, "tools", "calibrate_refinement.py")
    done = tool_processes.run([sys.executable, tool, "--config-file", config, "--dataset", "iounet_synth_holdout"],
                              env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    expected = (
        f"--config-file {config}: a LazyConfig; the calibration reads YAML configs only (a LazyConfig takes chosen "
        "values under model.roi_heads.iou_branch, named in the README's option table)"
    )
    assert done.stderr.strip().splitlines()[-1].endswith(expected), done.stderr[-2000:]
