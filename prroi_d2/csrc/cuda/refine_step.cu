// CUDA kernel of prroi_d2::_refine_step (see ../refine_step.h): one thread per box, the whole step (best-box
// bookkeeping, stop rules, move, clip) in one launch instead of ~15 element-wise kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../refine_step.h"

namespace prroi_d2 {
namespace {

constexpr int kThreads = 128;

template <typename scalar_t>
__global__ void refine_step_kernel(
    const scalar_t* __restrict__ boxes, const scalar_t* __restrict__ grad, const scalar_t* __restrict__ ious,
    const scalar_t* __restrict__ previous, const scalar_t* __restrict__ best_boxes,
    const scalar_t* __restrict__ best_ious, const bool* __restrict__ active, const scalar_t* __restrict__ clip_size,
    int64_t K, bool first, scalar_t step, scalar_t stop_delta, scalar_t stop_drop, scalar_t* __restrict__ out_boxes,
    scalar_t* __restrict__ out_best_boxes, scalar_t* __restrict__ out_best_ious, bool* __restrict__ out_active) {
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k >= K) return;
  StepBox<scalar_t> in;
  in.box = boxes + 4 * k;
  in.grad = grad != nullptr ? grad + 4 * k : nullptr;
  in.bound = clip_size != nullptr ? clip_size + 2 * k : nullptr;
  in.best_box = best_boxes + 4 * k;
  in.iou = ious[k];
  in.previous = previous[k];
  in.best_iou = best_ious[k];
  in.active = active[k];
  refine_step_box(in, first, step, stop_delta, stop_drop, out_boxes + 4 * k, out_best_boxes + 4 * k,
                  out_best_ious + k, out_active + k);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> refine_step_cuda(
    const at::Tensor& boxes_in, const c10::optional<at::Tensor>& grad_in, const at::Tensor& ious_in,
    const at::Tensor& previous_in, const at::Tensor& best_boxes_in, const at::Tensor& best_ious_in,
    const at::Tensor& active_in, const c10::optional<at::Tensor>& clip_size_in, double step, double stop_delta,
    double stop_drop, bool first) {
  check_refine_step_args(boxes_in, grad_in, ious_in, previous_in, best_boxes_in, best_ious_in, active_in,
                         clip_size_in);
  c10::cuda::CUDAGuard device_guard(boxes_in.device());
  const at::Tensor boxes = boxes_in.contiguous(), ious = ious_in.contiguous(), previous = previous_in.contiguous();
  const at::Tensor best_boxes = best_boxes_in.contiguous(), best_ious = best_ious_in.contiguous();
  const at::Tensor active = active_in.contiguous();
  const at::Tensor grad = grad_in.has_value() ? grad_in->contiguous() : at::Tensor();
  const at::Tensor clip_size = clip_size_in.has_value() ? clip_size_in->contiguous() : at::Tensor();
  at::Tensor out_boxes = at::empty_like(boxes), out_best_boxes = at::empty_like(boxes);
  at::Tensor out_best_ious = at::empty_like(ious), out_active = at::empty_like(active);
  const int64_t K = boxes.size(0);
  if (K == 0) return {out_boxes, out_best_boxes, out_best_ious, out_active};
  const int64_t blocks = (K + kThreads - 1) / kThreads;
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(), "_refine_step: too many boxes, got ", K);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(boxes.scalar_type(), "_refine_step_cuda", [&] {
    refine_step_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        boxes.const_data_ptr<scalar_t>(), grad.defined() ? grad.const_data_ptr<scalar_t>() : nullptr,
        ious.const_data_ptr<scalar_t>(), previous.const_data_ptr<scalar_t>(), best_boxes.const_data_ptr<scalar_t>(),
        best_ious.const_data_ptr<scalar_t>(), active.const_data_ptr<bool>(),
        clip_size.defined() ? clip_size.const_data_ptr<scalar_t>() : nullptr, K, first, scalar_t(step),
        scalar_t(stop_delta), scalar_t(stop_drop), out_boxes.mutable_data_ptr<scalar_t>(),
        out_best_boxes.mutable_data_ptr<scalar_t>(), out_best_ious.mutable_data_ptr<scalar_t>(),
        out_active.mutable_data_ptr<bool>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out_boxes, out_best_boxes, out_best_ious, out_active};
}

}  // namespace

TORCH_LIBRARY_IMPL(prroi_d2, CUDA, m) { m.impl("_refine_step", &refine_step_cuda); }

}  // namespace prroi_d2
