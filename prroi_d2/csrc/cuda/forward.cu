// Forward of Precise RoI Pooling on CUDA: float32, float64, float16, bfloat16 (float32 accumulation for the halves).
//
// One thread per (box, group of kChannelsPerThread channels, bin); consecutive threads take consecutive bins of the
// same box and channels, so stores coalesce and neighbouring threads read neighbouring pixels (through L1). A
// thread computes its bin's separable pixel weights once and reuses them for its channels. Windows of up to 6 x 6
// pixels (bins up to about 4 pixels wide) are unrolled with the weights in registers; larger ones loop. Boxes of
// every pyramid level go in one launch (the level table). float16/bfloat16 maps of even width read windows up to 7
// pixels wide two pixels per load, looping over the window's rows only.
//
// Channels-last maps (every map (N, C, H, W) with channels-last strides) have a kernel of their own: a block takes
// (box, kLanes channels), lane l channel c0 + l and warp w bins w, w + 8, ..., so a warp's load of a pixel reads
// kLanes consecutive channels (one coalesced transaction, where the channels-first kernel's warp touches ~5 rows).
// The bins go through shared memory, tile[channel][bin], and the block writes its (channels, PH, PW) slab of the
// output, which is contiguous, in order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_fp16.h>

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

// The two pixels of a 32-bit word of a float16/bfloat16 map, the lower address first.
template <typename scalar_t>
__device__ __forceinline__ float2 unpack_pair(uint32_t word) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    return make_float2(__uint_as_float(word << 16), __uint_as_float(word & 0xffff0000u));
  } else {
    return __half22float2(*reinterpret_cast<const __half2*>(&word));
  }
}

// Pools float16/bfloat16 maps of even width at 4-byte aligned addresses, for windows whose rows span kWords
// 32-bit words of two pixels, starting at the even column j0 - (j0 & 1). Rows are looped (only the window's own
// rows are read) with the thread's channels unrolled inside, so a row's loads for all channels are in flight
// together. A word's pixel outside the window is masked to zero before use (not multiplied by a zero weight, so a
// non-finite neighbour never leaks in); no word reaches past the row, since the width is even.
template <int kWords, typename scalar_t, typename acc_t>
__device__ __forceinline__ void pool_pairs(
    const scalar_t* __restrict__ window, int64_t plane_stride, int W, const BinWindow<acc_t>& b, acc_t inv_area,
    int channels, scalar_t* __restrict__ out, int out_stride) {
  const int odd = b.j0 & 1;
  const uint32_t* rows = reinterpret_cast<const uint32_t*>(window - odd);
  const int row_words = W / 2;
  const int64_t plane_words = plane_stride / 2;
  acc_t wx[2 * kWords];
#pragma unroll
  for (int t = 0; t < 2 * kWords; ++t) {
    const int jj = t - odd;
    wx[t] = jj >= 0 && jj < b.nj ? cell_weight(b.x_lo, b.x_hi, b.j0 + jj) : acc_t(0);
  }
  // Only the first word can start before the window (odd j0) and only the last can end after it.
  const uint32_t first_mask = odd ? 0xffff0000u : 0xffffffffu;
  const uint32_t last_mask = (odd + b.nj) % 2 ? 0x0000ffffu : 0xffffffffu;
  acc_t sum[kChannelsPerThread];
#pragma unroll
  for (int q = 0; q < kChannelsPerThread; ++q) sum[q] = 0;
  // Channels in batches whose loads are all issued before any is used (kBatch x kWords loads in flight).
  constexpr int kBatch = kWords <= 2 ? kChannelsPerThread : kChannelsPerThread / 2;
  for (int ii = 0; ii < b.ni; ++ii) {
    const acc_t wy = cell_weight(b.y_lo, b.y_hi, b.i0 + ii);
    const uint32_t* row_start = rows + int64_t(ii) * row_words;
#pragma unroll
    for (int q0 = 0; q0 < kChannelsPerThread; q0 += kBatch) {
      uint32_t word[kBatch][kWords];
#pragma unroll
      for (int qb = 0; qb < kBatch; ++qb) {
        // A partial last group re-reads its last channel for the missing ones (never stored).
        const uint32_t* p = row_start + min(q0 + qb, channels - 1) * plane_words;
#pragma unroll
        for (int m = 0; m < kWords; ++m) word[qb][m] = p[m];
      }
#pragma unroll
      for (int qb = 0; qb < kBatch; ++qb) {
        acc_t row = 0;
#pragma unroll
        for (int m = 0; m < kWords; ++m) {
          uint32_t w = word[qb][m];
          if (m == 0) w &= first_mask;
          if (m == kWords - 1) w &= last_mask;
          const float2 v = unpack_pair<scalar_t>(w);
          row += wx[2 * m] * v.x + wx[2 * m + 1] * v.y;
        }
        sum[q0 + qb] += wy * row;
      }
    }
  }
#pragma unroll
  for (int q = 0; q < kChannelsPerThread; ++q) {
    if (q < channels) out[q * out_stride] = static_cast<scalar_t>(sum[q] * inv_area);
  }
}

// Calls pool_pairs with kWords = the words a window row spans (1 to 4, up to 7 pixels) and returns true; false
// for a wider window.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ bool pool_in_pairs(
    const scalar_t* __restrict__ window, int64_t plane_stride, int W, const BinWindow<acc_t>& b, acc_t inv_area,
    int channels, scalar_t* __restrict__ out, int out_stride) {
  switch (((b.j0 & 1) + b.nj + 1) / 2) {
    case 1: pool_pairs<1>(window, plane_stride, W, b, inv_area, channels, out, out_stride); return true;
    case 2: pool_pairs<2>(window, plane_stride, W, b, inv_area, channels, out, out_stride); return true;
    case 3: pool_pairs<3>(window, plane_stride, W, b, inv_area, channels, out, out_stride); return true;
    case 4: pool_pairs<4>(window, plane_stride, W, b, inv_area, channels, out, out_stride); return true;
    default: return false;
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

// kPairs: float16/bfloat16 maps, every width even and every base address 4-byte aligned (pool_pairs). Boxes come
// in acc_t (float32 also for float16/bfloat16 maps).
template <typename scalar_t, typename index_t, bool kLevels, bool kPairs>
__global__ void __launch_bounds__(kThreads, kForwardMinBlocks<scalar_t>) forward_kernel(
    LevelTable<scalar_t> table, const int64_t* __restrict__ levels, const at::opmath_type<scalar_t>* __restrict__ rois,
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
    bool done;
    if constexpr (kPairs) {
      done = pool_in_pairs(window, plane_stride, W, b, inv_area, channels, out, bins);
    } else {
      done = with_unrolled_window(b.ni, b.nj, [&](auto p) {
        pool_unrolled<decltype(p)::value>(window, plane_stride, W, b, inv_area, channels, out, bins);
      });
    }
    if (!done) pool_looped(window, plane_stride, W, b, inv_area, channels, out, bins);
  }
}

// One channel of a bin of a channels-last map: sum over the window of wy_i * inv_area * wx_j * F[i, j], `p` at
// pixel (i0, j0) of the lane's channel, pixels `pixel_stride` apart and rows `row_stride` (the sums of
// pool_unrolled, in its order).
template <int P, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t pool_channel_unrolled(
    const scalar_t* __restrict__ p, int64_t row_stride, int pixel_stride, const BinWindow<acc_t>& b,
    acc_t inv_area) {
  acc_t wx[P];
#pragma unroll
  for (int t = 0; t < P; ++t) wx[t] = t < b.nj ? cell_weight(b.x_lo, b.x_hi, b.j0 + t) : acc_t(0);
  acc_t sum = 0;
#pragma unroll
  for (int ii = 0; ii < P; ++ii) {
    acc_t row = 0;
#pragma unroll
    for (int jj = 0; jj < P; ++jj) {
      if (ii < b.ni && jj < b.nj) {
        row += wx[jj] * static_cast<acc_t>(p[ii * row_stride + int64_t(jj) * pixel_stride]);
      }
    }
    if (ii < b.ni) sum += cell_weight(b.y_lo, b.y_hi, b.i0 + ii) * inv_area * row;
  }
  return sum;
}

template <typename scalar_t, typename acc_t>
__device__ acc_t pool_channel_looped(
    const scalar_t* __restrict__ p, int64_t row_stride, int pixel_stride, const BinWindow<acc_t>& b,
    acc_t inv_area) {
  acc_t sum = 0;
  for (int ii = 0; ii < b.ni; ++ii) {
    acc_t row = 0;
    for (int jj = 0; jj < b.nj; ++jj) {
      const acc_t v = static_cast<acc_t>(p[ii * row_stride + int64_t(jj) * pixel_stride]);
      row += cell_weight(b.x_lo, b.x_hi, b.j0 + jj) * v;
    }
    sum += cell_weight(b.y_lo, b.y_hi, b.i0 + ii) * inv_area * row;
  }
  return sum;
}

// Channels-last maps; tasks are (box, chunk of kLanes channels), a grid-stride loop of blocks. The shared tile is
// kLanes rows of `tile_stride` elements (bins, made odd so that the lanes' stores fall in distinct banks).
template <typename scalar_t, bool kLevels>
__global__ void __launch_bounds__(kThreads) forward_channels_last_kernel(
    LevelTable<scalar_t> table, const int64_t* __restrict__ levels, const at::opmath_type<scalar_t>* __restrict__ rois,
    int64_t K, int N, int C, int ph_n, int pw_n, int tile_stride, bool aligned, scalar_t* __restrict__ output) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(sizeof(double)) unsigned char tile_bytes[];
  scalar_t* tile = reinterpret_cast<scalar_t*>(tile_bytes);
  const int bins = ph_n * pw_n;
  const int chunks = (C + kLanes - 1) / kLanes;
  const int lane = threadIdx.x % kLanes, warp = threadIdx.x / kLanes;
  for (int64_t task = blockIdx.x; task < K * chunks; task += gridDim.x) {
    const int64_t k = task / chunks;
    const int c0 = static_cast<int>(task % chunks) * kLanes;
    const int channels = min(kLanes, C - c0);
    const int slab = channels * bins;
    scalar_t* out = output + (k * C + c0) * bins;
    const Box<acc_t, scalar_t> box = load_box<kLevels, acc_t>(table, levels, rois, k, aligned, ph_n, pw_n, N, C);
    const RoiGeometry<acc_t>& g = box.g;
    __syncthreads();  // the previous task's tile has been written out (every thread of the block takes each task)
    if (!g.valid || !(g.area > acc_t(0))) {
      const scalar_t v = static_cast<scalar_t>(g.valid ? acc_t(0) : quiet_nan<acc_t>());
      for (int t = threadIdx.x; t < slab; t += blockDim.x) out[t] = v;
      continue;
    }
    const int H = box.height, W = box.width;
    const int64_t row_stride = int64_t(W) * C;
    const acc_t inv_area = acc_t(1) / g.area;
    if (lane < channels) {
      for (int bin = warp; bin < bins; bin += kThreads / kLanes) {
        const BinWindow<acc_t> b = bin_window(g, bin / pw_n, bin % pw_n, H, W);
        acc_t v = 0;  // a bin outside the map pools to zero
        if (b.ni > 0 && b.nj > 0) {
          const scalar_t* p = box.image + (int64_t(b.i0) * W + b.j0) * C + c0 + lane;
          const bool done = with_unrolled_window(b.ni, b.nj, [&](auto n) {
            v = pool_channel_unrolled<decltype(n)::value>(p, row_stride, C, b, inv_area);
          });
          if (!done) v = pool_channel_looped(p, row_stride, C, b, inv_area);
        }
        tile[lane * tile_stride + bin] = static_cast<scalar_t>(v);
      }
    }
    __syncthreads();
    for (int t = threadIdx.x; t < slab; t += blockDim.x) out[t] = tile[(t / bins) * tile_stride + t % bins];
  }
}

// Whether every map of the table can be read two pixels per 32-bit word: even widths, 4-byte aligned bases.
template <typename scalar_t>
bool reads_pairs(const LevelTable<scalar_t>& table) {
  for (int l = 0; l < table.count; ++l) {
    if (table.width[l] % 2 != 0 || reinterpret_cast<uintptr_t>(table.data[l]) % 4 != 0) return false;
  }
  return true;
}

// Launches forward_channels_last_kernel (the caller checked forward_reads_channels_last).
void launch_forward_channels_last(
    at::TensorList features, const at::Tensor& rois, const at::Tensor& levels, at::ArrayRef<double> scales,
    bool aligned, at::Tensor& output) {
  const int64_t K = rois.size(0);
  const int N = features[0].size(0), C = features[0].size(1);
  const int ph_n = output.size(2), pw_n = output.size(3);
  if (K == 0 || C == 0 || ph_n * pw_n == 0) return;
  const int64_t* level_data = levels.defined() ? levels.const_data_ptr<int64_t>() : nullptr;
  const int bins = ph_n * pw_n;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, output.scalar_type(), "prroi_pool2d_forward_cuda", [&] {
    const LevelTable<scalar_t> table = make_level_table<scalar_t>(features, scales);
    const int64_t blocks = grid_blocks(K * ((C + kLanes - 1) / kLanes));
    auto kernel = level_data != nullptr ? forward_channels_last_kernel<scalar_t, true>
                                        : forward_channels_last_kernel<scalar_t, false>;
    kernel<<<blocks, kThreads, forward_tile_bytes(bins, sizeof(scalar_t)), stream>>>(
        table, level_data, rois.const_data_ptr<at::opmath_type<scalar_t>>(), K, N, C, ph_n, pw_n, bins | 1, aligned,
        output.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

bool forward_reads_channels_last(int64_t pooled_height, int64_t pooled_width, at::ScalarType dtype) {
  return forward_tile_bytes(pooled_height * pooled_width, c10::elementSize(dtype)) <= kMaxForwardTileBytes;
}

void launch_forward(
    at::TensorList features, const at::Tensor& rois, const at::Tensor& levels, at::ArrayRef<double> scales,
    bool aligned, bool channels_last, at::Tensor& output) {
  if (channels_last) {
    launch_forward_channels_last(features, rois, levels, scales, aligned, output);
    return;
  }
  const int N = features[0].size(0), C = features[0].size(1);
  const int ph_n = output.size(2), pw_n = output.size(3);
  const int64_t total = rois.size(0) * channel_groups(C) * int64_t(ph_n) * pw_n;
  if (total == 0) return;
  const int64_t* level_data = levels.defined() ? levels.const_data_ptr<int64_t>() : nullptr;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, output.scalar_type(), "prroi_pool2d_forward_cuda", [&] {
    const LevelTable<scalar_t> table = make_level_table<scalar_t>(features, scales);
    const int64_t blocks = grid_blocks((total + kThreads - 1) / kThreads);
    const bool pairs = sizeof(scalar_t) == 2 && reads_pairs(table);
    auto launch = [&](auto index_zero) {
      using index_t = decltype(index_zero);
      auto kernel = level_data != nullptr ? forward_kernel<scalar_t, index_t, true, false>
                                          : forward_kernel<scalar_t, index_t, false, false>;
      if constexpr (sizeof(scalar_t) == 2) {
        if (pairs) {
          kernel = level_data != nullptr ? forward_kernel<scalar_t, index_t, true, true>
                                         : forward_kernel<scalar_t, index_t, false, true>;
        }
      }
      kernel<<<blocks, kThreads, 0, stream>>>(table, level_data, rois.const_data_ptr<at::opmath_type<scalar_t>>(),
                                              index_t(total), N, C, ph_n, pw_n, aligned,
                                              output.mutable_data_ptr<scalar_t>());
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
