// CUDA kernel of prroi_d2::_nms_clusters (see ../nms_clusters.h): one thread block per group, all groups at once.
//
// Block p works only if position p starts a group. Its threads find where the group ends, then walk down the
// group's ranking together: at each box not yet removed, thread 0 keeps it and all threads test the later boxes of
// the group against it in parallel. No host synchronisation; the greedy walk is sequential only within a group.
#include <ATen/ATen.h>
#include <limits>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../nms_clusters.h"

namespace prroi_d2 {
namespace {

constexpr int kThreads = 128;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) nms_clusters_kernel(
    const scalar_t* __restrict__ boxes, const int64_t* __restrict__ groups, int64_t n,
    at::opmath_type<scalar_t> threshold, bool* __restrict__ keep, int64_t* __restrict__ head,
    unsigned char* removed) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t start = blockIdx.x;
  const int64_t group = groups[start];
  if (start > 0 && groups[start - 1] == group) return;  // not the first box of its group

  __shared__ unsigned long long end_shared;
  if (threadIdx.x == 0) end_shared = static_cast<unsigned long long>(n);
  __syncthreads();
  for (int64_t p = start + 1 + threadIdx.x; p < n; p += kThreads) {
    if (groups[p] != group) {
      atomicMin(&end_shared, static_cast<unsigned long long>(p));
      break;
    }
  }
  __syncthreads();
  const int64_t end = static_cast<int64_t>(end_shared);

  for (int64_t i = start; i < end; ++i) {
    // removed[i] was last written before the previous __syncthreads: every thread reads the same value.
    if (removed[i]) continue;
    if (threadIdx.x == 0) {
      keep[i] = true;
      head[i] = i;
    }
    const scalar_t* kept = boxes + 4 * i;
    for (int64_t j = i + 1 + threadIdx.x; j < end; j += kThreads) {
      if (!removed[j] && overlaps_above<acc_t>(kept, boxes + 4 * j, threshold)) {
        removed[j] = 1;
        head[j] = i;
      }
    }
    __syncthreads();
  }
}

std::tuple<at::Tensor, at::Tensor> nms_clusters_cuda(const at::Tensor& boxes_in, const at::Tensor& groups_in,
                                                     double iou_threshold) {
  check_nms_clusters_args(boxes_in, groups_in, iou_threshold);
  c10::cuda::CUDAGuard device_guard(boxes_in.device());
  const at::Tensor boxes = boxes_in.contiguous();
  const at::Tensor groups = groups_in.contiguous();
  const int64_t n = boxes.size(0);
  at::Tensor keep = at::zeros({n}, groups.options().dtype(at::kBool));
  at::Tensor head = at::empty({n}, groups.options());
  if (n == 0) return {keep, head};
  TORCH_CHECK_VALUE(n <= std::numeric_limits<int32_t>::max(), "_nms_clusters: at most 2^31 - 1 boxes, got ", n);
  at::Tensor removed = at::zeros({n}, groups.options().dtype(at::kByte));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "_nms_clusters_cuda", [&] {
    nms_clusters_kernel<scalar_t><<<static_cast<unsigned int>(n), kThreads, 0, stream>>>(
        boxes.const_data_ptr<scalar_t>(), groups.const_data_ptr<int64_t>(), n,
        at::opmath_type<scalar_t>(iou_threshold), keep.mutable_data_ptr<bool>(), head.mutable_data_ptr<int64_t>(),
        removed.mutable_data_ptr<unsigned char>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {keep, head};
}

}  // namespace

TORCH_LIBRARY_IMPL(prroi_d2, CUDA, m) { m.impl("_nms_clusters", &nms_clusters_cuda); }

}  // namespace prroi_d2
