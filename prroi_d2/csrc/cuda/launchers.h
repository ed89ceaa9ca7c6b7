// Launchers of the CUDA kernels of Precise RoI Pooling (one .cu file each). Inputs are checked by the caller
// (prroi_pool_cuda.cu): features are contiguous maps of one pyramid level each (a single one for prroi_pool2d),
// rois (K, 5) contiguous, `levels` (K,) int64 contiguous or undefined (every box on level 0). Every output is
// written in full.
#pragma once

#include <ATen/ATen.h>

namespace prroi_d2 {
namespace cuda {

// output (K, C, PH, PW).
void launch_forward(
    at::TensorList features, const at::Tensor& rois, const at::Tensor& levels, at::ArrayRef<double> scales,
    bool aligned, at::Tensor& output);

// grad_features[l] (N, C, H_l, W_l) from grad_output (K, C, PH, PW, any strides): a gather, deterministic.
void launch_features_backward(
    const at::Tensor& grad_output, const at::Tensor& rois, const at::Tensor& levels, at::ArrayRef<double> scales,
    bool aligned, at::TensorList grad_features);

// grad_rois (K, 5) from grad_output (K, C, PH, PW, any strides). Blocks add their sums atomically unless
// `deterministic` (then thread-block clusters on sm_90 and later, one block per box before).
void launch_rois_backward(
    const at::Tensor& grad_output, at::TensorList features, const at::Tensor& rois, const at::Tensor& levels,
    at::ArrayRef<double> scales, bool aligned, bool deterministic, at::Tensor& grad_rois);

}  // namespace cuda
}  // namespace prroi_d2
