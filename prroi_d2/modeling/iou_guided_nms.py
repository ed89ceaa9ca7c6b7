"""IoU-guided NMS (IoU-Net, Algorithm 1): rank boxes by predicted IoU, keep each cluster's best-localised box and
give it the highest classification score of its cluster."""

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["iou_guided_nms"]


def iou_guided_nms(
    boxes: Tensor, scores: Tensor, ious: Tensor, idxs: Tensor, iou_threshold: float
) -> Tuple[Tensor, Tensor]:
    """IoU-guided NMS, batched over the groups in ``idxs`` (classes, or image x class).

    Repeatedly takes the remaining box with the highest predicted IoU (ties: the lower index first), removes every
    remaining box of its group whose IoU with it is above ``iou_threshold``, and scores the kept box with the maximum
    of ``scores`` over its cluster (itself and the boxes it removed).

    Args:
        boxes: (N, 4) XYXY.
        scores: (N,) classification scores.
        ious: (N,) predicted IoU (the ranking key; pass ``scores * ious`` to rank by their product).
        idxs: (N,) int64 group of each box; boxes of different groups never suppress each other.
        iou_threshold: overlap above which a box is removed.

    Returns:
        keep: (M,) int64 indices into the inputs, in the order Algorithm 1 keeps them (decreasing predicted IoU).
        cluster_scores: (M,) the maximum score of each kept box's cluster.
    """
    _check_inputs(boxes, scores, ious, idxs, iou_threshold)
    # No branch on the box count (none is needed: every step below takes N = 0), so a trace is valid for any N.
    # Processing order: by decreasing predicted IoU (ties: lower index first), then grouped (stable).
    ranked = torch.sort(ious, descending=True, stable=True).indices
    groups = idxs.to(torch.int64)[ranked]
    by_group = torch.sort(groups, stable=True)
    order = ranked[by_group.indices]
    # The greedy walk, every group at once (one thread block per group on CUDA): positions in ``order``.
    kept, head = torch.ops.prroi_d2._nms_clusters(boxes[order], by_group.values, float(iou_threshold))
    # Back to input indices: kept boxes in the order Algorithm 1 keeps them (the ranking across groups).
    kept_input = torch.empty_like(kept).scatter_(0, order, kept)
    keep = ranked[kept_input[ranked]]
    cluster = torch.empty_like(head).scatter_(0, order, order[head])  # input index of each box's cluster head
    best = torch.full_like(scores, float("-inf")).scatter_reduce(0, cluster, scores, reduce="amax", include_self=True)
    return keep, best[keep]


def _check_inputs(boxes: Tensor, scores: Tensor, ious: Tensor, idxs: Tensor, iou_threshold: float) -> None:
    if boxes.dim() != 2 or boxes.size(1) != 4:
        raise ValueError(f"iou_guided_nms: boxes must be (N, 4), got shape {tuple(boxes.shape)}")
    for name, t in (("scores", scores), ("ious", ious), ("idxs", idxs)):
        if t.dim() != 1 or (not torch.jit.is_tracing() and t.size(0) != boxes.size(0)):  # counts are traced values
            raise ValueError(f"iou_guided_nms: {name} must be (N,) = ({boxes.size(0)},), got shape {tuple(t.shape)}")
        if t.device != boxes.device:
            raise ValueError(f"iou_guided_nms: {name} is on {t.device}, boxes on {boxes.device}")
    if idxs.dtype.is_floating_point or idxs.dtype == torch.bool:
        raise TypeError(f"iou_guided_nms: idxs must be an integer tensor, got {idxs.dtype}")
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise ValueError(f"iou_guided_nms: iou_threshold must be in [0, 1], got {iou_threshold}")
