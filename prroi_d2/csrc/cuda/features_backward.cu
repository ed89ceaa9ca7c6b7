// Gradient of Precise RoI Pooling with respect to the features, on CUDA: a gather, so it needs no atomics, no
// zero-filled buffer and is deterministic.
//
// One block per (16 x 16 pixel tile, image, group of kGatherChannels channels), one thread per pixel. The block
// reads the boxes in chunks, keeps those of its image whose pixel window meets the tile (in index order, with their
// decoded geometry in shared memory), and each thread sums, over the kept boxes and the bins whose weight reaches
// its pixel, weight x dL/d(output bin) for its channels, in registers; the sums are written once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>

#include "kernel_common.cuh"
#include "launchers.h"

namespace prroi_d2 {
namespace cuda {
namespace {

constexpr int kTile = 16;
constexpr int kTileThreads = kTile * kTile;
constexpr int kGatherChannels = 16;

// Bins [first, last] of one axis whose support may reach pixel p (empty when first > last). Bin b spans
// [start + b * bin, start + (b + 1) * bin] and pixel p's weight is supported on (p - 1, p + 1); one bin of margin on
// each side covers rounding, and bins without weight are skipped by the caller. NaN-safe: a product that is not a
// number selects every bin.
template <typename acc_t>
__device__ __forceinline__ void bins_touching(acc_t start, acc_t inv_bin, int bins, int p, int* first, int* last) {
  const acc_t f = floor((acc_t(p - 1) - start) * inv_bin) - acc_t(1);
  const acc_t l = floor((acc_t(p + 1) - start) * inv_bin) + acc_t(1);
  *first = f >= acc_t(0) ? (f <= acc_t(bins) ? static_cast<int>(f) : bins) : 0;
  *last = l <= acc_t(bins - 1) ? (l >= acc_t(-1) ? static_cast<int>(l) : -1) : bins - 1;
}

// Geometry of the boxes kept for a tile, one slot per kept box.
template <typename acc_t>
struct KeptBoxes {
  acc_t x0[kTileThreads], y0[kTileThreads], bin_w[kTileThreads], bin_h[kTileThreads];
  acc_t inv_bin_w[kTileThreads], inv_bin_h[kTileThreads], inv_area[kTileThreads];
  int64_t k[kTileThreads];
};

// The gradient of one level's map: boxes on other levels (levels[k] != level) are skipped.
template <typename scalar_t>
__global__ void __launch_bounds__(kTileThreads) features_backward_kernel(
    const scalar_t* __restrict__ grad, GradStrides gs, const at::opmath_type<scalar_t>* __restrict__ rois,
    const int64_t* __restrict__ levels, int level, int64_t K, int C, int H, int W, int N, int ph_n, int pw_n,
    at::opmath_type<scalar_t> scale, bool aligned, scalar_t* __restrict__ grad_features) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ KeptBoxes<acc_t> kept;
  __shared__ int warp_counts[kTileThreads / 32];
  const int tiles_x = (W + kTile - 1) / kTile;
  const int tile_x0 = (blockIdx.x % tiles_x) * kTile;
  const int tile_y0 = (blockIdx.x / tiles_x) * kTile;
  const int n = blockIdx.y;
  const int c0 = blockIdx.z * kGatherChannels;
  const int channels = min(kGatherChannels, C - c0);
  const int t = threadIdx.x;
  const int px = tile_x0 + t % kTile, py = tile_y0 + t / kTile;
  const int lane = t % 32, warp = t / 32;

  acc_t acc[kGatherChannels];
#pragma unroll
  for (int q = 0; q < kGatherChannels; ++q) acc[q] = 0;

  for (int64_t chunk = 0; chunk < K; chunk += kTileThreads) {
    const int64_t k = chunk + t;
    bool keep = false;
    RoiGeometry<acc_t> g{};
    if (k < K && (levels == nullptr || levels[k] == level)) {
      g = load_roi(rois, k, scale, aligned, ph_n, pw_n, N);
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
    int slot = 0, count = 0;
    for (int w = 0; w < kTileThreads / 32; ++w) {
      slot += w < warp ? warp_counts[w] : 0;
      count += warp_counts[w];
    }
    if (keep) {
      slot += __popc(ballot & ((1u << lane) - 1u));
      kept.x0[slot] = g.x0;
      kept.y0[slot] = g.y0;
      kept.bin_w[slot] = g.bin_w;
      kept.bin_h[slot] = g.bin_h;
      kept.inv_bin_w[slot] = acc_t(1) / g.bin_w;
      kept.inv_bin_h[slot] = acc_t(1) / g.bin_h;
      kept.inv_area[slot] = acc_t(1) / g.area;
      kept.k[slot] = k;
    }
    __syncthreads();

    if (px < W && py < H) {
      for (int s = 0; s < count; ++s) {
        const acc_t x0 = kept.x0[s], y0 = kept.y0[s], bin_w = kept.bin_w[s], bin_h = kept.bin_h[s];
        int bx0, bx1, by0, by1;
        bins_touching(x0, kept.inv_bin_w[s], pw_n, px, &bx0, &bx1);
        bins_touching(y0, kept.inv_bin_h[s], ph_n, py, &by0, &by1);
        const acc_t inv_area = kept.inv_area[s];
        const scalar_t* gk = grad + kept.k[s] * gs.k + c0 * gs.c;
        for (int ph = by0; ph <= by1; ++ph) {
          // The same edges as bin_window computes in the forward.
          const acc_t wy = inv_area * cell_weight(y0 + ph * bin_h, y0 + (ph + 1) * bin_h, py);
          if (wy == acc_t(0)) continue;
          for (int pw = bx0; pw <= bx1; ++pw) {
            const acc_t w = wy * cell_weight(x0 + pw * bin_w, x0 + (pw + 1) * bin_w, px);
            if (w == acc_t(0)) continue;
            const scalar_t* gb = gk + ph * gs.h + pw * gs.w;
#pragma unroll
            for (int q = 0; q < kGatherChannels; ++q) {
              if (q < channels) acc[q] += w * static_cast<acc_t>(gb[q * gs.c]);
            }
          }
        }
      }
    }
    __syncthreads();
  }
  if (px < W && py < H) {
    scalar_t* out = grad_features + ((int64_t(n) * C + c0) * H + py) * int64_t(W) + px;
#pragma unroll
    for (int q = 0; q < kGatherChannels; ++q) {
      if (q < channels) out[int64_t(q) * H * W] = static_cast<scalar_t>(acc[q]);
    }
  }
}

}  // namespace

void launch_features_backward(
    const at::Tensor& grad_output, const at::Tensor& rois, const at::Tensor& levels, at::ArrayRef<double> scales,
    bool aligned, at::TensorList grad_features) {
  const int64_t K = rois.size(0);
  const int ph_n = grad_output.size(2), pw_n = grad_output.size(3);
  const GradStrides gs{grad_output.stride(0), grad_output.stride(1), grad_output.stride(2), grad_output.stride(3)};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (size_t l = 0; l < grad_features.size(); ++l) {
    const at::Tensor& out = grad_features[l];
    if (out.numel() == 0) continue;
    const int N = out.size(0), C = out.size(1), H = out.size(2), W = out.size(3);
    const int64_t tiles = int64_t((H + kTile - 1) / kTile) * ((W + kTile - 1) / kTile);
    const int64_t groups = (C + kGatherChannels - 1) / kGatherChannels;
    TORCH_CHECK_VALUE(tiles <= std::numeric_limits<int32_t>::max() && N <= 65535 && groups <= 65535,
                      "prroi_pool2d: features of shape ", out.sizes(), " are too large for the CUDA feature "
                      "gradient (at most 65535 images and 1048560 channels)");
    const dim3 grid(tiles, N, groups);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, out.scalar_type(), "prroi_pool2d_features_backward", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          features_backward_kernel<scalar_t><<<grid, kTileThreads, 0, stream>>>(
              grad_output.const_data_ptr<scalar_t>(), gs, rois.const_data_ptr<acc_t>(),
              levels.defined() ? levels.const_data_ptr<int64_t>() : nullptr, static_cast<int>(l), K, C, H, W, N,
              ph_n, pw_n, acc_t(scales[l]), aligned, out.mutable_data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
}

}  // namespace cuda
}  // namespace prroi_d2
