// CPU kernels of the multi-level form: each level's boxes are gathered and pooled by the single-level CPU kernels,
// and the results scattered back to the boxes' positions.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../prroi_pool.h"

namespace prroi_d2 {
namespace {

// Raises on a level that is not in [0, num_levels): the CPU path checks, the CUDA path cannot without a sync.
void check_level_indices(const at::Tensor& levels, int64_t num_levels) {
  if (levels.numel() == 0) return;
  const at::Tensor bad = at::logical_or(levels < 0, levels >= num_levels);
  if (bad.any().item<bool>()) {
    const int64_t i = bad.nonzero()[0][0].item<int64_t>();
    TORCH_CHECK_VALUE(false, "prroi_pool2d_levels: levels[", i, "] is ", levels[i].item<int64_t>(),
                      ", not a level index in [0, ", num_levels, ")");
  }
}

// (K_l,) positions of the boxes on level l.
at::Tensor boxes_on_level(const at::Tensor& levels, size_t l) {
  return (levels == static_cast<int64_t>(l)).nonzero().select(1, 0);
}

at::Tensor forward_levels_cpu(
    at::TensorList features, const at::Tensor& rois, const at::Tensor& levels, int64_t pooled_height,
    int64_t pooled_width, at::ArrayRef<double> spatial_scales, bool aligned) {
  detail::check_levels_args(features, rois, levels, pooled_height, pooled_width, spatial_scales);
  check_level_indices(levels, features.size());
  at::Tensor output =
      at::empty({rois.size(0), features[0].size(1), pooled_height, pooled_width}, features[0].options());
  for (size_t l = 0; l < features.size(); ++l) {
    const at::Tensor index = boxes_on_level(levels, l);
    if (index.numel() == 0) continue;
    output.index_copy_(0, index, prroi_pool2d(features[l], rois.index_select(0, index), pooled_height,
                                              pooled_width, spatial_scales[l], aligned));
  }
  return output;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> backward_levels_cpu(
    const at::Tensor& grad_output, at::TensorList features, const at::Tensor& rois, const at::Tensor& levels,
    int64_t pooled_height, int64_t pooled_width, at::ArrayRef<double> spatial_scales, bool aligned,
    bool features_requires_grad, bool rois_requires_grad) {
  detail::check_levels_backward_args(grad_output, features, rois, levels, pooled_height, pooled_width,
                                     spatial_scales);
  check_level_indices(levels, features.size());
  std::vector<at::Tensor> grad_features;
  at::Tensor grad_rois = rois_requires_grad ? at::zeros({rois.size(0), 5}, rois.options())
                                            : at::empty({0}, rois.options());
  for (size_t l = 0; l < features.size(); ++l) {
    const at::Tensor index = boxes_on_level(levels, l);
    auto grads = prroi_pool2d_backward(grad_output.index_select(0, index), features[l], rois.index_select(0, index),
                                       pooled_height, pooled_width, spatial_scales[l], aligned,
                                       features_requires_grad, rois_requires_grad);
    grad_features.push_back(std::get<0>(grads));
    if (rois_requires_grad && index.numel() > 0) grad_rois.index_copy_(0, index, std::get<1>(grads));
  }
  return {grad_features, grad_rois};
}

}  // namespace

TORCH_LIBRARY_IMPL(prroi_d2, CPU, m) {
  m.impl("prroi_pool2d_levels", &forward_levels_cpu);
  m.impl("_prroi_pool2d_levels_backward", &backward_levels_cpu);
}

}  // namespace prroi_d2
