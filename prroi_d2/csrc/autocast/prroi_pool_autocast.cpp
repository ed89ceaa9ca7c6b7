// Autocast of Precise RoI Pooling (both forms). The kernels take float16/bfloat16 features as they are (summing in
// float32) and box coordinates in float32, so the features are left alone and only the rois are cast: to float32
// for float16/bfloat16 features, and by autocast's own rule otherwise (float16/bfloat16 rois to float32, float64
// kept). The result has the features' dtype.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "../prroi_pool.h"

namespace prroi_d2 {
namespace {

template <c10::DeviceType device_type>
at::Tensor autocast_rois(const at::Tensor& rois, at::ScalarType features_dtype) {
  if ((features_dtype == at::kHalf || features_dtype == at::kBFloat16) && at::isFloatingType(rois.scalar_type())) {
    return rois.to(at::kFloat);
  }
  return at::autocast::cached_cast(at::kFloat, rois, device_type);
}

template <c10::DispatchKey autocast_key, c10::DeviceType device_type>
at::Tensor forward_autocast(
    const at::Tensor& features, const at::Tensor& rois, int64_t pooled_height, int64_t pooled_width,
    double spatial_scale, bool aligned) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  return prroi_pool2d(features, autocast_rois<device_type>(rois, features.scalar_type()), pooled_height,
                      pooled_width, spatial_scale, aligned);
}

template <c10::DispatchKey autocast_key, c10::DeviceType device_type>
at::Tensor forward_levels_autocast(
    at::TensorList features, const at::Tensor& rois, const at::Tensor& levels, int64_t pooled_height,
    int64_t pooled_width, at::ArrayRef<double> spatial_scales, bool aligned) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const auto dtype = features.empty() ? at::kFloat : features[0].scalar_type();
  return prroi_pool2d_levels(features, autocast_rois<device_type>(rois, dtype), levels, pooled_height, pooled_width,
                             spatial_scales, aligned);
}

}  // namespace

TORCH_LIBRARY_IMPL(prroi_d2, AutocastCUDA, m) {
  m.impl("prroi_pool2d", &forward_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
  m.impl("prroi_pool2d_levels", &forward_levels_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
}

TORCH_LIBRARY_IMPL(prroi_d2, AutocastCPU, m) {
  m.impl("prroi_pool2d", &forward_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
  m.impl("prroi_pool2d_levels", &forward_levels_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
}

}  // namespace prroi_d2
