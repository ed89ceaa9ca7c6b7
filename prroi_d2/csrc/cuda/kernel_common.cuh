// Device helpers shared by the CUDA kernels of Precise RoI Pooling.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../prroi_pool.h"
#include "../prroi_pool_geometry.h"

namespace prroi_d2 {
namespace cuda {

constexpr int kThreads = 256;
// Channels a forward or coordinate-gradient thread handles with one set of bin weights.
constexpr int kChannelsPerThread = 8;

__host__ __device__ constexpr int channel_groups(int channels) {
  return channels / kChannelsPerThread + (channels % kChannelsPerThread != 0);
}

// Channels a warp of the channels-last kernels reads together, one per lane.
constexpr int kLanes = 32;

// Shared memory of a block of the channels-last forward: a tile of kLanes channels x (bins made odd) elements; the
// kernel is used where it fits the default limit of a launch.
constexpr int64_t kMaxForwardTileBytes = 48 * 1024;
inline int64_t forward_tile_bytes(int64_t bins, int64_t element_size) {
  return kLanes * (bins | 1) * element_size;
}

// The feature maps a launch reads: one per pyramid level (a single entry for prroi_pool2d). Passed by value.
template <typename scalar_t>
struct LevelTable {
  const scalar_t* data[kMaxLevels];
  int height[kMaxLevels];
  int width[kMaxLevels];
  double scale[kMaxLevels];
  int count;
};

// Element strides of grad_output (K, C, PH, PW); an expanded gradient (stride 0) is read in place.
struct GradStrides {
  int64_t k, c, h, w;
};

template <typename T>
__device__ __forceinline__ T quiet_nan() {
  return std::numeric_limits<T>::quiet_NaN();
}

// A box with its feature map: g.valid is false for a non-finite box, a batch index outside [0, N) or a level
// outside the table; `image` is channel 0 of the box's image on its level.
template <typename acc_t, typename scalar_t>
struct Box {
  RoiGeometry<acc_t> g;
  const scalar_t* image;
  int height, width;
  acc_t scale;
};

// Row k of rois (K, 5), held in acc_t (box_dtype), decoded for a map of the given scale.
template <typename acc_t>
__device__ __forceinline__ RoiGeometry<acc_t> load_roi(
    const acc_t* __restrict__ rois, int64_t k, acc_t scale, bool aligned, int ph_n, int pw_n, int batch_size) {
  acc_t roi[5];
#pragma unroll
  for (int t = 0; t < 5; ++t) roi[t] = rois[k * 5 + t];
  return decode_roi<acc_t>(roi, scale, aligned, ph_n, pw_n, batch_size);
}

// kLevels: whether boxes carry a level index (prroi_pool2d_levels). Without it every box is on the table's only
// map; with it the level's entries are read with constant indices (a run-time index into the kernel's parameters
// would cost registers and local memory).
template <bool kLevels, typename acc_t, typename scalar_t>
__device__ __forceinline__ Box<acc_t, scalar_t> load_box(
    const LevelTable<scalar_t>& table, const int64_t* __restrict__ levels, const acc_t* __restrict__ rois,
    int64_t k, bool aligned, int ph_n, int pw_n, int N, int C) {
  Box<acc_t, scalar_t> box;
  const scalar_t* data = table.data[0];
  box.height = table.height[0];
  box.width = table.width[0];
  double scale = table.scale[0];
  bool level_ok = true;
  if constexpr (kLevels) {
    const int64_t level = levels[k];
    level_ok = level >= 0 && level < table.count;
#pragma unroll
    for (int l = 1; l < kMaxLevels; ++l) {
      if (level == l) {
        data = table.data[l];
        box.height = table.height[l];
        box.width = table.width[l];
        scale = table.scale[l];
      }
    }
  }
  box.scale = static_cast<acc_t>(scale);
  box.g = load_roi(rois, k, box.scale, aligned, ph_n, pw_n, N);
  box.g.valid = box.g.valid && level_ok;
  box.image = data + int64_t(box.g.batch) * C * box.height * box.width;
  return box;
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

// Blocks of kThreads threads the GPU holds at once (an estimate for choosing how finely to split work).
inline int64_t resident_blocks() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount * int64_t(2048 / kThreads);
}

template <typename scalar_t>
LevelTable<scalar_t> make_level_table(at::TensorList features, at::ArrayRef<double> scales) {
  LevelTable<scalar_t> table{};
  table.count = static_cast<int>(features.size());
  for (int l = 0; l < table.count; ++l) {
    table.data[l] = features[l].const_data_ptr<scalar_t>();
    table.height[l] = static_cast<int>(features[l].size(2));
    table.width[l] = static_cast<int>(features[l].size(3));
    table.scale[l] = scales[l];
  }
  return table;
}

}  // namespace cuda
}  // namespace prroi_d2
