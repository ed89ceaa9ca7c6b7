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

// The data of one _refine_step call: inputs (grad and bound nullptr when absent), outputs, and the scalars.
template <typename T>
struct StepData {
  const T *boxes, *grad, *ious, *previous, *best_boxes, *best_ious, *bound;
  const bool* active;
  T *out_boxes, *out_best_boxes, *out_best_ious;
  bool* out_active;
  T step, stop_delta, stop_drop;
  bool first;
};

// The step of box k.
template <typename T>
PRROI_D2_STEP_HD void refine_step_box(const StepData<T>& d, int64_t k) {
  const T* box = d.boxes + 4 * k;
  const T iou = d.ious[k];
  bool active = d.active[k];
  bool improved = d.first;
  T best_iou = iou;
  if (!d.first) {
    improved = active && iou > d.best_ious[k];
    best_iou = improved ? iou : d.best_ious[k];
    const T change = iou - d.previous[k];
    active = active && (change >= d.stop_delta || -change >= d.stop_delta) && change >= d.stop_drop;
  }
  const T size[2] = {box[2] - box[0], box[3] - box[1]};
  for (int i = 0; i < 4; ++i) {
    d.out_best_boxes[4 * k + i] = improved ? box[i] : d.best_boxes[4 * k + i];
    T v = box[i];
    if (d.grad != nullptr && active) {
      v = box[i] + d.step * d.grad[4 * k + i] * size[i % 2];
      if (d.bound != nullptr) {  // bound: (height, width); x clipped to [0, width], y to [0, height]
        const T hi = d.bound[2 * k + 1 - i % 2];
        v = v < T(0) ? T(0) : v;
        v = v > hi ? hi : v;
      }
    }
    d.out_boxes[4 * k + i] = v;
  }
  d.out_best_ious[k] = best_iou;
  d.out_active[k] = active;
}

// The tensors of one call: the inputs, checked and made contiguous (grad and clip_size undefined when absent), and
// the outputs (boxes, best_boxes, best_ious, active), allocated.
struct StepTensors {
  at::Tensor boxes, grad, ious, previous, best_boxes, best_ious, active, clip_size;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs;

  template <typename T>
  StepData<T> data(double step, double stop_delta, double stop_drop, bool first) {
    StepData<T> d;
    d.boxes = boxes.const_data_ptr<T>();
    d.grad = grad.defined() ? grad.const_data_ptr<T>() : nullptr;
    d.ious = ious.const_data_ptr<T>();
    d.previous = previous.const_data_ptr<T>();
    d.best_boxes = best_boxes.const_data_ptr<T>();
    d.best_ious = best_ious.const_data_ptr<T>();
    d.bound = clip_size.defined() ? clip_size.const_data_ptr<T>() : nullptr;
    d.active = active.const_data_ptr<bool>();
    d.out_boxes = std::get<0>(outputs).mutable_data_ptr<T>();
    d.out_best_boxes = std::get<1>(outputs).mutable_data_ptr<T>();
    d.out_best_ious = std::get<2>(outputs).mutable_data_ptr<T>();
    d.out_active = std::get<3>(outputs).mutable_data_ptr<bool>();
    d.step = T(step);
    d.stop_delta = T(stop_delta);
    d.stop_drop = T(stop_drop);
    d.first = first;
    return d;
  }
};

StepTensors prepare_refine_step(
    const at::Tensor& boxes, const c10::optional<at::Tensor>& grad, const at::Tensor& ious, const at::Tensor& previous,
    const at::Tensor& best_boxes, const at::Tensor& best_ious, const at::Tensor& active,
    const c10::optional<at::Tensor>& clip_size);

}  // namespace prroi_d2
