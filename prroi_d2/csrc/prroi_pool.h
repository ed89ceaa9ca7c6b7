// Precise RoI Pooling: the operator's declarations and argument checks shared by all backends.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace prroi_d2 {

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

namespace detail {

// Throws ValueError/TypeError naming the argument for anything the kernels cannot take.
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

}  // namespace detail
}  // namespace prroi_d2
