// Precise RoI Pooling: the operator's declarations and argument checks shared by all backends.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace prroi_d2 {

// Most pyramid levels prroi_pool2d_levels takes in one call.
constexpr int kMaxLevels = 8;

// The largest batch size, channels, height and width of a map, pooled_height and pooled_width, bins of a box
// (pooled_height x pooled_width) and elements of one box's output (channels x pooled_height x pooled_width): the
// kernels index with these in 32-bit ints, with room to spare for rounding up and loop steps. Larger ones raise a
// ValueError in the argument checks, before anything is allocated. Box indices and offsets into whole tensors are
// 64-bit, so the number of boxes is not bounded.
constexpr int64_t kMaxSize = int64_t(1) << 30;

// The dtype the kernels hold box coordinates, spatial scales and the coordinate gradient in: float64 for float64
// features, float32 otherwise (also for float16/bfloat16 features, whose boxes stay float32). rois of another
// (allowed) dtype are converted to it once, and the coordinate gradient is returned in the rois' dtype.
inline at::ScalarType box_dtype(at::ScalarType features_dtype) {
  return features_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// features (N, C, H, W), rois (K, 5) -> (K, C, pooled_height, pooled_width)
at::Tensor prroi_pool2d(
    const at::Tensor& features,
    const at::Tensor& rois,
    int64_t pooled_height,
    int64_t pooled_width,
    double spatial_scale,
    bool aligned);

// Gradients (grad_features (N, C, H, W), grad_rois (K, 5)); a gradient not asked for is returned empty (0 elements)
// and costs nothing. grad_rois[:, 0] (the batch index) is zero.
std::tuple<at::Tensor, at::Tensor> prroi_pool2d_backward(
    const at::Tensor& grad_output,
    const at::Tensor& features,
    const at::Tensor& rois,
    int64_t pooled_height,
    int64_t pooled_width,
    double spatial_scale,
    bool aligned,
    bool features_requires_grad,
    bool rois_requires_grad);

// Multi-level form: box k is pooled from features[levels[k]] with spatial_scales[levels[k]] (one call for all the
// levels of a feature pyramid). features: 1 to kMaxLevels maps (N, C, H_l, W_l); levels (K,) int64.
at::Tensor prroi_pool2d_levels(
    at::TensorList features,
    const at::Tensor& rois,
    const at::Tensor& levels,
    int64_t pooled_height,
    int64_t pooled_width,
    at::ArrayRef<double> spatial_scales,
    bool aligned);

std::tuple<std::vector<at::Tensor>, at::Tensor> prroi_pool2d_levels_backward(
    const at::Tensor& grad_output,
    at::TensorList features,
    const at::Tensor& rois,
    const at::Tensor& levels,
    int64_t pooled_height,
    int64_t pooled_width,
    at::ArrayRef<double> spatial_scales,
    bool aligned,
    bool features_requires_grad,
    bool rois_requires_grad);

namespace detail {

// Throws ValueError/TypeError naming the argument for anything the kernels cannot take. Accepted dtypes: features
// float16, bfloat16, float32 or float64; rois of the features' dtype, float32 with float16/bfloat16 features, or
// float64 with float32 features. Sizes up to kMaxSize; spatial_scale finite and > 0 in box_dtype.
void check_forward_args(
    const at::Tensor& features,
    const at::Tensor& rois,
    int64_t pooled_height,
    int64_t pooled_width,
    double spatial_scale);

void check_backward_args(
    const at::Tensor& grad_output,
    const at::Tensor& features,
    const at::Tensor& rois,
    int64_t pooled_height,
    int64_t pooled_width,
    double spatial_scale);

void check_levels_args(
    at::TensorList features,
    const at::Tensor& rois,
    const at::Tensor& levels,
    int64_t pooled_height,
    int64_t pooled_width,
    at::ArrayRef<double> spatial_scales);

void check_levels_backward_args(
    const at::Tensor& grad_output,
    at::TensorList features,
    const at::Tensor& rois,
    const at::Tensor& levels,
    int64_t pooled_height,
    int64_t pooled_width,
    at::ArrayRef<double> spatial_scales);

// _channels_last: features (N, C, H, W) of a floating dtype.
void check_channels_last_args(const at::Tensor& features);

}  // namespace detail
}  // namespace prroi_d2
