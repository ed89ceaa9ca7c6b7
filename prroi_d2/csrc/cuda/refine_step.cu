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
__global__ void refine_step_kernel(StepData<scalar_t> d, int64_t K) {
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k < K) refine_step_box(d, k);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> refine_step_cuda(
    const at::Tensor& boxes, const c10::optional<at::Tensor>& grad, const at::Tensor& ious, const at::Tensor& previous,
    const at::Tensor& best_boxes, const at::Tensor& best_ious, const at::Tensor& active,
    const c10::optional<at::Tensor>& clip_size, double step, double stop_delta, double stop_drop, bool first) {
  c10::cuda::CUDAGuard device_guard(boxes.device());
  StepTensors t = prepare_refine_step(boxes, grad, ious, previous, best_boxes, best_ious, active, clip_size);
  const int64_t K = t.boxes.size(0);
  if (K == 0) return t.outputs;
  const int64_t blocks = (K + kThreads - 1) / kThreads;
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(), "_refine_step: too many boxes, got ", K);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(t.boxes.scalar_type(), "_refine_step_cuda", [&] {
    refine_step_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        t.data<scalar_t>(step, stop_delta, stop_drop, first), K);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return t.outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(prroi_d2, CUDA, m) { m.impl("_refine_step", &refine_step_cuda); }

}  // namespace prroi_d2
