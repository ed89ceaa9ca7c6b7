"""Fake (meta) kernels: output shapes of ``torch.ops.prroi_d2.*`` for ``torch.compile`` and other tracing."""

from typing import List

import torch
from torch import Tensor


@torch.library.register_fake("prroi_d2::prroi_pool2d")
def _prroi_pool2d_fake(
    features: Tensor, rois: Tensor, pooled_height: int, pooled_width: int, spatial_scale: float, aligned: bool
) -> Tensor:
    torch._check(features.dim() == 4, lambda: f"prroi_pool2d: features must be 4-D, got {features.dim()}-D")
    torch._check(rois.dim() == 2 and rois.size(1) == 5, lambda: "prroi_pool2d: rois must be (K, 5)")
    torch._check(rois.dtype == features.dtype, lambda: "prroi_pool2d: rois dtype does not match features dtype")
    torch._check(pooled_height >= 1 and pooled_width >= 1, lambda: "prroi_pool2d: pooled sizes must be >= 1")
    return features.new_empty((rois.size(0), features.size(1), pooled_height, pooled_width))


@torch.library.register_fake("prroi_d2::_prroi_pool2d_backward")
def _prroi_pool2d_backward_fake(
    grad_output: Tensor,
    features: Tensor,
    rois: Tensor,
    pooled_height: int,
    pooled_width: int,
    spatial_scale: float,
    aligned: bool,
    features_requires_grad: bool,
    rois_requires_grad: bool,
):
    grad_features = features.new_empty(features.shape) if features_requires_grad else features.new_empty((0,))
    grad_rois = rois.new_empty((rois.size(0), 5)) if rois_requires_grad else rois.new_empty((0,))
    return grad_features, grad_rois


@torch.library.register_fake("prroi_d2::prroi_pool2d_levels")
def _prroi_pool2d_levels_fake(
    features: List[Tensor],
    rois: Tensor,
    levels: Tensor,
    pooled_height: int,
    pooled_width: int,
    spatial_scales: List[float],
    aligned: bool,
) -> Tensor:
    torch._check(len(features) >= 1, lambda: "prroi_pool2d_levels: features must hold at least one map")
    torch._check(len(spatial_scales) == len(features), lambda: "prroi_pool2d_levels: one spatial scale per map")
    torch._check(rois.dim() == 2 and rois.size(1) == 5, lambda: "prroi_pool2d_levels: rois must be (K, 5)")
    torch._check(levels.dim() == 1 and levels.size(0) == rois.size(0), lambda: "prroi_pool2d_levels: levels (K,)")
    torch._check(pooled_height >= 1 and pooled_width >= 1, lambda: "prroi_pool2d_levels: pooled sizes must be >= 1")
    return features[0].new_empty((rois.size(0), features[0].size(1), pooled_height, pooled_width))


@torch.library.register_fake("prroi_d2::_prroi_pool2d_levels_backward")
def _prroi_pool2d_levels_backward_fake(
    grad_output: Tensor,
    features: List[Tensor],
    rois: Tensor,
    levels: Tensor,
    pooled_height: int,
    pooled_width: int,
    spatial_scales: List[float],
    aligned: bool,
    features_requires_grad: bool,
    rois_requires_grad: bool,
):
    grad_features = [f.new_empty(f.shape) if features_requires_grad else f.new_empty((0,)) for f in features]
    grad_rois = rois.new_empty((rois.size(0), 5)) if rois_requires_grad else rois.new_empty((0,))
    return grad_features, grad_rois
