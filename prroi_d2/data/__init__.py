"""Datasets for IoU-Net jobs (the Detectron2 glue layer; Detectron2 is imported only when a dataset is registered).

``prroi_d2.data.synthetic`` renders the embedded synthetic COCO-format shapes dataset and registers it with
Detectron2 (:func:`register_synthetic_datasets`).
"""

from prroi_d2.data import synthetic
from prroi_d2.data.synthetic import *  # noqa: F403 - the package re-exports synthetic's public names

__all__ = list(synthetic.__all__)
