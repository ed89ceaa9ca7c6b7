"""Precise RoI Pooling, functional form.

Each output bin is the exact integral of the bilinearly interpolated feature map over the bin, divided by the bin
area (Jiang et al., ECCV 2018). The result is continuous in the box coordinates and differentiable with respect to
both the features and the four box coordinates.

Geometry: pixel ``(i, j)`` of the map sits at ``x = j, y = i``; the interpolated map is zero outside the pixel grid
(it ramps linearly to zero over the one-pixel border around it). A box ``(x0, y0, x1, y1)`` is multiplied by
``spatial_scale`` and covers ``[x0, x1) x [y0, y1)``; with ``aligned=True`` the scaled box is shifted by -0.5 pixel
(the half-pixel geometry of Detectron2's ``ROIAlignV2``). Inverted boxes have zero width or height, and a bin of zero
area pools to 0.

Defined results for bad boxes:
  * a box with a NaN or infinite coordinate (or a width or height that overflows) pools to NaN; it reads no
    feature and adds nothing to the feature gradient, and its coordinate gradient is NaN;
  * on CUDA, a box whose batch index is not an integer in ``[0, N)`` pools to NaN in the same way (checking it would
    need a host synchronisation); on the CPU it raises a ``ValueError``.

Dtypes: features float16, bfloat16, float32 or float64 (CPU and CUDA; float16/bfloat16 are summed in float32). Boxes
have the features' dtype, or float32 with float16/bfloat16 features (recommended: coordinates such as 1300.7 or a
batch index of 257 are not rounded to the features' precision), or float64 with float32 features (used as float32).
Box coordinates and ``spatial_scale`` are used in float32, or float64 for float64 features. The output has the
features' dtype; gradients have the dtypes of their inputs.

Sizes: batch size, channels, height and width of a map, ``pooled_height``, ``pooled_width``, bins per box
(``pooled_height * pooled_width``) and channels x bins are each at most 2**30; larger ones raise ``ValueError``.

The entry points are leaf functions for ``torch.fx`` (``torch.fx.wrap``, as torchvision does for its ops), so a
module that calls them, or uses :class:`prroi_d2.PrRoIPool`, can be traced with ``torch.fx.symbolic_trace``.
A module that imports them by name into its own namespace calls ``torch.fx.wrap("prroi_pool")`` there as well (or
calls them as ``prroi_d2.functional.prroi_pool``).
"""

import math
from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor

from prroi_d2 import _extension

_extension.load()

__all__ = ["prroi_pool2d", "prroi_pool", "prroi_pool_levels", "assign_fpn_levels", "boxes_to_rois"]


def boxes_to_rois(boxes: Union[Tensor, List[Tensor]]) -> Tensor:
    """Return rois ``(K, 5)`` from a ``(K, 5)`` tensor or a list of per-image ``(Ki, 4)`` box tensors.

    The list form prepends each box's image index; gradients flow back to the listed tensors. A tensor is returned
    as it is (the op checks its shape).
    """
    if isinstance(boxes, Tensor):
        return boxes
    if len(boxes) == 0:
        raise ValueError("rois is an empty list: pass one (Ki, 4) box tensor per image (Ki may be 0)")
    for i, b in enumerate(boxes):
        if b.dim() != 2 or b.size(1) != 4:
            raise ValueError("rois[{}] must be a (Ki, 4) box tensor, got shape {}".format(i, b.shape))
        if b.dtype != boxes[0].dtype or b.device != boxes[0].device:
            raise ValueError("rois[{}] differs from rois[0] in dtype or device".format(i))
    index = [torch.full_like(b[:, :1], float(i)) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(index, dim=0), torch.cat(boxes, dim=0)], dim=1)


@torch.fx.wrap
def prroi_pool2d(
    features: Tensor,
    rois: Union[Tensor, List[Tensor]],
    pooled_height: int,
    pooled_width: int,
    spatial_scale: float,
    aligned: bool = False,
) -> Tensor:
    """Precise RoI Pooling, in the argument order of the original ``prroi_pool`` package.

    Args:
        features: (N, C, H, W) float16, bfloat16, float32 or float64.
        rois: (K, 5) ``(batch_index, x0, y0, x1, y1)`` in input coordinates, on the device of ``features``, of its
            dtype, or float32 with float16/bfloat16 features, or float64 with float32 features; or a list of N
            per-image (Ki, 4) ``(x0, y0, x1, y1)`` tensors.
        pooled_height, pooled_width: output bins per box, >= 1 (at most 2**30 bins per box).
        spatial_scale: factor from input coordinates to feature-map pixels (e.g. 1/16), finite and > 0 in float32
            (float64 for float64 features).
        aligned: shift scaled boxes by -0.5 pixel (Detectron2 ``ROIAlignV2`` geometry).

    Returns:
        (K, C, pooled_height, pooled_width) in the features' dtype, contiguous.

    Bad arguments raise ``ValueError`` or ``TypeError`` naming the argument.
    """
    return torch.ops.prroi_d2.prroi_pool2d(
        features, boxes_to_rois(rois), pooled_height, pooled_width, spatial_scale, aligned
    )


@torch.fx.wrap
def prroi_pool(
    features: Tensor,
    rois: Union[Tensor, List[Tensor]],
    output_size: Union[int, Tuple[int, int], List[int]],
    spatial_scale: float = 1.0,
    aligned: bool = False,
) -> Tensor:
    """Precise RoI Pooling in the argument order of ``torchvision.ops.roi_align``.

    ``output_size`` is an int or a ``(height, width)`` pair; see :func:`prroi_pool2d` for the rest.
    """
    pooled_height, pooled_width = output_size_pair(output_size)
    return prroi_pool2d(features, rois, pooled_height, pooled_width, spatial_scale, aligned)


@torch.fx.wrap
def prroi_pool_levels(
    features: List[Tensor],
    rois: Union[Tensor, List[Tensor]],
    levels: Tensor,
    output_size: Union[int, Tuple[int, int], List[int]],
    spatial_scales: Sequence[float],
    aligned: bool = False,
) -> Tensor:
    """Precise RoI Pooling over a feature pyramid in one call: box ``k`` is pooled from ``features[levels[k]]``
    with ``spatial_scales[levels[k]]``, as :func:`prroi_pool` would pool it on that level alone.

    One launch for all levels and no host synchronisation, where pooling level by level takes a launch, a gather and
    a scatter per level: the form for loops that pool the same boxes many times (IoU-Net's box refinement).

    Args:
        features: 1 to 8 maps (N, C, H_l, W_l) of one dtype and device (same N and C).
        rois: (K, 5) or a list of per-image (Ki, 4) boxes, as for :func:`prroi_pool2d`.
        levels: (K,) int64 index into ``features`` of each box (e.g. from :func:`assign_fpn_levels`).
        output_size: int or (height, width).
        spatial_scales: one factor per map, from input coordinates to its pixels.
        aligned: shift scaled boxes by -0.5 pixel (Detectron2 ``ROIAlignV2`` geometry).

    Returns:
        (K, C, height, width). A level outside ``[0, len(features))`` raises ``ValueError`` on the CPU and pools to NaN
        on CUDA (like a bad batch index).
    """
    pooled_height, pooled_width = output_size_pair(output_size)
    return torch.ops.prroi_d2.prroi_pool2d_levels(
        list(features), boxes_to_rois(rois), levels, pooled_height, pooled_width, list(spatial_scales), aligned
    )


def channels_last_copy(features: Tensor) -> Tensor:
    """A copy of ``features`` (N, C, H, W) in the channels-last memory format, which the CUDA kernels read with
    coalesced loads. On CUDA a tiled transpose (torch's own strided copy reaches about a quarter of the bandwidth);
    where a gradient is wanted, torch's differentiable copy."""
    if torch.is_grad_enabled() and features.requires_grad:
        return features.clone(memory_format=torch.channels_last)
    return torch.ops.prroi_d2._channels_last(features)


def assign_fpn_levels(
    rois: Tensor, spatial_scales: Sequence[float], canonical_box_size: float = 224.0, canonical_level: int = 4
) -> Tensor:
    """(K,) int64 index into ``spatial_scales`` of the pyramid level each roi is pooled from, by the rule of the FPN
    paper that Detectron2's ``ROIPooler`` uses: ``floor(canonical_level + log2(sqrt(area) / canonical_box_size))``,
    clamped to the pyramid (level ``l`` has scale ``2 ** -l``).

    rois: (K, 5) rows ``(batch_index, x0, y0, x1, y1)`` or (K, 4) boxes, in input coordinates. Boxes of zero or
    negative area go to the finest level, boxes with a non-finite coordinate to the finest level too (they pool to
    NaN there).
    """
    levels = [-math.log2(s) for s in spatial_scales]
    if not levels or any(abs(lv - round(lv)) > 1e-6 for lv in levels):
        raise ValueError("spatial_scales must be powers of 1/2, one per level, got {}".format(list(spatial_scales)))
    min_level, max_level = round(levels[0]), round(levels[-1])
    if max_level - min_level + 1 != len(levels):
        raise ValueError(
            "spatial_scales must be consecutive levels, finest first (1/4, 1/8, ...), got {}".format(
                list(spatial_scales)
            )
        )
    if rois.dim() != 2 or rois.size(1) not in (4, 5):
        raise ValueError("rois must be (K, 5) or (K, 4), got shape {}".format(tuple(rois.shape)))
    boxes = rois[:, -4:]
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0)
    level = torch.floor(canonical_level + torch.log2(area.sqrt() / canonical_box_size + 1e-8))
    level = torch.nan_to_num(level, nan=float(min_level)).clamp(min_level, max_level)
    return level.to(torch.int64) - min_level


def output_size_pair(output_size: Union[int, Tuple[int, int], List[int]]) -> Tuple[int, int]:
    """``7 -> (7, 7)``; ``(7, 5) -> (7, 5)``."""
    if isinstance(output_size, int):
        return output_size, output_size
    if len(output_size) != 2:
        raise ValueError("output_size must be an int or a (height, width) pair, got {}".format(output_size))
    return output_size[0], output_size[1]
