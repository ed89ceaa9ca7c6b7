// Forward of Precise RoI Pooling on CUDA: float32, float64, float16, bfloat16 (float32 accumulation for the halves).
//
// One thread per (box, group of kChannelsPerThread channels, bin); consecutive threads take consecutive bins of the
// same box and channels, so stores coalesce and neighbouring threads read neighbouring pixels (through L1). A
// thread computes its bin's separable pixel weights once and reuses them for its channels. Windows of up to 6 x 6
// pixels (bins up to about 4 pixels wide) are unrolled with the weights in registers; larger ones loop. Boxes of
// every pyramid level go in one launch (the level table).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>

#include "kernel_common.cuh"
#include "launchers.h"

namespace prroi_d2 {
namespace cuda {
namespace {

// Writes out[q * out_stride] = the bin's pooled value of plane q, for q < channels. `window` points at pixel
// (i0, j0) of plane 0; planes are plane_stride apart, rows W apart.
template <int P, typename scalar_t, typename acc_t>
__device__ __forceinline__ void pool_unrolled(
    const scalar_t* __restrict__ window, int64_t plane_stride, int W, const BinWindow<acc_t>& b, acc_t inv_area,
    int channels, scalar_t* __restrict__ out, int out_stride) {
  acc_t wx[P], wy[P];
#pragma unroll
  for (int t = 0; t < P; ++t) {
    wx[t] = t < b.nj ? cell_weight(b.x_lo, b.x_hi, b.j0 + t) : acc_t(0);
    wy[t] = t < b.ni ? cell_weight(b.y_lo, b.y_hi, b.i0 + t) * inv_area : acc_t(0);
  }
#pragma unroll 2
  for (int q = 0; q < kChannelsPerThread; ++q) {
    if (q < channels) {
      const scalar_t* p = window + q * plane_stride;
      acc_t sum = 0;
#pragma unroll
      for (int ii = 0; ii < P; ++ii) {
        acc_t row = 0;
#pragma unroll
        for (int jj = 0; jj < P; ++jj) {
          if (ii < b.ni && jj < b.nj) row += wx[jj] * static_cast<acc_t>(p[int64_t(ii) * W + jj]);
        }
        sum += wy[ii] * row;
      }
      out[q * out_stride] = static_cast<scalar_t>(sum);
    }
  }
}

template <typename scalar_t, typename acc_t>
__device__ void pool_looped(
    const scalar_t* __restrict__ window, int64_t plane_stride, int W, const BinWindow<acc_t>& b, acc_t inv_area,
    int channels, scalar_t* __restrict__ out, int out_stride) {
  for (int q = 0; q < channels; ++q) {
    const scalar_t* p = window + q * plane_stride;
    acc_t sum = 0;
    for (int ii = 0; ii < b.ni; ++ii) {
      acc_t row = 0;
      for (int jj = 0; jj < b.nj; ++jj) {
        row += cell_weight(b.x_lo, b.x_hi, b.j0 + jj) * static_cast<acc_t>(p[int64_t(ii) * W + jj]);
      }
      sum += cell_weight(b.y_lo, b.y_hi, b.i0 + ii) * inv_area * row;
    }
    out[q * out_stride] = static_cast<scalar_t>(sum);
  }
}

// float16/bfloat16 are held to four blocks per multiprocessor (64 registers a thread, as float32 takes by itself):
// left alone they take ~100 registers and run at half the occupancy.
template <typename scalar_t>
constexpr int kForwardMinBlocks = sizeof(scalar_t) == 2 ? 4 : 1;

template <typename scalar_t, typename index_t, bool kLevels>
__global__ void __launch_bounds__(kThreads, kForwardMinBlocks<scalar_t>) forward_kernel(
    LevelTable<scalar_t> table, const int64_t* __restrict__ levels, const scalar_t* __restrict__ rois,
    index_t total, int N, int C, int ph_n, int pw_n, bool aligned, scalar_t* __restrict__ output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int bins = ph_n * pw_n;
  const int groups = channel_groups(C);
  for (index_t idx = blockIdx.x * index_t(blockDim.x) + threadIdx.x; idx < total;
       idx += index_t(blockDim.x) * gridDim.x) {
    const int bin = idx % bins;
    const index_t box_group = idx / bins;
    const int group = box_group % groups;
    const index_t k = box_group / groups;
    const int c0 = group * kChannelsPerThread;
    const int channels = min(kChannelsPerThread, C - c0);
    scalar_t* out = output + (int64_t(k) * C + c0) * bins + bin;
    const Box<acc_t, scalar_t> box = load_box<kLevels, acc_t>(table, levels, rois, k, aligned, ph_n, pw_n, N, C);
    const RoiGeometry<acc_t>& g = box.g;
    if (!g.valid || !(g.area > acc_t(0))) {
      const scalar_t v = static_cast<scalar_t>(g.valid ? acc_t(0) : quiet_nan<acc_t>());
      for (int q = 0; q < channels; ++q) out[q * bins] = v;
      continue;
    }
    const int H = box.height, W = box.width;
    const BinWindow<acc_t> b = bin_window(g, bin / pw_n, bin % pw_n, H, W);
    if (b.ni <= 0 || b.nj <= 0) {  // the bin lies outside the map
      for (int q = 0; q < channels; ++q) out[q * bins] = scalar_t(0);
      continue;
    }
    const int64_t plane_stride = int64_t(H) * W;
    const scalar_t* window = box.image + c0 * plane_stride + int64_t(b.i0) * W + b.j0;
    const acc_t inv_area = acc_t(1) / g.area;
    const bool done = with_unrolled_window(b.ni, b.nj, [&](auto p) {
      pool_unrolled<decltype(p)::value>(window, plane_stride, W, b, inv_area, channels, out, bins);
    });
    if (!done) pool_looped(window, plane_stride, W, b, inv_area, channels, out, bins);
  }
}

}  // namespace

void launch_forward(
    at::TensorList features, const at::Tensor& rois, const at::Tensor& levels, at::ArrayRef<double> scales,
    bool aligned, at::Tensor& output) {
  const int N = features[0].size(0), C = features[0].size(1);
  const int ph_n = output.size(2), pw_n = output.size(3);
  const int64_t total = rois.size(0) * channel_groups(C) * int64_t(ph_n) * pw_n;
  if (total == 0) return;
  const int64_t* level_data = levels.defined() ? levels.const_data_ptr<int64_t>() : nullptr;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, output.scalar_type(), "prroi_pool2d_forward_cuda", [&] {
    const LevelTable<scalar_t> table = make_level_table<scalar_t>(features, scales);
    const int64_t blocks = grid_blocks((total + kThreads - 1) / kThreads);
    auto launch = [&](auto index_zero) {
      using index_t = decltype(index_zero);
      auto kernel = level_data != nullptr ? forward_kernel<scalar_t, index_t, true>
                                          : forward_kernel<scalar_t, index_t, false>;
      kernel<<<blocks, kThreads, 0, stream>>>(table, level_data, rois.const_data_ptr<scalar_t>(), index_t(total), N,
                                              C, ph_n, pw_n, aligned, output.mutable_data_ptr<scalar_t>());
    };
    if (total + blocks * kThreads <= std::numeric_limits<int32_t>::max()) {  // the grid-stride index fits too
      launch(int32_t(0));
    } else {
      launch(int64_t(0));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace prroi_d2
