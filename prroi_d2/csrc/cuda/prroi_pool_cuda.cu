// CUDA entry points of Precise RoI Pooling (prroi_pool2d and its multi-level form): argument checks, device guard,
// allocation, then the kernels of forward.cu, features_backward.cu and rois_backward.cu, on the current stream and
// without a host synchronisation.
//
// A box with a non-finite coordinate, a batch index outside [0, N) or a level outside [0, len(features)) reads
// nothing and pools to NaN (checking indices on the host would need a synchronisation).
//
// Maps in the channels-last memory format (all of a call's) are read as they are by kernels of their own; maps of
// other layouts through contiguous copies. The output and the feature gradient are contiguous either way.
//
// The kernels take boxes in box_dtype (float32, or float64 for float64 features): rois of another dtype (float32
// boxes come as they are with float16/bfloat16 features) are converted once here, and the coordinate gradient,
// summed in box_dtype, is cast back to the rois' dtype.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../prroi_pool.h"
#include "launchers.h"

namespace prroi_d2 {
namespace {

std::vector<at::Tensor> contiguous_all(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const at::Tensor& t : tensors) out.push_back(t.contiguous());
  return out;
}

// Whether the maps are read channels-last as they are: every one is contiguous in the channels-last memory format
// and one at least is not also contiguous (a map with one channel, or one pixel, is both, indexed alike either way).
// Maps of any other layout are read from contiguous copies.
bool all_channels_last(at::TensorList features) {
  bool only_channels_last = false;
  for (const at::Tensor& f : features) {
    if (!f.is_contiguous(at::MemoryFormat::ChannelsLast)) return false;
    only_channels_last = only_channels_last || !f.is_contiguous();
  }
  return only_channels_last;
}

at::Tensor forward_levels_impl(
    at::TensorList features, const at::Tensor& rois, const at::Tensor& levels, int64_t pooled_height,
    int64_t pooled_width, at::ArrayRef<double> spatial_scales, bool aligned) {
  c10::cuda::CUDAGuard device_guard(features[0].device());
  at::Tensor output =
      at::empty({rois.size(0), features[0].size(1), pooled_height, pooled_width}, features[0].options());
  const bool channels_last = all_channels_last(features) &&
      cuda::forward_reads_channels_last(pooled_height, pooled_width, features[0].scalar_type());
  cuda::launch_forward(channels_last ? features.vec() : contiguous_all(features),
                       rois.to(box_dtype(features[0].scalar_type())).contiguous(),
                       levels.defined() ? levels.contiguous() : levels, spatial_scales, aligned, channels_last, output);
  return output;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> backward_levels_impl(
    const at::Tensor& grad_output, at::TensorList features, const at::Tensor& rois, const at::Tensor& levels,
    at::ArrayRef<double> spatial_scales, bool aligned, bool features_requires_grad, bool rois_requires_grad) {
  c10::cuda::CUDAGuard device_guard(features[0].device());
  const at::ScalarType acc_dtype = box_dtype(features[0].scalar_type());
  const at::Tensor r = rois.to(acc_dtype).contiguous();
  const at::Tensor lv = levels.defined() ? levels.contiguous() : levels;
  std::vector<at::Tensor> grad_features;
  for (const at::Tensor& f : features) {
    grad_features.push_back(features_requires_grad
                                ? at::empty(f.sizes(), f.options().memory_format(at::MemoryFormat::Contiguous))
                                : at::empty({0}, f.options()));
  }
  at::Tensor grad_rois = at::empty({0}, rois.options());
  if (features_requires_grad) {
    cuda::launch_features_backward(grad_output, r, lv, spatial_scales, aligned, grad_features);
  }
  if (rois_requires_grad) {
    grad_rois = at::empty({rois.size(0), 5}, rois.options().dtype(acc_dtype));
    const bool channels_last = all_channels_last(features);
    cuda::launch_rois_backward(grad_output, channels_last ? features.vec() : contiguous_all(features), r, lv,
                               spatial_scales, aligned, channels_last, at::globalContext().deterministicAlgorithms(),
                               grad_rois);
    grad_rois = grad_rois.to(rois.scalar_type());
  }
  return {grad_features, grad_rois};
}

at::Tensor forward_cuda(
    const at::Tensor& features, const at::Tensor& rois, int64_t pooled_height, int64_t pooled_width,
    double spatial_scale, bool aligned) {
  detail::check_forward_args(features, rois, pooled_height, pooled_width, spatial_scale);
  return forward_levels_impl({features}, rois, at::Tensor(), pooled_height, pooled_width, {spatial_scale}, aligned);
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& features, const at::Tensor& rois, int64_t pooled_height,
    int64_t pooled_width, double spatial_scale, bool aligned, bool features_requires_grad, bool rois_requires_grad) {
  detail::check_backward_args(grad_output, features, rois, pooled_height, pooled_width, spatial_scale);
  auto grads = backward_levels_impl(grad_output, {features}, rois, at::Tensor(), {spatial_scale}, aligned,
                                    features_requires_grad, rois_requires_grad);
  return {std::get<0>(grads)[0], std::get<1>(grads)};
}

at::Tensor forward_levels_cuda(
    at::TensorList features, const at::Tensor& rois, const at::Tensor& levels, int64_t pooled_height,
    int64_t pooled_width, at::ArrayRef<double> spatial_scales, bool aligned) {
  detail::check_levels_args(features, rois, levels, pooled_height, pooled_width, spatial_scales);
  return forward_levels_impl(features, rois, levels, pooled_height, pooled_width, spatial_scales, aligned);
}

std::tuple<std::vector<at::Tensor>, at::Tensor> backward_levels_cuda(
    const at::Tensor& grad_output, at::TensorList features, const at::Tensor& rois, const at::Tensor& levels,
    int64_t pooled_height, int64_t pooled_width, at::ArrayRef<double> spatial_scales, bool aligned,
    bool features_requires_grad, bool rois_requires_grad) {
  detail::check_levels_backward_args(grad_output, features, rois, levels, pooled_height, pooled_width,
                                     spatial_scales);
  return backward_levels_impl(grad_output, features, rois, levels, spatial_scales, aligned, features_requires_grad,
                              rois_requires_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(prroi_d2, CUDA, m) {
  m.impl("prroi_pool2d", &forward_cuda);
  m.impl("_prroi_pool2d_backward", &backward_cuda);
  m.impl("prroi_pool2d_levels", &forward_levels_cuda);
  m.impl("_prroi_pool2d_levels_backward", &backward_levels_cuda);
}

}  // namespace prroi_d2
