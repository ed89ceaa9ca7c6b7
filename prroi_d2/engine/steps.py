"""The steps both trainers of ``tools/train_net.py`` (:mod:`~prroi_d2.engine.yaml_train` for YAML ``CfgNode``
configs, :mod:`~prroi_d2.engine.lazy_train` for LazyConfig ``.py`` files) share: dataset registration and the
missing-data message, the evaluator, checkpoint loading, seeding, one-line errors and the final report.
"""

import contextlib
import importlib.util
import logging
import os
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_setup, default_writers
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, JSONWriter
from detectron2.utils.logger import setup_logger

from prroi_d2.data import register_synthetic_datasets
from prroi_d2.data.neon_trees import NeonTreesDownloadError, register_neon_trees_datasets
from prroi_d2.data.register import register_coco_dataset
from prroi_d2.engine.checkpoint import SafeCheckpointer
from prroi_d2.engine.output_lock import hold_output_dir
from prroi_d2.evaluation import IoUNetEvaluator, draw_refinement_examples

__all__ = [
    "SYNTHETIC_CONFIG",
    "SYNTHETIC_PREFIX",
    "build_checkpointer",
    "build_evaluator",
    "build_writers",
    "missing_data_message",
    "one_line_errors",
    "prepare_datasets",
    "register_datasets",
    "report",
    "setup_run",
]

SYNTHETIC_PREFIX = "iounet_synth"
SYNTHETIC_CONFIG = "configs/iounet_synthetic_R18.yaml"
NEON_TREES_PREFIX = "neon_trees"
logger = logging.getLogger(__name__)


def setup_run(cfg, args) -> None:
    """Detectron2's ``default_setup`` for a ``CfgNode`` or a LazyConfig (logging, the config saved to the output
    folder and the seed of every random generator: ``SEED`` / ``train.seed``; < 0 draws one), and prroi_d2's own
    logger to the same console and ``log.txt``."""
    output_dir = cfg.OUTPUT_DIR if hasattr(cfg, "OUTPUT_DIR") else cfg.train.output_dir
    hold_output_dir(output_dir)  # one run per OUTPUT_DIR (main process), before anything is written there
    default_setup(cfg, args)
    setup_logger(output_dir, distributed_rank=comm.get_rank(), name="prroi_d2", abbrev_name="prroi_d2")


def register_datasets(
    names: Iterable[str], coco_format: Optional[Sequence[Tuple[str, str, str]]] = (), replace: bool = False
) -> None:
    """Register the ``--register NAME JSON IMAGE_ROOT`` datasets (a taken NAME is an error unless ``replace``), and
    the embedded synthetic set (generated on first use) or the NEON tree crowns (fetched and converted on first use)
    if ``names`` name them."""
    for name, json_file, image_root in coco_format or ():
        try:
            register_coco_dataset(name, json_file, image_root, replace=replace)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    if any(name.startswith(SYNTHETIC_PREFIX + "_") for name in names):
        register_synthetic_datasets(prefix=SYNTHETIC_PREFIX)
    if any(name.startswith(NEON_TREES_PREFIX + "_") for name in names):
        try:
            register_neon_trees_datasets(prefix=NEON_TREES_PREFIX)
        except NeonTreesDownloadError as e:
            raise SystemExit(str(e)) from None


def missing_data_message(names: Iterable[str], registered: Iterable[str] = ()) -> Optional[str]:
    """One message naming everything missing for the COCO-format datasets ``names``, or None if all is there.
    Datasets in ``registered`` (``--register NAME JSON IMAGE_ROOT``) are the user's own: their missing files are
    named with the ``--register`` argument that gave them; the COCO download steps are offered only for
    Detectron2's built-in ``coco_*`` datasets."""
    names = list(names)
    registered = set(registered)
    unknown = [name for name in names if name not in DatasetCatalog.list()]
    if unknown:
        return f"Datasets not registered: {', '.join(unknown)} (register them, e.g. with --register NAME JSON DIR)."
    own, builtin, other = [], [], []
    for name in dict.fromkeys(names):
        meta = MetadataCatalog.get(name)
        for what, path in (("JSON", meta.get("json_file")), ("IMAGE_ROOT", meta.get("image_root"))):
            if not path or os.path.exists(path):
                continue
            if name in registered:
                own.append(f"--register {name}: {what} {path} does not exist")
            elif name.startswith("coco_"):
                builtin.append(path)
            else:
                other.append(f"dataset {name!r}: {path} does not exist")
    parts = ["Dataset files not found:\n  " + "\n  ".join(own + other)] if own or other else []
    if builtin:
        root = os.environ.get("DETECTRON2_DATASETS", "datasets")
        parts.append(
            f"Dataset files not found: {', '.join(builtin)}.\n"
            f"COCO is expected in Detectron2's layout under $DETECTRON2_DATASETS (now {root!r}):\n"
            "  coco/annotations/instances_{train,val}2017.json, coco/train2017/, coco/val2017/\n"
            "Download COCO 2017 there, or run on the embedded synthetic dataset instead:\n"
            f"  python tools/train_net.py --config-file {SYNTHETIC_CONFIG}"
        )
    return "\n".join(parts) or None


def prepare_datasets(names: Iterable[str], coco_format=(), replace: bool = False) -> None:
    """:func:`register_datasets`, then exit with :func:`missing_data_message` if anything is missing."""
    names = list(names)
    register_datasets(names, coco_format, replace)
    message = missing_data_message(names, registered=[entry[0] for entry in coco_format or ()])
    if message is not None:
        raise SystemExit(message)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Inside the block, the errors of bad input found during a run (a dataset check, weights, an unreadable
    checkpoint, an image that fails to decode) end the program with their one-line message instead of a
    traceback."""
    from prroi_d2.data.named_decode import ImageDecodeError, decode_error_message
    from prroi_d2.data.preflight import DatasetCheckError
    from prroi_d2.engine.checkpoint import CheckpointReadError, WeightsError

    try:
        yield
    except (DatasetCheckError, WeightsError, CheckpointReadError) as e:
        raise SystemExit(str(e)) from None
    except ImageDecodeError as e:
        raise SystemExit(decode_error_message(e)) from None


def build_evaluator(dataset_name: str, output_dir: str, mask_on: bool = False, max_dets_per_image: int = 100):
    """:class:`~prroi_d2.evaluation.IoUNetEvaluator` (every IoU-Net stage; COCOeval counts ``max_dets_per_image``
    detections per image, the model's ``TEST.DETECTIONS_PER_IMAGE``) writing to ``output_dir`` and, with
    ``mask_on``, Detectron2's COCO mask AP too."""
    evaluator = IoUNetEvaluator(dataset_name, output_dir=output_dir, max_dets_per_image=max_dets_per_image)
    if not mask_on:
        return evaluator
    masks = COCOEvaluator(dataset_name, tasks=("segm",), output_dir=output_dir, use_fast_impl=False)
    return DatasetEvaluators([evaluator, masks])


def build_checkpointer(model, output_dir: str, **checkpointables) -> SafeCheckpointer:
    """The checkpointer of both paths' models (``checkpointables``: e.g. ``trainer=``, saved and resumed with it):
    atomic writes, and a resume that skips an unreadable latest checkpoint."""
    return SafeCheckpointer(model, save_dir=output_dir, **checkpointables)


def build_writers(output_dir: str, max_iter: int):
    """Detectron2's event writers (console, metrics.json, TensorBoard); without the ``tensorboard`` package, the
    console and metrics.json ones only."""
    if importlib.util.find_spec("tensorboard") is not None:
        return default_writers(output_dir, max_iter)
    logger.warning("tensorboard is not installed: no TensorBoard event files are written")
    return [CommonMetricPrinter(max_iter), JSONWriter(os.path.join(output_dir, "metrics.json"))]


def report(output_dir: str, test_datasets: List[str]) -> None:
    """Pictures of the refinement and the paths of everything evaluation wrote (main process)."""
    folder = os.path.join(output_dir, "inference")
    results = os.path.join(folder, "coco_instances_results_refined.json")
    if not os.path.exists(results) or len(test_datasets) != 1:
        return
    meta = MetadataCatalog.get(test_datasets[0])
    pictures = draw_refinement_examples(
        results, meta.json_file, meta.image_root, os.path.join(folder, "refinement_examples")
    )
    print("\nWritten by evaluation:")
    for name in ("iounet_stages.md", "iounet_stages.json", "ap_vs_iou.png", "iou_histogram.png"):
        print("  " + os.path.join(folder, name))
    print("Refinement pictures (ground truth green, before refinement orange, after blue):")
    for path in pictures:
        print("  " + path)
