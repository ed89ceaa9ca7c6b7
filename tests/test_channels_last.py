"""Feature maps in the channels-last memory format.

On CUDA the op reads channels-last maps as they are, by kernels of their own (forward and coordinate gradient); it
must give what it gives for the same maps stored contiguously, which the other op tests check against the float64
reference, and the reference itself. On the CPU such maps are read through contiguous copies.
"""

import math

import pytest
import torch
from reference import random_features, reference_prroi_pool
from test_prroi_pool_levels import SCALES, pyramid, random_rois

from prroi_d2 import assign_fpn_levels, prroi_pool, prroi_pool_levels

LEVELS_OP = torch.ops.prroi_d2.prroi_pool2d_levels
LEVELS_BACKWARD_OP = torch.ops.prroi_d2._prroi_pool2d_levels_backward
F64 = torch.float64
CL = torch.channels_last


def channels_last(maps):
    out = [f.contiguous(memory_format=CL) for f in maps]
    assert all(not f.is_contiguous() for f in out)  # really another layout
    return out


def bad_rois(rois):
    """rois with one row each of: a NaN coordinate, a batch index out of range, zero size, outside the image."""
    rois = rois.clone()
    rois[0, 2] = float("nan")
    rois[1, 0] = 5
    rois[2, 3:] = rois[2, 1:3]
    rois[3, 1:] = torch.tensor([-80.0, -90.0, -30.0, -40.0], dtype=rois.dtype)
    return rois


def levels_forward_backward(features, rois, levels, size, grad_out):
    """(output, rois gradient, feature gradients) of the multi-level op, aligned boxes."""
    out = LEVELS_OP(features, rois, levels, size, size, SCALES, True)
    grads = LEVELS_BACKWARD_OP(grad_out, features, rois, levels, size, size, SCALES, True, True, True)
    return [out, grads[1]] + list(grads[0])


def assert_all_close(got, want, rtol):
    for a, b in zip(got, want):
        b = b.to(a.device, a.dtype)
        scale = b[torch.isfinite(b)].abs().max().item()
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale, equal_nan=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("channels", [20, 64, 70])
@pytest.mark.parametrize("size", [7, 14])
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_channels_last_levels_match_cpu(dtype, channels, size, deterministic):
    """Forward and every gradient, against the float64 CPU op on contiguous maps; invalid boxes included."""
    features = pyramid(channels=channels, seed=11)
    for count in (9, 500):
        rois = bad_rois(random_rois(count, seed=12))
        levels = assign_fpn_levels(rois.nan_to_num(), SCALES, canonical_box_size=56)
        grad_out = torch.randn(count, channels, size, size, generator=torch.Generator().manual_seed(13), dtype=F64)
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        try:
            got = levels_forward_backward(
                channels_last([f.to(dtype).cuda() for f in features]),
                rois.to(dtype).cuda(),
                levels.cuda(),
                size,
                grad_out.to(dtype).cuda(),
            )
        finally:
            torch.use_deterministic_algorithms(previous)
        assert torch.isnan(got[0][0]).all() and torch.isnan(got[0][1]).all()  # the NaN box, the bad batch index
        assert torch.isnan(got[1][1, 1:]).all()
        assert (got[0][2] == 0).all() and (got[0][3] == 0).all()  # empty, outside
        assert got[0][4:].abs().sum() > 0 and got[1][4:, 1:].abs().sum() > 0
        # The CPU op raises for a batch index out of range: there box 1 is moved to image 0 and its gradient zeroed
        # (on CUDA it reads nothing and adds nothing to the feature gradients), and its rows are left out.
        cpu_rois, cpu_grad_out = rois.clone(), grad_out.clone()
        cpu_rois[1, 0], cpu_grad_out[1] = 0, 0
        want = levels_forward_backward(features, cpu_rois, levels, size, cpu_grad_out)
        others = torch.arange(count) != 1
        for i in (0, 1):
            got[i], want[i] = got[i][others.to(got[i].device)], want[i][others]
        assert_all_close(got, want, 1e-9 if dtype == F64 else 1e-4)  # float32: sums of ~10^4 terms


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_channels_last_halves_match_contiguous(dtype):
    """float16/bfloat16 maps (float32 boxes): channels-last against contiguous, and near the float64 op."""
    features = pyramid(channels=48, seed=14)
    rois = random_rois(300, seed=15)
    levels = assign_fpn_levels(rois, SCALES, canonical_box_size=56)
    grad_out = torch.randn(300, 48, 7, 7, generator=torch.Generator().manual_seed(16), dtype=F64)
    maps = [f.to(dtype).cuda() for f in features]
    args = (rois.float().cuda(), levels.cuda(), 7, grad_out.to(dtype).cuda())
    got = levels_forward_backward(channels_last(maps), *args)
    contiguous = levels_forward_backward(maps, *args)
    assert_all_close(got, contiguous, 1e-2)
    exact = levels_forward_backward(
        [f.to(dtype).to(F64) for f in features], rois, levels, 7, grad_out.to(dtype).to(F64)
    )
    assert_all_close(got[:1], exact[:1], 1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("aligned", [False, True])
def test_cuda_channels_last_single_map_matches_reference(aligned):
    """prroi_pool on one channels-last map against the float64 reference; gradients against contiguous."""
    features = random_features((2, 40, 23, 31), seed=17)
    rois = random_rois(30, image=(23 * 4, 31 * 4), seed=18)
    out = prroi_pool(channels_last([features.cuda()])[0], rois.cuda(), (5, 6), 0.25, aligned)
    expected = reference_prroi_pool(features, rois, 5, 6, 0.25, aligned)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-10, atol=1e-10)
    assert out.is_contiguous()
    grads = []
    for maps in (channels_last([features.cuda()]), [features.cuda()]):
        f = maps[0].requires_grad_(True)
        r = rois.cuda().requires_grad_(True)
        prroi_pool(f, r, (5, 6), 0.25, aligned).backward(torch.ones(30, 40, 5, 6, dtype=F64, device="cuda"))
        grads.append((f.grad, r.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-10)
    assert grads[0][1][:, 1:].abs().sum() > 0


@pytest.mark.cuda
def test_cuda_channels_last_gradcheck():
    features = channels_last([f[:, :, :7, :8] for f in pyramid(channels=33, device="cuda")[:2]])
    features = [f.requires_grad_(True) for f in features]
    boxes = torch.tensor([[2.3, 3.1, 19.7, 14.9], [5.2, 4.4, 37.7, 40.6]], dtype=F64, device="cuda")
    boxes.requires_grad_(True)
    batch = torch.tensor([[0.0], [1.0]], dtype=F64, device="cuda")
    levels = torch.tensor([0, 1], device="cuda")

    def fn(f0, f1, b):
        return prroi_pool_levels([f0, f1], torch.cat([batch, b], dim=1), levels, 2, SCALES[:2], True)

    assert torch.autograd.gradcheck(fn, (*features, boxes), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.cuda
def test_cuda_large_outputs_and_mixed_layouts_fall_back():
    """Outputs too large for the channels-last forward's shared tile, and maps of mixed layouts, are pooled from
    contiguous copies: the results are those of contiguous maps."""
    features = [f.cuda() for f in pyramid(channels=36, seed=19)]
    rois = random_rois(40, seed=20).cuda()
    levels = assign_fpn_levels(rois, SCALES, canonical_box_size=56)
    size = 24  # float64: 32 x 577 x 8 bytes, over the 48 KiB tile
    assert 32 * (size * size + 1) * 8 > 48 * 1024
    grad_out = torch.randn(40, 36, size, size, dtype=F64, device="cuda")
    want = levels_forward_backward(features, rois, levels, size, grad_out)
    assert_all_close(levels_forward_backward(channels_last(features), rois, levels, size, grad_out), want, 1e-10)
    mixed = channels_last(features[:2]) + features[2:]
    assert_all_close(
        levels_forward_backward(mixed, rois, levels, 7, grad_out[:, :, :7, :7].contiguous()),
        levels_forward_backward(features, rois, levels, 7, grad_out[:, :, :7, :7].contiguous()),
        1e-10,
    )


@pytest.mark.cuda
def test_cuda_channels_last_kernels_are_the_ones_run():
    """The profiler sees the channels-last kernels for channels-last maps (and not for contiguous ones)."""
    features = [f.cuda() for f in pyramid(channels=32, dtype=torch.float32, seed=21)]
    rois = random_rois(50, seed=22).float().cuda().requires_grad_(True)
    levels = assign_fpn_levels(rois.detach(), SCALES, canonical_box_size=56)

    def kernels(maps):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            prroi_pool_levels(maps, rois, levels, 7, SCALES, True).sum().backward()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        if not names:  # e.g. under compute-sanitizer, where the profiler's CUDA activities are missing
            pytest.skip("the profiler records no CUDA kernels here")
        return " ".join(names)

    assert "forward_channels_last_kernel" in kernels(channels_last(features))
    assert "forward_channels_last_kernel" not in kernels(features)
    assert "forward_kernel" in kernels(features)


def test_cpu_channels_last_equals_contiguous():
    features = random_features((2, 6, 19, 25), seed=23)
    rois = random_rois(12, image=(19 * 4, 25 * 4), seed=24)
    expected = reference_prroi_pool(features, rois, 3, 4, 0.25, True)
    out = prroi_pool(features.contiguous(memory_format=CL), rois, (3, 4), 0.25, True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert math.isfinite(out.sum().item()) and out.abs().sum() > 0


COPY_OP = torch.ops.prroi_d2._channels_last


def copy_inputs(device):
    """(N, C, H, W) maps of odd sizes: contiguous, already channels-last, and a non-contiguous view."""
    base = random_features((3, 37, 29, 41), seed=25).to(device)
    return [base, base.contiguous(memory_format=CL), base[:, 1:36:2, 3:, ::2]]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16, torch.bfloat16])
def test_channels_last_copy(device, dtype):
    """_channels_last: the same values in channels-last strides, never the input's storage."""
    from prroi_d2.functional import channels_last_copy

    for x in copy_inputs(device):
        x = x.to(dtype)
        out = channels_last_copy(x)
        assert out.shape == x.shape and out.is_contiguous(memory_format=CL) and not out.is_contiguous()
        assert out.data_ptr() != x.data_ptr()
        assert torch.equal(out, x) and out.abs().sum() > 0


def test_channels_last_copy_opcheck_errors_and_gradient():
    from prroi_d2.functional import channels_last_copy

    torch.library.opcheck(COPY_OP, (random_features((2, 5, 3, 4), seed=26),))
    with pytest.raises(ValueError, match=r"_channels_last: features must be \(N, C, H, W\)"):
        COPY_OP(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="_channels_last: features must be float16, bfloat16, float32 or float64"):
        COPY_OP(torch.ones(1, 2, 3, 4, dtype=torch.int32))
    x = random_features((2, 3, 4, 5), seed=27).requires_grad_(True)
    assert torch.autograd.gradcheck(channels_last_copy, (x,))


@pytest.mark.cuda
def test_cuda_channels_last_copy_opcheck():
    torch.library.opcheck(COPY_OP, (random_features((2, 40, 9, 70), device="cuda", seed=28),))
