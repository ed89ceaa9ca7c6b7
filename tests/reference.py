"""Float64 reference of Precise RoI Pooling by numeric integration, written for the tests.

The pooled value of a bin is the mean over the bin of the bilinearly interpolated feature map

    f(x, y) = bilinear interpolation of the four pixels around (x, y), pixel (i, j) at x = j, y = i,
              pixels outside the map counted as 0 (so f vanishes outside (-1, W) x (-1, H)).

On every unit cell [m, m + 1] x [n, n + 1] the map is a polynomial of degree <= 1 in x and in y, so Gauss-Legendre
quadrature with 2 nodes per axis on each piece of the bin cut at the integer coordinates is exact (up to rounding).
Nothing here shares code or formulas with the op: f is evaluated point by point from its four corner pixels.
"""

import itertools
import math

import torch
from torch import Tensor

__all__ = ["bin_edges", "decode_box", "forward_backward", "reference_box_iou", "reference_prroi_pool"]

# 2-point Gauss-Legendre rule on [-1, 1]: exact for polynomials of degree <= 3.
_GL_NODES = (-1.0 / math.sqrt(3.0), 1.0 / math.sqrt(3.0))
_GL_WEIGHTS = (1.0, 1.0)


def decode_box(roi, spatial_scale: float, aligned: bool) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of one roi row in feature-map pixels, as Python floats (float64)."""
    shift = 0.5 if aligned else 0.0
    x0, y0, x1, y1 = (float(v) * spatial_scale - shift for v in roi[1:5])
    return x0, y0, x1, y1


def bin_edges(start: float, stop: float, bins: int) -> list[tuple[float, float]]:
    """Intervals of the ``bins`` equal parts of [start, stop]; all of zero length when stop <= start."""
    step = max(stop - start, 0.0) / bins
    return [(start + k * step, start + (k + 1) * step) for k in range(bins)]


def _quadrature(lo: float, hi: float, size: int) -> tuple[list[float], list[float]]:
    """Nodes and weights integrating exactly over [lo, hi] any function that is linear on each unit cell and zero
    outside (-1, size). The interval is clipped to [-1, size] and cut at every integer inside it."""
    a = max(lo, -1.0)
    b = min(hi, float(size))
    nodes: list[float] = []
    weights: list[float] = []
    if not b > a:
        return nodes, weights
    cuts = [a] + [float(m) for m in range(math.floor(a) + 1, math.ceil(b))] + [b]
    for left, right in itertools.pairwise(cuts):
        if not right > left:
            continue
        mid, half = 0.5 * (left + right), 0.5 * (right - left)
        for t, w in zip(_GL_NODES, _GL_WEIGHTS):
            nodes.append(mid + half * t)
            weights.append(half * w)
    return nodes, weights


def _axis_rule(bins: list[tuple[float, float]], size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Quadrature rules of all bins of one axis, padded to a common length with zero weights.

    Returns nodes (bins, M), weights (bins, M) and bin lengths (bins,).
    """
    rules = [_quadrature(lo, hi, size) for lo, hi in bins]
    m = max(1, max(len(nodes) for nodes, _ in rules))
    nodes = torch.zeros(len(bins), m, dtype=torch.float64)
    weights = torch.zeros(len(bins), m, dtype=torch.float64)
    for p, (n, w) in enumerate(rules):
        nodes[p, : len(n)] = torch.tensor(n, dtype=torch.float64)
        weights[p, : len(w)] = torch.tensor(w, dtype=torch.float64)
    lengths = torch.tensor([hi - lo for lo, hi in bins], dtype=torch.float64)
    return nodes, weights, lengths


def _interpolate(plane: Tensor, ys: Tensor, xs: Tensor) -> Tensor:
    """f at every (ys[p], xs[q]) by bilinear interpolation of the four neighbouring pixels, zero outside the map.

    plane: (C, H, W) float64; ys: (P,), xs: (Q,) -> (C, P, Q).
    """
    C, H, W = plane.shape
    padded = torch.zeros(C, H + 2, W + 2, dtype=torch.float64)
    padded[:, 1:-1, 1:-1] = plane  # pixel (i, j) at padded[i + 1, j + 1]
    iy = torch.floor(ys).clamp(-1, H - 1)
    ix = torch.floor(xs).clamp(-1, W - 1)
    ty = (ys - iy)[:, None]
    tx = (xs - ix)[None, :]
    r0 = iy.long() + 1
    c0 = ix.long() + 1
    top_left = padded[:, r0][:, :, c0]
    top_right = padded[:, r0][:, :, c0 + 1]
    bottom_left = padded[:, r0 + 1][:, :, c0]
    bottom_right = padded[:, r0 + 1][:, :, c0 + 1]
    return (
        (1 - ty) * (1 - tx) * top_left
        + (1 - ty) * tx * top_right
        + ty * (1 - tx) * bottom_left
        + ty * tx * bottom_right
    )


def reference_prroi_pool(
    features: Tensor,
    rois: Tensor,
    pooled_height: int,
    pooled_width: int,
    spatial_scale: float,
    aligned: bool = False,
) -> Tensor:
    """(K, C, pooled_height, pooled_width) float64 reference.

    A box with a non-finite coordinate (or a batch index that is not an integer in [0, N)) gives NaN; a bin of zero
    area gives 0.
    """
    feats = features.detach().to(torch.float64).cpu()
    boxes = rois.detach().to(torch.float64).cpu()
    N, C, H, W = feats.shape
    K = boxes.shape[0]
    out = torch.zeros(K, C, pooled_height, pooled_width, dtype=torch.float64)
    for k in range(K):
        row = boxes[k].tolist()
        b = row[0]
        x0, y0, x1, y1 = decode_box(row, spatial_scale, aligned)
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or not (0 <= b < N and b == math.floor(b)):
            out[k] = float("nan")
            continue
        plane = feats[int(b)]
        ys, wy, len_y = _axis_rule(bin_edges(y0, y1, pooled_height), H)
        xs, wx, len_x = _axis_rule(bin_edges(x0, x1, pooled_width), W)
        values = _interpolate(plane, ys.reshape(-1), xs.reshape(-1))
        values = values.reshape(C, pooled_height, ys.shape[1], pooled_width, xs.shape[1])
        integral = torch.einsum("cpmqn,pm,qn->cpq", values, wy, wx)
        area = len_y[:, None] * len_x[None, :]
        out[k] = torch.where(area > 0, integral / torch.where(area > 0, area, 1.0), 0.0)
    return out


def reference_box_iou(a, b) -> float:
    """IoU of two XYXY boxes (sequences of 4 floats), written out in float64; 0 when the union is empty."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference_true_iou(annotations, image_id, category_id, box) -> float:
    """Best IoU of ``box`` (XYWH) with a non-crowd ground truth (COCO ``annotations``) of the image and category, in
    plain Python floats; 0 when there is none."""
    x, y, w, h = (float(v) for v in box)
    best = 0.0
    for ann in annotations:
        if ann["image_id"] != image_id or ann["category_id"] != category_id or ann["iscrowd"]:
            continue
        gx, gy, gw, gh = (float(v) for v in ann["bbox"])
        iw = max(0.0, min(x + w, gx + gw) - max(x, gx))
        ih = max(0.0, min(y + h, gy + gh) - max(y, gy))
        union = w * h + gw * gh - iw * ih
        best = max(best, iw * ih / union if union > 0 else 0.0)
    return best


def random_features(shape, dtype=torch.float64, device="cpu", seed=0) -> Tensor:
    """Standard-normal features of ``shape``, drawn in float64 from ``seed`` (the same values for every dtype)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def forward_backward(fn, features: Tensor, rois: Tensor, grad_out: Tensor):
    """``fn(features, rois)`` on fresh leaves, backward of ``grad_out``: (output, features grad, rois grad)."""
    features = features.detach().requires_grad_(True)
    rois = rois.detach().requires_grad_(True)
    out = fn(features, rois)
    out.backward(grad_out)
    return out.detach(), features.grad, rois.grad


def assert_baseline_stage_equals_stock(model, stock, batch) -> list:
    """Run IoU-Net ``model`` and the stock detector ``stock`` (eval mode) on ``batch``; assert that every image's
    ``baseline`` stage equals the stock detector's output exactly (boxes, scores, classes). Returns the baseline
    ``Instances`` per image."""
    with torch.no_grad():
        ours = model(batch)
        theirs = stock(batch)
    baselines = []
    for a, b in zip(ours, theirs):
        base, ref = a["stages"]["baseline"], b["instances"]
        assert len(ref) > 3
        torch.testing.assert_close(base.pred_boxes.tensor, ref.pred_boxes.tensor, rtol=0, atol=0)
        torch.testing.assert_close(base.scores, ref.scores, rtol=0, atol=0)
        assert torch.equal(base.pred_classes, ref.pred_classes)
        baselines.append(base)
    return baselines
