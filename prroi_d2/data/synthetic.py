"""An embedded synthetic detection dataset in COCO format, generated on first use (the default data of IoU-Net jobs):
the COCO files, their cache under ``$PRROI_D2_DATASETS`` and the Detectron2 registration. Each image is rendered by
:func:`~prroi_d2.data.synthetic_render.render_synthetic_image` (five shape families, hard to localise on purpose;
identical bit for bit on every machine) and written as a PNG with uncompressed deflate blocks (no dependence on the
zlib build)."""

import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
import zlib

import numpy as np

from prroi_d2.data.paths import default_datasets_root  # also importable from here, as before
from prroi_d2.data.preflight import DatasetCheckError
from prroi_d2.data.synthetic_render import SYNTHETIC_CLASSES, render_synthetic_image

__all__ = [
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_VERSION",
    "default_datasets_root",
    "generate_synthetic_coco",
    "prepare_synthetic_split",
    "register_synthetic_datasets",
    "render_synthetic_image",
]

# Bump on any change to the rendering: it names the cache folder and enters the stamp.
SYNTHETIC_VERSION = 1


def _png_bytes(img):
    """An 8-bit RGB PNG with stored (uncompressed) deflate blocks: the bytes depend on nothing but the pixels."""
    height, width = img.shape[:2]
    raw = np.zeros((height, 1 + 3 * width), dtype=np.uint8)
    raw[:, 1:] = img.reshape(height, 3 * width)
    data = raw.tobytes()
    blocks = [b"\x78\x01"]
    for start in range(0, len(data), 65535):
        part = data[start : start + 65535]
        final = 1 if start + 65535 >= len(data) else 0
        blocks.append(struct.pack("<BHH", final, len(part), len(part) ^ 0xFFFF) + part)
    blocks.append(struct.pack(">I", zlib.adler32(data)))

    def chunk(tag, payload):
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(blocks)) + chunk(b"IEND", b"")


def generate_synthetic_coco(root, split, num_images, seed=0, image_size=(160, 192)):
    """Write ``<root>/<split>/*.png`` and ``<root>/<split>.json`` (COCO instances); returns the json path.

    A pure function of its arguments: same bytes on every machine. ``image_size`` is (height, width).
    """
    height, width = (int(v) for v in image_size)
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, int(num_images) + 1):
        img, objects = render_synthetic_image(seed, split, image_id, (height, width))
        file_name = f"{image_id:06d}.png"
        with open(os.path.join(image_dir, file_name), "wb") as f:
            f.write(_png_bytes(img))
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for obj in objects:
            if obj["annotated"]:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": obj["category_id"],
                        "bbox": obj["bbox"],
                        "area": obj["area"],
                        "iscrowd": 0,
                        "segmentation": [obj["segmentation"]],
                    }
                )
    coco = {
        "info": {
            "description": f"prroi_d2 synthetic shapes v{SYNTHETIC_VERSION} ({split}, seed {seed})",
            "version": str(SYNTHETIC_VERSION),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SYNTHETIC_CLASSES)],
    }
    json_path = os.path.join(root, f"{split}.json")
    with open(json_path, "wb") as f:
        f.write(json.dumps(coco, separators=(",", ":")).encode("utf-8"))
    return json_path


def _make_temp_folder(root, split):
    """A temporary folder in ``root`` (made if missing); an unwritable place raises :class:`DatasetCheckError`
    naming it and the variable that sets it."""
    try:
        os.makedirs(root, exist_ok=True)
        return tempfile.mkdtemp(prefix=f".{split}.tmp-", dir=root)
    except OSError as e:
        raise DatasetCheckError(
            f"Cannot write the synthetic dataset under {root}: {e.strerror or e} (set PRROI_D2_DATASETS to a "
            "writable folder)"
        ) from None


def _stamp(split, num_images, seed, image_size):
    params = {"version": SYNTHETIC_VERSION, "split": split, "num_images": int(num_images), "seed": int(seed)}
    params["image_size"] = [int(v) for v in image_size]
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode("utf-8")).hexdigest()


def _is_current(root, split, stamp):
    try:
        with open(os.path.join(root, f"{split}.stamp"), encoding="utf-8") as f:
            current = f.read().strip() == stamp
    except OSError:
        return False
    return current and os.path.isfile(os.path.join(root, f"{split}.json")) and os.path.isdir(os.path.join(root, split))


def prepare_synthetic_split(root, split, num_images, seed=0, image_size=(160, 192)):
    """Make sure ``<root>/<split>`` and ``<root>/<split>.json`` hold the requested data; returns the json path.

    Reuses them when ``<root>/<split>.stamp`` matches the parameters, else generates into a temporary sibling and
    renames it into place, and prints how many seconds that took. Several processes may call this at once: they
    generate the same bytes and a process that loses the race to install its copy uses the winner's.
    """
    stamp = _stamp(split, num_images, seed, image_size)
    json_path = os.path.join(root, f"{split}.json")
    if _is_current(root, split, stamp):
        return json_path
    tmp = _make_temp_folder(root, split)
    start = time.perf_counter()
    try:
        generate_synthetic_coco(tmp, split, num_images, seed, image_size)
        seconds = time.perf_counter() - start
        print(f"prroi_d2: generated the synthetic split {split!r} ({num_images} images) in {seconds:.1f} s", flush=True)
        with open(os.path.join(tmp, f"{split}.stamp"), "w", encoding="utf-8") as f:
            f.write(stamp + "\n")
        if not _is_current(root, split, stamp):
            # Invalidate first, so nobody trusts a half-replaced split; the stamp goes back last.
            try:
                os.remove(os.path.join(root, f"{split}.stamp"))
            except FileNotFoundError:
                pass
            image_dir = os.path.join(root, split)
            try:
                os.rename(image_dir, os.path.join(tmp, "stale"))
            except OSError:
                pass  # absent, or another process moved it away
            try:
                os.rename(os.path.join(tmp, split), image_dir)
            except OSError:
                pass  # another process installed its (identical) images first
            os.replace(os.path.join(tmp, f"{split}.json"), json_path)
            os.replace(os.path.join(tmp, f"{split}.stamp"), os.path.join(root, f"{split}.stamp"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _is_current(root, split, stamp):
        raise RuntimeError(f"could not prepare the synthetic split {split!r} under {root}")
    return json_path


def register_synthetic_datasets(root=None, num_train=400, num_val=100, prefix="iounet_synth", num_holdout=100):
    """Generate (if missing or stale) and register ``{prefix}_train`` / ``{prefix}_val`` / ``{prefix}_holdout`` with
    Detectron2. The holdout split is more training data, never trained on: settings are chosen on it, so that the
    validation split only reports.

    ``root`` is the datasets directory (default: :func:`default_datasets_root`); the files live in
    ``<root>/synthetic_v<version>/``. Names already registered with the same json file are skipped. Returns
    ``{name: json_path}``.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    data_root = os.path.join(root or default_datasets_root(), f"synthetic_v{SYNTHETIC_VERSION}")
    registered = {}
    for split, num_images in (("train", num_train), ("val", num_val), ("holdout", num_holdout)):
        name = f"{prefix}_{split}"
        json_path = prepare_synthetic_split(data_root, split, num_images)
        if name in DatasetCatalog.list():
            existing = MetadataCatalog.get(name).get("json_file")
            if existing != json_path:
                raise ValueError(f"dataset {name!r} is already registered with json_file={existing!r}")
        else:
            meta = {"thing_classes": list(SYNTHETIC_CLASSES)}  # the json's categories, ids 1..K in this order
            register_coco_instances(name, meta, json_path, os.path.join(data_root, split))
        registered[name] = json_path
    return registered
