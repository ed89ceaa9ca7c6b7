"""IoU-guided NMS (IoU-Net, Algorithm 1): rank boxes by predicted IoU, keep each cluster's best-localised box and
give it the highest classification score of its cluster."""

from typing import Tuple

import torch
import torchvision
from torch import Tensor


__all__ = ["iou_guided_nms"]

# Entries of the (kept x all) overlap matrix computed at once when assigning boxes to clusters (~16 Mi: a few
# hundred MiB of temporaries at most; one chunk for a few thousand candidates).
_CLUSTER_CHUNK_ELEMENTS = 1 << 24


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
    n = boxes.size(0)
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device), scores.new_zeros((0,))
    # A strictly decreasing key in processing order, so torchvision's NMS follows exactly our tie-breaking.
    order = torch.sort(ious, descending=True, stable=True).indices
    rank = torch.empty(n, dtype=torch.float32, device=boxes.device)
    rank[order] = torch.arange(n, 0, -1, dtype=torch.float32, device=boxes.device)
    # Groups apart: offset each group's boxes beyond every other's (the batched-NMS coordinate trick).
    boxes_f = boxes.float()
    low, high = torch.aminmax(boxes_f)
    shifted = boxes_f + (idxs.to(boxes_f) * (high - low + 1.0))[:, None]
    keep = torchvision.ops.nms(shifted, rank, iou_threshold)

    # Box j joins the cluster of the first kept box (in keep order) overlapping it above the threshold; that box
    # precedes j in the ranking, and a kept box is the first of its own cluster. The overlaps are those of the
    # shifted boxes NMS saw, so boxes of different groups never overlap.
    m = keep.numel()
    area = (shifted[:, 2:] - shifted[:, :2]).clamp(min=0).prod(dim=1)
    cluster = torch.full((n,), m, dtype=torch.int64, device=boxes.device)
    chunk = max(1, _CLUSTER_CHUNK_ELEMENTS // n)
    for start in range(0, m, chunk):
        rows = keep[start : start + chunk]
        kept = shifted[rows]
        lt = torch.maximum(kept[:, None, :2], shifted[None, :, :2])
        rb = torch.minimum(kept[:, None, 2:], shifted[None, :, 2:])
        inter = (rb - lt).clamp_(min=0).prod(dim=2)
        hit = inter > iou_threshold * (area[rows][:, None] + area[None, :] - inter)  # IoU > threshold
        position = torch.arange(start, start + rows.numel(), device=boxes.device)[:, None]
        cluster = torch.minimum(cluster, torch.where(hit, position, m).amin(dim=0))
    cluster[keep] = torch.arange(m, device=boxes.device)  # exact even where the two overlap computations round apart
    cluster_scores = scores.new_full((m + 1,), float("-inf"))
    cluster_scores = cluster_scores.scatter_reduce(0, cluster, scores, reduce="amax", include_self=True)
    return keep, cluster_scores[:m]


def _check_inputs(boxes: Tensor, scores: Tensor, ious: Tensor, idxs: Tensor, iou_threshold: float) -> None:
    if boxes.dim() != 2 or boxes.size(1) != 4:
        raise ValueError(f"iou_guided_nms: boxes must be (N, 4), got shape {tuple(boxes.shape)}")
    n = boxes.size(0)
    for name, t in (("scores", scores), ("ious", ious), ("idxs", idxs)):
        if t.shape != (n,):
            raise ValueError(f"iou_guided_nms: {name} must be (N,) = ({n},), got shape {tuple(t.shape)}")
        if t.device != boxes.device:
            raise ValueError(f"iou_guided_nms: {name} is on {t.device}, boxes on {boxes.device}")
    if idxs.dtype.is_floating_point or idxs.dtype == torch.bool:
        raise TypeError(f"iou_guided_nms: idxs must be an integer tensor, got {idxs.dtype}")
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise ValueError(f"iou_guided_nms: iou_threshold must be in [0, 1], got {iou_threshold}")
