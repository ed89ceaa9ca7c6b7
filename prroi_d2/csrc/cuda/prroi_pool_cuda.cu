// CUDA entry points of Precise RoI Pooling: argument checks, device guard, allocation, then the kernels of
// forward.cu, features_backward.cu and rois_backward.cu, on the current stream and without a host synchronisation.
//
// A box with a non-finite coordinate or a batch index outside [0, N) reads nothing and pools to NaN (checking the
// batch index on the host would need a synchronisation).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../prroi_pool.h"
#include "launchers.h"

namespace prroi_d2 {
namespace {

at::Tensor forward_cuda(
    const at::Tensor& features, const at::Tensor& rois, int64_t pooled_height, int64_t pooled_width,
    double spatial_scale, bool aligned) {
  detail::check_forward_args(features, rois, pooled_height, pooled_width, spatial_scale);
  c10::cuda::CUDAGuard device_guard(features.device());
  at::Tensor output = at::empty({rois.size(0), features.size(1), pooled_height, pooled_width}, features.options());
  cuda::launch_forward(features.contiguous(), rois.contiguous(), spatial_scale, aligned, output);
  return output;
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& features, const at::Tensor& rois, int64_t pooled_height,
    int64_t pooled_width, double spatial_scale, bool aligned, bool features_requires_grad, bool rois_requires_grad) {
  detail::check_backward_args(grad_output, features, rois, pooled_height, pooled_width, spatial_scale);
  c10::cuda::CUDAGuard device_guard(features.device());
  const at::Tensor r = rois.contiguous();
  at::Tensor grad_features = at::empty({0}, features.options());
  at::Tensor grad_rois = at::empty({0}, rois.options());
  if (features_requires_grad) {
    grad_features = at::empty(features.sizes(), features.options().memory_format(at::MemoryFormat::Contiguous));
    cuda::launch_features_backward(grad_output, r, spatial_scale, aligned, grad_features);
  }
  if (rois_requires_grad) {
    grad_rois = at::empty({rois.size(0), 5}, rois.options());
    cuda::launch_rois_backward(grad_output, features.contiguous(), r, spatial_scale, aligned,
                               at::globalContext().deterministicAlgorithms(), grad_rois);
  }
  return {grad_features, grad_rois};
}

}  // namespace

TORCH_LIBRARY_IMPL(prroi_d2, CUDA, m) {
  m.impl("prroi_pool2d", &forward_cuda);
  m.impl("_prroi_pool2d_backward", &backward_cuda);
}

}  // namespace prroi_d2
