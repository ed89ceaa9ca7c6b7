"""Optimisation-based box refinement (IoU-Net, Algorithm 2): gradient ascent on the predicted IoU of each box with
respect to its coordinates, through Precise RoI Pooling."""

import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["refine_boxes"]


def refine_boxes(
    boxes: Tensor,
    predict_iou: Callable[[Tensor], Tensor],
    step: float = 0.5,
    max_iter: int = 5,
    stop_delta: float = 0.001,
    stop_drop: float = -0.01,
    clip_size: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Refine every box at once by gradient ascent on its predicted IoU.

    Each iteration moves every box still running by ``step * grad * (w, h, w, h)`` (the gradient of its predicted
    IoU, scaled by its own width and height), then clips it to its image. A box stops when its predicted IoU changed
    by less than ``stop_delta`` in absolute value, or by less than ``stop_drop`` (a drop). The box returned is the
    one with the highest predicted IoU seen, so no box leaves with a lower predicted IoU than it entered with.

    Works under ``torch.no_grad()`` and ``torch.inference_mode()`` (gradients are enabled locally). ``predict_iou``
    should not depend on the boxes through anything but differentiable ops (e.g. keep FPN level assignment fixed).

    Args:
        boxes: (K, 4) XYXY.
        predict_iou: maps boxes (K, 4) to predicted IoU (K,), differentiably.
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
    if not math.isfinite(step) or max_iter < 0 or stop_delta < 0 or not stop_drop <= 0:
        raise ValueError(
            "refine_boxes: need a finite step, max_iter >= 0, stop_delta >= 0 and stop_drop <= 0; got "
            f"step={step}, max_iter={max_iter}, stop_delta={stop_delta}, stop_drop={stop_drop}"
        )
    if clip_size is not None and clip_size.shape != (boxes.size(0), 2):
        raise ValueError(f"refine_boxes: clip_size must be (K, 2) = ({boxes.size(0)}, 2), got {tuple(clip_size.shape)}")
    with torch.inference_mode(False), torch.enable_grad():
        # The step itself (best-box bookkeeping, stop rules, move, clip) is one op, _refine_step: one kernel per
        # iteration on CUDA. It works in float32 or float64.
        dtype = torch.promote_types(boxes.dtype, torch.float32)
        current = boxes.detach().to(dtype, copy=True)
        bounds = None if clip_size is None else clip_size.to(current)
        active = torch.ones(boxes.size(0), dtype=torch.bool, device=boxes.device)
        best_boxes, best_ious, previous, initial = current, None, None, None
        for t in range(max_iter + 1):
            last = t == max_iter
            point = current.detach().requires_grad_(not last)
            predicted = predict_iou(point)
            grad = None if last else torch.autograd.grad(predicted.sum(), point)[0]
            ious = predicted.detach().to(dtype)
            if t == 0:
                initial = predicted.detach()
                previous = best_ious = ious
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
