// Geometry of Precise RoI Pooling shared by the CPU and CUDA kernels.
//
// The feature map is the bilinear interpolation of its pixels, pixel (i, j) at x = j, y = i, zero outside the grid:
//   f(x, y) = sum_ij F[i, j] * hat(x - j) * hat(y - i),   hat(t) = max(0, 1 - |t|).
// The integral of f over a bin [x_lo, x_hi] x [y_lo, y_hi] is separable:
//   S = sum_ij F[i, j] * wy_i * wx_j,   wx_j = integral of hat(x - j) over [x_lo, x_hi],
// and only pixels j in [floor(x_lo), ceil(x_hi)] have a non-zero weight, which bounds every loop by the map size.
// Derivatives of the weights with respect to the bin edges are hat values: d wx_j / d x_hi = hat(x_hi - j),
// d wx_j / d x_lo = -hat(x_lo - j).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define PRROI_HD __host__ __device__ __forceinline__
#else
#define PRROI_HD inline
#endif

namespace prroi_d2 {

// integral of (1 - |t|) over [a, b], for -1 <= a <= b <= 1.
template <typename T>
PRROI_HD T hat_integral(T a, T b) {
  return (b - a) - (b * std::abs(b) - a * std::abs(a)) * T(0.5);
}

// Weight of pixel `j` in the integral over [lo, hi] of the interpolated line.
template <typename T>
PRROI_HD T cell_weight(T lo, T hi, int j) {
  const T a = lo - T(j) < T(-1) ? T(-1) : lo - T(j);
  const T b = hi - T(j) > T(1) ? T(1) : hi - T(j);
  return b > a ? hat_integral(a, b) : T(0);
}

// hat(x - j): the interpolation weight of pixel `j` at position x.
template <typename T>
PRROI_HD T hat(T x, int j) {
  const T d = std::abs(x - T(j));
  return d < T(1) ? T(1) - d : T(0);
}

// First and last pixel index in [0, size) with a non-zero weight over [lo, hi]; first > last when none.
// Clamping happens in floating point, so huge or far-outside coordinates never overflow an int.
template <typename T>
PRROI_HD void pixel_range(T lo, T hi, int size, int* first, int* last) {
  T f = std::floor(lo);
  T l = std::ceil(hi);
  f = f < T(0) ? T(0) : (f > T(size) ? T(size) : f);
  l = l > T(size - 1) ? T(size - 1) : (l < T(-1) ? T(-1) : l);
  *first = static_cast<int>(f);
  *last = static_cast<int>(l);
}

// A box decoded into feature-map pixels. `valid` is false for a non-finite coordinate, width or height, or, where the caller asks
// for it, a batch index that is not an integer in [0, batch_size).
template <typename T>
struct RoiGeometry {
  T x0, y0;          // top-left corner in map pixels
  T bin_w, bin_h;    // bin size (>= 0; 0 for inverted or empty boxes)
  T area;            // bin_w * bin_h
  int batch;
  bool valid;
};

template <typename T>
PRROI_HD RoiGeometry<T> decode_roi(
    const T* roi, T spatial_scale, bool aligned, int pooled_height, int pooled_width, int batch_size) {
  RoiGeometry<T> g;
  const T offset = aligned ? T(0.5) : T(0);
  const T b = roi[0];
  const T x0 = roi[1] * spatial_scale - offset;
  const T y0 = roi[2] * spatial_scale - offset;
  const T x1 = roi[3] * spatial_scale - offset;
  const T y1 = roi[4] * spatial_scale - offset;
  // A finite box whose width or height overflows counts as non-finite too.
  g.valid = std::isfinite(x1 - x0) && std::isfinite(y1 - y0) && b >= T(0) && b < T(batch_size) &&
      std::floor(b) == b;
  g.batch = g.valid ? static_cast<int>(b) : 0;
  g.x0 = x0;
  g.y0 = y0;
  const T w = x1 - x0;
  const T h = y1 - y0;
  g.bin_w = (w > T(0) ? w : T(0)) / T(pooled_width);
  g.bin_h = (h > T(0) ? h : T(0)) / T(pooled_height);
  g.area = g.bin_w * g.bin_h;
  return g;
}

// One bin of a box: its edges and the pixels with a non-zero weight, rows i0 .. i0 + ni - 1 and columns
// j0 .. j0 + nj - 1 (clamped to the map; ni or nj <= 0 when the bin lies outside it).
template <typename T>
struct BinWindow {
  T x_lo, x_hi, y_lo, y_hi;
  int i0, j0, ni, nj;
};

template <typename T>
PRROI_HD BinWindow<T> bin_window(const RoiGeometry<T>& g, int ph, int pw, int height, int width) {
  BinWindow<T> b;
  b.x_lo = g.x0 + pw * g.bin_w;
  b.x_hi = g.x0 + (pw + 1) * g.bin_w;
  b.y_lo = g.y0 + ph * g.bin_h;
  b.y_hi = g.y0 + (ph + 1) * g.bin_h;
  int i1, j1;
  pixel_range(b.x_lo, b.x_hi, width, &b.j0, &j1);
  pixel_range(b.y_lo, b.y_hi, height, &b.i0, &i1);
  b.nj = j1 - b.j0 + 1;
  b.ni = i1 - b.i0 + 1;
  return b;
}

// Chain rule from one bin to its box. `s` is the bin integral and `s_*` its derivatives with respect to the bin
// edges; `go` is dL/d(output of the bin). Adds dL/d(x0, y0, x1, y1) of the box, in map pixels, to `d[0..3]`.
// out = S / (bin_w * bin_h) with the four edges independent; x_lo = x0 + pw * (x1 - x0) / PW, x_hi likewise.
template <typename T>
PRROI_HD void add_box_gradient(
    const RoiGeometry<T>& g, int ph, int pw, int ph_n, int pw_n, T go, T s, T s_xlo, T s_xhi, T s_ylo, T s_yhi,
    T* d) {
  const T out = s / g.area;
  const T g_xlo = go * (s_xlo / g.area + out / g.bin_w);
  const T g_xhi = go * (s_xhi / g.area - out / g.bin_w);
  const T g_ylo = go * (s_ylo / g.area + out / g.bin_h);
  const T g_yhi = go * (s_yhi / g.area - out / g.bin_h);
  const T tx_lo = T(pw) / pw_n, tx_hi = T(pw + 1) / pw_n;
  const T ty_lo = T(ph) / ph_n, ty_hi = T(ph + 1) / ph_n;
  d[0] += g_xlo * (1 - tx_lo) + g_xhi * (1 - tx_hi);
  d[1] += g_ylo * (1 - ty_lo) + g_yhi * (1 - ty_hi);
  d[2] += g_xlo * tx_lo + g_xhi * tx_hi;
  d[3] += g_ylo * ty_lo + g_yhi * ty_hi;
}

}  // namespace prroi_d2
