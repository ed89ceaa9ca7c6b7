"""The Detectron2 glue of prroi_d2: pooler types, and IoU-Net (IoU head, ROI heads, IoU-guided NMS, refinement).

Importing this package registers, once per process: the ``PrRoIPool`` / ``PrRoIPoolV2`` pooler types of
``ROIPooler``, ``IoUHead`` in ``IOU_HEAD_REGISTRY``, ``IoUNetROIHeads`` and ``IoUNetCascadeROIHeads`` in
``ROI_HEADS_REGISTRY`` and ``IoUNetRCNN`` in ``META_ARCH_REGISTRY``. ``from prroi_d2 import add_iounet_config``
imports it.
"""

from prroi_d2.modeling.box_jitter import sample_jittered_boxes
from prroi_d2.modeling.iou_branch import IoUBranch
from prroi_d2.modeling.iou_guided_nms import iou_guided_nms
from prroi_d2.modeling.iou_head import IOU_HEAD_REGISTRY, IoUHead, build_iou_head
from prroi_d2.modeling.meta_arch import IoUNetRCNN
from prroi_d2.modeling.poolers import (
    PRROI_POOLER_TYPES,
    PrRoIPooler,
    pool_rois,
    register_pooler_type,
    registered_pooler_types,
)
from prroi_d2.modeling.refinement import refine_boxes
from prroi_d2.modeling.roi_heads import IoUBranchMixin, IoUNetCascadeROIHeads, IoUNetROIHeads
from prroi_d2.modeling.stages import STAGES

__all__ = [
    "IOU_HEAD_REGISTRY",
    "PRROI_POOLER_TYPES",
    "STAGES",
    "IoUBranch",
    "IoUBranchMixin",
    "IoUHead",
    "IoUNetCascadeROIHeads",
    "IoUNetRCNN",
    "IoUNetROIHeads",
    "PrRoIPooler",
    "build_iou_head",
    "iou_guided_nms",
    "pool_rois",
    "refine_boxes",
    "register_pooler_type",
    "registered_pooler_types",
    "sample_jittered_boxes",
]
