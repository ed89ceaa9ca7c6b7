"""Small COCO-format datasets written as real files (json + PNG images) for the tests of the checks before
training."""

import itertools
import json
import os

import numpy as np
from PIL import Image

W, H = 40, 30


def write_png(path, size=(W, H), mode="RGB"):
    """A noise image of ``size`` (width, height): 8-bit RGB, or 16-bit grayscale for ``mode="I;16"``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if mode == "I;16":
        image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 200)
        assert image.mode == "I;16"
    image.save(path)


def write_coco_set(root, boxes=((5, 5, 10, 10),), num_images=2, categories=3, extra=None, drop_keys=(), size=(W, H)):
    """``root/images/{0..n-1}.png`` and ``root/set.json``; every image gets ``boxes`` (category 1). ``extra``
    replaces top-level keys, ``drop_keys`` removes them. Returns (json path, image folder)."""
    images, annotations = [], []
    for i in range(num_images):
        write_png(os.path.join(root, "images", f"{i}.png"), size)
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": size[0], "height": size[1]})
        for box in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1, "bbox": list(box),
                                "area": float(box[2] * box[3]), "iscrowd": 0})  # fmt: skip
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": c + 1, "name": f"c{c}"} for c in range(categories)]}  # fmt: skip
    data.update(extra or {})
    for key in drop_keys:
        data.pop(key)
    path = os.path.join(root, "set.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path, os.path.join(root, "images")


def rewrite_json(json_file, change):
    """Load ``json_file``, call ``change(data)`` (edits in place) and write it back."""
    with open(json_file) as f:
        data = json.load(f)
    change(data)
    with open(json_file, "w") as f:
        json.dump(data, f)


def write_oriented_image(path, size=(W, H), orientation=6, how="exif"):
    """An RGB noise image of stored ``size`` (width, height) whose metadata asks viewers to turn it: ``how="exif"``
    (EXIF Orientation tag; JPEG, TIFF or PNG by the extension) or ``"xmp"`` (a PNG's XMP ``tiff:Orientation``).
    Returns the stored pixels (H, W, 3) uint8."""
    from PIL.PngImagePlugin import PngInfo

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if how == "xmp":
        info = PngInfo()
        info.add_itxt(
            "XML:com.adobe.xmp",
            '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="{orientation}"/>'
            "</rdf:RDF></x:xmpmeta>",
        )
        image.save(path, format="PNG", pnginfo=info)
        return pixels
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif)
    return pixels


_names = itertools.count()


def register_set(json_file, image_root, prefix="coco_files_test"):
    """Register ``json_file`` / ``image_root`` with Detectron2 under a new name (``<prefix>_<n>``); returns it."""
    from detectron2.data.datasets import register_coco_instances

    name = f"{prefix}_{next(_names)}"
    register_coco_instances(name, {}, json_file, image_root)
    return name


def preflight_cfg(train=(), test=(), num_classes=3):
    """A Detectron2 config with ``MODEL.IOU_NET``, the given dataset names and ``NUM_CLASSES``."""
    from detectron2.config import get_cfg

    from prroi_d2 import add_iounet_config

    cfg = get_cfg()
    add_iounet_config(cfg)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = tuple(train), tuple(test)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    return cfg


def register_gt(root, file_name, gt, width, height, categories, prefix):
    """Write a COCO json of ``gt`` ({image id: [(category id, [x, y, w, h], iscrowd)]}, images width x height,
    annotation ids 1..N) into ``root`` and register it; returns (name, json path, annotations)."""
    annotations = [
        {"id": 0, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": crowd}
        for img, anns in gt.items()
        for cat, box, crowd in anns
    ]
    for i, ann in enumerate(annotations):
        ann["id"] = i + 1
    coco = {
        "images": [{"id": img, "file_name": f"{img}.png", "width": width, "height": height} for img in gt],
        "annotations": annotations,
        "categories": [{"id": c, "name": f"class{c}"} for c in categories],
    }
    json_file = os.path.join(str(root), file_name)
    with open(json_file, "w") as f:
        json.dump(coco, f)
    return register_set(json_file, str(root), prefix), json_file, annotations
