"""prroi_d2: Precise RoI Pooling for PyTorch, and IoU-Net for Detectron2.

Three layers:

* the op (``prroi_d2.functional``, ``prroi_d2.modules``): torch only; ``import prroi_d2`` imports nothing else;
* the Detectron2 glue (``prroi_d2.modeling``: pooler types, IoU head, ROI heads, IoU-guided NMS, refinement;
  ``prroi_d2.config``, ``prroi_d2.data``, ``prroi_d2.evaluation`` beside it). It registers itself with Detectron2 as
  soon as ``detectron2.modeling`` is imported (see ``prroi_d2._detectron2_hook``), and ``from prroi_d2 import
  add_iounet_config`` imports it;
* the tools (``tools/train_net.py`` and others).
"""

import importlib

from prroi_d2 import _detectron2_hook
from prroi_d2.functional import assign_fpn_levels, boxes_to_rois, prroi_pool, prroi_pool2d, prroi_pool_levels
from prroi_d2.modules import PrRoIPool, PrRoIPool2D

__version__ = "0.2.0"

# Detectron2-dependent names, imported on first access (PEP 562).
_DETECTRON2_NAMES = {
    "add_iounet_config": "prroi_d2.config",
    "register_pooler_type": "prroi_d2.modeling.poolers",
}

__all__ = [
    "PrRoIPool",
    "PrRoIPool2D",
    "add_iounet_config",
    "assign_fpn_levels",
    "boxes_to_rois",
    "prroi_pool",
    "prroi_pool2d",
    "prroi_pool_levels",
    "register_pooler_type",
    "__version__",
]


def __getattr__(name):
    if name in _DETECTRON2_NAMES:
        importlib.import_module("prroi_d2.modeling")
        value = getattr(importlib.import_module(_DETECTRON2_NAMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'prroi_d2' has no attribute {name!r}")


_detectron2_hook.install()
