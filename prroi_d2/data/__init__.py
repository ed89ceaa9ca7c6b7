"""Datasets for IoU-Net jobs (the Detectron2 glue layer: importing it imports Detectron2 through ``synthetic``).

``prroi_d2.data.synthetic`` renders the embedded synthetic COCO-format shapes dataset and registers it with
Detectron2 (:func:`register_synthetic_datasets`).
"""

from prroi_d2.data.synthetic import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_VERSION,
    default_datasets_root,
    generate_synthetic_coco,
    prepare_synthetic_split,
    register_synthetic_datasets,
    render_synthetic_image,
)

__all__ = [
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_VERSION",
    "default_datasets_root",
    "generate_synthetic_coco",
    "prepare_synthetic_split",
    "register_synthetic_datasets",
    "render_synthetic_image",
]
