// Autograd of Precise RoI Pooling: gradients for the features and the four box coordinates.
// The backward op computes only the gradients asked for; it has no derivative of its own.
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>

#include "../prroi_pool.h"

namespace prroi_d2 {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

// Where a backward pass calls the backward op. Without create_graph (grad mode off) it goes straight to the device
// kernels, skipping the op's own autograd node; with create_graph it goes through that node, whose backward raises
// (no double backward).
class BackwardDispatch {
 public:
  BackwardDispatch() {
    if (!torch::autograd::GradMode::is_enabled()) below_autograd_.emplace();
  }

 private:
  std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd_;
};

class PrRoIPool2DFunction : public torch::autograd::Function<PrRoIPool2DFunction> {
 public:
  static Variable forward(
      AutogradContext* ctx, const Variable& features, const Variable& rois, int64_t pooled_height,
      int64_t pooled_width, double spatial_scale, bool aligned) {
    ctx->saved_data["pooled_height"] = pooled_height;
    ctx->saved_data["pooled_width"] = pooled_width;
    ctx->saved_data["spatial_scale"] = spatial_scale;
    ctx->saved_data["aligned"] = aligned;
    ctx->save_for_backward({features, rois});
    at::AutoDispatchBelowADInplaceOrView guard;
    return prroi_pool2d(features, rois, pooled_height, pooled_width, spatial_scale, aligned);
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const bool need_features = ctx->needs_input_grad(0);
    const bool need_rois = ctx->needs_input_grad(1);
    const BackwardDispatch dispatch;
    auto grads = prroi_pool2d_backward(
        grad_outputs[0], saved[0], saved[1], ctx->saved_data["pooled_height"].toInt(),
        ctx->saved_data["pooled_width"].toInt(), ctx->saved_data["spatial_scale"].toDouble(),
        ctx->saved_data["aligned"].toBool(), need_features, need_rois);
    return {need_features ? std::get<0>(grads) : Variable(), need_rois ? std::get<1>(grads) : Variable(),
            Variable(), Variable(), Variable(), Variable()};
  }
};

class PrRoIPool2DBackwardFunction : public torch::autograd::Function<PrRoIPool2DBackwardFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const Variable& grad_output, const Variable& features, const Variable& rois,
      int64_t pooled_height, int64_t pooled_width, double spatial_scale, bool aligned, bool features_requires_grad,
      bool rois_requires_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto grads = prroi_pool2d_backward(grad_output, features, rois, pooled_height, pooled_width, spatial_scale,
                                       aligned, features_requires_grad, rois_requires_grad);
    return {std::get<0>(grads), std::get<1>(grads)};
  }

  static variable_list backward(AutogradContext*, const variable_list&) {
    TORCH_CHECK(false, "prroi_pool2d: double backward (a gradient of the gradient) is not supported");
  }
};

// The multi-level form. Its inputs, flattened as autograd sees them: features[0 .. L), rois, levels, then the four
// non-tensor arguments.
class PrRoIPool2DLevelsFunction : public torch::autograd::Function<PrRoIPool2DLevelsFunction> {
 public:
  static Variable forward(
      AutogradContext* ctx, at::TensorList features, const Variable& rois, const Variable& levels,
      int64_t pooled_height, int64_t pooled_width, at::ArrayRef<double> spatial_scales, bool aligned) {
    ctx->saved_data["pooled_height"] = pooled_height;
    ctx->saved_data["pooled_width"] = pooled_width;
    ctx->saved_data["spatial_scales"] = spatial_scales.vec();
    ctx->saved_data["aligned"] = aligned;
    variable_list saved(features.begin(), features.end());
    saved.push_back(rois);
    saved.push_back(levels);
    ctx->save_for_backward(saved);
    at::AutoDispatchBelowADInplaceOrView guard;
    return prroi_pool2d_levels(features, rois, levels, pooled_height, pooled_width, spatial_scales, aligned);
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const size_t num_levels = saved.size() - 2;
    const variable_list features(saved.begin(), saved.begin() + num_levels);
    bool need_features = false;
    for (size_t l = 0; l < num_levels; ++l) need_features = need_features || ctx->needs_input_grad(l);
    const bool need_rois = ctx->needs_input_grad(num_levels);
    const auto scales = ctx->saved_data["spatial_scales"].toDoubleVector();
    const BackwardDispatch dispatch;
    auto grads = prroi_pool2d_levels_backward(
        grad_outputs[0], features, saved[num_levels], saved[num_levels + 1],
        ctx->saved_data["pooled_height"].toInt(), ctx->saved_data["pooled_width"].toInt(), scales,
        ctx->saved_data["aligned"].toBool(), need_features, need_rois);
    variable_list result;
    for (size_t l = 0; l < num_levels; ++l) {
      result.push_back(ctx->needs_input_grad(l) ? std::get<0>(grads)[l] : Variable());
    }
    result.push_back(need_rois ? std::get<1>(grads) : Variable());
    for (int i = 0; i < 5; ++i) result.push_back(Variable());  // levels and the non-tensor arguments
    return result;
  }
};

class PrRoIPool2DLevelsBackwardFunction : public torch::autograd::Function<PrRoIPool2DLevelsBackwardFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const Variable& grad_output, at::TensorList features, const Variable& rois,
      const Variable& levels, int64_t pooled_height, int64_t pooled_width, at::ArrayRef<double> spatial_scales,
      bool aligned, bool features_requires_grad, bool rois_requires_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto grads = prroi_pool2d_levels_backward(grad_output, features, rois, levels, pooled_height, pooled_width,
                                              spatial_scales, aligned, features_requires_grad, rois_requires_grad);
    variable_list result(std::get<0>(grads).begin(), std::get<0>(grads).end());
    result.push_back(std::get<1>(grads));
    return result;
  }

  static variable_list backward(AutogradContext*, const variable_list&) {
    TORCH_CHECK(false, "prroi_pool2d_levels: double backward (a gradient of the gradient) is not supported");
  }
};

at::Tensor forward_autograd(
    const at::Tensor& features, const at::Tensor& rois, int64_t pooled_height, int64_t pooled_width,
    double spatial_scale, bool aligned) {
  return PrRoIPool2DFunction::apply(features, rois, pooled_height, pooled_width, spatial_scale, aligned);
}

std::tuple<at::Tensor, at::Tensor> backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& features, const at::Tensor& rois, int64_t pooled_height,
    int64_t pooled_width, double spatial_scale, bool aligned, bool features_requires_grad, bool rois_requires_grad) {
  auto result = PrRoIPool2DBackwardFunction::apply(grad_output, features, rois, pooled_height, pooled_width,
                                                   spatial_scale, aligned, features_requires_grad,
                                                   rois_requires_grad);
  return {result[0], result[1]};
}

at::Tensor forward_levels_autograd(
    at::TensorList features, const at::Tensor& rois, const at::Tensor& levels, int64_t pooled_height,
    int64_t pooled_width, at::ArrayRef<double> spatial_scales, bool aligned) {
  return PrRoIPool2DLevelsFunction::apply(features, rois, levels, pooled_height, pooled_width, spatial_scales,
                                          aligned);
}

std::tuple<std::vector<at::Tensor>, at::Tensor> backward_levels_autograd(
    const at::Tensor& grad_output, at::TensorList features, const at::Tensor& rois, const at::Tensor& levels,
    int64_t pooled_height, int64_t pooled_width, at::ArrayRef<double> spatial_scales, bool aligned,
    bool features_requires_grad, bool rois_requires_grad) {
  auto result = PrRoIPool2DLevelsBackwardFunction::apply(grad_output, features, rois, levels, pooled_height,
                                                         pooled_width, spatial_scales, aligned,
                                                         features_requires_grad, rois_requires_grad);
  at::Tensor grad_rois = result.back();
  result.pop_back();
  return {result, grad_rois};
}

}  // namespace

TORCH_LIBRARY_IMPL(prroi_d2, Autograd, m) {
  m.impl("prroi_pool2d", &forward_autograd);
  m.impl("_prroi_pool2d_backward", &backward_autograd);
  m.impl("prroi_pool2d_levels", &forward_levels_autograd);
  m.impl("_prroi_pool2d_levels_backward", &backward_levels_autograd);
}

}  // namespace prroi_d2
