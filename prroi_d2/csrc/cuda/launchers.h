// Launchers of the CUDA kernels of Precise RoI Pooling (one .cu file each). Inputs are checked by the caller
// (prroi_pool_cuda.cu): features are maps of one pyramid level each (a single one for prroi_pool2d), all contiguous
// or, where `channels_last` is passed true, all contiguous in the channels-last memory format,
// rois (K, 5) contiguous in box_dtype (float32, or float64 for float64 features), `levels` (K,) int64 contiguous or
// undefined (every box on level 0). Every output is written in full.
#pragma once

#include <ATen/ATen.h>

namespace prroi_d2 {
namespace cuda {

// output (K, C, PH, PW), contiguous.
void launch_forward(
    at::TensorList features, const at::Tensor& rois, const at::Tensor& levels, at::ArrayRef<double> scales,
    bool aligned, bool channels_last, at::Tensor& output);

// Whether launch_forward takes channels-last maps for this output size and dtype (its shared tile fits).
bool forward_reads_channels_last(int64_t pooled_height, int64_t pooled_width, at::ScalarType dtype);

// grad_features[l] (N, C, H_l, W_l) from grad_output (K, C, PH, PW, any strides): a gather, deterministic.
void launch_features_backward(
    const at::Tensor& grad_output, const at::Tensor& rois, const at::Tensor& levels, at::ArrayRef<double> scales,
    bool aligned, at::TensorList grad_features);

// grad_rois (K, 5) in box_dtype from grad_output (K, C, PH, PW, any strides). Blocks add their sums atomically
// unless `deterministic` (then thread-block clusters where the kernels were compiled for sm_90 or later, one block
// per box otherwise).
void launch_rois_backward(
    const at::Tensor& grad_output, at::TensorList features, const at::Tensor& rois, const at::Tensor& levels,
    at::ArrayRef<double> scales, bool aligned, bool channels_last, bool deterministic, at::Tensor& grad_rois);

// The virtual architecture (e.g. 80 or 90) the kernels that `device` runs were compiled for: the PTX version of
// its kernel image, which is what __CUDA_ARCH__ was when they were compiled (a PTX-only build for an older
// architecture, JIT-compiled by the driver, reports the older one). Queried once per device.
int kernel_arch(int device);

}  // namespace cuda
}  // namespace prroi_d2
