// One step of IoU-Net's box refinement (Algorithm 2) for one box, shared by the CPU and CUDA kernels of
// _refine_step. Per box: unless it is the first evaluation, keep the box if its predicted IoU beats the best seen
// (while it runs), and stop it when the IoU changed by less than stop_delta in absolute value or by less than
// stop_drop; then, if a gradient is given and the box still runs, move it by step * grad * (w, h, w, h) and clip it
// to [0, width] x [0, height].
#pragma once

#include <ATen/ATen.h>

#ifdef __CUDACC__
#define PRROI_D2_STEP_HD __host__ __device__ __forceinline__
#else
#define PRROI_D2_STEP_HD inline
#endif

namespace prroi_d2 {

// Pointers of one box k: box, grad (nullptr: no move), bound (height, width; nullptr: no clipping), the best box
// and best IoU so far (read unless first), the outputs.
template <typename T>
struct StepBox {
  const T* box;
  const T* grad;
  const T* bound;
  const T* best_box;
  T iou, previous, best_iou;
  bool active;
};

template <typename T>
PRROI_D2_STEP_HD void refine_step_box(
    const StepBox<T>& in, bool first, T step, T stop_delta, T stop_drop, T* out_box, T* out_best_box,
    T* out_best_iou, bool* out_active) {
  bool active = in.active;
  bool improved = first;
  T best_iou = in.iou;
  if (!first) {
    improved = active && in.iou > in.best_iou;
    best_iou = improved ? in.iou : in.best_iou;
    const T change = in.iou - in.previous;
    active = active && (change >= stop_delta || -change >= stop_delta) && change >= stop_drop;
  }
  const T size[2] = {in.box[2] - in.box[0], in.box[3] - in.box[1]};
  for (int i = 0; i < 4; ++i) {
    out_best_box[i] = improved ? in.box[i] : in.best_box[i];
    T v = in.box[i];
    if (in.grad != nullptr && active) {
      v = in.box[i] + step * in.grad[i] * size[i % 2];
      if (in.bound != nullptr) {  // bound: (height, width); x clipped to [0, width], y to [0, height]
        const T hi = in.bound[1 - i % 2];
        v = v < T(0) ? T(0) : v;
        v = v > hi ? hi : v;
      }
    }
    out_box[i] = v;
  }
  *out_best_iou = best_iou;
  *out_active = active;
}

void check_refine_step_args(
    const at::Tensor& boxes, const c10::optional<at::Tensor>& grad, const at::Tensor& ious, const at::Tensor& previous,
    const at::Tensor& best_boxes, const at::Tensor& best_ious, const at::Tensor& active,
    const c10::optional<at::Tensor>& clip_size);

}  // namespace prroi_d2
