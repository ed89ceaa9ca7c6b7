// CPU kernel of prroi_d2::_refine_step (see ../refine_step.h): one box after another.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../refine_step.h"

namespace prroi_d2 {

void check_refine_step_args(
    const at::Tensor& boxes, const c10::optional<at::Tensor>& grad, const at::Tensor& ious, const at::Tensor& previous,
    const at::Tensor& best_boxes, const at::Tensor& best_ious, const at::Tensor& active,
    const c10::optional<at::Tensor>& clip_size) {
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(1) == 4, "_refine_step: boxes must be (K, 4), got ",
                    boxes.sizes());
  TORCH_CHECK_TYPE(boxes.scalar_type() == at::kFloat || boxes.scalar_type() == at::kDouble,
                   "_refine_step: boxes must be float32 or float64, got ", boxes.scalar_type());
  const int64_t k = boxes.size(0);
  auto check = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
    TORCH_CHECK_VALUE(t.sizes() == shape, "_refine_step: ", name, " must have shape ", shape, ", got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, "_refine_step: ", name, " must be ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == boxes.device(), "_refine_step: ", name, " is on ", t.device(), ", boxes on ",
                      boxes.device());
  };
  const at::ScalarType dtype = boxes.scalar_type();
  if (grad.has_value()) check(*grad, "grad", {k, 4}, dtype);
  check(ious, "ious", {k}, dtype);
  check(previous, "previous", {k}, dtype);
  check(best_boxes, "best_boxes", {k, 4}, dtype);
  check(best_ious, "best_ious", {k}, dtype);
  check(active, "active", {k}, at::kBool);
  if (clip_size.has_value()) check(*clip_size, "clip_size", {k, 2}, dtype);
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> refine_step_cpu(
    const at::Tensor& boxes_in, const c10::optional<at::Tensor>& grad_in, const at::Tensor& ious_in,
    const at::Tensor& previous_in, const at::Tensor& best_boxes_in, const at::Tensor& best_ious_in,
    const at::Tensor& active_in, const c10::optional<at::Tensor>& clip_size_in, double step, double stop_delta,
    double stop_drop, bool first) {
  check_refine_step_args(boxes_in, grad_in, ious_in, previous_in, best_boxes_in, best_ious_in, active_in,
                         clip_size_in);
  const at::Tensor boxes = boxes_in.contiguous(), ious = ious_in.contiguous(), previous = previous_in.contiguous();
  const at::Tensor best_boxes = best_boxes_in.contiguous(), best_ious = best_ious_in.contiguous();
  const at::Tensor active = active_in.contiguous();
  const at::Tensor grad = grad_in.has_value() ? grad_in->contiguous() : at::Tensor();
  const at::Tensor clip_size = clip_size_in.has_value() ? clip_size_in->contiguous() : at::Tensor();
  at::Tensor out_boxes = at::empty_like(boxes), out_best_boxes = at::empty_like(boxes);
  at::Tensor out_best_ious = at::empty_like(ious), out_active = at::empty_like(active);
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "_refine_step_cpu", [&] {
    const scalar_t* b = boxes.const_data_ptr<scalar_t>();
    const scalar_t* g = grad.defined() ? grad.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* c = clip_size.defined() ? clip_size.const_data_ptr<scalar_t>() : nullptr;
    for (int64_t k = 0; k < boxes.size(0); ++k) {
      StepBox<scalar_t> in;
      in.box = b + 4 * k;
      in.grad = g != nullptr ? g + 4 * k : nullptr;
      in.bound = c != nullptr ? c + 2 * k : nullptr;
      in.best_box = best_boxes.const_data_ptr<scalar_t>() + 4 * k;
      in.iou = ious.const_data_ptr<scalar_t>()[k];
      in.previous = previous.const_data_ptr<scalar_t>()[k];
      in.best_iou = best_ious.const_data_ptr<scalar_t>()[k];
      in.active = active.const_data_ptr<bool>()[k];
      refine_step_box(in, first, scalar_t(step), scalar_t(stop_delta), scalar_t(stop_drop),
                      out_boxes.mutable_data_ptr<scalar_t>() + 4 * k,
                      out_best_boxes.mutable_data_ptr<scalar_t>() + 4 * k,
                      out_best_ious.mutable_data_ptr<scalar_t>() + k, out_active.mutable_data_ptr<bool>() + k);
    }
  });
  return {out_boxes, out_best_boxes, out_best_ious, out_active};
}

}  // namespace

TORCH_LIBRARY_IMPL(prroi_d2, CPU, m) { m.impl("_refine_step", &refine_step_cpu); }

}  // namespace prroi_d2
