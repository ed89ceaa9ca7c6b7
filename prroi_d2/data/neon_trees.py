"""NEON tree crowns: real airborne RGB imagery (10 cm/pixel) with hand-drawn crown boxes, as COCO-format datasets.

The two Yellowstone images and their Pascal VOC boxes ship inside the wheel of the PyPI package ``deepforest==2.1.0``
(MIT licence; imagery of the US National Ecological Observatory Network). Nothing of deepforest's code or its
requirements is used: the four files are taken from an installed ``deepforest`` (found without importing it) or from
its wheel, fetched with ``pip download --no-deps`` into the dataset cache and checked against a pinned sha256.

Datasets (one class, "tree"), built once under ``$PRROI_D2_DATASETS/neon_trees_v<version>/`` with a stamp:

- ``neon_trees_train``: the training image (2299 x 2472 px, 574 crowns) as overlapping tiles of ``TILE`` px every
  ``TILE_STRIDE`` px (every crown lies whole in at least one tile; decoding a tile is cheap, the whole PNG is not).
- ``neon_trees_train_fit`` / ``neon_trees_train_holdout``: the training image without / only its bottom
  ``HOLDOUT_ROWS`` rows, for choosing settings on the training image (the holdout strip is one image).
- ``neon_trees_val``: the validation image (1249 x 1035 px, 279 crowns), whole; it only reports.
- ``neon_trees_train_image``: the training image whole (574 crowns), for checks.

Rule for a box cut by a tile, strip or crop edge (:func:`clip_to_window`): the box is clipped to the window and kept
when at least ``MIN_VISIBLE_FRACTION`` of its area lies inside; a box with less (but some) area inside is kept as
``iscrowd: 1`` in the json, so COCO evaluation ignores detections on it and training drops it.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile

import numpy as np

from prroi_d2.data.boxes import clip_to_window
from prroi_d2.data.paths import default_datasets_root

__all__ = [
    "DEEPFOREST_VERSION",
    "NEON_TREES_SPLITS",
    "NEON_TREES_VERSION",
    "NeonTreesDownloadError",
    "clip_to_window",
    "prepare_neon_trees",
    "read_voc_boxes",
    "register_neon_trees_datasets",
]

# Bump on any change to what is written (tiling, strip, rule): it names the cache folder and enters the stamp.
NEON_TREES_VERSION = 1
DEEPFOREST_VERSION = "2.1.0"
WHEEL_NAME = f"deepforest-{DEEPFOREST_VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54"
TRAIN_STEM = "2019_YELL_2_528000_4978000_image_crop2"
VAL_STEM = "2019_YELL_2_541000_4977000_image_crop"
SOURCE_SHA256 = {
    TRAIN_STEM + ".png": "a9bdb0f4447fdd899d22f567e0e20ba8320c5413b2ad0cd0ac8d9f3b6e0f9767",
    TRAIN_STEM + ".xml": "bd431af6a5086d721eb731b22f5ea28cd8a8eab06883efc1c665391acbc68e11",
    VAL_STEM + ".png": "178e58a23cc2642226a364a30f71bd9258ddc1b012c826f12250914a90c7a131",
    VAL_STEM + ".xml": "cefe4b96888bacbf8af1674f000082e549aa707aa6590d545effb23e43f26631",
}
NEON_TREES_SPLITS = ("train", "train_fit", "train_holdout", "train_image", "val")
CLASSES = ("tree",)
TILE = 640
TILE_STRIDE = 320
HOLDOUT_ROWS = 512
MIN_VISIBLE_FRACTION = 0.5


class NeonTreesDownloadError(RuntimeError):
    """The deepforest wheel could not be fetched or is not the pinned one."""


# ----------------------------------------------------------------------------------------------------------------
# Boxes
# ----------------------------------------------------------------------------------------------------------------


def read_voc_boxes(xml_path):
    """``(boxes, (height, width))`` of a Pascal VOC file: boxes (N, 4) float64 XYXY in pixel units, as written."""
    try:
        root = ET.parse(xml_path).getroot()
        width, height = int(root.findtext("size/width")), int(root.findtext("size/height"))
        boxes = [
            [float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
            for obj in root.iter("object")
        ]
    except (ET.ParseError, TypeError, ValueError) as e:
        raise ValueError(f"{xml_path}: not a Pascal VOC annotation file with size and bndbox fields ({e})") from e
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if bad.any():
        raise ValueError(f"{xml_path}: {int(bad.sum())} boxes with xmax <= xmin or ymax <= ymin")
    return boxes, (height, width)


def _tile_starts(length, tile, stride):
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


# ----------------------------------------------------------------------------------------------------------------
# Source files: installed deepforest, the cache, or the wheel
# ----------------------------------------------------------------------------------------------------------------


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _has_sources(folder):
    return folder is not None and all(os.path.isfile(os.path.join(folder, name)) for name in SOURCE_SHA256)


def _installed_deepforest_data():
    """``deepforest/data`` of an installed deepforest (located, not imported), or None."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("deepforest")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = os.path.join(location, "data")
        if _has_sources(folder):
            return folder
    return None


def wheel_path(root=None):
    """Where the deepforest wheel is kept (and where to put it by hand): ``<root>/downloads/<wheel>``."""
    return os.path.join(root or default_datasets_root(), "downloads", WHEEL_NAME)


def _download_wheel(root, pip_args=()):
    """``pip download --no-deps deepforest==<version>`` into ``<root>/downloads`` (temporary name, then renamed)."""
    target = wheel_path(root)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".pip-download-", dir=os.path.dirname(target))
    command = [sys.executable, "-m", "pip", "download", "--no-deps", f"deepforest=={DEEPFOREST_VERSION}", "-d", tmp]
    command += list(pip_args)
    by_hand = (
        f"Fetch it on a machine with access to PyPI (pip download --no-deps deepforest=={DEEPFOREST_VERSION}) and put "
        f"{WHEEL_NAME} at {target}, or install deepforest=={DEEPFOREST_VERSION}."
    )
    try:
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        fetched = os.path.join(tmp, WHEEL_NAME)
        if proc.returncode != 0 or not os.path.isfile(fetched):
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-4:])
            raise NeonTreesDownloadError(
                f"Could not download the PyPI package deepforest=={DEEPFOREST_VERSION} (it holds the NEON tree-crown "
                f"images).\nCommand that failed (exit {proc.returncode}): {' '.join(command)}\n{tail}\n{by_hand}"
            )
        digest = _sha256(fetched)
        if digest != WHEEL_SHA256:
            raise NeonTreesDownloadError(
                f"{WHEEL_NAME} downloaded by `{' '.join(command)}` has sha256 {digest}, expected {WHEEL_SHA256}. "
                + by_hand
            )
        os.replace(fetched, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _extract_sources(wheel, folder):
    """The four files of the wheel's ``deepforest/data/`` into ``folder`` (after checking the wheel's sha256)."""
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        raise NeonTreesDownloadError(
            f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256} (deepforest=={DEEPFOREST_VERSION}); delete it "
            "and try again, or put the right wheel there"
        )
    with zipfile.ZipFile(wheel) as zf:
        for name in SOURCE_SHA256:
            with zf.open(f"deepforest/data/{name}") as src, open(os.path.join(folder, name), "wb") as dst:
                shutil.copyfileobj(src, dst)


def _checked_sources(folder):
    for name, expected in SOURCE_SHA256.items():
        digest = _sha256(os.path.join(folder, name))
        if digest != expected:
            raise ValueError(f"{os.path.join(folder, name)} has sha256 {digest}, expected {expected}")
    return folder


# ----------------------------------------------------------------------------------------------------------------
# COCO files
# ----------------------------------------------------------------------------------------------------------------


def _stamp():
    params = {
        "version": NEON_TREES_VERSION,
        "sources": SOURCE_SHA256,
        "tile": TILE,
        "tile_stride": TILE_STRIDE,
        "holdout_rows": HOLDOUT_ROWS,
        "min_visible_fraction": MIN_VISIBLE_FRACTION,
    }
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode("utf-8")).hexdigest()


def _is_current(data_dir):
    try:
        with open(os.path.join(data_dir, "stamp"), encoding="utf-8") as f:
            current = f.read().strip() == _stamp()
    except OSError:
        return False
    return current and all(os.path.isfile(os.path.join(data_dir, f"{split}.json")) for split in NEON_TREES_SPLITS)


def _annotations(boxes, window, image_id, first_id):
    """COCO annotations of ``boxes`` (XYXY, source image coordinates) seen through ``window`` (the rule above)."""
    clipped, visible = clip_to_window(boxes, window)
    annotations = []
    for box, frac in zip(clipped.tolist(), visible.tolist()):
        if frac <= 0.0 or box[2] <= box[0] or box[3] <= box[1]:
            continue
        w, h = box[2] - box[0], box[3] - box[1]
        annotations.append(
            {
                "id": first_id + len(annotations),
                "image_id": image_id,
                "category_id": 1,
                "bbox": [box[0], box[1], w, h],
                "area": w * h,
                "iscrowd": int(frac < MIN_VISIBLE_FRACTION),
            }
        )
    return annotations


def _write_split(data_dir, split, image, boxes, windows, description):
    """Crop ``image`` (H, W, 3 uint8) to each window, write ``images/<split>/*.png`` and ``<split>.json``."""
    from PIL import Image

    folder = os.path.join(data_dir, "images", split)
    os.makedirs(folder, exist_ok=True)
    images, annotations = [], []
    for image_id, (x0, y0, x1, y1) in enumerate(windows, start=1):
        file_name = f"{split}_{x0:04d}_{y0:04d}.png"
        Image.fromarray(image[y0:y1, x0:x1]).save(os.path.join(folder, file_name), compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "height": y1 - y0, "width": x1 - x0})
        images[-1]["window"] = [x0, y0, x1, y1]  # in the source image
        annotations += _annotations(boxes, (x0, y0, x1, y1), image_id, len(annotations) + 1)
    coco = {
        "info": {"description": description, "version": str(NEON_TREES_VERSION)},
        "licenses": [{"name": "MIT (deepforest); imagery: National Ecological Observatory Network (NEON)"}],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "tree", "supercategory": "plant"}],
    }
    with open(os.path.join(data_dir, f"{split}.json"), "w", encoding="utf-8") as f:
        json.dump(coco, f, separators=(",", ":"))


def _build(sources, data_dir):
    from PIL import Image

    read = {}
    for stem in (TRAIN_STEM, VAL_STEM):
        boxes, (height, width) = read_voc_boxes(os.path.join(sources, stem + ".xml"))
        with Image.open(os.path.join(sources, stem + ".png")) as im:
            image = np.asarray(im.convert("RGB"))
        if image.shape[:2] != (height, width):
            raise ValueError(f"{stem}.png is {image.shape[1]}x{image.shape[0]}, its xml says {width}x{height}")
        read[stem] = (image, boxes)
    image, boxes = read[TRAIN_STEM]
    height, width = image.shape[:2]
    fit_rows = height - HOLDOUT_ROWS

    def tiles(rows):
        return [
            (x, y, min(x + TILE, width), min(y + TILE, rows))
            for y in _tile_starts(rows, TILE, TILE_STRIDE)
            for x in _tile_starts(width, TILE, TILE_STRIDE)
        ]

    source = f"NEON {TRAIN_STEM}.png (deepforest {DEEPFOREST_VERSION})"
    _write_split(data_dir, "train", image, boxes, tiles(height), f"{source}, tiles of {TILE} px")
    _write_split(data_dir, "train_fit", image, boxes, tiles(fit_rows), f"{source} rows < {fit_rows}, tiles")
    _write_split(
        data_dir, "train_holdout", image, boxes, [(0, fit_rows, width, height)], f"{source} rows >= {fit_rows}"
    )
    image, boxes = read[VAL_STEM]
    val_source = f"NEON {VAL_STEM}.png (deepforest {DEEPFOREST_VERSION})"
    _write_split(data_dir, "val", image, boxes, [(0, 0, image.shape[1], image.shape[0])], val_source)
    # The whole training image too (574 crowns), for checks and for evaluating on what was trained on.
    image, boxes = read[TRAIN_STEM]
    _write_split(data_dir, "train_image", image, boxes, [(0, 0, width, height)], source)


def prepare_neon_trees(root=None, pip_args=()):
    """Make sure ``<root>/neon_trees_v<version>/`` holds every split; returns that folder.

    Sources, in order: ``<data dir>/source/`` (kept from an earlier build), an installed deepforest, the wheel at
    :func:`wheel_path`, or the wheel fetched by ``pip download`` (``pip_args`` are appended to its command, e.g. an
    index URL). Everything is built in a temporary sibling and renamed into place, so a failure leaves nothing
    half-written. Raises :class:`NeonTreesDownloadError` when the wheel can't be fetched.
    """
    root = root or default_datasets_root()
    data_dir = os.path.join(root, f"neon_trees_v{NEON_TREES_VERSION}")
    if _is_current(data_dir):
        return data_dir
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".neon_trees_v{NEON_TREES_VERSION}.tmp-", dir=root)
    try:
        sources = os.path.join(tmp, "source")
        os.makedirs(sources)
        found = next(
            (d for d in (os.path.join(data_dir, "source"), _installed_deepforest_data()) if _has_sources(d)), None
        )
        if found is not None:
            for name in SOURCE_SHA256:
                shutil.copyfile(os.path.join(found, name), os.path.join(sources, name))
        else:
            wheel = wheel_path(root)
            _extract_sources(wheel if os.path.isfile(wheel) else _download_wheel(root, pip_args), sources)
        _build(_checked_sources(sources), tmp)
        with open(os.path.join(tmp, "stamp"), "w", encoding="utf-8") as f:
            f.write(_stamp() + "\n")
        if not _is_current(data_dir):
            stale = os.path.join(tmp, "stale")
            try:
                os.rename(data_dir, stale)
            except OSError:
                pass  # absent, or another process moved it away
            try:
                os.rename(tmp, data_dir)
                tmp = os.path.join(data_dir, "stale")  # the old copy moved in with the new one: remove it
            except OSError:
                pass  # another process installed its (identical) copy first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _is_current(data_dir):
        raise RuntimeError(f"could not prepare the NEON tree-crown datasets under {data_dir}")
    return data_dir


def register_neon_trees_datasets(root=None, prefix="neon_trees", pip_args=()):
    """Prepare (if missing or stale) and register ``{prefix}_{split}`` for every split of ``NEON_TREES_SPLITS``.

    Names already registered with the same json file are skipped. Returns ``{name: json_path}``.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    data_dir = prepare_neon_trees(root, pip_args)
    registered = {}
    for split in NEON_TREES_SPLITS:
        name, json_path = f"{prefix}_{split}", os.path.join(data_dir, f"{split}.json")
        if name in DatasetCatalog.list():
            existing = MetadataCatalog.get(name).get("json_file")
            if existing != json_path:
                raise ValueError(f"dataset {name!r} is already registered with json_file={existing!r}")
        else:
            register_coco_instances(
                name, {"thing_classes": list(CLASSES)}, json_path, os.path.join(data_dir, "images", split)
            )
        registered[name] = json_path
    return registered
