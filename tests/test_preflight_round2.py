"""The second round of dataset checks before training (issue 31), on real COCO json and image files written here and
read by real Detectron2 and pycocotools: category order between datasets, iscrowd / area / segmentation values, the
json's encoding, EXIF orientation, images a resize would shrink to 0 px, and ``$PRROI_D2_DATASETS``."""

import codecs
import json
import os
import sys

import numpy as np
import pytest
import tool_processes

pytest.importorskip("detectron2")

import torch
from coco_files import H, W, preflight_cfg, register_set, rewrite_json, write_coco_set, write_oriented_image
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances
from pycocotools.coco import COCO

from prroi_d2.data.coco_checks import check_coco_dataset
from prroi_d2.data.preflight import DatasetCheckError, check_datasets, run_preflight
from prroi_d2.data.synthetic import default_datasets_root

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _register(json_file, image_root):
    return register_set(json_file, image_root, "preflight2_test")


def _check(json_file, image_root, is_eval=False, **kwargs):
    findings = check_coco_dataset("d", json_file, image_root, is_eval=is_eval, **kwargs)
    return findings, "\n".join(findings.describe(k, v) for k, v in findings.errors.items())


# --- 1. categories of the training and test sets ----------------------------------------------------------------

BOXES = ((2, 2, 10, 8), (14, 4, 9, 12), (26, 10, 10, 15))  # one box of each category per image
NAMES = ("cat", "dog", "owl")  # the category of each box, by name


def _named_set(root, id_of_name):
    """Two images with the three boxes of ``BOXES``, box j of category ``NAMES[j]`` (else the j-th of
    ``id_of_name``), whose json gives the names the ids ``id_of_name`` (each file is self-consistent)."""
    json_file, image_root = write_coco_set(root, boxes=BOXES, num_images=2)

    def change(data):
        data["categories"] = sorted(({"id": i, "name": n} for n, i in id_of_name.items()), key=lambda c: c["id"])
        for ann in data["annotations"]:
            j = (ann["id"] - 1) % len(BOXES)
            ann["category_id"] = id_of_name.get(NAMES[j], list(id_of_name.values())[j])

    rewrite_json(json_file, change)
    return json_file, image_root


def _perfect_box_ap(train_name, test_name):
    """Box AP on ``test_name`` of predictions equal to the ground truth of ``train_name`` as its loader gives it
    (contiguous class ids: what a model trained on it predicts), with Detectron2's COCOEvaluator."""
    DatasetCatalog.get(test_name)  # the test loader runs before evaluation: it sets the test metadata
    evaluator = COCOEvaluator(test_name, tasks=("bbox",), distributed=False, use_fast_impl=False)
    evaluator.reset()
    for record in DatasetCatalog.get(train_name):
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in record["annotations"]]
        instances = Instances((record["height"], record["width"]))
        instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        instances.scores = torch.ones(len(boxes))
        instances.pred_classes = torch.tensor([a["category_id"] for a in record["annotations"]])
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": instances}])
    return evaluator.evaluate()["bbox"]["AP"]


def test_categories_in_another_order_are_remapped_by_name(tmp_path, caplog):
    train_files = _named_set(str(tmp_path / "train"), {"cat": 1, "dog": 2, "owl": 3})
    test_files = _named_set(str(tmp_path / "test"), {"owl": 1, "cat": 2, "dog": 3})
    train, test = _register(*train_files), _register(*test_files)

    # Detectron2 alone: each json numbered by its own sorted ids, so a perfect model scores far below 100 AP.
    unchecked = _register(*train_files)
    assert _perfect_box_ap(unchecked, test) < 50

    with caplog.at_level("WARNING", logger="prroi_d2.data.preflight"):
        findings = run_preflight(preflight_cfg(train=[train], test=[test]))
    assert f"{train_files[0]} vs {test_files[0]}: class 0 is 'cat' here, 'owl' there" in caplog.text
    assert "remapped by name" in caplog.text
    assert findings[train].category_remap == {1: 1, 2: 2, 3: 0}  # json id -> the test set's class index
    assert MetadataCatalog.get(train).thing_classes == ["owl", "cat", "dog"]
    assert _perfect_box_ap(train, test) == pytest.approx(100.0)
    assert MetadataCatalog.get(test).thing_classes == MetadataCatalog.get(train).thing_classes


def test_two_training_sets_in_another_order_train_as_one(tmp_path):
    """Without a test set, the first training set's order is the reference; Detectron2's loader of both (which
    refuses datasets of different thing_classes) then gives each box the class of its name."""
    from detectron2.data import get_detection_dataset_dicts

    first = _register(*_named_set(str(tmp_path / "a"), {"cat": 1, "dog": 2, "owl": 3}))
    second = _register(*_named_set(str(tmp_path / "b"), {"dog": 1, "owl": 2, "cat": 3}))
    findings = run_preflight(preflight_cfg(train=[first, second]))
    assert list(findings[second].warnings) == [
        f"categories in another order than {first!r}'s: remapped by name to its order"
    ]
    records = get_detection_dataset_dicts([first, second])
    classes = [[a["category_id"] for a in r["annotations"]] for r in records]
    assert classes == [[0, 1, 2]] * 4  # box j is NAMES[j] in both files


def test_different_categories_are_refused_naming_both_files(tmp_path):
    train_files = _named_set(str(tmp_path / "train"), {"cat": 1, "dog": 2, "owl": 3})
    test_files = _named_set(str(tmp_path / "test"), {"cat": 1, "dog": 2, "emu": 3})
    train, test = _register(*train_files), _register(*test_files)
    with pytest.raises(DatasetCheckError) as info:
        check_datasets(preflight_cfg(train=[train], test=[test]))
    assert f"{train_files[0]} vs {test_files[0]}: class 2 is 'owl' here, 'emu' there" in str(info.value)
    assert "give both files the same categories (ids and names)" in str(info.value)

    # Two evaluation sets in different orders: each evaluation maps the classes through its own json, one is wrong.
    other = _register(*_named_set(str(tmp_path / "other"), {"dog": 1, "cat": 2, "owl": 3}))
    same = _register(*train_files)
    with pytest.raises(DatasetCheckError, match="give both files the same id for each name"):
        check_datasets(preflight_cfg(test=[same, other]), eval_only=True)


# --- 2-4. iscrowd, area, segmentation ----------------------------------------------------------------------------


def _set_with(tmp_path, **annotation):
    """A one-image set whose first annotation gets ``annotation``'s keys (a value None removes the key when given
    as the string "absent")."""
    json_file, image_root = write_coco_set(str(tmp_path), boxes=((5, 5, 10, 10), (20, 5, 10, 10)), num_images=1)

    def change(data):
        ann = data["annotations"][0]
        for key, value in annotation.items():
            if value == "absent":
                ann.pop(key)
            else:
                ann[key] = value

    rewrite_json(json_file, change)
    return json_file, image_root


@pytest.mark.parametrize("value", ["0", None, 2, -1, "1", float("nan")])
def test_iscrowd_must_be_the_number_0_or_1(tmp_path, value):
    json_file, image_root = _set_with(tmp_path, iscrowd=value)
    for is_eval in (False, True):
        _, text = _check(json_file, image_root, is_eval=is_eval)
        assert "'iscrowd' not the number 0 or 1" in text and f"annotation 1: 'iscrowd' {value!r}" in text


def test_a_string_iscrowd_is_what_detectron2_drops_from_training(tmp_path):
    """The silent failure the check prevents: Detectron2's mapper drops a box whose iscrowd is "0"."""
    json_file, image_root = _set_with(tmp_path, iscrowd="0")
    record = DatasetCatalog.get(_register(json_file, image_root))[0]
    cfg = preflight_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (H,), 1000
    assert len(DatasetMapper(cfg, is_train=True)(record)["instances"]) == 1  # of 2 boxes
    _, text = _check(json_file, image_root)
    assert "annotation 1: 'iscrowd' '0'" in text


@pytest.mark.parametrize("missing", [("area",), ("iscrowd",), ("iscrowd", "area")])
def test_an_evaluation_set_needs_area_and_iscrowd(tmp_path, missing):
    json_file, image_root = _set_with(tmp_path, **{key: "absent" for key in missing})
    _, text = _check(json_file, image_root, is_eval=True)
    assert "lacks keys COCOeval reads" in text and f"annotation 1 lacks {', '.join(map(repr, missing))}" in text
    assert not _check(json_file, image_root, is_eval=False)[0].errors  # training reads neither
    with pytest.raises(KeyError, match="|".join(missing)):  # what COCOeval does with it after a whole training
        _coco_eval_on_itself(json_file)


def _coco_eval_on_itself(json_file):
    from pycocotools.cocoeval import COCOeval

    gt = COCO(json_file)
    dt = gt.loadRes([dict(a, score=1.0) for a in gt.dataset["annotations"]])
    evaluation = COCOeval(gt, dt, "bbox")
    evaluation.evaluate()


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), "100", None])
def test_area_of_an_evaluation_set_must_be_a_finite_number_at_least_0(tmp_path, value):
    json_file, image_root = _set_with(tmp_path, area=value)
    _, text = _check(json_file, image_root, is_eval=True)
    assert f"'area' not a finite number >= 0 (COCOeval's area ranges read it): annotation 1: 'area' {value!r}" in text
    assert not _check(json_file, image_root, is_eval=False)[0].errors  # training never reads it


@pytest.mark.parametrize(
    "segmentation", [[[1, 2, 3, 4]], [[]], [[5, 5, 15, 5, 15, 15, 9]], [[5, 5, 15, 5], [1, 2, 3, 4, 5]]]
)
def test_a_segmentation_without_a_valid_polygon_is_an_error_or_dropped_on_request(tmp_path, segmentation):
    json_file, image_root = _set_with(tmp_path, segmentation=segmentation)
    name = _register(json_file, image_root)
    assert len(DatasetCatalog.get(name)[0]["annotations"]) == 1  # Detectron2 drops the annotation (of 2)
    with pytest.raises(DatasetCheckError) as info:
        check_datasets(preflight_cfg(train=[name]))
    assert "segmentation without a valid polygon" in str(info.value)
    assert f"annotation 1 (image 1): 'segmentation' {segmentation!r}" in str(info.value)
    assert "--invalid-boxes drop drops them" in str(info.value)
    findings = run_preflight(preflight_cfg(train=[name]), invalid_boxes="drop")[name]
    dropped = [k for k in findings.warnings if k.startswith("segmentation without a valid polygon")]
    assert len(dropped) == 1 and dropped[0].endswith("(dropped)")
    with pytest.raises(DatasetCheckError, match="evaluation ground truth is never altered"):
        check_datasets(preflight_cfg(test=[name]), invalid_boxes="drop")


@pytest.mark.parametrize(
    "segmentation, problem",
    [
        ({"counts": [0, 5, 10]}, "RLE segmentation lacks 'size'"),
        ({"size": [H, W]}, "RLE segmentation lacks 'counts'"),
        ({"size": [W, H], "counts": [0, W * H]}, "RLE segmentation 'size' [40, 30] is not the image's"),
        ("polygon", "segmentation is a str, not a list of polygons or an RLE dict"),
        (7, "segmentation is a int"),
        ([5, 5, 15, 5, 15, 15], "segmentation polygons are not lists of numbers"),
    ],
)
def test_a_malformed_segmentation_is_an_error_even_when_dropping(tmp_path, segmentation, problem):
    json_file, image_root = _set_with(tmp_path, segmentation=segmentation)
    name = _register(json_file, image_root)
    with pytest.raises(DatasetCheckError) as info:
        check_datasets(preflight_cfg(train=[name]), invalid_boxes="drop")
    assert f"'segmentation' malformed: annotation 1: {problem}" in str(info.value)


def test_valid_segmentations_pass_and_partly_invalid_polygons_are_counted(tmp_path):
    json_file, image_root = _set_with(tmp_path, segmentation=[[5, 5, 15, 5, 15, 15], [1, 2, 3, 4]])
    rewrite_json(json_file, lambda d: d["annotations"][1].update(segmentation={"size": [H, W], "counts": "PP0"}))
    findings, text = _check(json_file, image_root, is_eval=True)
    assert not findings.errors, text
    assert findings.counts["annotations with invalid polygons dropped by Detectron2"] == 1


# --- 6. encoding ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "encode, encoding",
    [
        (lambda t: codecs.BOM_UTF8 + t.encode(), "UTF-8 with a byte-order mark (BOM)"),
        (lambda t: t.encode("utf-16"), "UTF-16"),
        (lambda t: t.encode("utf-16-le"), "UTF-16-LE"),
        (lambda t: t.encode("utf-32"), "UTF-32"),
    ],
)
def test_a_json_not_in_plain_utf8_is_refused_naming_the_encoding(tmp_path, encode, encoding):
    json_file, image_root = write_coco_set(str(tmp_path), num_images=1)
    with open(json_file) as f:
        text = f.read()
    with open(json_file, "wb") as f:
        f.write(encode(text))
    with open(json_file, "rb") as f:
        assert json.loads(f.read()) == json.loads(text)  # Python's json reads these bytes ...
    with pytest.raises((ValueError, UnicodeDecodeError)):
        COCO(json_file)  # ... pycocotools does not
    findings, _ = _check(json_file, image_root)
    (kind, items), *_ = findings.errors.items()
    assert kind.startswith("json not plain UTF-8") and items == [f"{json_file}: encoded as {encoding}"]


# --- 10. EXIF orientation, and images a resize shrinks to 0 px -----------------------------------------------------


@pytest.mark.parametrize("file_name, how", [("0.jpg", "exif"), ("0.png", "exif"), ("0.png", "xmp")])
@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_an_orientation_that_swaps_width_and_height_is_checked_as_detectron2_reads_it(
    tmp_path, file_name, how, orientation
):
    json_file, image_root = write_coco_set(str(tmp_path), num_images=1, boxes=((2, 2, 5, 5),))
    path = os.path.join(image_root, file_name)
    write_oriented_image(path, orientation=orientation, how=how)
    assert read_image(path, "BGR").shape[:2] == (W, H)  # Detectron2 turns it: W wide, H high stored -> H x W

    rewrite_json(json_file, lambda d: d["images"][0].update(file_name=file_name))  # the stored W x H
    findings, text = _check(json_file, image_root)
    ((kind, items),) = findings.errors.items()
    assert kind.startswith("image size differs from the json after the EXIF orientation Detectron2 applies")
    assert items[0].startswith(f"{path} (image id 1): json {W}x{H} is the stored size, EXIF orientation {orientation}")
    assert items[0].endswith(f"makes it {H}x{W}")

    rewrite_json(json_file, lambda d: d["images"][0].update(width=H, height=W))  # the size Detectron2 reads
    findings, text = _check(json_file, image_root, check_images="full")
    assert not findings.errors, text


@pytest.mark.parametrize("orientation", [3, 6])
def test_a_tiff_with_an_orientation_is_refused(tmp_path, orientation):
    """PIL 13 applies a TIFF's orientation itself and Detectron2's read_image applies it again: the pixels come out
    turned twice (for 6: the stored pixels turned 180 degrees; for 3: the stored pixels, not turned)."""
    json_file, image_root = write_coco_set(str(tmp_path), num_images=1, boxes=((2, 2, 5, 5),))
    path = os.path.join(image_root, "0.tif")
    stored = write_oriented_image(path, orientation=orientation)
    read = read_image(path, "RGB")
    assert np.array_equal(read, stored[::-1, ::-1] if orientation == 6 else stored)  # a viewer shows neither
    rewrite_json(json_file, lambda d: d["images"][0].update(file_name="0.tif"))
    findings, _ = _check(json_file, image_root)
    ((kind, items),) = findings.errors.items()
    assert kind.startswith("TIFF with an EXIF orientation")
    assert items == [f"{path} (image id 1): orientation {orientation}"]


def test_an_image_the_resize_shrinks_to_zero_pixels_is_refused(tmp_path):
    json_file, image_root = write_coco_set(str(tmp_path), num_images=1, size=(3000, 1), boxes=((0, 0, 10, 1),))
    name = _register(json_file, image_root)
    cfg = preflight_cfg(train=[name])
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (640, 800), 1333
    with pytest.raises(ValueError):  # what training would meet, without the image's name
        T.ResizeShortestEdge((800,), 1333, "choice")(T.AugInput(read_image(os.path.join(image_root, "0.png"))))
    with pytest.raises(DatasetCheckError) as info:
        check_datasets(cfg)
    path = os.path.join(image_root, "0.png")
    assert (
        "image resized to 0 px on one side by INPUT.MIN_SIZE_TRAIN 800 / INPUT.MAX_SIZE_TRAIN 1333 (crop or drop "
        f"the image, or raise the max size): {path} (image id 1): 3000x1 -> 1333x0"
    ) in str(info.value)
    cfg.INPUT.MAX_SIZE_TRAIN = 6000  # 3000x1 -> 4500x2: fine
    assert check_datasets(cfg)[name].counts["images"] == 1
    with pytest.raises(DatasetCheckError, match="INPUT.MIN_SIZE_TEST 800 / INPUT.MAX_SIZE_TEST 1333"):
        check_datasets(preflight_cfg(test=[name]))


# --- 11. $PRROI_D2_DATASETS ----------------------------------------------------------------------------------------


def test_datasets_root_pointing_at_a_file_is_one_line(tmp_path, monkeypatch):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    for root in (a_file, a_file / "datasets"):
        monkeypatch.setenv("PRROI_D2_DATASETS", str(root))
        with pytest.raises(DatasetCheckError, match=f"PRROI_D2_DATASETS='{root}': {a_file} is a file, not a folder"):
            default_datasets_root()
    monkeypatch.setenv("PRROI_D2_DATASETS", str(tmp_path / "new" / "folder"))
    assert default_datasets_root() == str(tmp_path / "new" / "folder")  # made when the data is generated

    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PRROI_D2_DATASETS=str(a_file))
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
           os.path.join(REPO, "configs", "iounet_synthetic_R18.yaml"), "OUTPUT_DIR", str(tmp_path / "out")]  # fmt: skip
    proc = tool_processes.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"PRROI_D2_DATASETS='{a_file}': {a_file} is a file")


def test_an_unwritable_datasets_root_is_one_line(tmp_path):
    """Generating the synthetic set where nothing can be written: the folder named, with the variable to set."""
    from prroi_d2.data.synthetic import prepare_synthetic_split

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    root = str(locked / "datasets") if os.geteuid() != 0 else "/sys/prroi_d2_datasets"  # root writes all but sysfs
    try:
        os.makedirs(root)
    except OSError:
        pass
    else:
        os.rmdir(root)
        pytest.skip(f"{root} is writable for this user")
    with pytest.raises(DatasetCheckError) as info:
        prepare_synthetic_split(root, "train", 2)
    assert str(info.value).startswith(f"Cannot write the synthetic dataset under {root}: ")
    assert str(info.value).endswith("(set PRROI_D2_DATASETS to a writable folder)")
