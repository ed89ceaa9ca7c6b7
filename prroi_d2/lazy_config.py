"""IoU-Net in Detectron2 LazyConfigs: ``with_iou_net(model)`` adds the IoU branch to a lazy R-CNN model.

    from detectron2 import model_zoo
    from prroi_d2.lazy_config import with_iou_net

    model = with_iou_net(model_zoo.get_config("common/models/cascade_rcnn.py").model)

The model's ``StandardROIHeads`` / ``CascadeROIHeads`` become ``IoUNetROIHeads`` / ``IoUNetCascadeROIHeads`` with an
``iou_branch`` (:class:`~prroi_d2.modeling.iou_branch.IoUBranch`; keys as its arguments, defaults as
``MODEL.IOU_NET``), ``GeneralizedRCNN`` becomes ``IoUNetRCNN``. The branch reads the box head's features
(``in_features``, pooler scales) and the backbone's channel count through interpolations, so later overrides of
those keys carry over. ``configs/lazy/`` has complete configs built this way.
"""

import copy

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import CascadeROIHeads, StandardROIHeads
from detectron2.utils.registry import locate

from prroi_d2.modeling import IoUBranch, IoUHead, IoUNetCascadeROIHeads, IoUNetRCNN, IoUNetROIHeads
from prroi_d2.options import ARG_DEFAULTS

__all__ = ["iou_branch", "with_iou_net"]

_IOU_NET_HEADS = {StandardROIHeads: IoUNetROIHeads, CascadeROIHeads: IoUNetCascadeROIHeads}


def iou_branch(
    *,
    pooler_type: str = ARG_DEFAULTS["pooler"]["pooler_type"],
    pooler_resolution: int = ARG_DEFAULTS["pooler"]["output_size"],
    num_fc: int = ARG_DEFAULTS["iou_head"]["num_fc"],
    fc_dim: int = ARG_DEFAULTS["iou_head"]["fc_dim"],
    output_stages: bool = True,
    **options,
):
    """A lazy :class:`IoUBranch` for the ROI heads it is placed in (as ``roi_heads.iou_branch``): features, pooler
    scales and class count are those of the heads' box branch, channels those of ``model.backbone.out_channels``.
    Every option of :data:`prroi_d2.options.OPTIONS` is a key, with its default (``jitter.*``, ``iou_head.*``,
    ``pooler.pooler_type``, ``pooler.output_size`` included). ``options``: further ``IoUBranch`` arguments
    (``nms_rank="score_x_iou"``, ``refine_step=1.0``, ...); ``output_stages`` is on (every stage evaluated)."""
    defaults = copy.deepcopy(ARG_DEFAULTS)
    del defaults["in_features"], defaults["pooler"]  # the box head's features; the pooler's keys are set below
    head = {**defaults.pop("iou_head"), "num_fc": num_fc, "fc_dim": fc_dim}
    return L(IoUBranch)(
        in_features="${..box_in_features}",
        pooler=L(ROIPooler)(
            output_size=pooler_resolution,
            scales="${...box_pooler.scales}",
            sampling_ratio=0,
            pooler_type=pooler_type,
        ),
        iou_head=L(IoUHead)(
            # from input_shape: iou_head, iou_branch, roi_heads, model
            input_shape=L(ShapeSpec)(
                channels="${.....backbone.out_channels}", height=pooler_resolution, width=pooler_resolution
            ),
            num_classes="${...num_classes}",
            **head,
        ),
        **{**defaults, "output_stages": output_stages, **options},
    )


def with_iou_net(model, **branch_options):
    """The lazy ``model`` (a ``GeneralizedRCNN`` with ``StandardROIHeads`` or ``CascadeROIHeads``, or a subclass
    already IoU-Net's) with IoU-Net: ``IoUNetRCNN``, the heads' IoU-Net class and :func:`iou_branch`
    ``(**branch_options)``; ``model.train_only_iou_head`` follows ``roi_heads.iou_branch.train_only_iou_head``.
    Changes ``model`` in place and returns it."""
    meta = _target(model)
    if not (isinstance(meta, type) and issubclass(meta, GeneralizedRCNN)):
        raise ValueError(f"with_iou_net: model._target_ must be a GeneralizedRCNN, got {meta!r}")
    heads = _target(model.roi_heads)
    if heads not in _IOU_NET_HEADS and heads not in _IOU_NET_HEADS.values():
        raise ValueError(
            f"with_iou_net: model.roi_heads._target_ must be StandardROIHeads or CascadeROIHeads, got {heads!r}"
        )
    if meta is GeneralizedRCNN:
        model._target_ = meta = IoUNetRCNN
    model.roi_heads._target_ = _IOU_NET_HEADS.get(heads, heads)
    model.roi_heads.iou_branch = iou_branch(**branch_options)
    if issubclass(meta, IoUNetRCNN):
        model.train_only_iou_head = "${.roi_heads.iou_branch.train_only_iou_head}"
    return model


def _target(node):
    target = node.get("_target_") if hasattr(node, "get") else None
    return locate(target) if isinstance(target, str) else target
