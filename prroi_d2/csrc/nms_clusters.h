// The greedy part of IoU-guided NMS (Algorithm 1 of IoU-Net), shared by the CPU and CUDA kernels.
//
// Positions are in processing order: the boxes of a group are contiguous (groups ascending), each group's boxes in
// decreasing rank. Within a group, going down the ranking, a box not yet removed is kept and removes every later box
// of its group whose IoU with it is above the threshold; a removed box's head is the kept box that removed it (the
// first kept box above it that overlaps it), a kept box is its own head. Groups never interact.
#pragma once

#include <ATen/ATen.h>

#ifdef __CUDACC__
#define PRROI_D2_HOST_DEVICE __host__ __device__
#else
#define PRROI_D2_HOST_DEVICE
#endif

namespace prroi_d2 {

// IoU of XYXY boxes a and b greater than threshold (areas clamped at 0; an empty union overlaps nothing).
template <typename acc_t, typename scalar_t>
PRROI_D2_HOST_DEVICE inline bool overlaps_above(const scalar_t* a, const scalar_t* b, acc_t threshold) {
  const acc_t ax0 = acc_t(a[0]), ay0 = acc_t(a[1]), ax1 = acc_t(a[2]), ay1 = acc_t(a[3]);
  const acc_t bx0 = acc_t(b[0]), by0 = acc_t(b[1]), bx1 = acc_t(b[2]), by1 = acc_t(b[3]);
  const acc_t zero = acc_t(0);
  const acc_t w = (ax1 < bx1 ? ax1 : bx1) - (ax0 > bx0 ? ax0 : bx0);
  const acc_t h = (ay1 < by1 ? ay1 : by1) - (ay0 > by0 ? ay0 : by0);
  const acc_t inter = (w > zero ? w : zero) * (h > zero ? h : zero);
  const acc_t area_a = (ax1 - ax0 > zero ? ax1 - ax0 : zero) * (ay1 - ay0 > zero ? ay1 - ay0 : zero);
  const acc_t area_b = (bx1 - bx0 > zero ? bx1 - bx0 : zero) * (by1 - by0 > zero ? by1 - by0 : zero);
  const acc_t uni = area_a + area_b - inter;
  return uni > zero && inter / uni > threshold;
}

void check_nms_clusters_args(const at::Tensor& boxes, const at::Tensor& groups, double iou_threshold);

}  // namespace prroi_d2
