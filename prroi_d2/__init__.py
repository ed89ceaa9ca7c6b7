"""prroi_d2: Precise RoI Pooling for PyTorch, and IoU-Net for Detectron2.

The op layer (``prroi_d2.functional``, ``prroi_d2.modules``) needs only torch. When Detectron2 is installed,
importing ``prroi_d2`` also registers the ``PrRoIPool`` and ``PrRoIPoolV2`` pooler types with Detectron2's
``ROIPooler`` (see ``prroi_d2.modeling.poolers``).
"""

import importlib.util

from prroi_d2.functional import assign_fpn_levels, boxes_to_rois, prroi_pool, prroi_pool2d, prroi_pool_levels
from prroi_d2.modules import PrRoIPool, PrRoIPool2D

__version__ = "0.1.0"

__all__ = [
    "PrRoIPool",
    "PrRoIPool2D",
    "assign_fpn_levels",
    "boxes_to_rois",
    "prroi_pool",
    "prroi_pool2d",
    "prroi_pool_levels",
    "__version__",
]

if importlib.util.find_spec("detectron2") is not None:
    from prroi_d2.modeling import poolers as _poolers  # noqa: F401  (registers the pooler types)
    from prroi_d2.modeling.poolers import register_pooler_type  # noqa: F401

    __all__ += ["register_pooler_type"]
