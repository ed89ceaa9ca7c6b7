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

import inspect

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import CascadeROIHeads, StandardROIHeads
from detectron2.utils.registry import locate

from prroi_d2.modeling import IoUBranch, IoUHead, IoUNetCascadeROIHeads, IoUNetRCNN, IoUNetROIHeads
from prroi_d2.modeling.iou_branch import DEFAULT_JITTER

__all__ = ["iou_branch", "with_iou_net"]

_IOU_NET_HEADS = {StandardROIHeads: IoUNetROIHeads, CascadeROIHeads: IoUNetCascadeROIHeads}


def iou_branch(
    *,
    pooler_type: str = "PrRoIPoolV2",
    pooler_resolution: int = 7,
    num_fc: int = 2,
    fc_dim: int = 1024,
    output_stages: bool = True,
    **options,
):
    """A lazy :class:`IoUBranch` for the ROI heads it is placed in (as ``roi_heads.iou_branch``): features, pooler
    scales and class count are those of the heads' box branch, channels those of ``model.backbone.out_channels``.
    ``options``: further ``IoUBranch`` arguments (``nms_rank="score_x_iou"``, ``refine_step=1.0``, ...)."""
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
            num_fc=num_fc,
            fc_dim=fc_dim,
        ),
        **{**_branch_defaults(), "jitter": dict(DEFAULT_JITTER), "output_stages": output_stages, **options},
    )


def _branch_defaults():
    """Every optional argument of ``IoUBranch`` with its default (all keys visible, and overridable, in a config)."""
    params = inspect.signature(IoUBranch.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


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
