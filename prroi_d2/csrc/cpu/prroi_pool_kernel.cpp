// CPU kernels of Precise RoI Pooling (float16, bfloat16, float32, float64), multithreaded with at::parallel_for.
//
// Per box, the bin weights of each axis are computed once (AxisWeights) and every channel reuses them; the
// separable weights make each bin a weighted sum over the pixels it touches, clamped to the map. Sums, boxes and
// gradient buffers are in acc_t (float32 for float16/bfloat16 features, as on CUDA); boxes arrive in acc_t (the
// caller converts them once) and gradients are cast to the inputs' dtypes at the end.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../prroi_pool.h"
#include "../prroi_pool_geometry.h"

namespace prroi_d2 {
namespace {

// For each bin of one axis: the pixels with a non-zero weight, their area weights, and the interpolation weights
// at the bin's two edges (the derivatives of the area weights with respect to the edges).
template <typename T>
struct AxisWeights {
  std::vector<int> first, count;
  std::vector<int64_t> offset;  // the bins' pixels together may exceed 2^31 (up to width + 2 x bins)
  std::vector<T> area, at_lo, at_hi;

  void build(T start, T bin, int bins, int size, bool with_edges) {
    first.resize(bins);
    count.resize(bins);
    offset.resize(bins);
    area.clear();
    at_lo.clear();
    at_hi.clear();
    for (int b = 0; b < bins; ++b) {
      const T lo = start + b * bin;
      const T hi = start + (b + 1) * bin;
      int f, l;
      pixel_range(lo, hi, size, &f, &l);
      first[b] = f;
      count[b] = l >= f ? l - f + 1 : 0;
      offset[b] = static_cast<int64_t>(area.size());
      for (int p = f; p <= l; ++p) {
        area.push_back(cell_weight(lo, hi, p));
        if (with_edges) {
          at_lo.push_back(hat(lo, p));
          at_hi.push_back(hat(hi, p));
        }
      }
    }
  }
};

template <typename scalar_t>
void forward_impl(
    const at::Tensor& features, const at::Tensor& rois, int ph_n, int pw_n, double spatial_scale, bool aligned,
    at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int N = features.size(0), H = features.size(2), W = features.size(3);
  const int64_t C = features.size(1), K = rois.size(0);
  const scalar_t* fdata = features.const_data_ptr<scalar_t>();
  const acc_t* rdata = rois.const_data_ptr<acc_t>();
  scalar_t* out = output.mutable_data_ptr<scalar_t>();
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();

  at::parallel_for(0, K * C, 16, [&](int64_t begin, int64_t end) {
    AxisWeights<acc_t> ax, ay;
    int64_t current_roi = -1;
    RoiGeometry<acc_t> g{};
    for (int64_t kc = begin; kc < end; ++kc) {
      const int64_t k = kc / C, c = kc % C;
      acc_t roi[5];
      for (int t = 0; t < 5; ++t) roi[t] = rdata[k * 5 + t];
      if (k != current_roi) {
        g = decode_roi<acc_t>(roi, spatial_scale, aligned, ph_n, pw_n, N);
        if (g.valid && g.area > 0) {
          ax.build(g.x0, g.bin_w, pw_n, W, false);
          ay.build(g.y0, g.bin_h, ph_n, H, false);
        }
        current_roi = k;
      }
      scalar_t* o = out + kc * (int64_t(ph_n) * pw_n);
      if (!g.valid || !(g.area > 0)) {
        for (int b = 0; b < ph_n * pw_n; ++b) o[b] = g.valid ? scalar_t(0) : scalar_t(nan);
        continue;
      }
      const scalar_t* plane = fdata + (g.batch * C + c) * H * W;
      for (int ph = 0; ph < ph_n; ++ph) {
        for (int pw = 0; pw < pw_n; ++pw) {
          acc_t sum = 0;
          for (int r = 0; r < ay.count[ph]; ++r) {
            const scalar_t* row = plane + int64_t(ay.first[ph] + r) * W + ax.first[pw];
            const acc_t* wx = ax.area.data() + ax.offset[pw];
            acc_t row_sum = 0;
            for (int q = 0; q < ax.count[pw]; ++q) row_sum += wx[q] * acc_t(row[q]);
            sum += ay.area[ay.offset[ph] + r] * row_sum;
          }
          o[ph * pw_n + pw] = scalar_t(sum / g.area);
        }
      }
    }
  });
}

// Scatters grad_output into grad_features (zeroed, acc_t). Parallel over channels, boxes in order: deterministic.
template <typename scalar_t>
void features_backward_impl(
    const at::Tensor& grad, const at::Tensor& rois, int ph_n, int pw_n, double spatial_scale, bool aligned,
    at::Tensor& grad_features) {
  using acc_t = at::opmath_type<scalar_t>;
  const int N = grad_features.size(0), H = grad_features.size(2), W = grad_features.size(3);
  const int64_t C = grad_features.size(1), K = rois.size(0);
  const scalar_t* gdata = grad.const_data_ptr<scalar_t>();
  const acc_t* rdata = rois.const_data_ptr<acc_t>();
  acc_t* gf = grad_features.mutable_data_ptr<acc_t>();

  at::parallel_for(0, C, 1, [&](int64_t c_begin, int64_t c_end) {
    AxisWeights<acc_t> ax, ay;
    for (int64_t k = 0; k < K; ++k) {
      acc_t roi[5];
      for (int t = 0; t < 5; ++t) roi[t] = rdata[k * 5 + t];
      const RoiGeometry<acc_t> g = decode_roi<acc_t>(roi, spatial_scale, aligned, ph_n, pw_n, N);
      if (!g.valid || !(g.area > 0)) continue;
      ax.build(g.x0, g.bin_w, pw_n, W, false);
      ay.build(g.y0, g.bin_h, ph_n, H, false);
      for (int64_t c = c_begin; c < c_end; ++c) {
        const scalar_t* go = gdata + (k * C + c) * ph_n * pw_n;
        acc_t* plane = gf + (g.batch * C + c) * H * W;
        for (int ph = 0; ph < ph_n; ++ph) {
          for (int pw = 0; pw < pw_n; ++pw) {
            const acc_t scale = acc_t(go[ph * pw_n + pw]) / g.area;
            const acc_t* wx = ax.area.data() + ax.offset[pw];
            for (int r = 0; r < ay.count[ph]; ++r) {
              const acc_t wy = scale * ay.area[ay.offset[ph] + r];
              acc_t* row = plane + int64_t(ay.first[ph] + r) * W + ax.first[pw];
              for (int q = 0; q < ax.count[pw]; ++q) row[q] += wy * wx[q];
            }
          }
        }
      }
    }
  });
}

// Gradient of the loss with respect to the four box coordinates (acc_t), one box per task.
template <typename scalar_t>
void rois_backward_impl(
    const at::Tensor& grad, const at::Tensor& features, const at::Tensor& rois, int ph_n, int pw_n,
    double spatial_scale, bool aligned, at::Tensor& grad_rois) {
  using acc_t = at::opmath_type<scalar_t>;
  const int N = features.size(0), H = features.size(2), W = features.size(3);
  const int64_t C = features.size(1), K = rois.size(0);
  const scalar_t* gdata = grad.const_data_ptr<scalar_t>();
  const scalar_t* fdata = features.const_data_ptr<scalar_t>();
  const acc_t* rdata = rois.const_data_ptr<acc_t>();
  acc_t* gr = grad_rois.mutable_data_ptr<acc_t>();
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();

  at::parallel_for(0, K, 1, [&](int64_t k_begin, int64_t k_end) {
    AxisWeights<acc_t> ax, ay;
    for (int64_t k = k_begin; k < k_end; ++k) {
      acc_t roi[5];
      for (int t = 0; t < 5; ++t) roi[t] = rdata[k * 5 + t];
      const RoiGeometry<acc_t> g = decode_roi<acc_t>(roi, spatial_scale, aligned, ph_n, pw_n, N);
      acc_t* out = gr + k * 5;
      out[0] = acc_t(0);
      if (!g.valid || !(g.area > 0)) {
        for (int t = 1; t < 5; ++t) out[t] = g.valid ? acc_t(0) : nan;
        continue;
      }
      ax.build(g.x0, g.bin_w, pw_n, W, true);
      ay.build(g.y0, g.bin_h, ph_n, H, true);
      acc_t d[4] = {0, 0, 0, 0};  // x0, y0, x1, y1
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* plane = fdata + (g.batch * C + c) * H * W;
        const scalar_t* go = gdata + (k * C + c) * ph_n * pw_n;
        for (int ph = 0; ph < ph_n; ++ph) {
          for (int pw = 0; pw < pw_n; ++pw) {
            const acc_t gout = acc_t(go[ph * pw_n + pw]);
            if (gout == acc_t(0)) continue;
            // S: the bin integral; s_*: its derivatives with respect to the bin's edges.
            acc_t s = 0, s_xlo = 0, s_xhi = 0, s_ylo = 0, s_yhi = 0;
            const int xo = ax.offset[pw], yo = ay.offset[ph];
            for (int r = 0; r < ay.count[ph]; ++r) {
              const scalar_t* row = plane + int64_t(ay.first[ph] + r) * W + ax.first[pw];
              acc_t row_area = 0, row_lo = 0, row_hi = 0;
              for (int q = 0; q < ax.count[pw]; ++q) {
                const acc_t v = acc_t(row[q]);
                row_area += ax.area[xo + q] * v;
                row_lo += ax.at_lo[xo + q] * v;
                row_hi += ax.at_hi[xo + q] * v;
              }
              const acc_t wy = ay.area[yo + r];
              s += wy * row_area;
              s_xlo -= wy * row_lo;
              s_xhi += wy * row_hi;
              s_ylo -= ay.at_lo[yo + r] * row_area;
              s_yhi += ay.at_hi[yo + r] * row_area;
            }
            add_box_gradient(g, ph, pw, ph_n, pw_n, gout, s, s_xlo, s_xhi, s_ylo, s_yhi, d);
          }
        }
      }
      const acc_t s = acc_t(spatial_scale);
      for (int t = 0; t < 4; ++t) out[t + 1] = d[t] * s;
    }
  });
}

// Raises on a batch index that is not an integer in [0, N): the CPU path checks, the CUDA path cannot without a sync.
void check_batch_indices(const at::Tensor& rois, int64_t batch_size) {
  if (rois.size(0) == 0) return;
  const at::Tensor b = rois.select(1, 0);
  const bool ok = at::logical_and(at::logical_and(b >= 0, b < batch_size), b == at::floor(b)).all().item<bool>();
  if (!ok) {
    const at::Tensor bad = at::logical_not(
        at::logical_and(at::logical_and(b >= 0, b < batch_size), b == at::floor(b))).nonzero().select(1, 0);
    const int64_t i = bad[0].item<int64_t>();
    TORCH_CHECK_VALUE(false, "prroi_pool2d: rois[", i, ", 0] (batch index) is ", b[i].item<double>(),
                      ", not an integer in [0, ", batch_size, ")");
  }
}

at::Tensor forward_cpu(
    const at::Tensor& features, const at::Tensor& rois, int64_t pooled_height, int64_t pooled_width,
    double spatial_scale, bool aligned) {
  detail::check_forward_args(features, rois, pooled_height, pooled_width, spatial_scale);
  check_batch_indices(rois, features.size(0));
  at::Tensor output = at::empty({rois.size(0), features.size(1), pooled_height, pooled_width}, features.options());
  if (output.numel() == 0) return output;
  const at::Tensor f = features.contiguous();
  const at::Tensor r = rois.to(box_dtype(features.scalar_type())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "prroi_pool2d_forward_cpu", [&] {
    forward_impl<scalar_t>(f, r, pooled_height, pooled_width, spatial_scale, aligned, output);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& features, const at::Tensor& rois, int64_t pooled_height,
    int64_t pooled_width, double spatial_scale, bool aligned, bool features_requires_grad, bool rois_requires_grad) {
  detail::check_backward_args(grad_output, features, rois, pooled_height, pooled_width, spatial_scale);
  check_batch_indices(rois, features.size(0));
  const at::ScalarType acc_dtype = box_dtype(features.scalar_type());
  const at::Tensor g = grad_output.contiguous();
  const at::Tensor r = rois.to(acc_dtype).contiguous();
  // Gradients are summed in acc_t buffers (the features' own for float32/float64) and cast to the inputs' dtypes.
  at::Tensor grad_features = features_requires_grad
      ? at::zeros(features.sizes(), features.options().dtype(acc_dtype))
      : at::empty({0}, features.options());
  at::Tensor grad_rois = rois_requires_grad ? at::empty({rois.size(0), 5}, rois.options().dtype(acc_dtype))
                                            : at::empty({0}, rois.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "prroi_pool2d_backward_cpu", [&] {
    if (features_requires_grad && g.numel() > 0) {
      features_backward_impl<scalar_t>(g, r, pooled_height, pooled_width, spatial_scale, aligned, grad_features);
    }
    if (rois_requires_grad && rois.size(0) > 0) {
      if (features.size(1) == 0) {
        grad_rois.zero_();
      } else {
        rois_backward_impl<scalar_t>(g, features.contiguous(), r, pooled_height, pooled_width, spatial_scale,
                                     aligned, grad_rois);
      }
    }
  });
  return {grad_features.to(features.scalar_type()), grad_rois.to(rois.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(prroi_d2, CPU, m) {
  m.impl("prroi_pool2d", &forward_cpu);
  m.impl("_prroi_pool2d_backward", &backward_cpu);
}

}  // namespace prroi_d2
