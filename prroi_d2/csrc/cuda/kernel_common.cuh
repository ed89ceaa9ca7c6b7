// Device helpers shared by the CUDA kernels of Precise RoI Pooling.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../prroi_pool_geometry.h"

namespace prroi_d2 {
namespace cuda {

constexpr int kThreads = 256;
// Channels a forward or coordinate-gradient thread handles with one set of bin weights.
constexpr int kChannelsPerThread = 8;

__host__ __device__ constexpr int channel_groups(int channels) {
  return (channels + kChannelsPerThread - 1) / kChannelsPerThread;
}

// Element strides of grad_output (K, C, PH, PW); an expanded gradient (stride 0) is read in place.
struct GradStrides {
  int64_t k, c, h, w;
};

template <typename T>
__device__ __forceinline__ T quiet_nan() {
  return std::numeric_limits<T>::quiet_NaN();
}

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ RoiGeometry<acc_t> load_roi(
    const scalar_t* __restrict__ rois, int64_t k, acc_t scale, bool aligned, int ph_n, int pw_n, int batch_size) {
  acc_t roi[5];
#pragma unroll
  for (int t = 0; t < 5; ++t) roi[t] = static_cast<acc_t>(rois[k * 5 + t]);
  return decode_roi<acc_t>(roi, scale, aligned, ph_n, pw_n, batch_size);
}

// Calls body(std::integral_constant<int, P>()) with the smallest P of 3, 4, 6 such that the bin's ni x nj pixels
// fit a P x P window held in registers, and returns true; returns false for a larger window (the caller loops).
// Both ni and nj must be >= 1.
template <typename Body>
__device__ __forceinline__ bool with_unrolled_window(int ni, int nj, Body&& body) {
  const int n = ni > nj ? ni : nj;
  if (n <= 3) {
    body(std::integral_constant<int, 3>());
  } else if (n <= 4) {
    body(std::integral_constant<int, 4>());
  } else if (n <= 6) {
    body(std::integral_constant<int, 6>());
  } else {
    return false;
  }
  return true;
}

// Blocks for a grid-stride loop over `blocks_needed` blocks: enough to fill the GPU, capped.
inline int64_t grid_blocks(int64_t blocks_needed) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>(blocks_needed, sms * 32));
}

}  // namespace cuda
}  // namespace prroi_d2
