// CPU kernel of prroi_d2::_nms_clusters (see ../nms_clusters.h): one group after another, greedily.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../nms_clusters.h"

namespace prroi_d2 {

void check_nms_clusters_args(const at::Tensor& boxes, const at::Tensor& groups, double iou_threshold) {
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(1) == 4, "_nms_clusters: boxes must be (N, 4), got ",
                    boxes.sizes());
  TORCH_CHECK_VALUE(groups.dim() == 1 && groups.size(0) == boxes.size(0), "_nms_clusters: groups must be (N,) = (",
                    boxes.size(0), ",), got ", groups.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(boxes.scalar_type()), "_nms_clusters: boxes must be floating point, got ",
                   boxes.scalar_type());
  TORCH_CHECK_TYPE(groups.scalar_type() == at::kLong, "_nms_clusters: groups must be int64, got ",
                   groups.scalar_type());
  TORCH_CHECK_VALUE(boxes.device() == groups.device(), "_nms_clusters: boxes on ", boxes.device(), ", groups on ",
                    groups.device());
  TORCH_CHECK_VALUE(iou_threshold >= 0.0 && iou_threshold <= 1.0, "_nms_clusters: iou_threshold must be in [0, 1], "
                    "got ", iou_threshold);
}

namespace {

std::tuple<at::Tensor, at::Tensor> nms_clusters_cpu(const at::Tensor& boxes_in, const at::Tensor& groups_in,
                                                    double iou_threshold) {
  check_nms_clusters_args(boxes_in, groups_in, iou_threshold);
  const at::Tensor boxes = boxes_in.contiguous();
  const at::Tensor groups = groups_in.contiguous();
  const int64_t n = boxes.size(0);
  at::Tensor keep = at::zeros({n}, groups.options().dtype(at::kBool));
  at::Tensor head = at::empty({n}, groups.options());
  bool* keep_p = keep.data_ptr<bool>();
  int64_t* head_p = head.data_ptr<int64_t>();
  const int64_t* group_p = groups.const_data_ptr<int64_t>();
  std::vector<char> removed(static_cast<size_t>(n), 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "_nms_clusters_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* b = boxes.const_data_ptr<scalar_t>();
    const acc_t threshold = acc_t(iou_threshold);
    for (int64_t start = 0, end = 0; start < n; start = end) {
      for (end = start + 1; end < n && group_p[end] == group_p[start];) ++end;
      for (int64_t i = start; i < end; ++i) {
        if (removed[i]) continue;
        keep_p[i] = true;
        head_p[i] = i;
        for (int64_t j = i + 1; j < end; ++j) {
          if (!removed[j] && overlaps_above<acc_t>(b + 4 * i, b + 4 * j, threshold)) {
            removed[j] = 1;
            head_p[j] = i;
          }
        }
      }
    }
  });
  return {keep, head};
}

}  // namespace

TORCH_LIBRARY_IMPL(prroi_d2, CPU, m) { m.impl("_nms_clusters", &nms_clusters_cpu); }

}  // namespace prroi_d2
