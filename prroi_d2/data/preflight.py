"""Pre-flight check of every dataset a run will use, before any model is built.

``run_preflight(cfg, eval_only=..., check_images=..., invalid_boxes=...)`` checks each dataset of
``DATASETS.TRAIN`` (unless ``eval_only``) and ``DATASETS.TEST`` whose ``MetadataCatalog`` entry has ``json_file`` and
``image_root`` (COCO format; others are skipped with an info line), with the rules of
:mod:`prroi_d2.data.coco_checks`, compares ``NUM_CLASSES`` with each json's categories and the categories of the
datasets with each other (Detectron2 numbers the classes of each json by sorted category id, and the evaluation maps
the model's classes back through the test json's ids). A training set listing the test set's category names in
another order is remapped by name to the test set's order (a warning); any other difference is an error. The checks
run once, on the main process; every process then remaps the categories and drops the boxes the check chose to.
Problems raise one :class:`DatasetCheckError` listing all of them.
"""

import functools
import logging
import time
from typing import Dict, List, Tuple

from prroi_d2.data.coco_checks import (
    CHECK_IMAGES,
    DROPPABLE_BOX_PROBLEMS,
    DROPPABLE_PROBLEMS,
    ZERO_SIZE,
    DatasetFindings,
    Resize,
    box_problem,
    check_coco_dataset,
)

__all__ = ["INVALID_BOXES", "CHECK_IMAGES", "DatasetCheckError", "run_preflight", "check_datasets"]

INVALID_BOXES = ("error", "drop")
_CLASS_METADATA = ("thing_classes", "thing_dataset_id_to_contiguous_id")
logger = logging.getLogger(__name__)


class DatasetCheckError(ValueError):
    """A dataset the run would use is broken; the message names every dataset, file and problem found."""


def _num_classes_key(cfg) -> str:
    node = "RETINANET" if cfg.MODEL.META_ARCHITECTURE == "RetinaNet" else "ROI_HEADS"
    return f"MODEL.{node}.NUM_CLASSES"


def _num_classes(cfg) -> int:
    node = cfg.MODEL.RETINANET if cfg.MODEL.META_ARCHITECTURE == "RetinaNet" else cfg.MODEL.ROI_HEADS
    return node.NUM_CLASSES


def _resizes(cfg, is_train: bool, is_eval: bool) -> List[Resize]:
    """The shortest-edge resizes of Detectron2's ``DatasetMapper`` (``build_augmentation``) a dataset goes through:
    ``INPUT.MIN_SIZE_TRAIN`` / ``MAX_SIZE_TRAIN`` for training, ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST`` for
    evaluation. None where the config has no ``INPUT`` (a LazyConfig's view) or uses the aerial augmentations."""
    node = cfg.get("INPUT")
    if node is None or node.get("AERIAL_AUGMENT", {}).get("ENABLED", False):
        return []
    resizes = []
    if is_train:
        sizes = node.MIN_SIZE_TRAIN if isinstance(node.MIN_SIZE_TRAIN, (list, tuple)) else [node.MIN_SIZE_TRAIN]
        setting = f"INPUT.MIN_SIZE_TRAIN {max(sizes)} / INPUT.MAX_SIZE_TRAIN {node.MAX_SIZE_TRAIN}"
        resizes.append(Resize(max(sizes), node.MAX_SIZE_TRAIN, setting))
    if is_eval and node.MIN_SIZE_TEST > 0:  # 0: no resize
        setting = f"INPUT.MIN_SIZE_TEST {node.MIN_SIZE_TEST} / INPUT.MAX_SIZE_TEST {node.MAX_SIZE_TEST}"
        resizes.append(Resize(node.MIN_SIZE_TEST, node.MAX_SIZE_TEST, setting))
    return [r for r in resizes if r.short_edge > 0]


def _first_difference(names: List[str], other: List[str]) -> str:
    """Where two category name lists (by sorted id) first differ, in words."""
    for index, (a, b) in enumerate(zip(names, other)):
        if a != b:
            return f"class {index} is {a!r} here, {b!r} there"
    longer, which = (names, "here") if len(names) > len(other) else (other, "there")
    return f"class {min(len(names), len(other))} {longer[min(len(names), len(other))]!r} only {which}"


def _compare_categories(results: Dict[str, DatasetFindings], test_names: List[str]) -> None:
    """Compare the categories of every dataset with the reference (the first test set, else the first training
    set), in Detectron2's class order (by sorted id). A training set with the same names in another order gets a
    remap (``findings.category_remap``: json id -> the reference's class index); other differences are errors."""
    checked = [name for name in results if results[name].categories is not None]
    ordered = [n for n in checked if n in test_names] + [n for n in checked if n not in test_names]
    if len(ordered) < 2:
        return
    reference = results[ordered[0]]
    ref_names = [name for _, name in reference.categories]
    for name in ordered[1:]:
        findings = results[name]
        names = [category_name for _, category_name in findings.categories]
        if names == ref_names:
            continue
        same_set = sorted(names) == sorted(ref_names) and len(set(names)) == len(names)
        if same_set and name not in test_names:
            index = {category_name: i for i, category_name in enumerate(ref_names)}
            findings.category_remap = {cat_id: index[cat_name] for cat_id, cat_name in findings.categories}
            findings.warn(
                f"categories in another order than {reference.name!r}'s: remapped by name to its order",
                f"{findings.json_file} vs {reference.json_file}: {_first_difference(names, ref_names)}",
            )
            continue
        fix = (
            "give both files the same id for each name"
            if same_set
            else "give both files the same categories (ids and names)"
        )
        findings.error(
            f"categories differ from another dataset's (Detectron2 numbers classes by sorted category id; {fix})",
            f"{findings.json_file} vs {reference.json_file}: {_first_difference(names, ref_names)}",
        )


def check_datasets(
    cfg, *, eval_only: bool = False, check_images: str = "header", invalid_boxes: str = "error"
) -> Dict[str, DatasetFindings]:
    """Check the datasets of ``cfg`` in this process and return their findings; raise :class:`DatasetCheckError`
    if any has an error. With ``invalid_boxes="drop"``, invalid boxes of training sets are warnings (the caller
    drops them: :func:`run_preflight`); evaluation ground truth is never altered, so there they stay errors."""
    from detectron2.data import MetadataCatalog

    if invalid_boxes not in INVALID_BOXES:
        raise ValueError(f"invalid_boxes must be one of {INVALID_BOXES}, got {invalid_boxes!r}")
    test_names = list(dict.fromkeys(cfg.DATASETS.TEST))
    train_names = [] if eval_only else [n for n in dict.fromkeys(cfg.DATASETS.TRAIN) if n not in test_names]
    start = time.perf_counter()
    results: Dict[str, DatasetFindings] = {}
    for name in train_names + test_names:
        meta = MetadataCatalog.get(name)
        json_file, image_root = meta.get("json_file"), meta.get("image_root")
        if not json_file or image_root is None:
            logger.info(f"Dataset {name!r} has no json_file/image_root metadata (not COCO format): not pre-checked")
            continue
        is_eval = name in test_names
        is_train = not eval_only and name in cfg.DATASETS.TRAIN
        resizes = _resizes(cfg, is_train, is_eval)
        findings = check_coco_dataset(
            name, json_file, image_root, is_eval=is_eval, check_images=check_images, resizes=resizes
        )
        if findings.num_categories is not None and findings.num_categories != _num_classes(cfg):
            findings.error(
                "NUM_CLASSES differs from the json's categories",
                f"{_num_classes_key(cfg)} is {_num_classes(cfg)} but {json_file} has {findings.num_categories} "
                f"categories (set {_num_classes_key(cfg)} {findings.num_categories})",
            )
        for kind in DROPPABLE_PROBLEMS:
            if kind in findings.errors and invalid_boxes == "drop" and not is_eval:
                findings.warnings[kind + " (dropped)"] = findings.errors.pop(kind)
            elif kind in findings.errors:
                hint = "evaluation ground truth is never altered" if is_eval else "--invalid-boxes drop drops them"
                findings.errors[f"{kind} ({hint})"] = findings.errors.pop(kind)
        if ZERO_SIZE in findings.warnings:
            note = "kept in the evaluation's ground truth" if is_eval else "dropped, as Detectron2 drops empty boxes"
            findings.warnings[f"{ZERO_SIZE} ({note})"] = findings.warnings.pop(ZERO_SIZE)
        results[name] = findings
    _compare_categories(results, test_names)
    _log(results, time.perf_counter() - start, check_images)
    failed = [f for f in results.values() if f.errors]
    if failed:
        lines = ["Dataset check failed before training (see 'Checks before training' in the README):"]
        for f in failed:
            lines.append(f"  {f.name} ({f.json_file}):")
            lines += ["    " + f.describe(kind, items) for kind, items in f.errors.items()]
        raise DatasetCheckError("\n".join(lines))
    return results


def _log(results: Dict[str, DatasetFindings], seconds: float, check_images: str) -> None:
    for f in results.values():
        counts = ", ".join(f"{v} {k}" for k, v in f.counts.items())
        logger.info(f"Dataset {f.name!r} ({f.json_file}): {counts}")
        for kind, items in f.warnings.items():
            logger.warning(f"Dataset {f.name!r}: {f.describe(kind, items)}")
    images = sum(f.counts.get("images", 0) for f in results.values())
    logger.info(f"Pre-flight check of {len(results)} dataset(s), {images} images ({check_images}): {seconds:.2f} s")


def _drop_invalid_boxes(load, name: str) -> List[dict]:
    """``load()``'s records without the annotations whose box :func:`box_problem` rejects."""
    from detectron2.structures import BoxMode

    records, dropped = load(), 0
    for record in records:
        kept = []
        for ann in record.get("annotations", []):
            bbox = ann["bbox"]
            if ann.get("bbox_mode", BoxMode.XYWH_ABS) != BoxMode.XYWH_ABS:
                bbox = BoxMode.convert(list(bbox), ann["bbox_mode"], BoxMode.XYWH_ABS)
            problem = box_problem(list(bbox), record["width"], record["height"])
            if problem in DROPPABLE_BOX_PROBLEMS or problem == ZERO_SIZE:
                dropped += 1
            else:
                kept.append(ann)
        record["annotations"] = kept
    logger.info(f"Dataset {name!r}: dropped {dropped} invalid boxes")
    return records


def _install_box_filter(name: str) -> None:
    from detectron2.data import DatasetCatalog

    load = DatasetCatalog[name]
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, functools.partial(_drop_invalid_boxes, load, name))


def _load_remapped(json_file: str, image_root: str, category_remap: Dict[object, int]) -> List[dict]:
    """``load_coco_json``'s records with each annotation's json category id mapped through ``category_remap``."""
    from detectron2.data.datasets import load_coco_json

    records = load_coco_json(json_file, image_root)  # no dataset name: json category ids, no metadata written
    for record in records:
        for ann in record["annotations"]:
            ann["category_id"] = category_remap[ann["category_id"]]
    return records


def _install_category_remap(name: str, categories: List[Tuple[object, str]], category_remap: Dict[object, int]):
    """Register COCO-format dataset ``name`` anew: its classes in the order of ``category_remap`` (json id -> class
    index): the loader's category ids and the metadata (``thing_classes``, ``thing_dataset_id_to_contiguous_id``)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    meta = MetadataCatalog.get(name)
    kept = {k: v for k, v in meta.as_dict().items() if k not in ("name", *_CLASS_METADATA)}
    MetadataCatalog.remove(name)
    thing_classes = [n for _, n in sorted(categories, key=lambda c: category_remap[c[0]])]
    MetadataCatalog.get(name).set(**kept, thing_classes=thing_classes, thing_dataset_id_to_contiguous_id=category_remap)
    DatasetCatalog.remove(name)
    loader = functools.partial(_load_remapped, kept["json_file"], kept["image_root"], dict(category_remap))
    DatasetCatalog.register(name, loader)


def run_preflight(cfg, *, eval_only: bool = False, check_images: str = "header", invalid_boxes: str = "error"):
    """:func:`check_datasets` once, on the main process (the others wait), before any model is built; then every
    process registers the datasets whose categories are remapped and the box filter for the training sets whose
    invalid boxes are dropped. Returns the findings (an empty dict on the other processes)."""
    from detectron2.utils import comm

    results, failure = {}, None
    if comm.is_main_process():
        try:
            results = check_datasets(cfg, eval_only=eval_only, check_images=check_images, invalid_boxes=invalid_boxes)
        except DatasetCheckError as e:
            failure = str(e)
    to_filter = sorted(n for n, f in results.items() if any(k.endswith("(dropped)") for k in f.warnings))
    to_remap = {n: (f.categories, f.category_remap) for n, f in results.items() if f.category_remap is not None}
    if comm.get_world_size() > 1:  # every process learns the outcome: none waits for a main process that stopped
        to_filter, to_remap, failure = comm.all_gather((to_filter, to_remap, failure))[0]
    if failure is not None:
        raise DatasetCheckError(failure)
    for name, (categories, category_remap) in to_remap.items():
        _install_category_remap(name, categories, category_remap)
    for name in to_filter:
        _install_box_filter(name)
    return results
