// CPU kernel of prroi_d2::_refine_step (see ../refine_step.h): one box after another.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../refine_step.h"

namespace prroi_d2 {

namespace {

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

}  // namespace

StepTensors prepare_refine_step(
    const at::Tensor& boxes, const c10::optional<at::Tensor>& grad, const at::Tensor& ious, const at::Tensor& previous,
    const at::Tensor& best_boxes, const at::Tensor& best_ious, const at::Tensor& active,
    const c10::optional<at::Tensor>& clip_size) {
  check_refine_step_args(boxes, grad, ious, previous, best_boxes, best_ious, active, clip_size);
  StepTensors t;
  t.boxes = boxes.contiguous();
  t.grad = grad.has_value() ? grad->contiguous() : at::Tensor();
  t.ious = ious.contiguous();
  t.previous = previous.contiguous();
  t.best_boxes = best_boxes.contiguous();
  t.best_ious = best_ious.contiguous();
  t.active = active.contiguous();
  t.clip_size = clip_size.has_value() ? clip_size->contiguous() : at::Tensor();
  t.outputs = {at::empty_like(t.boxes), at::empty_like(t.boxes), at::empty_like(t.ious), at::empty_like(t.active)};
  return t;
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> refine_step_cpu(
    const at::Tensor& boxes, const c10::optional<at::Tensor>& grad, const at::Tensor& ious, const at::Tensor& previous,
    const at::Tensor& best_boxes, const at::Tensor& best_ious, const at::Tensor& active,
    const c10::optional<at::Tensor>& clip_size, double step, double stop_delta, double stop_drop, bool first) {
  StepTensors t = prepare_refine_step(boxes, grad, ious, previous, best_boxes, best_ious, active, clip_size);
  AT_DISPATCH_FLOATING_TYPES(t.boxes.scalar_type(), "_refine_step_cpu", [&] {
    const StepData<scalar_t> d = t.data<scalar_t>(step, stop_delta, stop_drop, first);
    for (int64_t k = 0; k < t.boxes.size(0); ++k) refine_step_box(d, k);
  });
  return t.outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(prroi_d2, CPU, m) { m.impl("_refine_step", &refine_step_cpu); }

}  // namespace prroi_d2
