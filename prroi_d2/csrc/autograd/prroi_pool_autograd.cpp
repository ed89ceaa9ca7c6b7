// Autograd of Precise RoI Pooling: gradients for the features and the four box coordinates.
// The backward op computes only the gradients asked for; it has no derivative of its own.
#include <torch/autograd.h>
#include <torch/library.h>

#include "../prroi_pool.h"

namespace prroi_d2 {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

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

}  // namespace

TORCH_LIBRARY_IMPL(prroi_d2, Autograd, m) {
  m.impl("prroi_pool2d", &forward_autograd);
  m.impl("_prroi_pool2d_backward", &backward_autograd);
}

}  // namespace prroi_d2
