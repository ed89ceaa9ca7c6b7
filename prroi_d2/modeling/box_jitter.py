"""Training boxes of the IoU head: ground-truth boxes jittered at random, sampled uniformly over IoU bins.

IoU-Net trains its IoU head on jittered ground truth instead of RPN proposals, whose IoU distribution is skewed to
low overlaps (paper, section 3.1). Everything here is batched tensor code on the boxes' device.
"""

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["box_iou", "jitter_boxes", "sample_jittered_boxes", "sample_uniform_over_bins"]


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU matrix (N, M) of XYXY boxes a (N, 4) and b (M, 4); 0 where the union is empty."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(inter))


def jitter_boxes(
    boxes: Tensor, num_per_box: int, max_shift: float, max_scale: float, generator: Optional[torch.Generator] = None
) -> Tensor:
    """``num_per_box`` random jitters of each XYXY box (G, 4) -> (G, num_per_box, 4).

    Each jitter draws a magnitude m ~ U(0, 1), then shifts the centre by up to ``m * max_shift`` of the box's width
    and height and scales width and height by ``max_scale ** (m * u)``, u ~ U(-1, 1) (independently per axis), so
    small and large jitters are both frequent and every IoU in [0.5, 1] is well covered.
    """
    g = boxes.size(0)
    u = torch.rand((g, num_per_box, 5), generator=generator, dtype=boxes.dtype, device=boxes.device)
    magnitude = u[..., 4:5]
    offsets = (2.0 * u[..., :4] - 1.0) * magnitude
    size = (boxes[:, 2:] - boxes[:, :2])[:, None, :]  # (G, 1, 2)
    centre = (boxes[:, 2:] + boxes[:, :2])[:, None, :] * 0.5
    centre = centre + offsets[..., :2] * max_shift * size
    size = size * torch.exp(offsets[..., 2:] * math.log(max_scale))
    return torch.cat([centre - 0.5 * size, centre + 0.5 * size], dim=-1)


def sample_uniform_over_bins(
    bins: Tensor, num_bins: int, num_samples: int, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Indices into ``bins`` (N,) int64: ``num_samples`` spread evenly over the bins ``0 .. num_bins - 1``.

    Each bin gets ``num_samples // num_bins`` slots (the first ``num_samples % num_bins`` bins one more), filled by a
    random permutation of the bin's members, repeated when the bin has fewer members than slots. Slots of empty bins
    stay empty, so fewer indices are returned then. Values of ``bins`` outside ``[0, num_bins)`` are never chosen.
    """
    device = bins.device
    valid = (bins >= 0) & (bins < num_bins)
    keys = torch.rand(bins.shape, generator=generator, device=device, dtype=torch.float64)
    order = torch.argsort(torch.where(valid, bins.to(torch.float64), float(num_bins)) + keys)
    # Members per bin, without a host sync (bincount of a masked selection needs two): invalid entries go to an
    # extra bin that is dropped.
    counts = torch.zeros(num_bins + 1, dtype=torch.int64, device=device)
    counts = counts.index_add_(0, torch.where(valid, bins, num_bins), torch.ones_like(bins))[:num_bins]
    starts = torch.cumsum(counts, 0) - counts
    quota = torch.full((num_bins,), num_samples // num_bins, dtype=torch.int64, device=device)
    quota[: num_samples % num_bins] += 1
    slot_bin = torch.repeat_interleave(torch.arange(num_bins, device=device), quota, output_size=num_samples)
    slot_rank = torch.arange(num_samples, device=device) - (torch.cumsum(quota, 0) - quota)[slot_bin]
    filled = counts[slot_bin] > 0
    position = starts[slot_bin] + slot_rank % counts[slot_bin].clamp(min=1)
    return order[position[filled]]


def sample_jittered_boxes(
    gt_boxes: Tensor,
    image_size: Tuple[int, int],
    num_samples: int,
    num_bins: int = 5,
    min_iou: float = 0.5,
    max_shift: float = 0.3,
    max_scale: float = 1.6,
    candidates_per_sample: int = 8,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Jittered ground-truth boxes of one image with IoU targets, uniform over IoU bins in [min_iou, 1].

    Args:
        gt_boxes: (G, 4) XYXY ground truth of the image (G may be 0).
        image_size: (height, width); candidates are clipped to the image.
        num_samples: boxes to return (fewer only when some IoU bin has no candidate, or G == 0).
        num_bins: equal-width IoU bins over [min_iou, 1].
        min_iou: candidates whose IoU with the box they came from is below this are dropped.
        max_shift, max_scale: jitter ranges (see :func:`jitter_boxes`).
        candidates_per_sample: candidates drawn per returned box (spread over the G boxes).
        generator: random generator (on the boxes' device) for reproducible draws.

    Returns:
        boxes (M, 4), target IoU (M,) with the ground-truth box of maximum overlap, and the index (M,) int64 of that
        box in ``gt_boxes`` (its class is the target class).
    """
    if gt_boxes.dim() != 2 or gt_boxes.size(1) != 4:
        raise ValueError(f"sample_jittered_boxes: gt_boxes must be (G, 4), got shape {tuple(gt_boxes.shape)}")
    if num_bins < 1 or not 0.0 <= min_iou < 1.0 or max_shift < 0 or max_scale < 1.0 or candidates_per_sample < 1:
        raise ValueError(
            "sample_jittered_boxes: need num_bins >= 1, 0 <= min_iou < 1, max_shift >= 0, max_scale >= 1, "
            f"candidates_per_sample >= 1; got {num_bins}, {min_iou}, {max_shift}, {max_scale}, {candidates_per_sample}"
        )
    device = gt_boxes.device
    g = gt_boxes.size(0)
    if g == 0 or num_samples <= 0:
        return gt_boxes.new_zeros((0, 4)), gt_boxes.new_zeros((0,)), torch.zeros(0, dtype=torch.int64, device=device)
    per_box = max(1, math.ceil(num_samples * candidates_per_sample / g))
    candidates = jitter_boxes(gt_boxes, per_box, max_shift, max_scale, generator)  # (G, P, 4)
    height, width = image_size
    candidates = candidates.clamp(min=0)
    candidates[..., 0::2].clamp_(max=width)  # scalar bounds: no host-to-device copy
    candidates[..., 1::2].clamp_(max=height)
    candidates = candidates.reshape(-1, 4)
    source = torch.arange(g, device=device).repeat_interleave(per_box)

    iou = box_iou(candidates, gt_boxes)  # (G * P, G)
    target_iou, target_index = iou.max(dim=1)
    own_iou = iou.gather(1, source[:, None]).squeeze(1)
    bin_width = (1.0 - min_iou) / num_bins
    bins = ((target_iou - min_iou) / bin_width).floor().clamp(max=num_bins - 1).to(torch.int64)
    bins = torch.where(own_iou >= min_iou, bins, torch.full_like(bins, -1))
    chosen = sample_uniform_over_bins(bins, num_bins, num_samples, generator)
    return candidates[chosen], target_iou[chosen], target_index[chosen]
