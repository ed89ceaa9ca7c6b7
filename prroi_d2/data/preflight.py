"""Pre-flight check of every dataset a run will use, before any model is built.

``run_preflight(cfg, eval_only=..., check_images=..., invalid_boxes=...)`` checks each dataset of
``DATASETS.TRAIN`` (unless ``eval_only``) and ``DATASETS.TEST`` whose ``MetadataCatalog`` entry has ``json_file`` and
``image_root`` (COCO format; others are skipped with an info line), with the rules of
:mod:`prroi_d2.data.coco_checks`, and compares ``NUM_CLASSES`` with each json's categories. The checks run once, on
the main process; every process then drops the boxes the check chose to drop. Problems raise one
:class:`DatasetCheckError` listing all of them.
"""

import functools
import logging
import time
from typing import Dict, List

from prroi_d2.data.coco_checks import (
    CHECK_IMAGES,
    DROPPABLE_BOX_PROBLEMS,
    ZERO_SIZE,
    DatasetFindings,
    box_problem,
    check_coco_dataset,
)

__all__ = ["INVALID_BOXES", "CHECK_IMAGES", "DatasetCheckError", "run_preflight", "check_datasets"]

INVALID_BOXES = ("error", "drop")
logger = logging.getLogger(__name__)


class DatasetCheckError(ValueError):
    """A dataset the run would use is broken; the message names every dataset, file and problem found."""


def _num_classes_key(cfg) -> str:
    node = "RETINANET" if cfg.MODEL.META_ARCHITECTURE == "RetinaNet" else "ROI_HEADS"
    return f"MODEL.{node}.NUM_CLASSES"


def _num_classes(cfg) -> int:
    node = cfg.MODEL.RETINANET if cfg.MODEL.META_ARCHITECTURE == "RetinaNet" else cfg.MODEL.ROI_HEADS
    return node.NUM_CLASSES


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
        findings = check_coco_dataset(name, json_file, image_root, is_eval=is_eval, check_images=check_images)
        if findings.num_categories is not None and findings.num_categories != _num_classes(cfg):
            findings.error(
                "NUM_CLASSES differs from the json's categories",
                f"{_num_classes_key(cfg)} is {_num_classes(cfg)} but {json_file} has {findings.num_categories} "
                f"categories (set {_num_classes_key(cfg)} {findings.num_categories})",
            )
        for kind in DROPPABLE_BOX_PROBLEMS:
            if kind in findings.errors and invalid_boxes == "drop" and not is_eval:
                findings.warnings[kind + " (dropped)"] = findings.errors.pop(kind)
            elif kind in findings.errors:
                hint = "evaluation ground truth is never altered" if is_eval else "--invalid-boxes drop drops them"
                findings.errors[f"{kind} ({hint})"] = findings.errors.pop(kind)
        if ZERO_SIZE in findings.warnings:
            note = "kept in the evaluation's ground truth" if is_eval else "dropped, as Detectron2 drops empty boxes"
            findings.warnings[f"{ZERO_SIZE} ({note})"] = findings.warnings.pop(ZERO_SIZE)
        results[name] = findings
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


def run_preflight(cfg, *, eval_only: bool = False, check_images: str = "header", invalid_boxes: str = "error"):
    """:func:`check_datasets` once, on the main process (the others wait), before any model is built; then every
    process registers the box filter for the training sets whose invalid boxes are dropped. Returns the findings
    (an empty dict on the other processes)."""
    from detectron2.utils import comm

    results, failure = {}, None
    if comm.is_main_process():
        try:
            results = check_datasets(cfg, eval_only=eval_only, check_images=check_images, invalid_boxes=invalid_boxes)
        except DatasetCheckError as e:
            failure = str(e)
    to_filter = sorted(n for n, f in results.items() if any(k.endswith("(dropped)") for k in f.warnings))
    if comm.get_world_size() > 1:  # every process learns the outcome: none waits for a main process that stopped
        to_filter, failure = comm.all_gather((to_filter, failure))[0]
    if failure is not None:
        raise DatasetCheckError(failure)
    for name in to_filter:
        _install_box_filter(name)
    return results
