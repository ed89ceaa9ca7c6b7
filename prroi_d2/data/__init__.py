"""Datasets for IoU-Net jobs (the Detectron2 glue layer; Detectron2 is imported only when a dataset is registered).

``prroi_d2.data.synthetic`` writes the embedded synthetic COCO-format shapes dataset (rendered by
``synthetic_render`` from the outlines of ``synthetic_shapes``) and registers it with Detectron2
(:func:`register_synthetic_datasets`); ``prroi_d2.data.neon_trees`` fetches and converts the NEON tree-crown
imagery (:func:`register_neon_trees_datasets`). Both read the datasets root from ``prroi_d2.data.paths``; the
tree-crown tiles and the aerial augmentation share the rule for boxes cut by a window (``prroi_d2.data.boxes``).
``prroi_d2.data.augmentation`` (imports Detectron2; not re-exported here) holds the aerial augmentations and their
dataset mapper; ``coco_checks`` / ``preflight`` check COCO files before training; ``register`` and ``named_decode``
register a user's COCO files and name an image that fails to decode.
"""

from prroi_d2.data import neon_trees, synthetic
from prroi_d2.data.neon_trees import *  # noqa: F403 - the package re-exports its modules' public names
from prroi_d2.data.synthetic import *  # noqa: F403

__all__ = list(synthetic.__all__) + list(neon_trees.__all__)
