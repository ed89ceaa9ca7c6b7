// The operator schema (torch.ops.prroi_d2.*), its dispatching entry points and argument checks.
#include "prroi_pool.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#ifdef WITH_CUDA
#include <cuda_runtime_api.h>

#include "cuda/launchers.h"
#endif

namespace prroi_d2 {

at::Tensor prroi_pool2d(
    const at::Tensor& features,
    const at::Tensor& rois,
    int64_t pooled_height,
    int64_t pooled_width,
    double spatial_scale,
    bool aligned) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("prroi_d2::prroi_pool2d", "")
                       .typed<decltype(prroi_pool2d)>();
  return op.call(features, rois, pooled_height, pooled_width, spatial_scale, aligned);
}

std::tuple<at::Tensor, at::Tensor> prroi_pool2d_backward(
    const at::Tensor& grad_output,
    const at::Tensor& features,
    const at::Tensor& rois,
    int64_t pooled_height,
    int64_t pooled_width,
    double spatial_scale,
    bool aligned,
    bool features_requires_grad,
    bool rois_requires_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("prroi_d2::_prroi_pool2d_backward", "")
                       .typed<decltype(prroi_pool2d_backward)>();
  return op.call(
      grad_output,
      features,
      rois,
      pooled_height,
      pooled_width,
      spatial_scale,
      aligned,
      features_requires_grad,
      rois_requires_grad);
}

at::Tensor prroi_pool2d_levels(
    at::TensorList features,
    const at::Tensor& rois,
    const at::Tensor& levels,
    int64_t pooled_height,
    int64_t pooled_width,
    at::ArrayRef<double> spatial_scales,
    bool aligned) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("prroi_d2::prroi_pool2d_levels", "")
                       .typed<decltype(prroi_pool2d_levels)>();
  return op.call(features, rois, levels, pooled_height, pooled_width, spatial_scales, aligned);
}

std::tuple<std::vector<at::Tensor>, at::Tensor> prroi_pool2d_levels_backward(
    const at::Tensor& grad_output,
    at::TensorList features,
    const at::Tensor& rois,
    const at::Tensor& levels,
    int64_t pooled_height,
    int64_t pooled_width,
    at::ArrayRef<double> spatial_scales,
    bool aligned,
    bool features_requires_grad,
    bool rois_requires_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("prroi_d2::_prroi_pool2d_levels_backward", "")
                       .typed<decltype(prroi_pool2d_levels_backward)>();
  return op.call(grad_output, features, rois, levels, pooled_height, pooled_width, spatial_scales, aligned,
                 features_requires_grad, rois_requires_grad);
}

namespace detail {
namespace {

bool is_features_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

// rois of the features' dtype; float32 with float16/bfloat16 features (box coordinates are not rounded to the
// features' precision); float64 with float32 features (used as float32).
bool rois_dtype_fits(at::ScalarType features, at::ScalarType rois) {
  return rois == features || (rois == at::kFloat && (features == at::kHalf || features == at::kBFloat16)) ||
      (rois == at::kDouble && features == at::kFloat);
}

// Whether a spatial scale is finite and > 0 in the type the kernels use it in (box_dtype); e.g. 1e300 and 1e-46
// are not in float32.
bool scale_fits(double scale, at::ScalarType features_dtype) {
  if (box_dtype(features_dtype) == at::kDouble) return std::isfinite(scale) && scale > 0;
  if (!(std::abs(scale) <= static_cast<double>(std::numeric_limits<float>::max()))) return false;  // NaN too
  return static_cast<float>(scale) > 0.0f;
}

const char* box_dtype_name(at::ScalarType features_dtype) {
  return box_dtype(features_dtype) == at::kDouble
      ? "float64 (the kernels' type for float64 features)"
      : "float32 (the kernels' type for float32, float16 and bfloat16 features)";
}

}  // namespace

void check_forward_args(
    const at::Tensor& features,
    const at::Tensor& rois,
    int64_t pooled_height,
    int64_t pooled_width,
    double spatial_scale) {
  TORCH_CHECK_VALUE(features.dim() == 4, "prroi_pool2d: features must be 4-D (N, C, H, W), got shape ",
                    features.sizes());
  TORCH_CHECK_VALUE(rois.dim() == 2 && rois.size(1) == 5,
                    "prroi_pool2d: rois must be (K, 5) rows of (batch_index, x0, y0, x1, y1) or a list of (Ki, 4) "
                    "boxes, got shape ", rois.sizes());
  TORCH_CHECK_TYPE(is_features_dtype(features.scalar_type()),
                   "prroi_pool2d: features must be float16, bfloat16, float32 or float64, got ",
                   features.scalar_type());
  TORCH_CHECK_TYPE(rois_dtype_fits(features.scalar_type(), rois.scalar_type()), "prroi_pool2d: rois dtype ",
                   rois.scalar_type(), " does not go with features dtype ", features.scalar_type(), ": rois take "
                   "the features' dtype, float32 with float16/bfloat16 features, or float64 with float32 features");
  TORCH_CHECK_VALUE(rois.device() == features.device(), "prroi_pool2d: rois are on ", rois.device(),
                    " but features are on ", features.device());
  TORCH_CHECK_VALUE(pooled_height >= 1, "prroi_pool2d: pooled_height must be >= 1, got ", pooled_height);
  TORCH_CHECK_VALUE(pooled_width >= 1, "prroi_pool2d: pooled_width must be >= 1, got ", pooled_width);
  TORCH_CHECK_VALUE(pooled_height <= kMaxSize, "prroi_pool2d: pooled_height must be at most 2^30 (", kMaxSize,
                    "), got ", pooled_height);
  TORCH_CHECK_VALUE(pooled_width <= kMaxSize, "prroi_pool2d: pooled_width must be at most 2^30 (", kMaxSize,
                    "), got ", pooled_width);
  const int64_t bins = pooled_height * pooled_width;  // < 2^60
  TORCH_CHECK_VALUE(bins <= kMaxSize, "prroi_pool2d: pooled_height x pooled_width (bins per box) must be at most "
                    "2^30 (", kMaxSize, "), got ", pooled_height, " x ", pooled_width, " = ", bins);
  TORCH_CHECK_VALUE(scale_fits(spatial_scale, features.scalar_type()), "prroi_pool2d: spatial_scale must be finite "
                    "and > 0 in ", box_dtype_name(features.scalar_type()), ", got ", spatial_scale);
  const char* dims[4] = {"batch size", "channels", "height", "width"};
  for (int d = 0; d < 4; ++d) {
    TORCH_CHECK_VALUE(features.size(d) <= kMaxSize, "prroi_pool2d: features ", dims[d], " must be at most 2^30 (",
                      kMaxSize, "), got features of shape ", features.sizes());
  }
  TORCH_CHECK_VALUE(features.size(1) * bins <= kMaxSize, "prroi_pool2d: features channels x pooled_height x "
                    "pooled_width (one box's output) must be at most 2^30 (", kMaxSize, "), got ", features.size(1),
                    " x ", pooled_height, " x ", pooled_width);
}

void check_backward_args(
    const at::Tensor& grad_output,
    const at::Tensor& features,
    const at::Tensor& rois,
    int64_t pooled_height,
    int64_t pooled_width,
    double spatial_scale) {
  check_forward_args(features, rois, pooled_height, pooled_width, spatial_scale);
  const std::vector<int64_t> expected = {rois.size(0), features.size(1), pooled_height, pooled_width};
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(expected), "prroi_pool2d backward: grad_output must have "
                    "shape ", at::IntArrayRef(expected), ", got ", grad_output.sizes());
  TORCH_CHECK_VALUE(grad_output.device() == features.device(), "prroi_pool2d backward: grad_output is on ",
                    grad_output.device(), " but features are on ", features.device());
  TORCH_CHECK_TYPE(grad_output.scalar_type() == features.scalar_type(), "prroi_pool2d backward: grad_output dtype ",
                   grad_output.scalar_type(), " does not match features dtype ", features.scalar_type());
}

void check_levels_args(
    at::TensorList features,
    const at::Tensor& rois,
    const at::Tensor& levels,
    int64_t pooled_height,
    int64_t pooled_width,
    at::ArrayRef<double> spatial_scales) {
  TORCH_CHECK_VALUE(!features.empty() && features.size() <= kMaxLevels, "prroi_pool2d_levels: features must be a "
                    "list of 1 to ", kMaxLevels, " maps (N, C, H_l, W_l), got ", features.size());
  TORCH_CHECK_VALUE(spatial_scales.size() == features.size(), "prroi_pool2d_levels: spatial_scales must have one "
                    "entry per feature map (", features.size(), "), got ", spatial_scales.size());
  for (size_t l = 0; l < features.size(); ++l) {
    TORCH_CHECK_VALUE(features[l].dim() == 4, "prroi_pool2d_levels: features[", l, "] must be 4-D (N, C, H, W), "
                      "got shape ", features[l].sizes());
    TORCH_CHECK_VALUE(scale_fits(spatial_scales[l], features[l].scalar_type()), "prroi_pool2d_levels: "
                      "spatial_scales[", l, "] must be finite and > 0 in ", box_dtype_name(features[l].scalar_type()),
                      ", got ", spatial_scales[l]);
    if (l > 0) {
      TORCH_CHECK_VALUE(features[l].size(0) == features[0].size(0) && features[l].size(1) == features[0].size(1),
                        "prroi_pool2d_levels: features[", l, "] of shape ", features[l].sizes(), " differs from "
                        "features[0] of shape ", features[0].sizes(), " in batch size or channels");
      TORCH_CHECK_TYPE(features[l].scalar_type() == features[0].scalar_type(), "prroi_pool2d_levels: features[",
                       l, "] dtype ", features[l].scalar_type(), " differs from features[0] dtype ",
                       features[0].scalar_type());
      TORCH_CHECK_VALUE(features[l].device() == features[0].device(), "prroi_pool2d_levels: features[", l,
                        "] is on ", features[l].device(), " but features[0] is on ", features[0].device());
    }
    check_forward_args(features[l], rois, pooled_height, pooled_width, spatial_scales[l]);
  }
  TORCH_CHECK_VALUE(levels.dim() == 1 && levels.size(0) == rois.size(0), "prroi_pool2d_levels: levels must be a "
                    "(K,) tensor, one level index per roi (K = ", rois.size(0), "), got shape ", levels.sizes());
  TORCH_CHECK_TYPE(levels.scalar_type() == at::kLong, "prroi_pool2d_levels: levels must be int64, got ",
                   levels.scalar_type());
  TORCH_CHECK_VALUE(levels.device() == rois.device(), "prroi_pool2d_levels: levels are on ", levels.device(),
                    " but rois are on ", rois.device());
}

void check_channels_last_args(const at::Tensor& features) {
  TORCH_CHECK_VALUE(features.dim() == 4, "_channels_last: features must be (N, C, H, W), got shape ",
                    features.sizes());
  TORCH_CHECK_VALUE(is_features_dtype(features.scalar_type()),
                    "_channels_last: features must be float16, bfloat16, float32 or float64, got ",
                    features.scalar_type());
}

void check_levels_backward_args(
    const at::Tensor& grad_output,
    at::TensorList features,
    const at::Tensor& rois,
    const at::Tensor& levels,
    int64_t pooled_height,
    int64_t pooled_width,
    at::ArrayRef<double> spatial_scales) {
  check_levels_args(features, rois, levels, pooled_height, pooled_width, spatial_scales);
  check_backward_args(grad_output, features[0], rois, pooled_height, pooled_width, spatial_scales[0]);
}

}  // namespace detail

namespace {

int64_t cuda_version() {
#ifdef WITH_CUDA
  return CUDART_VERSION;
#else
  return 0;
#endif
}

// The virtual architecture (e.g. 90 for compute_90) of the CUDA kernels as they run on `device`, or 0 for a CPU-only
// build. Thread-block clusters are used only where it is 90 or more.
int64_t cuda_kernel_arch(int64_t device) {
#ifdef WITH_CUDA
  return cuda::kernel_arch(static_cast<int>(device));
#else
  (void)device;
  return 0;
#endif
}

}  // namespace

TORCH_LIBRARY(prroi_d2, m) {
  m.def(
      "prroi_pool2d(Tensor features, Tensor rois, int pooled_height, int pooled_width, float spatial_scale, "
      "bool aligned) -> Tensor");
  m.def(
      "_prroi_pool2d_backward(Tensor grad_output, Tensor features, Tensor rois, int pooled_height, "
      "int pooled_width, float spatial_scale, bool aligned, bool features_requires_grad, bool rois_requires_grad)"
      " -> (Tensor, Tensor)");
  m.def(
      "prroi_pool2d_levels(Tensor[] features, Tensor rois, Tensor levels, int pooled_height, int pooled_width, "
      "float[] spatial_scales, bool aligned) -> Tensor");
  m.def(
      "_prroi_pool2d_levels_backward(Tensor grad_output, Tensor[] features, Tensor rois, Tensor levels, "
      "int pooled_height, int pooled_width, float[] spatial_scales, bool aligned, bool features_requires_grad, "
      "bool rois_requires_grad) -> (Tensor[], Tensor)");
  // IoU-guided NMS, the greedy part (prroi_d2.modeling.iou_guided_nms): boxes (N, 4) and groups (N,) int64 in
  // processing order, each group's boxes contiguous and groups ascending; returns keep (N,) bool and head (N,) int64,
  // the position of the kept box whose cluster each box joins (its own position when kept).
  m.def("_nms_clusters(Tensor boxes, Tensor groups, float iou_threshold) -> (Tensor, Tensor)");
  // A copy of features (N, C, H, W) in the channels-last memory format, which the pooling kernels read as it is.
  m.def("_channels_last(Tensor features) -> Tensor");
  // One step of IoU-Net's box refinement for every box (prroi_d2.modeling.refine_boxes; see refine_step.h):
  // returns (boxes, best_boxes, best_ious, active) after the step.
  m.def(
      "_refine_step(Tensor boxes, Tensor? grad, Tensor ious, Tensor previous, Tensor best_boxes, Tensor best_ious, "
      "Tensor active, Tensor? clip_size, float step, float stop_delta, float stop_drop, bool first) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("_cuda_version() -> int", &cuda_version);
  m.def("_cuda_kernel_arch(int device) -> int", &cuda_kernel_arch);
}

}  // namespace prroi_d2
