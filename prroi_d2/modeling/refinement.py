"""Optimisation-based box refinement (IoU-Net, Algorithm 2): gradient ascent on the predicted IoU of each box with
respect to its coordinates, through Precise RoI Pooling."""

import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["IoUAndGrad", "refine_boxes"]


IoUAndGrad = Callable[[Tensor, bool], Tuple[Tensor, Optional[Tensor]]]
"""``f(boxes (K, 4), need_grad) -> (predicted IoU (K,), d IoU / d boxes (K, 4) or None when not need_grad)``."""


def refine_boxes(
    boxes: Tensor,
    predict_iou: Optional[Callable[[Tensor], Tensor]] = None,
    step: float = 0.5,
    max_iter: int = 5,
    stop_delta: float = 0.001,
    stop_drop: float = -0.01,
    clip_size: Optional[Tensor] = None,
    *,
    predict_iou_and_grad: Optional[IoUAndGrad] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Refine every box at once by gradient ascent on its predicted IoU.

    Each iteration moves every box still running by ``step * grad * (w, h, w, h)`` (the gradient of its predicted
    IoU, scaled by its own width and height), then clips it to its image. A box stops when its predicted IoU changed
    by less than ``stop_delta`` in absolute value, or by less than ``stop_drop`` (a drop). The box returned is the
    one with the highest predicted IoU seen, so no box leaves with a lower predicted IoU than it entered with.

    The gradient comes from one of two sources (exactly one is given):

    * ``predict_iou_and_grad``: a plain forward computation of the predicted IoU and its gradient (e.g. the IoU
      head's explicit input gradient chained with the PrRoI pooling coordinate backward). No autograd: it runs as
      it is under ``torch.inference_mode()``, and traces (``torch.jit.trace``) into a graph valid for any box count;
    * ``predict_iou``: a differentiable function, differentiated by autograd (gradients enabled locally, so it works
      under ``torch.no_grad()`` and ``torch.inference_mode()`` too, but does not trace).

    Either should not depend on the boxes through anything but differentiable ops (e.g. keep FPN level assignment
    fixed).

    Args:
        boxes: (K, 4) XYXY.
        predict_iou: maps boxes (K, 4) to predicted IoU (K,), differentiably.
        predict_iou_and_grad: maps boxes (K, 4) and whether the gradient is needed to the predicted IoU (K,) and its
            gradient with respect to the boxes (K, 4) (see :data:`IoUAndGrad`).
        step: lambda, the step length.
        max_iter: T, the most steps per box (T + 1 evaluations of ``predict_iou``, T gradients).
        stop_delta: Omega_1.
        stop_drop: Omega_2 (negative).
        clip_size: (K, 2) (height, width) of each box's image, or None for no clipping.

    Returns:
        refined boxes (K, 4), their predicted IoU (K,), and the predicted IoU of the input boxes (K,).
    """
    if boxes.dim() != 2 or boxes.size(1) != 4:
        raise ValueError(f"refine_boxes: boxes must be (K, 4), got shape {tuple(boxes.shape)}")
    if (predict_iou is None) == (predict_iou_and_grad is None):
        raise ValueError("refine_boxes: give exactly one of predict_iou and predict_iou_and_grad")
    if not math.isfinite(step) or max_iter < 0 or stop_delta < 0 or not stop_drop <= 0:
        raise ValueError(
            "refine_boxes: need a finite step, max_iter >= 0, stop_delta >= 0 and stop_drop <= 0; got "
            f"step={step}, max_iter={max_iter}, stop_delta={stop_delta}, stop_drop={stop_drop}"
        )
    if clip_size is not None and (clip_size.dim() != 2 or clip_size.size(1) != 2 or not _same_rows(clip_size, boxes)):
        raise ValueError(f"refine_boxes: clip_size must be (K, 2) = ({boxes.size(0)}, 2), got {tuple(clip_size.shape)}")
    if predict_iou_and_grad is None:
        with torch.inference_mode(False), torch.enable_grad():
            return _ascend(boxes, _autograd_iou_and_grad(predict_iou), step, max_iter, stop_delta, stop_drop, clip_size)
    return _ascend(boxes, predict_iou_and_grad, step, max_iter, stop_delta, stop_drop, clip_size)


def _ascend(
    boxes: Tensor,
    iou_and_grad: IoUAndGrad,
    step: float,
    max_iter: int,
    stop_delta: float,
    stop_drop: float,
    clip_size: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor]:
    """Algorithm 2's loop: T + 1 evaluations, T steps; no host synchronisation and no data-dependent control flow."""
    # The step itself (best-box bookkeeping, stop rules, move, clip) is one op, _refine_step: one kernel per
    # iteration on CUDA. It works in float32 or float64.
    dtype = torch.promote_types(boxes.dtype, torch.float32)
    current = boxes.detach().to(dtype, copy=True)
    bounds = None if clip_size is None else clip_size.to(current)
    active = torch.ones_like(current[:, 0], dtype=torch.bool)
    best_boxes, best_ious, previous, initial = current, current[:, 0], current[:, 0], current[:, 0]
    for t in range(max_iter + 1):
        last = t == max_iter
        predicted, grad = iou_and_grad(current, not last)
        ious = predicted.detach().to(dtype)
        if t == 0:
            initial = predicted.detach()
            previous = best_ious = ious
        if grad is not None:
            grad = grad.detach().to(dtype)
        current, best_boxes, best_ious, active = torch.ops.prroi_d2._refine_step(
            current,
            grad,
            ious,
            previous,
            best_boxes,
            best_ious,
            active,
            bounds,
            step,
            stop_delta,
            stop_drop,
            t == 0,
        )
        previous = ious
    return best_boxes.to(boxes.dtype), best_ious.to(initial.dtype), initial


def _autograd_iou_and_grad(predict_iou: Callable[[Tensor], Tensor]) -> IoUAndGrad:
    """``predict_iou`` differentiated by autograd (call with gradients enabled)."""

    def iou_and_grad(boxes: Tensor, need_grad: bool) -> Tuple[Tensor, Optional[Tensor]]:
        point = boxes.detach().requires_grad_(need_grad)
        predicted = predict_iou(point)
        grad = torch.autograd.grad(predicted.sum(), point)[0] if need_grad else None
        return predicted.detach(), grad

    return iou_and_grad


def _same_rows(a: Tensor, b: Tensor) -> bool:
    if torch.jit.is_tracing():  # row counts are traced values there: nothing to compare on the host
        return True
    return a.size(0) == b.size(0)
