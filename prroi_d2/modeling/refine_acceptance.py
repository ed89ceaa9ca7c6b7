"""Per-box acceptance of refined boxes: keep a refined box only where the IoU head is trusted to have improved it.

Refinement returns, for every box, the box with the highest *predicted* IoU it saw. That protects the prediction,
not the truth: where the head's error exceeds the box's own (tight boxes of Cascade R-CNN, imagery unlike the
training set), climbing the predicted IoU moves boxes the wrong way. The acceptance rule keeps the refined box only
when its predicted IoU gain exceeds ``margin`` and the initial box's predicted IoU lies in ``iou_range`` (the range
where the head was measured to be reliable); other boxes keep their initial box and predicted IoU. The calibration
(:mod:`prroi_d2.engine.calibration`) chooses ``margin`` and ``iou_range`` on a held-out split.
"""

from typing import Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["accept_refinement", "accepted_mask"]


def accepted_mask(initial_ious: Tensor, refined_ious: Tensor, margin: float, iou_range: Sequence[float]) -> Tensor:
    """(K,) bool: which refined boxes to keep, from the predicted IoU before (K,) and after (K,) refinement.

    A box is kept when ``refined - initial > margin`` and ``iou_range[0] <= initial <= iou_range[1]``. With
    ``margin 0`` and ``iou_range (0, 1)`` every box that refinement moved is kept (refinement as in the paper)."""
    low, high = float(iou_range[0]), float(iou_range[1])
    initial = initial_ious.float()
    return ((refined_ious.float() - initial) > margin) & (initial >= low) & (initial <= high)


def accept_refinement(
    initial_boxes: Tensor,
    refined_boxes: Tensor,
    initial_ious: Tensor,
    refined_ious: Tensor,
    margin: float = 0.0,
    iou_range: Sequence[float] = (0.0, 1.0),
) -> Tuple[Tensor, Tensor]:
    """Boxes (K, 4) and predicted IoU (K,) after the acceptance rule (:func:`accepted_mask`): the refined box and
    its predicted IoU where accepted, the initial box and its predicted IoU elsewhere. No host synchronisation."""
    keep = accepted_mask(initial_ious, refined_ious, margin, iou_range)
    boxes = torch.where(keep[:, None], refined_boxes, initial_boxes.to(refined_boxes.dtype))
    ious = torch.where(keep, refined_ious, initial_ious.to(refined_ious.dtype))
    return boxes, ious
