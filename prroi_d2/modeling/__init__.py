"""Detectron2 integration of Precise RoI Pooling (imported by ``prroi_d2`` when Detectron2 is installed).

``prroi_d2.modeling.poolers`` adds the ``PrRoIPool`` and ``PrRoIPoolV2`` pooler types to Detectron2's ``ROIPooler``
and holds the registry for further types (:func:`register_pooler_type`).
"""

from prroi_d2.modeling.poolers import PRROI_POOLER_TYPES, register_pooler_type, registered_pooler_types

__all__ = ["PRROI_POOLER_TYPES", "register_pooler_type", "registered_pooler_types"]
