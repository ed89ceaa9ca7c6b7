"""Tests of the Precise RoI Pooling op (prroi_d2.functional / modules / torch.ops.prroi_d2.*).

Values are checked against ``reference.py`` (float64 numeric integration of the bilinear map, independent of the
op's closed form) and against properties that need no reference. Tests marked ``cuda`` run only with a GPU.
"""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from reference import forward_backward, random_features, reference_prroi_pool

import prroi_d2
from prroi_d2 import PrRoIPool, PrRoIPool2D, prroi_pool, prroi_pool2d

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OP = torch.ops.prroi_d2.prroi_pool2d
BACKWARD_OP = torch.ops.prroi_d2._prroi_pool2d_backward

N, C, H, W = 2, 3, 9, 11
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
F64 = torch.float64
F32 = torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------
def make_features(shape=(N, C, H, W), dtype=F64, device="cpu", seed=0):
    return random_features(shape, dtype, device, seed)


def random_rois(per_kind, batch=N, height=H, width=W, spatial_scale=1.0, seed=0, dtype=F64, device="cpu"):
    """Boxes of every kind, returned as ((K, 5) rois in input coordinates, per-row kind names).

    Kinds, in map pixels: tiny (< 1 px), medium, larger than the map, partly outside on either side, fully outside,
    inverted (x1 < x0), and boxes with integer corners (edges on the interpolation kinks).
    """
    g = torch.Generator().manual_seed(seed)

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(per_kind, generator=g, dtype=F64)

    def ints(lo, hi):
        return torch.randint(lo, hi, (per_kind,), generator=g).to(F64)

    parts, kinds = [], []

    def add(kind, x0, y0, w, h):
        b = torch.randint(0, batch, (per_kind,), generator=g).to(F64)
        parts.append(torch.stack([b, x0, y0, x0 + w, y0 + h], dim=1))
        kinds.extend([kind] * per_kind)

    add("tiny", u(-1.5, width), u(-1.5, height), u(0.01, 1.0), u(0.01, 1.0))
    add("medium", u(-1, width - 1), u(-1, height - 1), u(1, 5), u(1, 5))
    add("large", u(-8, 0), u(-8, 0), u(width + 1, 2 * width + 8), u(height + 1, 2 * height + 8))
    add("outside_left", u(-4, -1.2), u(-3, height), u(0.2, 2.5), u(0.5, 4))
    add("outside_bottom_right", u(width - 2, width + 0.5), u(height - 2, height + 0.5), u(0.5, 4), u(0.5, 4))
    add("fully_outside", u(width + 0.01, width + 5), u(-3, height), u(0.1, 3), u(0.1, 3))
    add("inverted", u(0, width), u(0, height), -u(0.1, 3), u(0.5, 3))
    add("integer", ints(-2, width + 1), ints(-2, height + 1), ints(0, 5), ints(1, 5))
    rois = torch.cat(parts)
    rois[:, 1:] /= spatial_scale
    return rois.to(dtype=dtype, device=device), kinds


def with_index(boxes, batch_index=0.0):
    """(K, 4) boxes -> (K, 5) rois with a constant batch index, keeping the autograd graph of ``boxes``."""
    return torch.cat([torch.full_like(boxes[:, :1], batch_index), boxes], dim=1)


def kink_free_boxes(count, height, width, pooled_height, pooled_width, spatial_scale, aligned, seed, margin=0.03):
    """(count, 4) boxes (input coordinates) whose every bin edge lies at least ``margin`` px from an integer in map
    pixels, so that the pooled value is smooth around them (the interpolated map has kinks at integers)."""
    g = torch.Generator().manual_seed(seed)
    shift = 0.5 if aligned else 0.0
    boxes = []
    while len(boxes) < count:
        x0, y0 = (-2 + (s + 2) * torch.rand(1, generator=g, dtype=F64).item() for s in (width, height))
        w, h = (0.6 + 5 * torch.rand(1, generator=g, dtype=F64).item() for _ in range(2))
        edges_x = [x0 + k * w / pooled_width for k in range(pooled_width + 1)]
        edges_y = [y0 + k * h / pooled_height for k in range(pooled_height + 1)]
        if all(abs(e - round(e)) > margin for e in edges_x + edges_y):
            boxes.append([(v + shift) / spatial_scale for v in (x0, y0, x0 + w, y0 + h)])
    return torch.tensor(boxes, dtype=F64)


def inside_boxes(count, height, width, seed, min_size=0.3):
    """(count, 4) boxes in map pixels lying inside [0, width - 1] x [0, height - 1], where the map is interior."""
    g = torch.Generator().manual_seed(seed)
    w = min_size + (width - 1 - min_size) * torch.rand(count, generator=g, dtype=F64)
    h = min_size + (height - 1 - min_size) * torch.rand(count, generator=g, dtype=F64)
    x0 = (width - 1 - w) * torch.rand(count, generator=g, dtype=F64)
    y0 = (height - 1 - h) * torch.rand(count, generator=g, dtype=F64)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def batch_column(count, batch, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, batch, (count, 1), generator=g).to(F64)


def tol(dtype):
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == F64 else {"rtol": 1e-5, "atol": 2e-5}


# ---------------------------------------------------------------------------------------------------------------
# Against the reference
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize(
    "spatial_scale, pooled", [(1.0, (7, 7)), (0.5, (3, 5)), (0.25, (1, 4)), (1 / 3, (2, 1)), (2.0, (4, 3))]
)
def test_matches_reference(device, dtype, aligned, spatial_scale, pooled):
    features = make_features(dtype=dtype, device=device, seed=1)
    rois, kinds = random_rois(5, spatial_scale=spatial_scale, seed=2, dtype=dtype, device=device)
    out = prroi_pool2d(features, rois, pooled[0], pooled[1], spatial_scale, aligned)
    assert out.shape == (rois.shape[0], C) + pooled and out.dtype == dtype and out.device.type == device
    assert out.is_contiguous()
    # the reference integrates the inputs as the op sees them (rounded to dtype)
    expected = reference_prroi_pool(features, rois, pooled[0], pooled[1], spatial_scale, aligned)
    got = out.double().cpu()
    tiny = torch.tensor([k == "tiny" for k in kinds])
    torch.testing.assert_close(got[~tiny], expected[~tiny], **tol(dtype))
    # float32 loses digits when a bin is a small fraction of a pixel (the bin integral cancels); float64 does not
    tiny_tol = tol(dtype) if dtype == F64 else {"rtol": 1e-4, "atol": 2e-4}
    torch.testing.assert_close(got[tiny], expected[tiny], **tiny_tol)
    for kind in ("fully_outside", "inverted"):
        rows = torch.tensor([k == kind for k in kinds])
        assert torch.all(got[rows] == 0), kind


def test_reference_is_exact_on_simple_cases():
    """Sanity of the reference itself on hand-computed values."""
    features = torch.zeros(1, 1, 3, 3, dtype=F64)
    features[0, 0, 1, 1] = 1.0  # a single hat of unit integral centred at (1, 1)
    rois = torch.tensor([[0, -1, -1, 3, 3], [0, 1, 1, 2, 2], [0, 0.5, 0.5, 1.5, 1.5]], dtype=F64)
    out = reference_prroi_pool(features, rois, 1, 1, 1.0)
    # whole support: 1 / 16; one quarter of the hat (integral 1/4 over a unit cell); the central cell
    # [0.5, 1.5]^2 holds (integral of hat over [-0.5, 0.5])^2 = (3/4)^2
    torch.testing.assert_close(out.flatten(), torch.tensor([1 / 16, 1 / 4, 9 / 16], dtype=F64), rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------------------------
# Properties that need no reference
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aligned", [False, True])
def test_constant_features_give_the_constant(device, aligned):
    value = -1.75
    features = torch.full((N, C, H, W), value, dtype=F64, device=device)
    boxes = inside_boxes(40, H, W, seed=3) + (0.5 if aligned else 0.0)
    rois = torch.cat([batch_column(40, N, 4), boxes], dim=1).to(device)
    out = prroi_pool2d(features, rois, 3, 4, 1.0, aligned)
    torch.testing.assert_close(out, torch.full_like(out, value), rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aligned", [False, True])
def test_linear_features_give_the_value_at_the_bin_centre(device, aligned):
    g = torch.Generator().manual_seed(5)
    a, b, c = (torch.randn(N, C, 1, 1, generator=g, dtype=F64) for _ in range(3))
    y = torch.arange(H, dtype=F64)[:, None]
    x = torch.arange(W, dtype=F64)[None, :]
    features = (a * x + b * y + c).to(device)
    K, ph, pw = 30, 3, 5
    boxes = inside_boxes(K, H, W, seed=6)
    batch = batch_column(K, N, 7)
    shift = 0.5 if aligned else 0.0
    out = prroi_pool2d(features, torch.cat([batch, boxes + shift], dim=1).to(device), ph, pw, 1.0, aligned).cpu()
    x0, y0, x1, y1 = boxes.unbind(1)
    cx = x0[:, None] + (torch.arange(pw, dtype=F64) + 0.5) * ((x1 - x0) / pw)[:, None]  # (K, pw)
    cy = y0[:, None] + (torch.arange(ph, dtype=F64) + 0.5) * ((y1 - y0) / ph)[:, None]  # (K, ph)
    idx = batch[:, 0].long()
    expected = (
        a[idx].view(K, C, 1, 1) * cx[:, None, None, :]
        + b[idx].view(K, C, 1, 1) * cy[:, None, :, None]
        + c[idx].view(K, C, 1, 1)
    )
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5])
def test_unit_cell_bins_equal_avg_pool2d(device, aligned, spatial_scale):
    """A bin [j, j + 1] x [i, i + 1] averages the bilinear patch of pixels (i..i+1, j..j+1): its value is the mean
    of those four pixels, i.e. avg_pool2d(kernel_size=2, stride=1)[i, j]."""
    features = make_features(device=device, seed=8)
    expected = F.avg_pool2d(features, kernel_size=2, stride=1)  # (N, C, H - 1, W - 1)
    shift = 0.5 if aligned else 0.0
    ii, jj, nn_ = torch.meshgrid(torch.arange(H - 1), torch.arange(W - 1), torch.arange(N), indexing="ij")
    ii, jj, nn_ = ii.flatten().to(F64), jj.flatten().to(F64), nn_.flatten().to(F64)
    # one 1x1 bin per cell
    boxes = torch.stack([jj, ii, jj + 1, ii + 1], dim=1)
    rois = torch.cat([nn_[:, None], (boxes + shift) / spatial_scale], dim=1).to(device)
    out = prroi_pool2d(features, rois, 1, 1, spatial_scale, aligned)
    want = expected[nn_.long(), :, ii.long(), jj.long()]  # (K, C)
    torch.testing.assert_close(out[:, :, 0, 0], want, rtol=1e-12, atol=1e-12)
    # 2x2 bins of a 2x2-cell box, 3x2 bins of a 3x2-cell box
    for ph, pw in ((2, 2), (3, 2)):
        keep = (ii <= H - 1 - ph) & (jj <= W - 1 - pw)
        i, j, n = ii[keep], jj[keep], nn_[keep]
        boxes = torch.stack([j, i, j + pw, i + ph], dim=1)
        rois = torch.cat([n[:, None], (boxes + shift) / spatial_scale], dim=1).to(device)
        out = prroi_pool2d(features, rois, ph, pw, spatial_scale, aligned)
        for p in range(ph):
            for q in range(pw):
                want = expected[n.long(), :, i.long() + p, j.long() + q]
                torch.testing.assert_close(out[:, :, p, q], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_whole_support_gives_sum_over_area(device):
    """Every pixel's hat integrates to 1 over the plane, so a box holding (-1, W) x (-1, H) integrates to sum(F)."""
    features = make_features(device=device, seed=9)
    rois = torch.tensor([[0, -1, -1, W, H], [1, -1, -1, W, H], [1, -6.5, -3.25, W + 2, H + 4.5]], dtype=F64)
    out = prroi_pool2d(features, rois.to(device), 1, 1, 1.0).cpu()[:, :, 0, 0]
    total = features.sum(dim=(2, 3)).cpu()
    area = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
    expected = total[rois[:, 0].long()] / area[:, None]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aligned", [False, True])
def test_bins_equal_their_own_1x1_boxes(device, aligned):
    features = make_features(device=device, seed=10)
    rois, _ = random_rois(3, seed=11, spatial_scale=0.5)
    rois = rois[(rois[:, 3] > rois[:, 1]) & (rois[:, 4] > rois[:, 2])]
    ph, pw = 3, 4
    out = prroi_pool2d(features, rois.to(device), ph, pw, 0.5, aligned).cpu()
    b, x0, y0, x1, y1 = rois.unbind(1)
    for p in range(ph):
        for q in range(pw):
            sub = torch.stack(
                [
                    b,
                    x0 + q * (x1 - x0) / pw,
                    y0 + p * (y1 - y0) / ph,
                    x0 + (q + 1) * (x1 - x0) / pw,
                    y0 + (p + 1) * (y1 - y0) / ph,
                ],
                dim=1,
            )
            single = prroi_pool2d(features, sub.to(device), 1, 1, 0.5, aligned).cpu()
            torch.testing.assert_close(out[:, :, p, q], single[:, :, 0, 0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_spatial_scale_and_aligned_are_coordinate_maps(device):
    features = make_features(device=device, seed=12)
    rois, _ = random_rois(3, seed=13)
    rois = rois.to(device)
    scale = 0.25
    scaled = torch.cat([rois[:, :1], rois[:, 1:] / scale], dim=1)
    base = prroi_pool2d(features, rois, 2, 3, 1.0, False)
    torch.testing.assert_close(prroi_pool2d(features, scaled, 2, 3, scale, False), base, rtol=1e-12, atol=1e-12)
    shifted = torch.cat([rois[:, :1], (rois[:, 1:] + 0.5) / scale], dim=1)
    torch.testing.assert_close(prroi_pool2d(features, shifted, 2, 3, scale, True), base, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_output_is_continuous_in_the_box(device):
    """Moving a box by 1e-7 px changes the output by O(1e-7), also across integer coordinates."""
    features = make_features(device=device, seed=14)
    rois = torch.tensor([[0, 2.0, 3.0, 6.0, 7.0], [1, -1.0, 0.0, 4.0, 1.0]], dtype=F64, device=device)
    out = prroi_pool2d(features, rois, 2, 2, 1.0)
    for delta in (1e-7, -1e-7):
        moved = rois.clone()
        moved[:, 1:] += delta
        assert (prroi_pool2d(features, moved, 2, 2, 1.0) - out).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("features_grad", [True, False])
def test_gradcheck(device, aligned, features_grad):
    n, c, h, w = 2, 2, 5, 6
    ph, pw, scale = 2, 3, 0.5
    features = make_features((n, c, h, w), device=device, seed=15).requires_grad_(features_grad)
    boxes = kink_free_boxes(4, h, w, ph, pw, scale, aligned, seed=16)
    # plus an inverted box and one fully outside the map: both pool to 0 around these coordinates
    extra = torch.tensor([[4.0, 3.0, 2.2, 6.4], [2 * w + 4.3, 1.3, 2 * w + 9.1, 5.7]], dtype=F64)
    boxes = torch.cat([boxes, extra]).to(device).requires_grad_(True)
    batch = torch.tensor([[0.0], [1.0], [1.0], [0.0], [1.0], [0.0]], dtype=F64, device=device)

    def fn(*inputs):
        b = inputs[-1]
        f = inputs[0] if features_grad else features
        return prroi_pool2d(f, torch.cat([batch, b], dim=1), ph, pw, scale, aligned)

    inputs = (features, boxes) if features_grad else (boxes,)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_batch_index_gradient_is_zero_and_features_grad_skipped(device):
    features = make_features(device=device, seed=17)
    rois = torch.cat([batch_column(5, N, 18), kink_free_boxes(5, H, W, 2, 2, 1.0, False, seed=18)], dim=1)
    rois = rois.to(device).requires_grad_(True)
    grad_out = make_features((5, C, 2, 2), device=device, seed=19)
    prroi_pool2d(features, rois, 2, 2, 1.0).backward(grad_out)
    assert features.grad is None
    assert torch.all(rois.grad[:, 0] == 0)
    assert rois.grad[:, 1:].abs().sum() > 0
    coords_only = rois.grad.clone()
    # the same coordinate gradient when the features require a gradient as well
    rois.grad = None
    features.requires_grad_(True)
    prroi_pool2d(features, rois, 2, 2, 1.0).backward(grad_out)
    torch.testing.assert_close(rois.grad, coords_only, rtol=1e-12, atol=1e-12)
    # the raw backward op computes only what is asked for
    for need_f, need_r in ((True, False), (False, True), (True, True)):
        gf, gr = BACKWARD_OP(grad_out, features.detach(), rois.detach(), 2, 2, 1.0, False, need_f, need_r)
        assert (gf.numel() > 0) == need_f and (gr.numel() > 0) == need_r
        if need_r:
            torch.testing.assert_close(gr, coords_only, rtol=1e-12, atol=1e-12)
        if need_f:
            torch.testing.assert_close(gf, features.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_feature_gradient_is_the_adjoint_of_the_reference(device):
    """The op is linear in the features: <pool(F), G> = <F, grad_F>, checked with the reference's forward."""
    features = make_features(device=device, seed=20).requires_grad_(True)
    rois, _ = random_rois(2, seed=21)
    grad_out = make_features((rois.shape[0], C, 3, 2), seed=22)
    prroi_pool2d(features, rois.to(device), 3, 2, 1.0, True).backward(grad_out.to(device))
    # the gradient of each feature pixel: pool the unit impulse at that pixel
    for n, i, j in ((0, 0, 0), (1, 4, 5), (0, 8, 10), (1, 3, 0)):
        impulse = torch.zeros(N, C, H, W, dtype=F64)
        impulse[n, :, i, j] = 1.0
        pooled = reference_prroi_pool(impulse, rois, 3, 2, 1.0, True)  # (K, C, 3, 2)
        expected = (pooled * grad_out).sum(dim=(0, 2, 3))
        torch.testing.assert_close(features.grad[n, :, i, j].cpu(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_gradients_match_float64(device):
    features = make_features(dtype=F32, device=device, seed=61)
    rois = torch.cat([batch_column(8, N, 62), kink_free_boxes(8, H, W, 3, 2, 0.5, True, seed=62)], dim=1).to(F32)
    rois = rois.to(device)
    grad_out = make_features((8, C, 3, 2), dtype=F32, device=device, seed=63)
    fn = lambda f, r: prroi_pool2d(f, r, 3, 2, 0.5, True)
    got = forward_backward(fn, features, rois, grad_out)
    want = forward_backward(fn, features.double(), rois.double(), grad_out.double())
    for a, b in zip(got, want):
        assert a.dtype == F32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_cpu_backward_is_deterministic():
    features = make_features((2, 8, 12, 14), dtype=F32, seed=64)
    rois, _ = random_rois(20, batch=2, height=12, width=14, seed=65, dtype=F32)
    grad_out = make_features((rois.shape[0], 8, 4, 4), dtype=F32, seed=66)
    fn = lambda f, r: prroi_pool2d(f, r, 4, 4, 1.0)
    first = forward_backward(fn, features, rois, grad_out)
    second = forward_backward(fn, features, rois, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_raises(device):
    features = make_features(device=device, seed=23).requires_grad_(True)
    rois = torch.tensor([[0, 1.3, 2.2, 5.7, 6.1]], dtype=F64, device=device, requires_grad=True)
    out = prroi_pool2d(features, rois, 2, 2, 1.0)
    grad_f, grad_r = torch.autograd.grad(out.sum(), (features, rois), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        (grad_f.sum() + grad_r.sum()).backward()


# ---------------------------------------------------------------------------------------------------------------
# API forms
# ---------------------------------------------------------------------------------------------------------------
def test_list_of_boxes_equals_rois_tensor():
    features = make_features(seed=24)
    boxes = [
        torch.tensor([[1.0, 2.0, 5.5, 6.5], [-2.0, 0.5, 3.0, 4.0]], dtype=F64, requires_grad=True),
        torch.tensor([[0.2, 0.3, 10.0, 8.0], [4.0, 4.0, 4.5, 4.25], [7.0, 1.0, 12.0, 3.0]], dtype=F64).requires_grad_(),
    ]
    rois = torch.cat([with_index(boxes[0].detach(), 0), with_index(boxes[1].detach(), 1)]).requires_grad_(True)
    out_list = prroi_pool2d(features, boxes, 2, 3, 1.0)
    out_rois = prroi_pool2d(features, rois, 2, 3, 1.0)
    assert torch.equal(out_list, out_rois)
    grad_out = make_features(out_rois.shape, seed=25)
    out_list.backward(grad_out)
    out_rois.backward(grad_out)
    torch.testing.assert_close(torch.cat([boxes[0].grad, boxes[1].grad]), rois.grad[:, 1:], rtol=0, atol=0)
    # an image without boxes
    empty = torch.zeros(0, 4, dtype=F64)
    out = prroi_pool(features, [empty, boxes[1].detach()], (2, 3))
    assert torch.equal(out, out_rois[2:].detach())
    assert torch.equal(prroi_d2.boxes_to_rois([empty, boxes[1].detach()]), rois[2:].detach())


def test_function_and_module_forms_agree():
    features = make_features(seed=26)
    rois, _ = random_rois(2, seed=27, spatial_scale=0.5)
    expected = OP(features, rois, 3, 2, 0.5, True)
    assert torch.equal(prroi_pool2d(features, rois, 3, 2, 0.5, True), expected)
    assert torch.equal(prroi_pool(features, rois, (3, 2), 0.5, True), expected)
    assert torch.equal(prroi_pool(features, rois, [3, 2], spatial_scale=0.5, aligned=True), expected)
    assert torch.equal(PrRoIPool2D(3, 2, 0.5, True)(features, rois), expected)
    assert torch.equal(PrRoIPool((3, 2), 0.5, aligned=True)(features, rois), expected)
    assert torch.equal(prroi_pool(features, rois, 3), prroi_pool2d(features, rois, 3, 3, 1.0))
    assert torch.equal(PrRoIPool(7)(features, rois), PrRoIPool((7, 7))(features, rois))
    assert torch.equal(PrRoIPool(7)(features, rois), PrRoIPool2D(7, 7, 1.0)(features, rois))
    module = PrRoIPool2D(3, 2, 0.5, True)
    assert len(list(module.parameters())) == 0 and len(module.state_dict()) == 0
    assert "pooled_height=3" in repr(module) and "aligned=True" in repr(module)


# ---------------------------------------------------------------------------------------------------------------
# Compilation, scripting, opcheck
# ---------------------------------------------------------------------------------------------------------------
def _opcheck_args(features_grad, rois_grad, aligned):
    features = make_features((2, 2, 5, 6), seed=28).requires_grad_(features_grad)
    rois = torch.cat([batch_column(4, 2, 29), kink_free_boxes(4, 5, 6, 2, 3, 0.5, aligned, seed=29)], dim=1)
    return (features, rois.requires_grad_(rois_grad), 2, 3, 0.5, aligned)


@pytest.mark.parametrize(
    "features_grad, rois_grad, aligned",
    [(False, False, False), (True, False, True), (False, True, False), (True, True, True)],
)
def test_opcheck(features_grad, rois_grad, aligned):
    torch.library.opcheck(OP.default, _opcheck_args(features_grad, rois_grad, aligned))


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    module = PrRoIPool2D(3, 2, 0.5, aligned=True)
    features = make_features(seed=30)
    rois, _ = random_rois(2, seed=31, spatial_scale=0.5)
    grad_out = make_features((rois.shape[0], C, 3, 2), seed=32)
    eager = forward_backward(module, features, rois, grad_out)
    compiled = torch.compile(module, fullgraph=True, backend="inductor")
    got = forward_backward(compiled, features, rois, grad_out)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torch_jit_script_matches_eager():
    features = make_features(seed=33)
    rois, _ = random_rois(2, seed=34)
    for module in (PrRoIPool2D(2, 3, 1.0, True), PrRoIPool((4, 2)), PrRoIPool(3, 0.5)):
        scripted = torch.jit.script(module)
        assert torch.equal(scripted(features, rois), module(features, rois))
        boxes = [rois[rois[:, 0] == n, 1:] for n in range(N)]
        assert torch.equal(scripted(features, boxes), module(features, boxes))
        grad_out = make_features((rois.shape[0], C, module.pooled_height, module.pooled_width), seed=35)
        eager = forward_backward(module, features, rois, grad_out)
        for a, b in zip(forward_backward(scripted, features, rois, grad_out), eager):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Autocast, memory layouts, empty inputs
# ---------------------------------------------------------------------------------------------------------------
def test_autocast_cpu_bfloat16():
    features = make_features(dtype=torch.bfloat16, seed=36).requires_grad_(True)
    rois, _ = random_rois(2, seed=37, dtype=F32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = prroi_pool2d(features, rois, 3, 3, 1.0, True)
    assert out.dtype == torch.bfloat16
    features32 = features.detach().float().requires_grad_(True)
    expected = prroi_pool2d(features32, rois, 3, 3, 1.0, True)
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
    grad_out = make_features(out.shape, dtype=F32, seed=38)
    out.float().backward(grad_out)
    expected.backward(grad_out)
    assert features.grad.dtype == torch.bfloat16
    torch.testing.assert_close(features.grad.float(), features32.grad, rtol=2e-2, atol=2e-2)
    # float64 stays float64 under autocast
    f64 = make_features(seed=39)
    r64, _ = random_rois(1, seed=40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out64 = prroi_pool2d(f64, r64, 2, 2, 1.0)
    assert out64.dtype == F64
    torch.testing.assert_close(out64, reference_prroi_pool(f64, r64, 2, 2, 1.0), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_channels_last_inputs(device):
    features = make_features(device=device, seed=41)
    rois, _ = random_rois(2, seed=42)
    rois = rois.to(device)
    ph, pw = 3, 2
    grad_out = make_features((rois.shape[0], C, ph, pw), device=device, seed=43)
    ref_out, ref_gf, ref_gr = forward_backward(
        lambda f, r: prroi_pool2d(f, r, ph, pw, 1.0, True), features, rois, grad_out
    )

    padded = torch.zeros(rois.shape[0], 8, dtype=F64, device=device)
    padded[:, 2:7] = rois
    feature_variants = {
        "channels_last": features.contiguous(memory_format=torch.channels_last),
        "strided": torch.stack([features, torch.zeros_like(features)], dim=-1)[..., 0],
        "transposed": features.transpose(2, 3).contiguous().transpose(2, 3),
    }
    rois_variants = {"column_slice": padded[:, 2:7], "transposed": rois.t().contiguous().t()}
    grad_variants = {
        "expanded": grad_out[:, :, :1, :].expand(-1, -1, ph, -1),
        "channels_last": grad_out.contiguous(memory_format=torch.channels_last),
    }
    for name, f in feature_variants.items():
        assert not f.is_contiguous(), name
        out, gf, gr = forward_backward(lambda f_, r_: prroi_pool2d(f_, r_, ph, pw, 1.0, True), f, rois, grad_out)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        torch.testing.assert_close(gf, ref_gf, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gr, ref_gr, rtol=1e-12, atol=1e-12)
    for name, r in rois_variants.items():
        assert not r.is_contiguous(), name
        out, gf, gr = forward_backward(lambda f_, r_: prroi_pool2d(f_, r_, ph, pw, 1.0, True), features, r, grad_out)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        torch.testing.assert_close(gf, ref_gf, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gr, ref_gr, rtol=1e-12, atol=1e-12)
    for name, g in grad_variants.items():
        assert not g.is_contiguous(), name
        _, gf, gr = forward_backward(lambda f_, r_: prroi_pool2d(f_, r_, ph, pw, 1.0, True), features, rois, g)
        _, want_gf, want_gr = forward_backward(
            lambda f_, r_: prroi_pool2d(f_, r_, ph, pw, 1.0, True), features, rois, g.contiguous()
        )
        torch.testing.assert_close(gf, want_gf, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gr, want_gr, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rois_and_channels(device):
    features = make_features(device=device, seed=44).requires_grad_(True)
    rois = torch.zeros(0, 5, dtype=F64, device=device, requires_grad=True)
    out = prroi_pool2d(features, rois, 3, 4, 1.0)
    assert out.shape == (0, C, 3, 4)
    out.sum().backward()
    assert features.grad.shape == features.shape and torch.all(features.grad == 0)
    assert rois.grad.shape == (0, 5)
    out = prroi_pool(features, [torch.zeros(0, 4, dtype=F64, device=device)] * N, 2)
    assert out.shape == (0, C, 2, 2)
    # no channels
    empty_c = torch.zeros(N, 0, H, W, dtype=F64, device=device, requires_grad=True)
    rois = torch.tensor([[0, 1.5, 2.5, 6.0, 7.0]], dtype=F64, device=device, requires_grad=True)
    out = prroi_pool2d(empty_c, rois, 2, 2, 1.0)
    assert out.shape == (1, 0, 2, 2)
    out.sum().backward()
    assert empty_c.grad.shape == empty_c.shape
    assert rois.grad.shape == (1, 5) and torch.all(rois.grad == 0)


# ---------------------------------------------------------------------------------------------------------------
# Bad boxes: non-finite coordinates, huge or far-away boxes, bad batch indices
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F64, F32])
def test_non_finite_box_gives_nan_and_no_feature_gradient(device, dtype):
    features = make_features(dtype=dtype, device=device, seed=45)
    good = torch.tensor([[0, 1.5, 2.5, 6.0, 7.0], [1, -0.5, 0.25, 3.0, 9.5]], dtype=dtype)
    bad = torch.tensor(
        [[0, math.nan, 1, 2, 3], [1, 0, math.inf, 2, 3], [0, 0, 1, -math.inf, 3], [1, 0, 1, 2, math.nan]], dtype=dtype
    )
    rois = torch.cat([good[:1], bad[:2], good[1:], bad[2:]]).to(device)
    is_bad = torch.tensor([False, True, True, False, True, True])
    grad_out = make_features((6, C, 2, 3), dtype=dtype, device=device, seed=46)
    out, gf, gr = forward_backward(lambda f, r: prroi_pool2d(f, r, 2, 3, 1.0), features, rois, grad_out)
    if device == "cuda":
        torch.cuda.synchronize()
    out, gf, gr = out.cpu(), gf.cpu(), gr.cpu()
    assert torch.isnan(out[is_bad]).all()
    good_out, good_gf, good_gr = forward_backward(
        lambda f, r: prroi_pool2d(f, r, 2, 3, 1.0), features, good.to(device), grad_out[~is_bad.to(device)]
    )
    torch.testing.assert_close(out[~is_bad], good_out.cpu(), rtol=0, atol=0)
    torch.testing.assert_close(gf, good_gf.cpu(), **tol(dtype))
    assert torch.isnan(gr[is_bad, 1:]).all() and torch.all(gr[:, 0] == 0)
    torch.testing.assert_close(gr[~is_bad], good_gr.cpu(), **tol(dtype))
    # the coordinate-only backward path
    r = rois.detach().requires_grad_(True)
    prroi_pool2d(features, r, 2, 3, 1.0).backward(grad_out)
    torch.testing.assert_close(r.grad.cpu(), gr, rtol=0, atol=0, equal_nan=True)


HUGE_ROIS = [
    [0, -1e9, -1e9, 1e9, 1e9],  # holds the whole map in one bin
    [1, 1e6, 1e6, 1e6 + 3, 1e6 + 3],  # far outside
    [0, -1e6 - 3, -1e6 - 3, -1e6, -1e6],  # far outside
    [1, -1e30, -1e30, 1e30, 1e30],
    [0, 1e30, 1e30, 2e30, 2e30],
    [1, -1e6, 2.5, 1e6, 5.5],  # very wide, ordinary height
    [0, 3.5, -1e9, 6.5, 1e9],  # very tall, ordinary width
    [1, -1e7, -1e7, 4.5, 4.5],  # huge box ending inside the map
    [0, -1e30, 2.0, 5.0, 6.0],
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F64, F32])
def test_huge_and_far_boxes_complete_and_match_reference(device, dtype):
    """A loop over the pixels a box spans without clamping to the map would run ~1e9 .. 1e30 steps here."""
    features = make_features(dtype=dtype, device=device, seed=47).requires_grad_(True)
    rois = torch.tensor(HUGE_ROIS, dtype=dtype, device=device, requires_grad=True)
    out = prroi_pool2d(features, rois, 7, 7, 1.0)
    expected = reference_prroi_pool(features, rois, 7, 7, 1.0)
    assert torch.isfinite(out).all()
    if dtype == F64:
        torch.testing.assert_close(out.cpu(), expected, rtol=1e-9, atol=1e-12)
    else:
        torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-5, atol=1e-6)
    for k in (1, 2, 4):
        assert torch.all(out[k] == 0)
    out.backward(make_features(out.shape, dtype=dtype, device=device, seed=48))
    assert torch.isfinite(features.grad).all() and torch.isfinite(rois.grad).all()
    for k in (1, 2, 4):
        assert torch.all(rois.grad[k] == 0)


@pytest.mark.parametrize("dtype, big", [("float32", 3e38), ("float64", 1.7e308)])
def test_box_whose_width_overflows_completes(dtype, big):
    """Run in a child process with a 6 GiB address-space limit, so that a regression fails instead of filling RAM."""
    code = textwrap.dedent(
        f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
        import torch, prroi_d2
        f = torch.randn(1, 2, 4, 5, dtype=torch.{dtype})
        r = torch.tensor([[0, -{big}, 1.0, {big}, 2.0], [0, 1.0, -{big}, 2.0, {big}]], dtype=torch.{dtype})
        out = prroi_d2.prroi_pool2d(f, r, 2, 2, 1.0)
        assert not torch.isinf(out).any() and (torch.isnan(out) | (out.abs() < 1e-6)).all(), out
        print("ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("value", [0.5, -1.0, float(N), 1e10, math.nan, math.inf])
def test_cpu_bad_batch_index_raises(value):
    features = make_features(seed=49)
    rois = torch.tensor([[0, 1, 1, 4, 4], [value, 1, 1, 4, 4]], dtype=F64)
    with pytest.raises(ValueError, match="batch index"):
        prroi_pool2d(features, rois, 2, 2, 1.0)
    with pytest.raises(ValueError, match="batch index"):
        BACKWARD_OP(torch.zeros(2, C, 2, 2, dtype=F64), features, rois, 2, 2, 1.0, False, True, True)


# ---------------------------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------------------------
def _f(shape=(N, C, H, W), dtype=F64):
    return make_features(shape, dtype=dtype, seed=50)


def _r(dtype=F64):
    return torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]], dtype=dtype)


BAD_CALLS = {
    "features_3d": (lambda: prroi_pool2d(_f((C, H, W)), _r(), 2, 2, 1.0), ValueError, "features"),
    "features_5d": (lambda: prroi_pool2d(_f((1, N, C, H, W)), _r(), 2, 2, 1.0), ValueError, "features"),
    "rois_k4": (lambda: prroi_pool2d(_f(), _r()[:, 1:], 2, 2, 1.0), ValueError, "rois"),
    "rois_1d": (lambda: prroi_pool2d(_f(), _r()[0], 2, 2, 1.0), ValueError, "rois"),
    "rois_k6": (lambda: prroi_pool2d(_f(), torch.zeros(2, 6, dtype=F64), 2, 2, 1.0), ValueError, "rois"),
    "rois_3d": (lambda: prroi_pool2d(_f(), _r()[None], 2, 2, 1.0), ValueError, "rois"),
    "rois_empty_list": (lambda: prroi_pool2d(_f(), [], 2, 2, 1.0), ValueError, "rois"),
    "rois_list_k5": (lambda: prroi_pool2d(_f(), [_r(), _r()], 2, 2, 1.0), ValueError, r"rois\[0\]"),
    "rois_list_dtypes": (
        lambda: prroi_pool2d(_f(), [_r()[:, 1:], _r(F32)[:, 1:]], 2, 2, 1.0),
        ValueError,
        r"rois\[1\]",
    ),
    "features_int": (lambda: prroi_pool2d(_f().long(), _r().long(), 2, 2, 1.0), TypeError, "features"),
    "features_bool": (lambda: prroi_pool2d(_f() > 0, _r(), 2, 2, 1.0), TypeError, "features"),
    "dtype_mismatch": (lambda: prroi_pool2d(_f(), _r(F32), 2, 2, 1.0), TypeError, "rois dtype"),
    "dtype_mismatch_list": (
        lambda: prroi_pool2d(_f(dtype=F32), [_r(torch.float16)[:, 1:]], 2, 2, 1.0),
        TypeError,
        "rois dtype",
    ),
    "rois_int": (lambda: prroi_pool2d(_f(), _r().int(), 2, 2, 1.0), TypeError, "rois dtype"),
    "pooled_height_0": (lambda: prroi_pool2d(_f(), _r(), 0, 2, 1.0), ValueError, "pooled_height"),
    "pooled_width_neg": (lambda: prroi_pool2d(_f(), _r(), 2, -1, 1.0), ValueError, "pooled_width"),
    "module_output_size_0": (lambda: PrRoIPool(0)(_f(), _r()), ValueError, "pooled_height"),
    "output_size_triple": (lambda: prroi_pool(_f(), _r(), (2, 2, 2)), ValueError, "output_size"),
    "scale_zero": (lambda: prroi_pool2d(_f(), _r(), 2, 2, 0.0), ValueError, "spatial_scale"),
    "scale_negative": (lambda: prroi_pool2d(_f(), _r(), 2, 2, -0.5), ValueError, "spatial_scale"),
    "scale_inf": (lambda: prroi_pool2d(_f(), _r(), 2, 2, math.inf), ValueError, "spatial_scale"),
    "scale_nan": (lambda: prroi_pool2d(_f(), _r(), 2, 2, math.nan), ValueError, "spatial_scale"),
    "backward_grad_shape": (
        lambda: BACKWARD_OP(torch.zeros(1, C, 3, 2, dtype=F64), _f(), _r(), 2, 2, 1.0, False, True, True),
        ValueError,
        "grad_output",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_arguments_raise_naming_the_argument(name):
    call, exc, pattern = BAD_CALLS[name]
    with pytest.raises(exc, match=pattern):
        call()


# ---------------------------------------------------------------------------------------------------------------
# CUDA only
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("aligned", [False, True])
def test_cuda_matches_cpu(dtype, aligned):
    features = make_features(dtype=dtype, seed=51)
    rois, _ = random_rois(6, seed=52, spatial_scale=0.5, dtype=dtype)
    grad_out = make_features((rois.shape[0], C, 4, 3), dtype=dtype, seed=53)
    fn = lambda f, r: prroi_pool2d(f, r, 4, 3, 0.5, aligned)
    cpu = forward_backward(fn, features, rois, grad_out)
    cuda = forward_backward(fn, features.cuda(), rois.cuda(), grad_out.cuda())
    for a, b in zip(cuda, cpu):
        torch.testing.assert_close(a.cpu(), b, **tol(dtype))


def fpn_like_rois(count, batch, height, width, spatial_scale, seed):
    """(count, 5) rois whose sizes in map pixels run log-uniformly from 0.3 to 70: bins from sub-pixel to wider
    than every unrolled window of the CUDA kernels, some partly outside the map."""
    g = torch.Generator().manual_seed(seed)
    size = torch.exp(torch.empty(count, 2, dtype=F64).uniform_(math.log(0.3), math.log(70.0), generator=g))
    corner = torch.rand(count, 2, generator=g, dtype=F64) * torch.tensor([width + 6.0, height + 6.0]) - 4.0
    boxes = torch.cat([corner, corner + size], dim=1) / spatial_scale
    return torch.cat([batch_column(count, batch, seed + 1), boxes], dim=1)


@pytest.mark.cuda
@pytest.mark.parametrize("pooled", [(7, 7), (14, 14), (5, 9)])
@pytest.mark.parametrize("count", [9, 700])
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_matches_cpu_on_fpn_like_boxes(pooled, count, deterministic):
    """float64 CUDA against the float64 CPU kernels on what Detectron2 pools: many channels (in groups, the last one
    partial), every window size of the kernels, few boxes (a box's coordinate gradient split over blocks) and many
    (several chunks per tile in the feature gradient), a dense and an expanded (stride 0) output gradient."""
    features = make_features((2, 20, 37, 53), seed=62)
    rois = fpn_like_rois(count, 2, 37, 53, 0.25, seed=63)
    fn = lambda f, r: prroi_pool2d(f, r, pooled[0], pooled[1], 0.25, aligned=True)
    grad_out = make_features((count, 20) + pooled, seed=64)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        cuda = forward_backward(fn, features.cuda(), rois.cuda(), grad_out.cuda())
        cuda_sum = _sum_backward(fn, features.cuda(), rois.cuda())
    finally:
        torch.use_deterministic_algorithms(previous)
    cpu = forward_backward(fn, features, rois, grad_out)
    cpu_sum = _sum_backward(fn, features, rois)
    for a, b in zip(cuda + cuda_sum, cpu + cpu_sum):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-9 * b.abs().max().item())
    assert cpu[0].abs().sum() > 0 and cpu[2][:, 1:].abs().sum() > 0  # the boxes pool real data


def _sum_backward(module, features, rois):
    """Gradients of out.sum(): autograd passes an expanded (stride 0) output gradient."""
    features = features.detach().requires_grad_(True)
    rois = rois.detach().requires_grad_(True)
    module(features, rois).sum().backward()
    return features.grad, rois.grad


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width", [53, 52])
def test_cuda_low_precision_on_fpn_like_boxes(dtype, width):
    """float32 / float16 / bfloat16 CUDA against float64 of the same rounded inputs, on every window size; an even
    width lets the float16/bfloat16 forward read two pixels per load, an odd one does not."""
    features = make_features((2, 20, 37, width), seed=65).to(dtype)
    rois = fpn_like_rois(300, 2, 37, width, 0.25, seed=66).to(dtype)
    grad_out = make_features((300, 20, 7, 7), seed=67).to(dtype)
    fn = lambda f, r: prroi_pool2d(f, r, 7, 7, 0.25, aligned=True)
    got = forward_backward(fn, features.cuda(), rois.cuda(), grad_out.cuda())
    want = forward_backward(fn, features.double(), rois.double(), grad_out.double())
    # forward and feature gradient are smooth in the inputs; the coordinate gradient jumps where a bin edge crosses
    # an integer (a kink of the interpolated map), and rounded edges cross them differently, so it is compared in
    # norm rather than element by element.
    # float32 loses ~eps * |coordinate| / bin size on the bin edges: up to ~4e-5 of the largest value here.
    rel = {F32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    for a, b in zip(got[:2], want[:2]):
        assert a.dtype == dtype
        torch.testing.assert_close(a.cpu().double(), b, rtol=rel, atol=rel * b.abs().max().item())
    gr, want_gr = got[2].cpu().double(), want[2]
    assert torch.linalg.norm(gr - want_gr) <= 2 * rel * torch.linalg.norm(want_gr)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_matches_reference(dtype):
    features = make_features(dtype=dtype, seed=54).cuda()
    rois, _ = random_rois(6, seed=55, dtype=dtype)
    rois = rois.cuda()
    out = prroi_pool2d(features, rois, 3, 4, 1.0, True)
    assert out.dtype == dtype
    expected = reference_prroi_pool(features, rois, 3, 4, 1.0, True)  # float64 of the rounded inputs
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())
    # gradients run and agree with float32 of the same (rounded) inputs
    grad_out = make_features(out.shape, dtype=dtype, seed=56).cuda()
    fn = lambda f, r: prroi_pool2d(f, r, 3, 4, 1.0, True)
    _, gf, gr = forward_backward(fn, features, rois, grad_out)
    _, gf32, gr32 = forward_backward(fn, features.float(), rois.float(), grad_out.float())
    assert gf.dtype == dtype and gr.dtype == dtype
    torch.testing.assert_close(gf.float(), gf32, rtol=2e-2, atol=2e-2 * gf32.abs().max().item())
    torch.testing.assert_close(gr.float(), gr32, rtol=5e-2, atol=5e-2 * gr32.abs().max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_pixel_pairs_skip_pixels_outside_the_window(dtype):
    """float16/bfloat16 maps of even width are read two pixels at a time from an even column: the pixel of a pair
    outside a bin's window must not count, even when it is infinite."""
    features = make_features((2, 3, 6, 16), seed=68)
    # box 0: window columns 3..6 (pairs 2..7: 2 and 7 outside); box 1: columns 4..8 (pairs 4..9: 9 outside)
    rois = torch.tensor([[0, 3.2, 1.3, 5.5, 3.8], [1, 4.2, 1.3, 7.5, 3.8]], dtype=F64)
    poisoned = features.clone()
    poisoned[0, :, :, [2, 7]] = math.inf
    poisoned[1, :, :, 9] = -math.inf
    out = prroi_pool2d(poisoned.to(dtype).cuda(), rois.to(dtype).cuda(), 2, 1, 1.0)
    expected = reference_prroi_pool(features.to(dtype).double(), rois.to(dtype).double(), 2, 1, 1.0, False)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_map_at_an_odd_address_matches_an_aligned_copy(dtype):
    """A float16/bfloat16 map starting 2 bytes past a 4-byte boundary cannot be read in pixel pairs: the op reads it
    a pixel at a time and gets what it gets from an aligned copy."""
    storage = make_features((2 * C * H * 16 + 1,), seed=69).to(dtype).cuda()
    shifted = storage[1:].view(2, C, H, 16)
    assert shifted.data_ptr() % 4 == 2
    rois, _ = random_rois(6, width=16, seed=70, dtype=dtype)
    out = prroi_pool2d(shifted, rois.cuda(), 7, 7, 1.0, True)
    aligned = prroi_pool2d(shifted.clone(), rois.cuda(), 7, 7, 1.0, True)
    assert aligned.abs().sum() > 0
    torch.testing.assert_close(out, aligned, rtol=1e-2, atol=1e-2 * aligned.abs().max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast(dtype):
    features = make_features(seed=57, dtype=F32).cuda()
    rois, _ = random_rois(3, seed=58, dtype=F32)
    rois = rois.cuda()
    low = features.to(dtype)
    with torch.autocast("cuda", dtype=dtype):
        out = prroi_pool2d(low, rois, 2, 2, 1.0)
        out32 = prroi_pool2d(features, rois, 2, 2, 1.0)
    assert out.dtype == dtype and out32.dtype == F32
    torch.testing.assert_close(out32, prroi_pool2d(features, rois, 2, 2, 1.0), rtol=1e-6, atol=1e-6)
    expected = prroi_pool2d(low.float(), rois, 2, 2, 1.0)
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.cuda
def test_cuda_deterministic_backward_is_bit_identical():
    g = torch.Generator().manual_seed(59)
    features = torch.randn(2, 16, 32, 40, generator=g).cuda()
    K = 600
    xy = torch.rand(K, 2, generator=g) * 30 - 2
    wh = torch.rand(K, 2, generator=g) * 12 + 0.1
    rois = torch.cat([torch.randint(0, 2, (K, 1), generator=g).float(), xy, xy + wh], dim=1).cuda()
    grad_out = torch.randn(K, 16, 7, 7, generator=g).cuda()
    fn = lambda f, r: prroi_pool2d(f, r, 7, 7, 0.5)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = forward_backward(fn, features, rois, grad_out)
        second = forward_backward(fn, features, rois, grad_out)
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # and the deterministic path agrees with the default one and with the CPU
    default = forward_backward(fn, features, rois, grad_out)
    cpu = forward_backward(fn, features.cpu(), rois.cpu(), grad_out.cpu())
    # (float32 coordinate gradients jump where a bin edge crosses an integer; CPU and GPU round edges differently)
    for a, b, c in zip(first, default, cpu):
        scale = c.abs().max().item()
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-3 * scale)
        torch.testing.assert_close(a.cpu(), c, rtol=1e-3, atol=2e-3 * scale)


@pytest.mark.cuda
@pytest.mark.parametrize("value", [0.5, -1.0, float(N), math.nan])
def test_cuda_bad_batch_index_gives_nan(value):
    features = make_features(seed=60).cuda().requires_grad_(True)
    rois = torch.tensor([[0, 1, 1, 4, 4], [value, 1, 1, 4, 4], [1, 2, 2, 5, 5]], dtype=F64).cuda()
    rois.requires_grad_(True)
    out = prroi_pool2d(features, rois, 2, 2, 1.0)
    out.sum().backward()
    torch.cuda.synchronize()
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
    assert torch.isnan(rois.grad[1, 1:]).all() and torch.isfinite(rois.grad[[0, 2]]).all()
    assert torch.isfinite(features.grad).all()
    good = rois.detach()[[0, 2]]
    torch.testing.assert_close(out[[0, 2]], prroi_pool2d(features, good, 2, 2, 1.0), rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_devices_differ_raises():
    with pytest.raises(ValueError, match="rois"):
        prroi_pool2d(_f().cuda(), _r(), 2, 2, 1.0)
    with pytest.raises(ValueError, match="rois"):
        prroi_pool2d(_f(), _r().cuda(), 2, 2, 1.0)
