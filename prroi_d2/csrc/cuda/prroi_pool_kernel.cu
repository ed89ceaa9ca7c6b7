// CUDA kernels of Precise RoI Pooling: float32, float64, float16, bfloat16 (float32 accumulation for the halves).
//
//   forward          one thread per output element (k, c, ph, pw), grid-stride.
//   features grad    the same mapping, scattering with atomics; or, under torch.use_deterministic_algorithms, a
//                    gather: one thread per feature pixel of a tile, boxes culled per tile in index order.
//   coordinate grad  one block per box; each thread sums its elements' edge derivatives, then a fixed-order block
//                    reduction writes the four coordinates: no atomics, no workspace, deterministic.
//
// A box with a non-finite coordinate or a batch index outside [0, N) reads nothing and pools to NaN (checking the
// batch index on the host would need a synchronisation).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/native/cuda/KernelUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../prroi_pool.h"
#include "../prroi_pool_geometry.h"

namespace prroi_d2 {
namespace {

constexpr int kThreads = 256;

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

// ---------------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------------
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads) forward_kernel(
    const scalar_t* __restrict__ features, const scalar_t* __restrict__ rois, index_t total, int C, int H, int W,
    int N, int ph_n, int pw_n, at::opmath_type<scalar_t> scale, bool aligned, scalar_t* __restrict__ output) {
  using acc_t = at::opmath_type<scalar_t>;
  for (index_t idx = blockIdx.x * index_t(blockDim.x) + threadIdx.x; idx < total;
       idx += index_t(blockDim.x) * gridDim.x) {
    const int pw = idx % pw_n;
    const int ph = (idx / pw_n) % ph_n;
    const index_t kc = idx / (pw_n * ph_n);
    const int c = kc % C;
    const index_t k = kc / C;
    const RoiGeometry<acc_t> g = load_roi<acc_t>(rois, k, scale, aligned, ph_n, pw_n, N);
    if (!g.valid) {
      output[idx] = static_cast<scalar_t>(quiet_nan<acc_t>());
      continue;
    }
    if (!(g.area > acc_t(0))) {
      output[idx] = scalar_t(0);
      continue;
    }
    const acc_t x_lo = g.x0 + pw * g.bin_w, x_hi = g.x0 + (pw + 1) * g.bin_w;
    const acc_t y_lo = g.y0 + ph * g.bin_h, y_hi = g.y0 + (ph + 1) * g.bin_h;
    int j0, j1, i0, i1;
    pixel_range(x_lo, x_hi, W, &j0, &j1);
    pixel_range(y_lo, y_hi, H, &i0, &i1);
    const scalar_t* plane = features + (int64_t(g.batch) * C + c) * int64_t(H) * W;
    acc_t sum = 0;
    for (int i = i0; i <= i1; ++i) {
      const scalar_t* row = plane + int64_t(i) * W;
      acc_t row_sum = 0;
      for (int j = j0; j <= j1; ++j) row_sum += cell_weight(x_lo, x_hi, j) * static_cast<acc_t>(row[j]);
      sum += cell_weight(y_lo, y_hi, i) * row_sum;
    }
    output[idx] = static_cast<scalar_t>(sum / g.area);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Feature gradient, atomics
// ---------------------------------------------------------------------------------------------------------------
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads) features_backward_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ rois, index_t total, int C, int H, int W, int N,
    int ph_n, int pw_n, at::opmath_type<scalar_t> scale, bool aligned, scalar_t* __restrict__ grad_features,
    int64_t grad_numel) {
  using acc_t = at::opmath_type<scalar_t>;
  for (index_t idx = blockIdx.x * index_t(blockDim.x) + threadIdx.x; idx < total;
       idx += index_t(blockDim.x) * gridDim.x) {
    const int pw = idx % pw_n;
    const int ph = (idx / pw_n) % ph_n;
    const index_t kc = idx / (pw_n * ph_n);
    const int c = kc % C;
    const index_t k = kc / C;
    const RoiGeometry<acc_t> g = load_roi<acc_t>(rois, k, scale, aligned, ph_n, pw_n, N);
    const acc_t go = static_cast<acc_t>(grad[idx]);
    if (!g.valid || !(g.area > acc_t(0)) || go == acc_t(0)) continue;
    const acc_t x_lo = g.x0 + pw * g.bin_w, x_hi = g.x0 + (pw + 1) * g.bin_w;
    const acc_t y_lo = g.y0 + ph * g.bin_h, y_hi = g.y0 + (ph + 1) * g.bin_h;
    int j0, j1, i0, i1;
    pixel_range(x_lo, x_hi, W, &j0, &j1);
    pixel_range(y_lo, y_hi, H, &i0, &i1);
    const int64_t plane = (int64_t(g.batch) * C + c) * int64_t(H) * W;
    const acc_t scaled = go / g.area;
    for (int i = i0; i <= i1; ++i) {
      const acc_t wy = scaled * cell_weight(y_lo, y_hi, i);
      for (int j = j0; j <= j1; ++j) {
        at::native::fastAtomicAdd(grad_features, plane + int64_t(i) * W + j, grad_numel,
                                  static_cast<scalar_t>(wy * cell_weight(x_lo, x_hi, j)), true);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Feature gradient, deterministic gather
// ---------------------------------------------------------------------------------------------------------------
constexpr int kTile = 16;       // kTile x kTile pixels per block, one thread each
constexpr int kChannels = 8;    // channels per block, accumulated in registers

// Bins of one axis whose support reaches pixel p: [first, last], empty when first > last.
template <typename acc_t>
__device__ __forceinline__ void bins_touching(acc_t start, acc_t bin, int bins, int p, int* first, int* last) {
  // bin b spans [start + b * bin, start + (b + 1) * bin]; pixel p's weight support is (p - 1, p + 1). One bin of
  // margin on each side covers rounding; bins without weight are skipped by the caller.
  acc_t f = floor((acc_t(p - 1) - start) / bin) - acc_t(1);
  acc_t l = floor((acc_t(p + 1) - start) / bin) + acc_t(1);
  f = f < acc_t(0) ? acc_t(0) : (f > acc_t(bins) ? acc_t(bins) : f);
  l = l > acc_t(bins - 1) ? acc_t(bins - 1) : (l < acc_t(-1) ? acc_t(-1) : l);
  *first = static_cast<int>(f);
  *last = static_cast<int>(l);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kTile * kTile) features_backward_gather_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ rois, int K, int C, int H, int W, int N,
    int ph_n, int pw_n, at::opmath_type<scalar_t> scale, bool aligned, scalar_t* __restrict__ grad_features) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ int selected[kTile * kTile];
  __shared__ int warp_counts[kTile * kTile / 32];
  const int tiles_x = (W + kTile - 1) / kTile;
  const int tile_x0 = (blockIdx.x % tiles_x) * kTile;
  const int tile_y0 = (blockIdx.x / tiles_x) * kTile;
  const int n = blockIdx.y;
  const int c0 = blockIdx.z * kChannels;
  const int t = threadIdx.x;
  const int px = tile_x0 + t % kTile, py = tile_y0 + t / kTile;
  const int lane = t % 32, warp = t / 32;

  acc_t acc[kChannels];
#pragma unroll
  for (int q = 0; q < kChannels; ++q) acc[q] = 0;

  for (int chunk = 0; chunk < K; chunk += kTile * kTile) {
    // Cull: keep the boxes of image n whose pixel window meets this tile, in index order.
    const int k = chunk + t;
    bool keep = false;
    if (k < K) {
      const RoiGeometry<acc_t> g = load_roi<acc_t>(rois, k, scale, aligned, ph_n, pw_n, N);
      if (g.valid && g.batch == n && g.area > acc_t(0)) {
        int j0, j1, i0, i1;
        pixel_range(g.x0, g.x0 + pw_n * g.bin_w, W, &j0, &j1);
        pixel_range(g.y0, g.y0 + ph_n * g.bin_h, H, &i0, &i1);
        keep = j0 <= j1 && i0 <= i1 && j0 < tile_x0 + kTile && j1 >= tile_x0 && i0 < tile_y0 + kTile &&
            i1 >= tile_y0;
      }
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, keep);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int offset = 0, count = 0;
    for (int w = 0; w < kTile * kTile / 32; ++w) {
      offset += w < warp ? warp_counts[w] : 0;
      count += warp_counts[w];
    }
    if (keep) selected[offset + __popc(ballot & ((1u << lane) - 1u))] = k;
    __syncthreads();

    if (px < W && py < H) {
      for (int s = 0; s < count; ++s) {
        const int kk = selected[s];
        const RoiGeometry<acc_t> g = load_roi<acc_t>(rois, kk, scale, aligned, ph_n, pw_n, N);
        int b_x0, b_x1, b_y0, b_y1;
        bins_touching(g.x0, g.bin_w, pw_n, px, &b_x0, &b_x1);
        bins_touching(g.y0, g.bin_h, ph_n, py, &b_y0, &b_y1);
        const acc_t inv_area = acc_t(1) / g.area;
        for (int ph = b_y0; ph <= b_y1; ++ph) {
          const acc_t wy = inv_area * cell_weight(g.y0 + ph * g.bin_h, g.y0 + (ph + 1) * g.bin_h, py);
          if (wy == acc_t(0)) continue;
          for (int pw = b_x0; pw <= b_x1; ++pw) {
            const acc_t w = wy * cell_weight(g.x0 + pw * g.bin_w, g.x0 + (pw + 1) * g.bin_w, px);
            if (w == acc_t(0)) continue;
            const scalar_t* gk = grad + ((int64_t(kk) * C + c0) * ph_n + ph) * pw_n + pw;
#pragma unroll
            for (int q = 0; q < kChannels; ++q) {
              if (c0 + q < C) acc[q] += w * static_cast<acc_t>(gk[int64_t(q) * ph_n * pw_n]);
            }
          }
        }
      }
    }
    __syncthreads();
  }
  if (px < W && py < H) {
#pragma unroll
    for (int q = 0; q < kChannels; ++q) {
      if (c0 + q < C) {
        grad_features[((int64_t(n) * C + c0 + q) * H + py) * W + px] = static_cast<scalar_t>(acc[q]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Coordinate gradient
// ---------------------------------------------------------------------------------------------------------------
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* shared) {
  // Fixed-order reduction: the same inputs give the same bits.
  for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  acc_t total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < int(blockDim.x / 32); ++w) total += shared[w];
  }
  return total;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) rois_backward_kernel(
    const scalar_t* __restrict__ grad, const scalar_t* __restrict__ features, const scalar_t* __restrict__ rois,
    int64_t K, int C, int H, int W, int N, int ph_n, int pw_n, at::opmath_type<scalar_t> scale, bool aligned,
    scalar_t* __restrict__ grad_rois) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t shared[kThreads / 32];
  const int per_roi = C * ph_n * pw_n;
  for (int64_t k = blockIdx.x; k < K; k += gridDim.x) {
    const RoiGeometry<acc_t> g = load_roi<acc_t>(rois, k, scale, aligned, ph_n, pw_n, N);
    if (!g.valid || !(g.area > acc_t(0))) {
      if (threadIdx.x < 5) {
        grad_rois[k * 5 + threadIdx.x] =
            static_cast<scalar_t>(threadIdx.x == 0 || g.valid ? acc_t(0) : quiet_nan<acc_t>());
      }
      continue;
    }
    acc_t d[4] = {0, 0, 0, 0};  // x0, y0, x1, y1
    for (int e = threadIdx.x; e < per_roi; e += blockDim.x) {
      const int pw = e % pw_n;
      const int ph = (e / pw_n) % ph_n;
      const int c = e / (pw_n * ph_n);
      const acc_t go = static_cast<acc_t>(grad[k * per_roi + e]);
      if (go == acc_t(0)) continue;
      const acc_t x_lo = g.x0 + pw * g.bin_w, x_hi = g.x0 + (pw + 1) * g.bin_w;
      const acc_t y_lo = g.y0 + ph * g.bin_h, y_hi = g.y0 + (ph + 1) * g.bin_h;
      int j0, j1, i0, i1;
      pixel_range(x_lo, x_hi, W, &j0, &j1);
      pixel_range(y_lo, y_hi, H, &i0, &i1);
      const scalar_t* plane = features + (int64_t(g.batch) * C + c) * int64_t(H) * W;
      // s: the bin integral; s_*: its derivatives with respect to the bin edges.
      acc_t s = 0, s_xlo = 0, s_xhi = 0, s_ylo = 0, s_yhi = 0;
      for (int i = i0; i <= i1; ++i) {
        const scalar_t* row = plane + int64_t(i) * W;
        acc_t r_area = 0, r_lo = 0, r_hi = 0;
        for (int j = j0; j <= j1; ++j) {
          const acc_t v = static_cast<acc_t>(row[j]);
          r_area += cell_weight(x_lo, x_hi, j) * v;
          r_lo += hat(x_lo, j) * v;
          r_hi += hat(x_hi, j) * v;
        }
        const acc_t wy = cell_weight(y_lo, y_hi, i);
        s += wy * r_area;
        s_xlo -= wy * r_lo;
        s_xhi += wy * r_hi;
        s_ylo -= hat(y_lo, i) * r_area;
        s_yhi += hat(y_hi, i) * r_area;
      }
      add_box_gradient(g, ph, pw, ph_n, pw_n, go, s, s_xlo, s_xhi, s_ylo, s_yhi, d);
    }
#pragma unroll
    for (int t = 0; t < 4; ++t) d[t] = block_sum(d[t], shared);
    if (threadIdx.x == 0) {
      grad_rois[k * 5] = scalar_t(0);
#pragma unroll
      for (int t = 0; t < 4; ++t) grad_rois[k * 5 + t + 1] = static_cast<scalar_t>(d[t] * scale);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------------------------
int64_t grid_for(int64_t work, int64_t threads) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, sms * 32));
}

#define PRROI_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

at::Tensor forward_cuda(
    const at::Tensor& features, const at::Tensor& rois, int64_t pooled_height, int64_t pooled_width,
    double spatial_scale, bool aligned) {
  detail::check_forward_args(features, rois, pooled_height, pooled_width, spatial_scale);
  c10::cuda::CUDAGuard device_guard(features.device());
  const at::Tensor f = features.contiguous();
  const at::Tensor r = rois.contiguous();
  at::Tensor output = at::empty({rois.size(0), features.size(1), pooled_height, pooled_width}, features.options());
  const int64_t total = output.numel();
  if (total == 0) return output;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  PRROI_DISPATCH(features.scalar_type(), "prroi_pool2d_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int N = f.size(0), C = f.size(1), H = f.size(2), W = f.size(3);
    auto launch = [&](auto index_zero) {
      using index_t = decltype(index_zero);
      forward_kernel<scalar_t, index_t><<<grid_for(total, kThreads), kThreads, 0, stream>>>(
          f.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), index_t(total), C, H, W, N, int(pooled_height),
          int(pooled_width), acc_t(spatial_scale), aligned, output.mutable_data_ptr<scalar_t>());
    };
    if (total <= std::numeric_limits<int32_t>::max()) {
      launch(int32_t(0));
    } else {
      launch(int64_t(0));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& features, const at::Tensor& rois, int64_t pooled_height,
    int64_t pooled_width, double spatial_scale, bool aligned, bool features_requires_grad, bool rois_requires_grad) {
  detail::check_backward_args(grad_output, features, rois, pooled_height, pooled_width, spatial_scale);
  c10::cuda::CUDAGuard device_guard(features.device());
  const at::Tensor g = grad_output.contiguous();
  const at::Tensor r = rois.contiguous();
  const int64_t K = rois.size(0);
  const int N = features.size(0), C = features.size(1), H = features.size(2), W = features.size(3);
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  at::Tensor grad_features = at::empty({0}, features.options());
  if (features_requires_grad) {
    grad_features = deterministic ? at::empty(features.sizes(), features.options())
                                  : at::zeros(features.sizes(), features.options());
  }
  at::Tensor grad_rois = rois_requires_grad ? at::empty({K, 5}, rois.options()) : at::empty({0}, rois.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  PRROI_DISPATCH(features.scalar_type(), "prroi_pool2d_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = acc_t(spatial_scale);
    if (features_requires_grad && grad_features.numel() > 0) {
      if (deterministic) {
        TORCH_CHECK_VALUE(K <= std::numeric_limits<int32_t>::max(), "prroi_pool2d: too many rois");
        const int tiles = ((H + kTile - 1) / kTile) * ((W + kTile - 1) / kTile);
        const dim3 grid(tiles, N, (C + kChannels - 1) / kChannels);
        TORCH_CHECK_VALUE(grid.y <= 65535 && grid.z <= 65535, "prroi_pool2d: batch or channels too large for the "
                          "deterministic backward, got N=", N, " C=", C);
        features_backward_gather_kernel<scalar_t><<<grid, kTile * kTile, 0, stream>>>(
            g.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), int(K), C, H, W, N, int(pooled_height),
            int(pooled_width), scale, aligned, grad_features.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else if (g.numel() > 0) {
        const int64_t total = g.numel();
        auto launch = [&](auto index_zero) {
          using index_t = decltype(index_zero);
          features_backward_kernel<scalar_t, index_t><<<grid_for(total, kThreads), kThreads, 0, stream>>>(
              g.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), index_t(total), C, H, W, N,
              int(pooled_height), int(pooled_width), scale, aligned, grad_features.mutable_data_ptr<scalar_t>(),
              grad_features.numel());
        };
        if (total <= std::numeric_limits<int32_t>::max()) {
          launch(int32_t(0));
        } else {
          launch(int64_t(0));
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    if (rois_requires_grad && K > 0) {
      if (C == 0) {
        grad_rois.zero_();
      } else {
        const at::Tensor f = features.contiguous();
        const int64_t blocks = std::min<int64_t>(K, at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 64);
        rois_backward_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
            g.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), K, C, H, W,
            N, int(pooled_height), int(pooled_width), scale, aligned, grad_rois.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  return {grad_features, grad_rois};
}

}  // namespace

TORCH_LIBRARY_IMPL(prroi_d2, CUDA, m) {
  m.impl("prroi_pool2d", &forward_cuda);
  m.impl("_prroi_pool2d_backward", &backward_cuda);
}

}  // namespace prroi_d2
