// Gradient of Precise RoI Pooling with respect to the box coordinates, on CUDA.
//
// A bin's integral S and its derivatives with respect to the bin's four edges are linear in the pixels, so a thread
// first accumulates G = sum_c dL/dout_c * F_c over its bin's window for its channels (one multiply-add per pixel
// and channel, as in the forward), then weighs G once with the area and edge weights and applies the chain rule
// from the bin to the box. The threads of a block sum in a fixed order.
//
// Channels-last maps: a box's items are (bin, lane) pairs, the lane fastest; lane l takes channels l, l + 32, ..., so
// a warp's loads of a pixel read 32 consecutive channels (coalesced), and a thread weighs its window once for all.
//
// A box's items ((channel group, bin) pairs of channels-first maps) are cut into `parts` blocks (enough blocks to fill
// the GPU). By default the blocks add their shares into a zeroed gradient with atomics (the gradient is float32 or
// float64, box_dtype, for every features dtype). Under torch.use_deterministic_algorithms the blocks of a box form a
// thread-block cluster where the kernels were compiled for sm_90 or later (kernel_arch, not the GPU's own architecture:
// a build for an older one compiles the cluster code to a trap): each block sums its share, and the cluster's first
// block adds the shares in rank order from distributed shared memory and writes the gradient (deterministic, no
// workspace, no zero fill); other builds use one block per box.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>

#include <mutex>
#include <vector>

#include "kernel_common.cuh"
#include "launchers.h"

namespace prroi_d2 {
namespace cuda {
namespace {

constexpr int kMaxClusterBlocks = 8;  // the portable thread-block cluster size

// How the blocks of one box combine their sums.
enum class Combine { kWrite, kAtomicAdd, kCluster };

// Over a thread's channels c: s = sum_c go_c S_c, and x_lo .. y_hi the same sums of dS_c / d(bin edge).
template <typename acc_t>
struct EdgeSums {
  acc_t s = 0, x_lo = 0, x_hi = 0, y_lo = 0, y_hi = 0;

  // Adds pixel row i of the bin: r, r_lo, r_hi are the row's values weighed by the x area weights and by the
  // interpolation weights at x_lo and x_hi.
  __device__ __forceinline__ void add_row(const BinWindow<acc_t>& b, int i, acc_t r, acc_t r_lo, acc_t r_hi) {
    const acc_t wy = cell_weight(b.y_lo, b.y_hi, i);
    s += wy * r;
    x_lo -= wy * r_lo;
    x_hi += wy * r_hi;
    y_lo -= hat(b.y_lo, i) * r;
    y_hi += hat(b.y_hi, i) * r;
  }
};

// The edge sums of a P x P window from G[i][j] = sum_c dL/dout_c * F_c[i0 + i, j0 + j] (zero outside the window,
// where the weights then multiply zeros): the x weights once, then row by row.
template <int P, typename acc_t>
__device__ __forceinline__ EdgeSums<acc_t> edge_sums_of(const acc_t (&G)[P][P], const BinWindow<acc_t>& b) {
  acc_t wx[P], hx_lo[P], hx_hi[P];
#pragma unroll
  for (int jj = 0; jj < P; ++jj) {
    wx[jj] = cell_weight(b.x_lo, b.x_hi, b.j0 + jj);
    hx_lo[jj] = hat(b.x_lo, b.j0 + jj);
    hx_hi[jj] = hat(b.x_hi, b.j0 + jj);
  }
  EdgeSums<acc_t> e;
#pragma unroll
  for (int ii = 0; ii < P; ++ii) {
    acc_t r = 0, r_lo = 0, r_hi = 0;
#pragma unroll
    for (int jj = 0; jj < P; ++jj) {
      r += wx[jj] * G[ii][jj];
      r_lo += hx_lo[jj] * G[ii][jj];
      r_hi += hx_hi[jj] * G[ii][jj];
    }
    e.add_row(b, b.i0 + ii, r, r_lo, r_hi);
  }
  return e;
}

template <int P, typename scalar_t, typename acc_t>
__device__ __forceinline__ EdgeSums<acc_t> edge_sums_unrolled(
    const scalar_t* __restrict__ window, int64_t plane_stride, int W, const BinWindow<acc_t>& b, int channels,
    const scalar_t* __restrict__ go, int64_t go_stride) {
  acc_t G[P][P];
#pragma unroll
  for (int ii = 0; ii < P; ++ii) {
#pragma unroll
    for (int jj = 0; jj < P; ++jj) G[ii][jj] = 0;
  }
#pragma unroll 2
  for (int q = 0; q < kChannelsPerThread; ++q) {
    if (q < channels) {
      const acc_t gq = static_cast<acc_t>(go[q * go_stride]);
      const scalar_t* p = window + q * plane_stride;
#pragma unroll
      for (int ii = 0; ii < P; ++ii) {
#pragma unroll
        for (int jj = 0; jj < P; ++jj) {
          if (ii < b.ni && jj < b.nj) G[ii][jj] += gq * static_cast<acc_t>(p[int64_t(ii) * W + jj]);
        }
      }
    }
  }
  return edge_sums_of(G, b);
}

template <typename scalar_t, typename acc_t>
__device__ EdgeSums<acc_t> edge_sums_looped(
    const scalar_t* __restrict__ window, int64_t plane_stride, int W, const BinWindow<acc_t>& b, int channels,
    const scalar_t* __restrict__ go, int64_t go_stride) {
  EdgeSums<acc_t> e;
  for (int q = 0; q < channels; ++q) {
    const acc_t gq = static_cast<acc_t>(go[q * go_stride]);
    const scalar_t* p = window + q * plane_stride;
    for (int ii = 0; ii < b.ni; ++ii) {
      acc_t r = 0, r_lo = 0, r_hi = 0;
      for (int jj = 0; jj < b.nj; ++jj) {
        const int j = b.j0 + jj;
        const acc_t v = gq * static_cast<acc_t>(p[int64_t(ii) * W + jj]);
        r += cell_weight(b.x_lo, b.x_hi, j) * v;
        r_lo += hat(b.x_lo, j) * v;
        r_hi += hat(b.x_hi, j) * v;
      }
      e.add_row(b, b.i0 + ii, r, r_lo, r_hi);
    }
  }
  return e;
}

// EdgeSums over the channels c = l, l + kLanes, ... < C of a channels-last map (a thread's share of a bin, `channels`
// of them): as edge_sums_unrolled, G = sum_c dL/dout_c * F_c over the window first, then the weights once. `p` is
// channel l at pixel (i0, j0) (channels 1 apart, pixels C apart, rows row_stride apart), `go` dL/dout of channel l,
// channels go_stride apart.
template <int P, typename scalar_t, typename acc_t>
__device__ __forceinline__ EdgeSums<acc_t> edge_sums_lanes_unrolled(
    const scalar_t* __restrict__ p, int64_t row_stride, int C, int channels, const BinWindow<acc_t>& b,
    const scalar_t* __restrict__ go, int64_t go_stride) {
  acc_t G[P][P];
#pragma unroll
  for (int ii = 0; ii < P; ++ii) {
#pragma unroll
    for (int jj = 0; jj < P; ++jj) G[ii][jj] = 0;
  }
#pragma unroll 2
  for (int q = 0; q < channels; ++q) {
    const acc_t gq = static_cast<acc_t>(go[q * kLanes * go_stride]);
    const scalar_t* pq = p + q * kLanes;
#pragma unroll
    for (int ii = 0; ii < P; ++ii) {
#pragma unroll
      for (int jj = 0; jj < P; ++jj) {
        if (ii < b.ni && jj < b.nj) G[ii][jj] += gq * static_cast<acc_t>(pq[ii * row_stride + int64_t(jj) * C]);
      }
    }
  }
  return edge_sums_of(G, b);
}

template <typename scalar_t, typename acc_t>
__device__ EdgeSums<acc_t> edge_sums_lanes_looped(
    const scalar_t* __restrict__ p, int64_t row_stride, int C, int channels, const BinWindow<acc_t>& b,
    const scalar_t* __restrict__ go, int64_t go_stride) {
  EdgeSums<acc_t> e;
  for (int q = 0; q < channels; ++q) {
    const acc_t gq = static_cast<acc_t>(go[q * kLanes * go_stride]);
    const scalar_t* pq = p + q * kLanes;
    for (int ii = 0; ii < b.ni; ++ii) {
      acc_t r = 0, r_lo = 0, r_hi = 0;
      for (int jj = 0; jj < b.nj; ++jj) {
        const int j = b.j0 + jj;
        const acc_t v = gq * static_cast<acc_t>(pq[ii * row_stride + int64_t(jj) * C]);
        r += cell_weight(b.x_lo, b.x_hi, j) * v;
        r_lo += hat(b.x_lo, j) * v;
        r_hi += hat(b.x_hi, j) * v;
      }
      e.add_row(b, b.i0 + ii, r, r_lo, r_hi);
    }
  }
  return e;
}

// Sums d[0..3] over the block in a fixed order (same inputs, same bits); the result is valid in thread 0.
template <typename acc_t>
__device__ __forceinline__ void block_sum4(acc_t (&d)[4], acc_t (&partial)[4][kThreads / 32]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    for (int o = 16; o > 0; o /= 2) d[t] += __shfl_down_sync(0xffffffffu, d[t], o);
  }
  __syncthreads();  // the previous box's partial sums have been read
  if (lane == 0) {
#pragma unroll
    for (int t = 0; t < 4; ++t) partial[t][warp] = d[t];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      acc_t total = 0;
      for (int w = 0; w < kThreads / 32; ++w) total += partial[t][w];
      d[t] = total;
    }
  }
}

// `parts` blocks per box: block b takes box (task / parts) and part (task % parts) for task = b, b + gridDim.x, ...;
// gridDim.x is a multiple of parts, so a cluster's blocks always share a box. Part p takes the box's items
// [p * per_part, (p + 1) * per_part).
template <typename scalar_t, Combine combine, bool kLevels, bool kChannelsLast,
          typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads, 2) rois_backward_kernel(
    const scalar_t* __restrict__ grad, GradStrides gs, LevelTable<scalar_t> table, const int64_t* __restrict__ levels,
    const acc_t* __restrict__ rois, int64_t K, int N, int C, int ph_n, int pw_n, bool aligned, int parts,
    int per_part, acc_t* __restrict__ grad_rois) {
  __shared__ acc_t partial[4][kThreads / 32];
  __shared__ acc_t block_total[4];  // this block's share, read by the cluster's first block
  const int bins = ph_n * pw_n;
  const int slots = min(C, kLanes);  // channels-last: a bin's items, one per lane
  const int items = (kChannelsLast ? slots : channel_groups(C)) * bins;  // a box's (channels, bin) items
  const int t = threadIdx.x;
  for (int64_t task = blockIdx.x; task < K * parts; task += gridDim.x) {
    const int64_t k = task / parts;
    const int part = static_cast<int>(task % parts);
    const Box<acc_t, scalar_t> box = load_box<kLevels, acc_t>(table, levels, rois, k, aligned, ph_n, pw_n, N, C);
    const RoiGeometry<acc_t>& g = box.g;
    if (!g.valid || !(g.area > acc_t(0))) {  // the same for every block of the box
      if (part == 0 && t < 5) {
        grad_rois[k * 5 + t] = t == 0 || g.valid ? acc_t(0) : quiet_nan<acc_t>();
      }
      continue;
    }
    const int H = box.height, W = box.width;
    const int64_t plane_stride = int64_t(H) * W;
    acc_t d[4] = {0, 0, 0, 0};  // x0, y0, x1, y1
    const int begin = part * per_part;
    const int end = begin + min(per_part, items - begin);
    for (int item = begin + t; item < end; item += kThreads) {
      const int bin = kChannelsLast ? item / slots : item % bins;
      const int c0 = kChannelsLast ? item % slots : (item / bins) * kChannelsPerThread;
      const int ph = bin / pw_n, pw = bin % pw_n;
      const BinWindow<acc_t> b = bin_window(g, ph, pw, H, W);
      if (b.ni <= 0 || b.nj <= 0) continue;  // outside the map: the bin and its derivatives are zero
      const scalar_t* go = grad + k * gs.k + c0 * gs.c + ph * gs.h + pw * gs.w;
      EdgeSums<acc_t> e;
      if constexpr (kChannelsLast) {  // channels c0, c0 + kLanes, ...
        const scalar_t* p = box.image + (int64_t(b.i0) * W + b.j0) * C + c0;
        const int64_t row_stride = int64_t(W) * C;
        const int channels = (C - c0 + kLanes - 1) / kLanes;
        const bool done = with_unrolled_window(b.ni, b.nj, [&](auto n) {
          e = edge_sums_lanes_unrolled<decltype(n)::value>(p, row_stride, C, channels, b, go, gs.c);
        });
        if (!done) e = edge_sums_lanes_looped(p, row_stride, C, channels, b, go, gs.c);
      } else {
        const int channels = min(kChannelsPerThread, C - c0);
        const scalar_t* window = box.image + c0 * plane_stride + int64_t(b.i0) * W + b.j0;
        const bool done = with_unrolled_window(b.ni, b.nj, [&](auto p) {
          e = edge_sums_unrolled<decltype(p)::value>(window, plane_stride, W, b, channels, go, gs.c);
        });
        if (!done) e = edge_sums_looped(window, plane_stride, W, b, channels, go, gs.c);
      }
      add_box_gradient(g, ph, pw, ph_n, pw_n, acc_t(1), e.s, e.x_lo, e.x_hi, e.y_lo, e.y_hi, d);
    }
    block_sum4(d, partial);
    if constexpr (combine == Combine::kCluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      namespace cg = cooperative_groups;
      const cg::cluster_group cluster = cg::this_cluster();
      if (t == 0) {
#pragma unroll
        for (int q = 0; q < 4; ++q) block_total[q] = d[q];
      }
      cluster.sync();
      if (part == 0 && t == 0) {
        acc_t total[4] = {0, 0, 0, 0};
        for (int r = 0; r < parts; ++r) {
          const acc_t* share = cluster.map_shared_rank(block_total, r);
#pragma unroll
          for (int q = 0; q < 4; ++q) total[q] += share[q];
        }
        grad_rois[k * 5] = acc_t(0);
#pragma unroll
        for (int q = 0; q < 4; ++q) grad_rois[k * 5 + 1 + q] = total[q] * box.scale;
      }
      cluster.sync();  // the shares have been read before the next box overwrites them
#else
      __trap();  // the host launches clusters only where kernel_arch() >= 90
#endif
    } else if (t == 0) {
      if constexpr (combine == Combine::kWrite) {
        grad_rois[k * 5] = acc_t(0);
#pragma unroll
        for (int q = 0; q < 4; ++q) grad_rois[k * 5 + 1 + q] = d[q] * box.scale;
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) gpuAtomicAdd(grad_rois + k * 5 + 1 + q, d[q] * box.scale);
      }
    }
  }
}

}  // namespace

int kernel_arch(int device) {
  // Every kernel of the extension comes from the same nvcc invocation options, so the driver picks the same kind
  // of image (SASS of an architecture, or PTX of one, JIT-compiled) for all of them: one kernel answers for all.
  TORCH_CHECK_VALUE(device >= 0 && device < at::cuda::device_count(), "prroi_d2: no CUDA device ", device);
  static std::mutex mutex;
  static std::vector<int> arch_of_device;  // 0: not queried yet
  std::lock_guard<std::mutex> lock(mutex);
  if (device >= static_cast<int>(arch_of_device.size())) arch_of_device.resize(device + 1, 0);
  if (arch_of_device[device] == 0) {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    cudaFuncAttributes attributes;
    C10_CUDA_CHECK(cudaFuncGetAttributes(
        &attributes, reinterpret_cast<const void*>(&rois_backward_kernel<float, Combine::kCluster, false, false>)));
    arch_of_device[device] = attributes.ptxVersion;
  }
  return arch_of_device[device];
}

void launch_rois_backward(
    const at::Tensor& grad_output, at::TensorList features, const at::Tensor& rois, const at::Tensor& levels,
    at::ArrayRef<double> scales, bool aligned, bool channels_last, bool deterministic, at::Tensor& grad_rois) {
  const int64_t K = rois.size(0);
  const int N = features[0].size(0), C = features[0].size(1);
  const int ph_n = grad_output.size(2), pw_n = grad_output.size(3);
  if (K == 0) return;
  if (C == 0) {
    grad_rois.zero_();
    return;
  }
  const int64_t items = (channels_last ? std::min(C, kLanes) : channel_groups(C)) * int64_t(ph_n) * pw_n;
  TORCH_CHECK_VALUE(items <= std::numeric_limits<int32_t>::max(), "prroi_pool2d: channels x pooled_height x "
                    "pooled_width is too large for the CUDA coordinate gradient, got ", grad_output.sizes());
  // Atomics when allowed (the fastest: a block never waits for another), clusters where determinism is asked for
  // and the kernels were compiled for them (the cluster kernel of an older build is a trap).
  const bool atomics = !deterministic;
  const bool clusters = !atomics && at::cuda::getCurrentDeviceProperties()->major >= 9 &&
      kernel_arch(grad_rois.get_device()) >= 90;
  // Enough blocks per box to fill the GPU, each taking whole rounds of kThreads items (one per thread) but the
  // last: a part of one round and a few items would hold its block for a second, almost idle round.
  int64_t per_part = items;
  if (clusters || atomics) {
    const int64_t rounds_needed = (items + kThreads - 1) / kThreads;
    const int64_t blocks_wanted = (resident_blocks() + K - 1) / K;
    int64_t rounds = std::max<int64_t>(1, rounds_needed / blocks_wanted);
    if (clusters) rounds = std::max(rounds, (rounds_needed + kMaxClusterBlocks - 1) / kMaxClusterBlocks);
    per_part = std::min(items, rounds * kThreads);
  }
  const int64_t parts = (items + per_part - 1) / per_part;
  const Combine combine = parts == 1 ? Combine::kWrite : (clusters ? Combine::kCluster : Combine::kAtomicAdd);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (combine == Combine::kAtomicAdd) {  // a memset costs the host less than a fill kernel (refinement loops)
    C10_CUDA_CHECK(cudaMemsetAsync(grad_rois.mutable_data_ptr(), 0, grad_rois.nbytes(), stream));
  }
  const int64_t blocks = std::max<int64_t>(1, grid_blocks(K * parts) / parts) * parts;  // whole clusters
  const GradStrides gs{grad_output.stride(0), grad_output.stride(1), grad_output.stride(2), grad_output.stride(3)};
  const int64_t* level_data = levels.defined() ? levels.const_data_ptr<int64_t>() : nullptr;
  const at::ScalarType dtype = features[0].scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "prroi_pool2d_rois_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LevelTable<scalar_t> table = make_level_table<scalar_t>(features, scales);
    const scalar_t* grad = grad_output.const_data_ptr<scalar_t>();
    const acc_t* boxes = rois.const_data_ptr<acc_t>();
    acc_t* out = grad_rois.mutable_data_ptr<acc_t>();
    auto launch = [&](auto kernel) {
      if (combine == Combine::kCluster) {
        cudaLaunchConfig_t config = {};
        config.gridDim = dim3(static_cast<unsigned>(blocks));
        config.blockDim = dim3(kThreads);
        config.stream = stream;
        cudaLaunchAttribute attribute;
        attribute.id = cudaLaunchAttributeClusterDimension;
        attribute.val.clusterDim.x = static_cast<unsigned>(parts);
        attribute.val.clusterDim.y = 1;
        attribute.val.clusterDim.z = 1;
        config.attrs = &attribute;
        config.numAttrs = 1;
        C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, grad, gs, table, level_data, boxes, K, N, C, ph_n, pw_n,
                                          aligned, int(parts), int(per_part), out));
      } else {
        kernel<<<blocks, kThreads, 0, stream>>>(grad, gs, table, level_data, boxes, K, N, C, ph_n, pw_n, aligned,
                                                int(parts), int(per_part), out);
      }
    };
    auto with_levels = [&](auto combine_tag) {
      constexpr Combine kCombine = decltype(combine_tag)::value;
      if (level_data != nullptr) {
        launch(channels_last ? rois_backward_kernel<scalar_t, kCombine, true, true>
                             : rois_backward_kernel<scalar_t, kCombine, true, false>);
      } else {
        launch(channels_last ? rois_backward_kernel<scalar_t, kCombine, false, true>
                             : rois_backward_kernel<scalar_t, kCombine, false, false>);
      }
    };
    if (combine == Combine::kCluster) {
      with_levels(std::integral_constant<Combine, Combine::kCluster>());
    } else if (combine == Combine::kAtomicAdd) {
      with_levels(std::integral_constant<Combine, Combine::kAtomicAdd>());
    } else {
      with_levels(std::integral_constant<Combine, Combine::kWrite>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace prroi_d2
