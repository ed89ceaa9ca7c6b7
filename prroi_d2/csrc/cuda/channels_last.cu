// _channels_last on CUDA: each image's (C, H * W) matrix transposed through 32 x 33 shared tiles, so that reads and
// writes are both coalesced (ATen's strided copy into channels-last strides reaches about a quarter of the bandwidth).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../prroi_pool.h"

namespace prroi_d2 {
namespace {

constexpr int kTile = 32;
constexpr int kRows = 8;  // threads (kTile x kRows) per block, each moving kTile / kRows elements

// out[n, i, c] = in[n, c, i] for (N, C, P) contiguous input; block (x, y, z) moves the tile of pixels
// [32 x, 32 x + 32) and channels [32 y, 32 y + 32) of image z.
template <typename scalar_t>
__global__ void __launch_bounds__(kTile * kRows) channels_last_kernel(
    const scalar_t* __restrict__ in, int64_t C, int64_t P, scalar_t* __restrict__ out) {
  __shared__ scalar_t tile[kTile][kTile + 1];
  const int64_t image = int64_t(blockIdx.z) * C * P;
  const int64_t p0 = int64_t(blockIdx.x) * kTile, c0 = int64_t(blockIdx.y) * kTile;
  for (int r = threadIdx.y; r < kTile; r += kRows) {
    const int64_t c = c0 + r, p = p0 + threadIdx.x;
    if (c < C && p < P) tile[r][threadIdx.x] = in[image + c * P + p];
  }
  __syncthreads();
  for (int r = threadIdx.y; r < kTile; r += kRows) {
    const int64_t p = p0 + r, c = c0 + threadIdx.x;
    if (c < C && p < P) out[image + p * C + c] = tile[threadIdx.x][r];
  }
}

at::Tensor channels_last_cuda(const at::Tensor& features) {
  detail::check_channels_last_args(features);
  c10::cuda::CUDAGuard device_guard(features.device());
  at::Tensor out = at::empty_like(features, at::MemoryFormat::ChannelsLast);
  const int64_t N = features.size(0), C = features.size(1), P = features.size(2) * features.size(3);
  const int64_t pixel_tiles = (P + kTile - 1) / kTile, channel_tiles = (C + kTile - 1) / kTile;
  if (out.numel() == 0) return out;
  if (N > 65535 || channel_tiles > 65535 || pixel_tiles > std::numeric_limits<int32_t>::max()) {
    return out.copy_(features);  // beyond the grid's limits: ATen's copy
  }
  if (features.is_contiguous(at::MemoryFormat::ChannelsLast)) return out.copy_(features);  // already: a plain copy
  const at::Tensor in = features.contiguous();
  const dim3 grid(static_cast<unsigned>(pixel_tiles), static_cast<unsigned>(channel_tiles), static_cast<unsigned>(N));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "_channels_last_cuda", [&] {
    channels_last_kernel<scalar_t><<<grid, dim3(kTile, kRows), 0, stream>>>(
        in.const_data_ptr<scalar_t>(), C, P, out.mutable_data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(prroi_d2, CUDA, m) { m.impl("_channels_last", &channels_last_cuda); }

}  // namespace prroi_d2
