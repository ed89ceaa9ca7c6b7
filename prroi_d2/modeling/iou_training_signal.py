"""What the IoU head learns, per training iteration: scalars a user can watch in ``metrics.json`` and TensorBoard.

* ``iou_net/train_pearson``: Pearson correlation of predicted and target IoU of the head's training boxes.
* ``iou_net/loss_ratio``: ``(loss - floor) / (constant - floor)`` of the same boxes, without the loss weight, where
  ``constant`` is the loss of the best constant predictor on the batch and ``floor`` the loss of a perfect one. 1 means
  the head predicts no better than a constant, 0 perfectly, whatever the loss type.

For smooth-L1 (targets ``2 * IoU - 1``) the floor is 0 and the constant is the targets' mean, the best constant as
long as every target lies within beta of it (always for targets in [0, 1] and beta 1). For binary cross-entropy
(targets IoU) the best constant predicts the mean IoU ``m``, scoring the binary entropy ``H(m)``; the floor is the
mean binary entropy of the targets.
"""

from typing import Dict

import torch
import torch.nn.functional as F
from detectron2.utils import events
from torch import Tensor

__all__ = ["iou_training_signal", "put_iou_training_signal"]


def _binary_entropy(p: Tensor) -> Tensor:
    return F.binary_cross_entropy(p, p, reduction="none")


@torch.no_grad()
def iou_training_signal(
    outputs: Tensor, target_ious: Tensor, loss_type: str, smooth_l1_beta: float = 1.0
) -> Dict[str, Tensor]:
    """``{"train_pearson", "loss_ratio"}`` (0-dim float64 tensors, NaN when undefined) of raw outputs (K,) of the
    boxes' classes against their target IoU (K,), for ``loss_type`` "smooth_l1" (outputs estimate ``2 * IoU - 1``)
    or "bce" (outputs are logits of IoU). Undefined for fewer than two boxes or constant targets."""
    out, iou = outputs.detach().double(), target_ious.detach().double()
    nan = out.new_tensor(float("nan"))
    if out.numel() < 2:
        return {"train_pearson": nan, "loss_ratio": nan}
    if loss_type == "bce":
        predicted = out.sigmoid()
        loss = F.binary_cross_entropy_with_logits(out, iou)
        floor = _binary_entropy(iou).mean()
        constant = _binary_entropy(iou.mean())
    else:
        target = 2.0 * iou - 1.0
        predicted = (out + 1.0) * 0.5
        loss = F.smooth_l1_loss(out, target, beta=smooth_l1_beta)
        floor = out.new_zeros(())
        constant = F.smooth_l1_loss(target.mean().expand_as(target), target, beta=smooth_l1_beta)
    spread = constant - floor
    ratio = torch.where(spread > 1e-12, (loss - floor) / spread.clamp(min=1e-12), nan)
    dp, dt = predicted - predicted.mean(), iou - iou.mean()
    denominator = (dp.square().sum() * dt.square().sum()).sqrt()
    pearson = torch.where(denominator > 1e-12, (dp * dt).sum() / denominator.clamp(min=1e-12), nan)
    return {"train_pearson": pearson, "loss_ratio": ratio}


def put_iou_training_signal(outputs: Tensor, target_ious: Tensor, loss_type: str, smooth_l1_beta: float = 1.0):
    """Put :func:`iou_training_signal` into Detectron2's current event storage as ``iou_net/<name>`` (no-op outside a
    training loop's ``EventStorage``; undefined values are not put). One host synchronisation."""
    if not events._CURRENT_STORAGE_STACK:
        return
    signal = iou_training_signal(outputs, target_ious, loss_type, smooth_l1_beta)
    values = torch.stack(list(signal.values())).tolist()
    storage = events.get_event_storage()
    for name, value in zip(signal, values):
        if value == value:  # not NaN
            storage.put_scalar("iou_net/" + name, value)
