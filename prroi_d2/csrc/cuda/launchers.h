// Launchers of the CUDA kernels of Precise RoI Pooling (one .cu file each). Inputs are checked by the caller
// (prroi_pool_cuda.cu); features and rois are contiguous; every output is written in full.
#pragma once

#include <ATen/ATen.h>

namespace prroi_d2 {
namespace cuda {

// output (K, C, PH, PW).
void launch_forward(
    const at::Tensor& features, const at::Tensor& rois, double spatial_scale, bool aligned, at::Tensor& output);

// grad_features (N, C, H, W) from grad_output (K, C, PH, PW, any strides): a gather, deterministic.
void launch_features_backward(
    const at::Tensor& grad_output, const at::Tensor& rois, double spatial_scale, bool aligned,
    at::Tensor& grad_features);

// grad_rois (K, 5) from grad_output (K, C, PH, PW, any strides). `deterministic` keeps each box in one block
// (fixed-order sums); otherwise a box may be split over blocks that add their sums atomically.
void launch_rois_backward(
    const at::Tensor& grad_output, const at::Tensor& features, const at::Tensor& rois, double spatial_scale,
    bool aligned, bool deterministic, at::Tensor& grad_rois);

}  // namespace cuda
}  // namespace prroi_d2
