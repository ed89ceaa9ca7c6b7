"""The rules of the dataset pre-flight check for one COCO-format json and its image folder.

:func:`check_coco_dataset` reads the json once, checks its structure, every annotation's box and every image's
header (or its full decode), and returns a :class:`DatasetFindings`: errors, warnings and counts, each kind with its
count and the first offending ids or paths. :func:`box_problem` is the box rule, shared with the filter that drops
invalid boxes (:mod:`prroi_d2.data.preflight`).
"""

import json
import math
import os
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from PIL import Image, UnidentifiedImageError

__all__ = ["CHECK_IMAGES", "DROPPABLE_BOX_PROBLEMS", "DatasetFindings", "box_problem", "check_coco_dataset"]

CHECK_IMAGES = ("none", "header", "full")
# Box problems a training set may drop (--invalid-boxes drop); "zero size" is always dropped with a warning.
DROPPABLE_BOX_PROBLEMS = ("non-finite bbox", "negative bbox width/height", "bbox fully outside its image")
ZERO_SIZE = "zero bbox width/height"
PARTLY_OUTSIDE = "partly outside its image (clipped)"
# PIL modes Detectron2's read_image would misread: convert("RGB") clips 16/32-bit and float pixels to 8 bits.
_MISREAD_MODES = {"I;16": "16-bit grayscale", "I;16B": "16-bit grayscale", "I;16L": "16-bit grayscale",
                  "I;16N": "16-bit grayscale", "I": "32-bit integer", "F": "32-bit float"}  # fmt: skip
_EXIF_ORIENTATION = 0x0112
_EXAMPLES = 5


@dataclass
class DatasetFindings:
    """What the check found in one dataset. ``errors`` / ``warnings`` map a kind of problem to the offending items
    (ids or paths, with details); ``counts`` holds totals (images, annotations, clipped boxes, ...)."""

    name: str
    json_file: str
    errors: Dict[str, List[str]] = field(default_factory=lambda: defaultdict(list))
    warnings: Dict[str, List[str]] = field(default_factory=lambda: defaultdict(list))
    counts: Dict[str, int] = field(default_factory=lambda: defaultdict(int))
    num_categories: Optional[int] = None

    def error(self, kind: str, item: str) -> None:
        self.errors[kind].append(item)

    def warn(self, kind: str, item: str) -> None:
        self.warnings[kind].append(item)

    @staticmethod
    def describe(kind: str, items: List[str]) -> str:
        """``"3 x kind, first: a; b; c"``: the count and the first few offending items."""
        shown = "; ".join(items[:_EXAMPLES]) + ("; ..." if len(items) > _EXAMPLES else "")
        return f"{len(items)} x {kind}" + (f": {shown}" if shown else "")


def box_problem(bbox, width, height) -> Optional[str]:
    """The problem of a COCO ``[x, y, w, h]`` box in a ``width`` x ``height`` image: ``None`` (fine, also when it
    ends exactly at the image edge), ``PARTLY_OUTSIDE`` (Detectron2 clips it), ``ZERO_SIZE`` or one of
    ``DROPPABLE_BOX_PROBLEMS``; ``"bbox is not 4 numbers"`` when it is malformed."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return "bbox is not 4 numbers"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        return "bbox is not 4 numbers"
    x, y, w, h = bbox
    if not all(math.isfinite(v) for v in bbox):
        return "non-finite bbox"
    if w < 0 or h < 0:
        return "negative bbox width/height"
    if w == 0 or h == 0:
        return ZERO_SIZE
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return "bbox fully outside its image"
    if x < 0 or y < 0 or x + w > width or y + h > height:
        return PARTLY_OUTSIDE
    return None


def _read_json(path: str, findings: DatasetFindings):
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        findings.error("json file not readable", f"{path}: {e.strerror or e}")
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        end = "; it does not end with '}' or ']': a truncated file?" if raw.rstrip()[-1:] not in (b"}", b"]") else ""
        where = f"line {e.lineno} column {e.colno}, character {e.pos} of {len(raw)}"
        findings.error("json not valid", f"{path}: {e.msg} ({where}){end}")
    except UnicodeDecodeError as e:
        findings.error("json not valid", f"{path}: not UTF-8 text ({e.reason} at byte {e.start})")
    return None


def _has_keys(item, keys, kind: str, label: str, findings: DatasetFindings) -> bool:
    missing = [k for k in keys if not isinstance(item, dict) or k not in item]
    if missing:
        findings.error(kind, f"{label} lacks {', '.join(repr(k) for k in missing)}")
    return not missing


def _check_structure(data, is_eval: bool, findings: DatasetFindings):
    """Top-level keys, categories and images; returns ``(images by id, category ids)`` or None if unusable."""
    path = findings.json_file
    if not isinstance(data, dict):
        findings.error("json not a COCO dict", f"{path}: top level is a {type(data).__name__}")
        return None
    required = ("images", "categories", "annotations")
    missing = [k for k in required if not isinstance(data.get(k), list)]
    for key in missing:
        what = "missing" if key not in data else f"a {type(data[key]).__name__}, not a list"
        note = " (an evaluation set needs ground truth)" if key == "annotations" and is_eval else ""
        findings.error("required key missing", f"{path}: {key!r} is {what}{note}")
    if "images" in missing or "categories" in missing:
        return None
    category_ids = set()
    for i, cat in enumerate(data["categories"]):
        if _has_keys(cat, ("id", "name"), "category lacks keys", f"categories[{i}]", findings):
            if cat["id"] in category_ids:
                findings.error("duplicate category id", f"id {cat['id']}")
            category_ids.add(cat["id"])
    findings.num_categories = len(data["categories"])
    if not category_ids:
        findings.error("no categories", f"{path}: 'categories' is empty")
    images = {}
    for i, img in enumerate(data["images"]):
        label = f"images[{i}]" + (f" (id {img['id']})" if isinstance(img, dict) and "id" in img else "")
        if not _has_keys(img, ("id", "file_name", "width", "height"), "image lacks keys", label, findings):
            continue
        if img["id"] in images:
            findings.error("duplicate image id", f"id {img['id']}")
        sizes = (img["width"], img["height"])
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
            findings.error("image width/height not positive integers", f"{label}: {sizes[0]!r} x {sizes[1]!r}")
            continue
        images[img["id"]] = img
    findings.counts["images"] = len(data["images"])
    return images, category_ids


def _check_annotations(annotations, images, category_ids, findings: DatasetFindings):
    ann_ids = set()
    annotated = set()
    for i, ann in enumerate(annotations):
        label = f"annotation {ann['id']}" if isinstance(ann, dict) and "id" in ann else f"annotations[{i}]"
        if not _has_keys(ann, ("id", "image_id", "category_id", "bbox"), "annotation lacks keys", label, findings):
            continue
        if ann["id"] in ann_ids:
            findings.error("duplicate annotation id", label)
        ann_ids.add(ann["id"])
        img = images.get(ann["image_id"])
        if img is None:
            findings.error("annotation of an unknown image_id", f"{label}: image_id {ann['image_id']!r}")
            continue
        annotated.add(ann["image_id"])
        if ann["category_id"] not in category_ids:
            findings.error("annotation of an unknown category_id", f"{label}: category_id {ann['category_id']!r}")
        if ann.get("ignore", 0):
            findings.error("annotation with 'ignore' set (Detectron2 refuses it)", label)
        problem = box_problem(ann["bbox"], img["width"], img["height"])
        if problem is None:
            continue
        item = f"{label} (image {img['id']} {img['file_name']}): {ann['bbox']}"
        if problem == PARTLY_OUTSIDE:
            findings.counts["clipped boxes"] += 1
        elif problem == ZERO_SIZE:
            findings.warn(ZERO_SIZE, item)
        elif problem in DROPPABLE_BOX_PROBLEMS:
            findings.error(problem, item)
        else:
            findings.error(problem, f"{label} (image {img['id']}): bbox {ann['bbox']!r}")
    findings.counts["annotations"] = len(annotations)
    findings.counts["images without annotations"] = len(set(images) - annotated)


def _image_size(im) -> tuple:
    """(width, height) as Detectron2's ``read_image`` returns it: after the EXIF orientation (JPEG headers)."""
    width, height = im.size
    if im.format == "JPEG" or "exif" in im.info:
        try:
            if im.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
                return height, width
        except Exception:  # Detectron2 ignores unreadable EXIF too
            pass
    return width, height


def _check_image(path: str, img: dict, full: bool, findings: DatasetFindings) -> None:
    try:
        with Image.open(path) as im:
            mode = im.mode
            size = _image_size(im)
            if full:
                im.load()
    except FileNotFoundError:
        findings.error("image file missing", f"{path} (image id {img['id']})")
        return
    except UnidentifiedImageError:
        findings.error("image file not an image PIL can read", f"{path} (image id {img['id']})")
        return
    except (OSError, SyntaxError, ValueError, zlib.error, Image.DecompressionBombError) as e:
        kind = "image file does not decode" if full else "image header not readable"
        findings.error(kind, f"{path} (image id {img['id']}): {type(e).__name__}: {e}")
        return
    if mode in _MISREAD_MODES:
        findings.error(
            "image mode Detectron2 would misread (pixels clipped to 8 bits, e.g. all white); convert the images to "
            "8-bit L or RGB first",
            f"{path}: mode {mode} ({_MISREAD_MODES[mode]})",
        )
    if size != (img["width"], img["height"]):
        findings.error(
            "image size differs from the json", f"{path}: json {img['width']}x{img['height']}, file {size[0]}x{size[1]}"
        )


def check_coco_dataset(
    name: str, json_file: str, image_root: str, *, is_eval: bool, check_images: str = "header"
) -> DatasetFindings:
    """Check dataset ``name`` (its COCO json and images under ``image_root``). ``check_images``: ``"none"``,
    ``"header"`` (PIL's lazy open: format, size, mode) or ``"full"`` (decode every image). An evaluation set
    (``is_eval``) must have annotations."""
    if check_images not in CHECK_IMAGES:
        raise ValueError(f"check_images must be one of {CHECK_IMAGES}, got {check_images!r}")
    findings = DatasetFindings(name, json_file)
    data = _read_json(json_file, findings)
    if data is None:
        return findings
    structure = _check_structure(data, is_eval, findings)
    if structure is None:
        return findings
    images, category_ids = structure
    annotations = data.get("annotations")
    if isinstance(annotations, list):
        _check_annotations(annotations, images, category_ids, findings)
        if is_eval and not annotations:
            findings.error(
                "evaluation set without annotations",
                f"{json_file} has no annotations: every AP would be nan (evaluate on a set with ground truth)",
            )
    if check_images != "none":
        for img in images.values():
            if isinstance(img["file_name"], str):
                _check_image(os.path.join(image_root, img["file_name"]), img, check_images == "full", findings)
    return findings
