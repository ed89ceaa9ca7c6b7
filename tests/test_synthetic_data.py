"""The embedded synthetic COCO dataset (real Detectron2 and pycocotools, CPU, a dozen small images)."""

import hashlib
import json
import os
import re
import threading
import uuid

import numpy as np
import pytest

pytest.importorskip("detectron2")
pytest.importorskip("pycocotools")

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode
from PIL import Image
from pycocotools.coco import COCO

from prroi_d2.data import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_VERSION,
    generate_synthetic_coco,
    prepare_synthetic_split,
    register_synthetic_datasets,
    render_synthetic_image,
    synthetic,
)

NUM = 12
SIZE = (160, 192)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth"))
    json_path = generate_synthetic_coco(root, "train", NUM, seed=0, image_size=SIZE)
    with open(json_path) as f:
        return root, json_path, json.load(f)


def _tree_bytes(root, split):
    files = {split + ".json": open(os.path.join(root, split + ".json"), "rb").read()}
    for name in sorted(os.listdir(os.path.join(root, split))):
        files[name] = open(os.path.join(root, split, name), "rb").read()
    return files


def test_generation_is_deterministic(dataset, tmp_path):
    root, _, _ = dataset
    generate_synthetic_coco(str(tmp_path / "again"), "train", NUM, seed=0, image_size=SIZE)
    first, second = _tree_bytes(root, "train"), _tree_bytes(str(tmp_path / "again"), "train")
    assert list(first) == list(second) and len(first) == NUM + 1
    for name in first:
        assert first[name] == second[name], name

    generate_synthetic_coco(str(tmp_path / "other"), "train", NUM, seed=1, image_size=SIZE)
    other = _tree_bytes(str(tmp_path / "other"), "train")
    assert other["train.json"] != first["train.json"]
    assert all(other[name] != first[name] for name in first if name.endswith(".png"))


def test_splits_differ(tmp_path):
    a, _ = render_synthetic_image(0, "train", 1)
    b, _ = render_synthetic_image(0, "val", 1)
    c, _ = render_synthetic_image(0, "train", 2)
    assert a.shape == b.shape == (*SIZE, 3) and a.dtype == np.uint8
    assert not np.array_equal(a, b) and not np.array_equal(a, c)


def test_golden_hash():
    """Renderings must not change silently: if this fails on purpose, bump SYNTHETIC_VERSION and update the hash."""
    h = hashlib.sha256()
    for image_id in (1, 2, 3):
        img, objects = render_synthetic_image(0, "train", image_id, (64, 80))
        h.update(img.tobytes())
        h.update(repr([(o["category_id"], o["bbox"], o["area"], o["segmentation"]) for o in objects]).encode())
    assert SYNTHETIC_VERSION == 1
    assert h.hexdigest() == "c9a50d8a339546f8a398edc35fb1c28ba18a639c156179abc459f3c840b42dcc"


def test_json_loads_in_pycocotools_and_detectron2(dataset):
    root, json_path, data = dataset
    coco = COCO(json_path)
    assert sorted(coco.getImgIds()) == list(range(1, NUM + 1))
    assert sorted(coco.getCatIds()) == list(range(1, len(SYNTHETIC_CLASSES) + 1))
    assert len(coco.getAnnIds()) == len(data["annotations"]) >= NUM
    ann = coco.loadAnns(coco.getAnnIds())[0]
    mask = coco.annToMask(ann)
    assert mask.shape == SIZE and mask.sum() > 0

    dicts = load_coco_json(json_path, os.path.join(root, "train"))
    assert len(dicts) == NUM
    assert sum(len(d["annotations"]) for d in dicts) == len(data["annotations"])
    for d in dicts:
        assert os.path.isfile(d["file_name"]) and (d["height"], d["width"]) == SIZE
        with Image.open(d["file_name"]) as im:
            assert im.mode == "RGB" and im.size == (SIZE[1], SIZE[0])
        for a in d["annotations"]:
            assert a["bbox_mode"] == BoxMode.XYWH_ABS and len(a["segmentation"][0]) >= 6


def test_boxes_inside_images_and_ids_consistent(dataset):
    _, _, data = dataset
    assert [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])] == list(SYNTHETIC_CLASSES)
    assert [c["id"] for c in data["categories"]] == list(range(1, len(SYNTHETIC_CLASSES) + 1))
    assert all(c["supercategory"] for c in data["categories"])
    assert [im["id"] for im in data["images"]] == list(range(1, NUM + 1))
    ann_ids = [a["id"] for a in data["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)
    images = {im["id"]: im for im in data["images"]}
    cat_ids = {c["id"] for c in data["categories"]}
    for a in data["annotations"]:
        im = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert a["category_id"] in cat_ids and a["iscrowd"] == 0
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"]
        assert 0 < a["area"] <= w * h
        poly = np.array(a["segmentation"][0]).reshape(-1, 2)
        assert poly.min() >= 0 and (poly[:, 0] <= im["width"]).all() and (poly[:, 1] <= im["height"]).all()
    assert len({a["image_id"] for a in data["annotations"]}) >= NUM - 1


def test_boxes_are_tight_extents_of_visible_regions(dataset):
    root, _, data = dataset
    by_image = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for image_id in range(1, NUM + 1):
        img, objects = render_synthetic_image(0, "train", image_id, SIZE)
        png = np.array(Image.open(os.path.join(root, "train", f"{image_id:06d}.png")))
        assert np.array_equal(png, img)
        masks = [o["visible_mask"] for o in objects]
        assert (np.sum(masks, axis=0) <= 1).all()  # the visible regions of different objects are disjoint
        annotated = [o for o in objects if o["annotated"]]
        assert [(o["category_id"], o["bbox"]) for o in annotated] == [
            (a["category_id"], a["bbox"]) for a in by_image.get(image_id, [])
        ]
        for o in objects:
            if not o["annotated"]:
                assert o["area"] < 64 or o["area"] < 0.4 * o["full_area"]
                continue
            ys, xs = np.nonzero(o["visible_mask"])
            assert o["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert o["area"] == len(xs) >= max(64, 0.4 * o["full_area"])
            # The outline of the whole shape contains the visible box (up to the blur's rounding of corners).
            poly = np.array(o["segmentation"]).reshape(-1, 2)
            x, y, w, h = o["bbox"]
            assert poly[:, 0].min() - 2 <= x and x + w <= poly[:, 0].max() + 2
            assert poly[:, 1].min() - 2 <= y and y + h <= poly[:, 1].max() + 2


def test_register_twice(tmp_path):
    prefix = f"test_synth_{uuid.uuid4().hex[:8]}"
    first = register_synthetic_datasets(str(tmp_path), num_train=6, num_val=3, prefix=prefix, num_holdout=2)
    second = register_synthetic_datasets(str(tmp_path), num_train=6, num_val=3, prefix=prefix, num_holdout=2)
    assert first == second and sorted(first) == [f"{prefix}_holdout", f"{prefix}_train", f"{prefix}_val"]
    data_root = tmp_path / f"synthetic_v{SYNTHETIC_VERSION}"
    assert first[f"{prefix}_train"] == str(data_root / "train.json")
    try:
        for name, count in ((f"{prefix}_train", 6), (f"{prefix}_val", 3), (f"{prefix}_holdout", 2)):
            dicts = DatasetCatalog.get(name)
            assert len(dicts) == count and all(os.path.isfile(d["file_name"]) for d in dicts)
            meta = MetadataCatalog.get(name)
            assert meta.evaluator_type == "coco" and meta.json_file == first[name]
            assert meta.thing_classes == list(SYNTHETIC_CLASSES)
            assert meta.thing_dataset_id_to_contiguous_id == {i + 1: i for i in range(len(SYNTHETIC_CLASSES))}
        # The holdout split is drawn apart from the others: no image of it repeats a training image.
        pixels = {name: [open(d["file_name"], "rb").read() for d in DatasetCatalog.get(name)] for name in first}
        assert not set(pixels[f"{prefix}_holdout"]) & set(pixels[f"{prefix}_train"] + pixels[f"{prefix}_val"])
        with pytest.raises(ValueError, match="already registered"):
            register_synthetic_datasets(str(tmp_path / "elsewhere"), num_train=2, num_val=1, prefix=prefix)
    finally:
        for name in first:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def _state(root, split):
    paths = [os.path.join(root, split + ".json")]
    paths += sorted(os.path.join(root, split, n) for n in os.listdir(os.path.join(root, split)))
    return {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in paths}


def test_cache_reused_and_regenerated_when_stale(tmp_path, monkeypatch, capsys):
    generated = []
    real_generate = synthetic.generate_synthetic_coco

    def counting_generate(*args, **kwargs):  # the real generator, counted
        generated.append(args)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(synthetic, "generate_synthetic_coco", counting_generate)
    root = str(tmp_path)
    json_path = prepare_synthetic_split(root, "train", 4)
    printed = capsys.readouterr().out
    said = r"prroi_d2: generated the synthetic split 'train' \(4 images\) in \d+\.\d s\n"
    assert re.fullmatch(said, printed), printed
    before = _state(root, "train")
    assert len(before) == 5 and len(generated) == 1
    assert prepare_synthetic_split(root, "train", 4) == json_path
    assert _state(root, "train") == before and len(generated) == 1  # reused: nothing generated or rewritten
    assert capsys.readouterr().out == ""  # and nothing said

    stamp = os.path.join(root, "train.stamp")
    good = open(stamp).read()
    with open(stamp, "w") as f:
        f.write("stale\n")
    prepare_synthetic_split(root, "train", 4)
    after = _state(root, "train")
    assert open(stamp).read() == good
    assert sorted(after) == sorted(before) and all(after[p] != before[p] for p in before)
    assert len(generated) == 2

    prepare_synthetic_split(root, "train", 3)  # other parameters: other stamp
    assert len(_state(root, "train")) == 4 and len(json.load(open(json_path))["images"]) == 3
    assert sorted(os.listdir(root)) == ["train", "train.json", "train.stamp"]  # no temporary left behind


def test_concurrent_preparation(tmp_path):
    root = str(tmp_path)
    results, errors = [], []

    def work():
        try:
            results.append(prepare_synthetic_split(root, "val", 3))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3 and len(set(results)) == 1
    assert synthetic._is_current(root, "val", synthetic._stamp("val", 3, 0, SIZE))
    assert sorted(os.listdir(os.path.join(root, "val"))) == [f"{i:06d}.png" for i in (1, 2, 3)]
    assert sorted(os.listdir(root)) == ["val", "val.json", "val.stamp"]
    assert len(COCO(results[0]).getImgIds()) == 3
