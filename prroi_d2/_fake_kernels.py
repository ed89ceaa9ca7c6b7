"""Fake (meta) kernels: output shapes of ``torch.ops.prroi_d2.*`` for ``torch.compile`` and other tracing.

They raise the same ``ValueError``/``TypeError`` as the C++ argument checks (``csrc/prroi_pool.cpp``) for what the
kernels cannot take: dtypes, sizes beyond ``MAX_SIZE``, a spatial scale that is not finite and > 0 in the kernels'
type.
"""

import ctypes
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

# The kernels' bound on every size they index with 32-bit ints (kMaxSize in csrc/prroi_pool.h).
MAX_SIZE = 1 << 30

_FEATURES_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SIZE_NAMES = ("batch size", "channels", "height", "width")


def _rois_dtype_fits(features: torch.dtype, rois: torch.dtype) -> bool:
    return (
        rois == features
        or (rois == torch.float32 and features in (torch.float16, torch.bfloat16))
        or (rois == torch.float64 and features == torch.float32)
    )


def _scale_fits(scale: float, features: torch.dtype) -> bool:
    """Finite and > 0 in float64 for float64 features, in float32 (the boxes' type in the kernels) otherwise."""
    if not isinstance(scale, (int, float)):  # a symbolic float: checked by the kernels when they run
        return True
    value = scale if features == torch.float64 else ctypes.c_float(scale).value
    return 0 < value < math.inf  # false for NaN


def _box_type_name(features: torch.dtype) -> str:
    if features == torch.float64:
        return "float64 (the kernels' type for float64 features)"
    return "float32 (the kernels' type for float32, float16 and bfloat16 features)"


def check_forward_args(features: Tensor, rois: Tensor, pooled_height: int, pooled_width: int, spatial_scale: float):
    """The checks of ``detail::check_forward_args``, with the same exception types and wording."""
    torch._check_value(
        features.dim() == 4, lambda: f"prroi_pool2d: features must be 4-D (N, C, H, W), got {features.dim()}-D"
    )
    torch._check_value(
        rois.dim() == 2 and rois.size(1) == 5, lambda: f"prroi_pool2d: rois must be (K, 5), got {tuple(rois.shape)}"
    )
    torch._check_type(
        features.dtype in _FEATURES_DTYPES,
        lambda: f"prroi_pool2d: features must be float16, bfloat16, float32 or float64, got {features.dtype}",
    )
    torch._check_type(
        _rois_dtype_fits(features.dtype, rois.dtype),
        lambda: (
            f"prroi_pool2d: rois dtype {rois.dtype} does not go with features dtype {features.dtype}: rois take "
            "the features' dtype, float32 with float16/bfloat16 features, or float64 with float32 features"
        ),
    )
    torch._check_value(pooled_height >= 1, lambda: f"prroi_pool2d: pooled_height must be >= 1, got {pooled_height}")
    torch._check_value(pooled_width >= 1, lambda: f"prroi_pool2d: pooled_width must be >= 1, got {pooled_width}")
    torch._check_value(
        pooled_height <= MAX_SIZE,
        lambda: f"prroi_pool2d: pooled_height must be at most 2^30 ({MAX_SIZE}), got {pooled_height}",
    )
    torch._check_value(
        pooled_width <= MAX_SIZE,
        lambda: f"prroi_pool2d: pooled_width must be at most 2^30 ({MAX_SIZE}), got {pooled_width}",
    )
    bins = pooled_height * pooled_width
    torch._check_value(
        bins <= MAX_SIZE,
        lambda: (
            "prroi_pool2d: pooled_height x pooled_width (bins per box) must be at most 2^30 "
            f"({MAX_SIZE}), got {pooled_height} x {pooled_width} = {bins}"
        ),
    )
    torch._check_value(
        _scale_fits(spatial_scale, features.dtype),
        lambda: (
            f"prroi_pool2d: spatial_scale must be finite and > 0 in {_box_type_name(features.dtype)}, "
            f"got {spatial_scale}"
        ),
    )
    for d, name in enumerate(_SIZE_NAMES):
        torch._check_value(
            features.size(d) <= MAX_SIZE,
            lambda: (
                f"prroi_pool2d: features {name} must be at most 2^30 ({MAX_SIZE}), got features of shape "
                f"{tuple(features.shape)}"
            ),
        )
    torch._check_value(
        features.size(1) * bins <= MAX_SIZE,
        lambda: (
            "prroi_pool2d: features channels x pooled_height x pooled_width (one box's output) must be at most "
            f"2^30 ({MAX_SIZE}), got {features.size(1)} x {pooled_height} x {pooled_width}"
        ),
    )


def check_levels_args(
    features: List[Tensor], rois: Tensor, levels: Tensor, pooled_height: int, pooled_width: int, spatial_scales
):
    """The checks of ``detail::check_levels_args``."""
    torch._check_value(
        1 <= len(features) <= 8,
        lambda: f"prroi_pool2d_levels: features must be a list of 1 to 8 maps (N, C, H_l, W_l), got {len(features)}",
    )
    torch._check_value(
        len(spatial_scales) == len(features),
        lambda: (
            f"prroi_pool2d_levels: spatial_scales must have one entry per feature map ({len(features)}), got "
            f"{len(spatial_scales)}"
        ),
    )
    for level, (f, scale) in enumerate(zip(features, spatial_scales)):
        torch._check_value(
            f.dim() == 4, lambda: f"prroi_pool2d_levels: features[{level}] must be 4-D (N, C, H, W), got {f.dim()}-D"
        )
        torch._check_value(
            _scale_fits(scale, f.dtype),
            lambda: (
                f"prroi_pool2d_levels: spatial_scales[{level}] must be finite and > 0 in "
                f"{_box_type_name(f.dtype)}, got {scale}"
            ),
        )
        if level > 0:
            torch._check_value(
                f.size(0) == features[0].size(0) and f.size(1) == features[0].size(1),
                lambda: f"prroi_pool2d_levels: features[{level}] differs from features[0] in batch size or channels",
            )
            torch._check_type(
                f.dtype == features[0].dtype,
                lambda: (
                    f"prroi_pool2d_levels: features[{level}] dtype {f.dtype} differs from features[0] dtype "
                    f"{features[0].dtype}"
                ),
            )
        check_forward_args(f, rois, pooled_height, pooled_width, scale)
    torch._check_value(
        levels.dim() == 1 and levels.size(0) == rois.size(0),
        lambda: "prroi_pool2d_levels: levels must be a (K,) tensor, one level index per roi",
    )
    torch._check_type(
        levels.dtype == torch.int64, lambda: f"prroi_pool2d_levels: levels must be int64, got {levels.dtype}"
    )


@torch.library.register_fake("prroi_d2::prroi_pool2d")
def _prroi_pool2d_fake(
    features: Tensor, rois: Tensor, pooled_height: int, pooled_width: int, spatial_scale: float, aligned: bool
) -> Tensor:
    check_forward_args(features, rois, pooled_height, pooled_width, spatial_scale)
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
    check_forward_args(features, rois, pooled_height, pooled_width, spatial_scale)
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
    check_levels_args(features, rois, levels, pooled_height, pooled_width, spatial_scales)
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
    check_levels_args(features, rois, levels, pooled_height, pooled_width, spatial_scales)
    grad_features = [f.new_empty(f.shape) if features_requires_grad else f.new_empty((0,)) for f in features]
    grad_rois = rois.new_empty((rois.size(0), 5)) if rois_requires_grad else rois.new_empty((0,))
    return grad_features, grad_rois


@torch.library.register_fake("prroi_d2::_nms_clusters")
def _nms_clusters_fake(boxes: Tensor, groups: Tensor, iou_threshold: float):
    torch._check_value(boxes.dim() == 2 and boxes.size(1) == 4, lambda: "_nms_clusters: boxes must be (N, 4)")
    torch._check_value(
        groups.dim() == 1 and groups.size(0) == boxes.size(0), lambda: "_nms_clusters: groups must be (N,)"
    )
    return groups.new_empty(groups.shape, dtype=torch.bool), groups.new_empty(groups.shape)


@torch.library.register_fake("prroi_d2::_channels_last")
def _channels_last_fake(features: Tensor) -> Tensor:
    if features.dim() != 4:
        raise ValueError(f"_channels_last: features must be (N, C, H, W), got shape {tuple(features.shape)}")
    if features.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(
            f"_channels_last: features must be float16, bfloat16, float32 or float64, got {features.dtype}"
        )
    return torch.empty_like(features, memory_format=torch.channels_last)


@torch.library.register_fake("prroi_d2::_refine_step")
def _refine_step_fake(
    boxes: Tensor,
    grad: Optional[Tensor],
    ious: Tensor,
    previous: Tensor,
    best_boxes: Tensor,
    best_ious: Tensor,
    active: Tensor,
    clip_size: Optional[Tensor],
    step: float,
    stop_delta: float,
    stop_drop: float,
    first: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if boxes.dim() != 2 or boxes.size(1) != 4:
        raise ValueError(f"_refine_step: boxes must be (K, 4), got {tuple(boxes.shape)}")
    return torch.empty_like(boxes), torch.empty_like(boxes), torch.empty_like(ious), torch.empty_like(active)
