"""The rules of the dataset pre-flight check for one COCO-format json and its image folder.

:func:`check_coco_dataset` reads the json once, checks its encoding and structure, every annotation's box,
``iscrowd``, ``area`` and ``segmentation``, and every image's header (or its full decode: format, size after the
EXIF orientation Detectron2 applies, mode, and the size the config's resize gives it), and returns a
:class:`DatasetFindings`: errors, warnings and counts, each kind with its count and the first offending ids or
paths. :func:`box_problem` is the box rule, shared with the filter that drops invalid boxes
(:mod:`prroi_d2.data.preflight`).
"""

import functools
import io
import json
import math
import os
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from PIL import Image, UnidentifiedImageError

__all__ = [
    "CHECK_IMAGES",
    "DROPPABLE_BOX_PROBLEMS",
    "DROPPABLE_PROBLEMS",
    "DatasetFindings",
    "Resize",
    "box_problem",
    "check_coco_dataset",
]

CHECK_IMAGES = ("none", "header", "full")
# Box problems a training set may drop (--invalid-boxes drop); "zero size" is always dropped with a warning.
DROPPABLE_BOX_PROBLEMS = ("non-finite bbox", "negative bbox width/height", "bbox fully outside its image")
# An annotation whose segmentation has no valid polygon: Detectron2's load_coco_json drops the whole annotation.
NO_VALID_POLYGON = (
    "segmentation without a valid polygon (Detectron2 drops the annotation; a polygon is an even count >= 6 of numbers)"
)
# What --invalid-boxes drop may drop from a training set (its box filter, or Detectron2's loader itself).
DROPPABLE_PROBLEMS = DROPPABLE_BOX_PROBLEMS + (NO_VALID_POLYGON,)
ZERO_SIZE = "zero bbox width/height"
PARTLY_OUTSIDE = "partly outside its image (clipped)"
# PIL modes Detectron2's read_image would misread: convert("RGB") clips 16/32-bit and float pixels to 8 bits.
_MISREAD_MODES = {"I;16": "16-bit grayscale", "I;16B": "16-bit grayscale", "I;16L": "16-bit grayscale",
                  "I;16N": "16-bit grayscale", "I": "32-bit integer", "F": "32-bit float"}  # fmt: skip
_EXIF_ORIENTATION = 0x0112
# EXIF orientations whose transpose (Detectron2's read_image applies it) swaps width and height.
_SWAPPING_ORIENTATIONS = {5: "transpose", 6: "rotate 90 degrees clockwise", 7: "transverse",
                          8: "rotate 90 degrees counter-clockwise"}  # fmt: skip
_EXAMPLES = 5


class Resize(NamedTuple):
    """The shortest-edge resize a dataset's images go through (Detectron2's ``ResizeShortestEdge``): the largest
    short-edge length it may draw, the longest-edge cap and the config keys they come from (for messages)."""

    short_edge: int
    max_size: int
    setting: str


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
    # (id, name) of every category, by id: Detectron2's contiguous class order. None if the categories are broken.
    categories: Optional[List[Tuple[object, str]]] = None
    # json category id -> class index, where the pre-flight remaps this set's classes by name to another set's order
    category_remap: Optional[Dict[object, int]] = None

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
    encoding = json.detect_encoding(raw[:4])
    if encoding != "utf-8":  # json.loads reads these bytes, but pycocotools opens the file as UTF-8 text and fails
        what = "UTF-8 with a byte-order mark (BOM)" if encoding == "utf-8-sig" else encoding.upper()
        findings.error(
            "json not plain UTF-8 (pycocotools cannot read it; save it as UTF-8 without a BOM)",
            f"{path}: encoded as {what}",
        )
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
    categories = []
    for i, cat in enumerate(data["categories"]):
        if _has_keys(cat, ("id", "name"), "category lacks keys", f"categories[{i}]", findings):
            if cat["id"] in category_ids:
                findings.error("duplicate category id", f"id {cat['id']}")
            category_ids.add(cat["id"])
            categories.append((cat["id"], cat["name"]))
    findings.num_categories = len(data["categories"])
    if len(categories) == len(data["categories"]) == len(category_ids):
        try:
            findings.categories = sorted(categories, key=lambda c: c[0])
        except TypeError:
            findings.error("category ids not all integers", f"{path}: ids {sorted(map(repr, category_ids))}")
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


def _segmentation_problem(segm, img) -> Optional[str]:
    """What Detectron2's ``load_coco_json`` would do wrong with ``segm`` of an annotation on image ``img``: ``None``
    (fine; also an empty value, read as no segmentation), ``NO_VALID_POLYGON`` (the annotation is dropped),
    ``"some polygons invalid"`` (those polygons are dropped) or what is malformed (Detectron2 or the mask code would
    crash on it)."""
    if not segm:
        return None
    if isinstance(segm, dict):
        missing = [k for k in ("size", "counts") if k not in segm]
        if missing:
            return f"RLE segmentation lacks {', '.join(repr(k) for k in missing)}"
        if segm["size"] != [img["height"], img["width"]]:
            return f"RLE segmentation 'size' {segm['size']!r} is not the image's [height, width]"
        if not isinstance(segm["counts"], (list, str)):
            return f"RLE segmentation 'counts' is a {type(segm['counts']).__name__}, not a list or string"
        return None
    if not isinstance(segm, list):
        return f"segmentation is a {type(segm).__name__}, not a list of polygons or an RLE dict"
    if not all(isinstance(poly, list) for poly in segm):
        return "segmentation polygons are not lists of numbers (a polygon list needs [[x1, y1, x2, y2, ...], ...])"
    valid = sum(len(poly) % 2 == 0 and len(poly) >= 6 for poly in segm)
    if valid == 0:
        return NO_VALID_POLYGON
    return "some polygons invalid" if valid < len(segm) else None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_crowd_area_segmentation(ann, label: str, img, is_eval: bool, findings: DatasetFindings) -> None:
    """``iscrowd`` 0 or 1 (a string "0" is crowd to pycocotools and dropped by Detectron2's training); in an
    evaluation set (COCOeval reads them; training reads neither) both present and ``area`` a finite number >= 0;
    and the segmentation's shape."""
    missing = [key for key in ("iscrowd", "area") if key not in ann]
    if missing and is_eval:
        findings.error(
            "annotation of an evaluation set lacks keys COCOeval reads (add 'iscrowd': 0 and 'area': the object's "
            "area in pixels)",
            f"{label} lacks {', '.join(repr(k) for k in missing)}",
        )
    crowd = ann.get("iscrowd", 0)
    if not (isinstance(crowd, (int, float)) and crowd in (0, 1)):
        findings.error(
            "'iscrowd' not the number 0 or 1 (a string or null is read as crowd or crashes evaluation)",
            f"{label}: 'iscrowd' {crowd!r}",
        )
    area = ann.get("area", 0)
    if is_eval and not (_is_number(area) and math.isfinite(area) and area >= 0):  # COCOeval's area ranges
        findings.error("'area' not a finite number >= 0 (COCOeval's area ranges read it)", f"{label}: 'area' {area!r}")
    problem = _segmentation_problem(ann.get("segmentation"), img)
    if problem == "some polygons invalid":
        findings.counts["annotations with invalid polygons dropped by Detectron2"] += 1
    elif problem == NO_VALID_POLYGON:
        findings.error(problem, f"{label} (image {img['id']}): 'segmentation' {_short(ann['segmentation'])}")
    elif problem is not None:
        findings.error("'segmentation' malformed", f"{label}: {problem}: {_short(ann['segmentation'])}")


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_annotations(annotations, images, category_ids, is_eval: bool, findings: DatasetFindings):
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
        _check_crowd_area_segmentation(ann, label, img, is_eval, findings)
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


def _orientation(im, full: bool) -> Optional[int]:
    """The EXIF orientation Detectron2's ``read_image`` applies: ``Image.getexif()`` of the freshly opened image (EXIF
    of JPEG, TIFF, WebP and PNG, else XMP's ``tiff:Orientation``), or None. In a header check a PNG's chunks before
    its image data only (PIL's PNG ``getexif`` would decode the whole image to reach later chunks)."""
    try:
        exif = im.getexif() if full or im.format != "PNG" else Image.Image.getexif(im)
        return exif.get(_EXIF_ORIENTATION)
    except Exception:  # Detectron2 ignores unreadable EXIF too
        return None


@functools.lru_cache(maxsize=None)
def _pillow_orients_tiff_itself() -> bool:
    """Whether this PIL applies a TIFF's orientation tag itself when reading (Pillow >= 11: its size is the oriented
    one from the start); Detectron2's ``read_image`` then applies it a second time."""
    buffer = io.BytesIO()
    Image.new("L", (2, 1)).save(buffer, format="TIFF", tiffinfo={_EXIF_ORIENTATION: 6})
    with Image.open(buffer) as im:
        return im.size == (1, 2)


def _check_image(path: str, img: dict, full: bool, findings: DatasetFindings) -> None:
    try:
        with Image.open(path) as im:
            mode, opened_size, image_format = im.mode, im.size, im.format
            orientation = _orientation(im, full)  # before any decode, as read_image does
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
    if image_format == "TIFF" and orientation in range(2, 9) and _pillow_orients_tiff_itself():
        findings.error(
            "TIFF with an EXIF orientation: PIL applies it when reading and Detectron2's read_image applies it again "
            "(the pixels come out turned twice); store the pixels upright without the tag, or as PNG/JPEG",
            f"{path} (image id {img['id']}): orientation {orientation}",
        )
        return
    # read_image's size: PIL's size at open, transposed by the orientation Detectron2 applies.
    size = opened_size[::-1] if orientation in _SWAPPING_ORIENTATIONS else opened_size
    json_size = (img["width"], img["height"])
    if size != json_size and opened_size == json_size:
        findings.error(
            "image size differs from the json after the EXIF orientation Detectron2 applies (give the json the "
            "turned width/height, with boxes in the turned image, or store the pixels upright without the tag)",
            f"{path} (image id {img['id']}): json {json_size[0]}x{json_size[1]} is the stored size, EXIF orientation "
            f"{orientation} ({_SWAPPING_ORIENTATIONS[orientation]}) makes it {size[0]}x{size[1]}",
        )
    elif size != json_size:
        note = f" (after EXIF orientation {orientation})" if size != opened_size else ""
        findings.error(
            "image size differs from the json",
            f"{path}: json {json_size[0]}x{json_size[1]}, file {size[0]}x{size[1]}{note}",
        )


def _check_resized_size(path: str, img: dict, resize: Resize, findings: DatasetFindings) -> None:
    """An image so elongated that the resize makes its short side 0 px (the long side hits ``max_size`` first)."""
    from detectron2.data.transforms import ResizeShortestEdge

    width, height = img["width"], img["height"]
    new_h, new_w = ResizeShortestEdge.get_output_shape(height, width, resize.short_edge, resize.max_size)
    if min(new_h, new_w) < 1:
        findings.error(
            f"image resized to 0 px on one side by {resize.setting} (crop or drop the image, or raise the max size)",
            f"{path} (image id {img['id']}): {width}x{height} -> {new_w}x{new_h}",
        )


def check_coco_dataset(
    name: str,
    json_file: str,
    image_root: str,
    *,
    is_eval: bool,
    check_images: str = "header",
    resizes: Sequence[Resize] = (),
) -> DatasetFindings:
    """Check dataset ``name`` (its COCO json and images under ``image_root``). ``check_images``: ``"none"``,
    ``"header"`` (PIL's lazy open: format, size, EXIF orientation, mode) or ``"full"`` (decode every image). An
    evaluation set (``is_eval``) must have annotations with ``iscrowd`` and ``area``. ``resizes``: the
    shortest-edge resizes the images go through; an image one of them shrinks to 0 px is an error."""
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
        _check_annotations(annotations, images, category_ids, is_eval, findings)
        if is_eval and not annotations:
            findings.error(
                "evaluation set without annotations",
                f"{json_file} has no annotations: every AP would be nan (evaluate on a set with ground truth)",
            )
    for img in images.values():
        path = os.path.join(image_root, img["file_name"]) if isinstance(img["file_name"], str) else img["file_name"]
        if check_images != "none" and isinstance(path, str):
            _check_image(path, img, check_images == "full", findings)
        for resize in resizes:
            _check_resized_size(path, img, resize, findings)
    return findings
