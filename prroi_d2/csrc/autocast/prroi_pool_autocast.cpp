// Autocast of Precise RoI Pooling (both forms): computed in float32 (box coordinates need it), returned in the
// features' dtype.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "../prroi_pool.h"

namespace prroi_d2 {
namespace {

template <c10::DispatchKey autocast_key, c10::DeviceType device_type>
at::Tensor forward_autocast(
    const at::Tensor& features, const at::Tensor& rois, int64_t pooled_height, int64_t pooled_width,
    double spatial_scale, bool aligned) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  return prroi_pool2d(at::autocast::cached_cast(at::kFloat, features, device_type),
                      at::autocast::cached_cast(at::kFloat, rois, device_type), pooled_height, pooled_width,
                      spatial_scale, aligned)
      .to(features.scalar_type());
}

template <c10::DispatchKey autocast_key, c10::DeviceType device_type>
at::Tensor forward_levels_autocast(
    at::TensorList features, const at::Tensor& rois, const at::Tensor& levels, int64_t pooled_height,
    int64_t pooled_width, at::ArrayRef<double> spatial_scales, bool aligned) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  std::vector<at::Tensor> features32;
  for (const at::Tensor& f : features) features32.push_back(at::autocast::cached_cast(at::kFloat, f, device_type));
  const auto dtype = features.empty() ? at::kFloat : features[0].scalar_type();
  return prroi_pool2d_levels(features32, at::autocast::cached_cast(at::kFloat, rois, device_type), levels,
                             pooled_height, pooled_width, spatial_scales, aligned)
      .to(dtype);
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
