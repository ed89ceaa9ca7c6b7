"""The dataset pre-flight check and decode-failure naming, on real COCO json and image files written here, read by
real Detectron2 (catalogs, load_coco_json, DatasetMapper, data loader workers)."""

import json
import math
import os
import time

import numpy as np
import pytest

pytest.importorskip("detectron2")

from coco_files import H, W, preflight_cfg, register_set, write_coco_set, write_png
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog, build_detection_test_loader

from prroi_d2.data.coco_checks import box_problem, check_coco_dataset
from prroi_d2.data.named_decode import ImageDecodeError, NamedDecodeErrors, decode_error_message
from prroi_d2.data.preflight import DatasetCheckError, check_datasets, run_preflight


def _register(json_file, image_root):
    return register_set(json_file, image_root, "preflight_test")


def _errors(tmp_path, is_eval=False, check_images="header", **kwargs):
    json_file, image_root = write_coco_set(str(tmp_path), **kwargs)
    findings = check_coco_dataset("d", json_file, image_root, is_eval=is_eval, check_images=check_images)
    return findings, "\n".join(findings.describe(k, v) for k, v in findings.errors.items())


def test_box_rule_edges():
    assert box_problem([0, 0, W, H], W, H) is None  # ends exactly at the image edge
    assert box_problem([30, 20, 10.5, 10], W, H) == "partly outside its image (clipped)"
    assert box_problem([-1, 0, 5, 5], W, H) == "partly outside its image (clipped)"
    assert box_problem([W, 0, 5, 5], W, H) == "bbox fully outside its image"  # starts at the right edge
    assert box_problem([-5, 0, 5, 5], W, H) == "bbox fully outside its image"  # ends at the left edge
    assert box_problem([0, 0, 0, 5], W, H) == "zero bbox width/height"
    assert box_problem([10, 0, -5, 5], W, H) == "negative bbox width/height"
    assert box_problem([0, 0, math.nan, 5], W, H) == "non-finite bbox"
    assert box_problem(None, W, H) == box_problem([1, 2, 3], W, H) == "bbox is not 4 numbers"


def test_a_valid_set_passes_and_counts_clipped_boxes(tmp_path):
    findings, text = _errors(tmp_path, boxes=[(0, 0, W, H), (30, 20, 15, 15)])
    assert not findings.errors, text
    assert findings.counts["clipped boxes"] == 2 and findings.counts["images"] == 2
    assert findings.counts["annotations"] == 4 and not findings.warnings


def test_missing_and_random_bytes_images_are_named(tmp_path):
    json_file, image_root = write_coco_set(str(tmp_path), num_images=3)
    os.remove(os.path.join(image_root, "1.png"))
    with open(os.path.join(image_root, "2.png"), "wb") as f:
        f.write(np.random.default_rng(1).bytes(500))
    findings = check_coco_dataset("d", json_file, image_root, is_eval=False)
    missing = findings.errors["image file missing"]
    assert missing == [f"{os.path.join(image_root, '1.png')} (image id 2)"]
    unreadable = findings.errors["image file not an image PIL can read"]
    assert unreadable == [f"{os.path.join(image_root, '2.png')} (image id 3)"]


def test_truncated_json_names_file_and_position(tmp_path):
    json_file, image_root = write_coco_set(str(tmp_path))
    with open(json_file) as f:
        text = f.read()
    with open(json_file, "w") as f:
        f.write(text[: len(text) // 2])
    findings = check_coco_dataset("d", json_file, image_root, is_eval=False)
    (message,) = findings.errors["json not valid"]
    assert message.startswith(json_file + ": ") and "line 1 column" in message and "truncated file?" in message


def test_null_bbox_names_the_annotation(tmp_path):
    _, text = _errors(tmp_path, extra={"annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": None}]})
    assert "1 x bbox is not 4 numbers: annotation 7 (image 1): bbox None" in text


def test_image_entries_need_integer_sizes(tmp_path):
    extra = {"images": [{"id": 1, "file_name": "0.png", "width": "40", "height": 30}, {"id": 2, "file_name": "1.png"}]}
    findings, text = _errors(tmp_path, extra=extra)
    assert "1 x image width/height not positive integers: images[0] (id 1): '40' x 30" in text
    assert "1 x image lacks keys: images[1] (id 2) lacks 'width', 'height'" in text
    assert "annotation of an unknown image_id" in text  # the annotations of both images


def test_missing_categories_and_eval_set_without_annotations(tmp_path):
    _, text = _errors(tmp_path / "a", drop_keys=("categories",))
    assert "'categories' is missing" in text
    _, text = _errors(tmp_path / "b", is_eval=True, extra={"annotations": []})
    assert "evaluation set without annotations" in text and "every AP would be nan" in text
    _, text = _errors(tmp_path / "c", is_eval=True, drop_keys=("annotations",))
    assert "'annotations' is missing (an evaluation set needs ground truth)" in text


def test_num_classes_must_match_the_json(tmp_path):
    name = _register(*write_coco_set(str(tmp_path)))
    for num_classes in (2, 5):
        with pytest.raises(DatasetCheckError) as info:
            check_datasets(preflight_cfg(train=[name], num_classes=num_classes))
        assert f"MODEL.ROI_HEADS.NUM_CLASSES is {num_classes} but {tmp_path / 'set.json'} has 3 categories" in str(
            info.value
        )
    assert check_datasets(preflight_cfg(train=[name], num_classes=3))[name].num_categories == 3


def test_invalid_boxes_are_errors_with_ids_or_dropped_on_request(tmp_path):
    boxes = [(5, 5, 10, 10), (5, 5, 0, 10), (5, 5, math.nan, 4), (20, 5, -10, 10), (W + 1, 0, 5, 5)]
    json_file, image_root = write_coco_set(str(tmp_path), boxes=boxes, num_images=1)
    name = _register(json_file, image_root)
    with pytest.raises(DatasetCheckError) as info:
        check_datasets(preflight_cfg(train=[name]))
    text = str(info.value)
    assert "1 x non-finite bbox (--invalid-boxes drop drops them): annotation 3 (image 1 0.png)" in text
    assert "1 x negative bbox width/height (--invalid-boxes drop drops them): annotation 4" in text
    assert "1 x bbox fully outside its image (--invalid-boxes drop drops them): annotation 5" in text
    assert "zero bbox" not in text  # a warning, not an error (COCO train2017 has two such boxes)

    # Detectron2 alone reads the negative-width box as one extending left: 4 boxes of 5 survive its loader.
    records = DatasetCatalog.get(name)
    assert len(records[0]["annotations"]) == 5
    findings = run_preflight(preflight_cfg(train=[name]), invalid_boxes="drop")[name]
    assert set(findings.warnings) == {
        "non-finite bbox (dropped)", "negative bbox width/height (dropped)", "bbox fully outside its image (dropped)",
        "zero bbox width/height (dropped, as Detectron2 drops empty boxes)",
    }  # fmt: skip
    assert [a["bbox"] for a in DatasetCatalog.get(name)[0]["annotations"]] == [[5, 5, 10, 10]]

    # Evaluation ground truth is never altered: still an error there.
    with pytest.raises(DatasetCheckError, match="evaluation ground truth is never altered"):
        check_datasets(preflight_cfg(test=[name]), invalid_boxes="drop")


def test_sixteen_bit_images_are_refused(tmp_path):
    json_file, image_root = write_coco_set(str(tmp_path), num_images=1)
    write_png(os.path.join(image_root, "0.png"), mode="I;16")
    findings = check_coco_dataset("d", json_file, image_root, is_eval=False)
    ((kind, items),) = findings.errors.items()
    assert "would misread" in kind and items == [f"{os.path.join(image_root, '0.png')}: mode I;16 (16-bit grayscale)"]


def test_image_size_must_match_the_json(tmp_path):
    json_file, image_root = write_coco_set(str(tmp_path), num_images=1)
    write_png(os.path.join(image_root, "0.png"), size=(W + 2, H))
    findings = check_coco_dataset("d", json_file, image_root, is_eval=False)
    assert findings.errors["image size differs from the json"] == [
        f"{os.path.join(image_root, '0.png')}: json {W}x{H}, file {W + 2}x{H}"
    ]


def _truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def test_truncated_png_passes_the_header_check_but_not_the_full_one(tmp_path):
    json_file, image_root = write_coco_set(str(tmp_path), num_images=1)
    _truncate(os.path.join(image_root, "0.png"))
    assert not check_coco_dataset("d", json_file, image_root, is_eval=False).errors
    full = check_coco_dataset("d", json_file, image_root, is_eval=False, check_images="full")
    (item,) = full.errors["image file does not decode"]
    assert item.startswith(os.path.join(image_root, "0.png") + " (image id 1): OSError")


def test_decode_failure_in_a_loader_worker_names_file_and_dataset(tmp_path):
    json_file, image_root = write_coco_set(str(tmp_path), num_images=2)
    _truncate(os.path.join(image_root, "1.png"))
    name = _register(json_file, image_root)
    cfg = preflight_cfg(test=[name])
    cfg.DATALOADER.NUM_WORKERS = 1
    mapper = NamedDecodeErrors(DatasetMapper(cfg, is_train=False), name)
    loader = build_detection_test_loader(cfg, name, mapper=mapper)
    with pytest.raises(ImageDecodeError) as info:
        for _ in loader:
            pass
    message = decode_error_message(info.value)
    path = os.path.join(image_root, "1.png")
    assert message.startswith(f"Cannot decode image {path} of dataset '{name}': OSError: image file is truncated")
    assert "\n" not in message and "--check-images full" in message


def test_header_check_speed_and_skipped_datasets(tmp_path, caplog):
    n = 1000
    json_file, image_root = write_coco_set(str(tmp_path), num_images=1)
    with open(json_file) as f:
        data = json.load(f)
    data["images"] = [dict(data["images"][0], id=i + 1) for i in range(n)]
    data["annotations"] = [dict(data["annotations"][0], id=i + 1, image_id=i + 1) for i in range(n)]
    with open(json_file, "w") as f:
        json.dump(data, f)
    name = _register(json_file, image_root)
    DatasetCatalog.register("preflight_test_no_json", lambda: [])
    start = time.process_time()  # CPU time: other processes on a shared machine do not count
    with caplog.at_level("INFO", logger="prroi_d2.data.preflight"):
        results = check_datasets(preflight_cfg(train=["preflight_test_no_json", name]))
    seconds = time.process_time() - start
    assert results[name].counts["images"] == n and "preflight_test_no_json" not in results
    assert "'preflight_test_no_json' has no json_file/image_root metadata" in caplog.text
    assert seconds < 1.0, f"header check of {n} images took {seconds:.2f} s of CPU"


def test_coco_2017_conventions_pass(tmp_path):
    """COCO's own quirks: crowd RLE boxes, float boxes past the edge, a zero-height box (train2017 has two),
    categories with gaps in their ids, images without annotations."""
    json_file, image_root = write_coco_set(str(tmp_path), num_images=3, categories=0)
    with open(json_file) as f:
        data = json.load(f)
    data["categories"] = [{"id": i, "name": f"c{i}", "supercategory": "s"} for i in (1, 2, 90)]
    data["annotations"] = [
        {"id": 918, "image_id": 1, "category_id": 90, "bbox": [29.65, 18.33, 1.03, 0.0], "area": 0.0, "iscrowd": 0,
         "segmentation": [[29.65, 18.33, 30.68, 18.33, 30.68, 18.33]]},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [10.0, 10.0, 30.01, 20.0], "area": 1.0, "iscrowd": 0,
         "segmentation": [[10, 10, 40, 10, 40, 30]]},
        {"id": 3, "image_id": 2, "category_id": 2, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 1,
         "segmentation": {"size": [H, W], "counts": [0, 5, 25, 5, W * H - 35]}},
    ]  # fmt: skip
    with open(json_file, "w") as f:
        json.dump(data, f)
    name = _register(json_file, image_root)
    findings = check_datasets(preflight_cfg(train=[name], test=[name]))[name]
    assert findings.counts["clipped boxes"] == 1 and findings.counts["images without annotations"] == 1
    assert list(findings.warnings) == ["zero bbox width/height (kept in the evaluation's ground truth)"]
    assert len(DatasetCatalog.get(name)) == 3 and MetadataCatalog.get(name).thing_classes == ["c1", "c2", "c90"]
