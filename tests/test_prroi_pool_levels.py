"""Tests of the multi-level form (prroi_d2.prroi_pool_levels, torch.ops.prroi_d2.prroi_pool2d_levels) and of
prroi_d2.assign_fpn_levels.

The multi-level op must pool every box exactly as the single-level op pools it on its own level (which
test_prroi_pool.py checks against the float64 reference), with gradients for every map and the boxes.
"""

import math

import pytest
import torch

from prroi_d2 import assign_fpn_levels, prroi_pool, prroi_pool_levels

LEVELS_OP = torch.ops.prroi_d2.prroi_pool2d_levels
LEVELS_BACKWARD_OP = torch.ops.prroi_d2._prroi_pool2d_levels_backward
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
F64 = torch.float64
SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def pyramid(channels=5, batch=2, image=(150, 200), dtype=F64, device="cpu", seed=0):
    """One (batch, channels, ceil(H * s), ceil(W * s)) map per scale of SCALES."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, channels, math.ceil(image[0] * s), math.ceil(image[1] * s), generator=g, dtype=F64).to(
            dtype=dtype, device=device
        )
        for s in SCALES
    ]


def random_rois(count, batch=2, image=(150, 200), seed=1):
    """(count, 5) rois of sizes 2 .. 180 px in input coordinates, some partly outside the image."""
    g = torch.Generator().manual_seed(seed)
    size = torch.exp(torch.empty(count, 2, dtype=F64).uniform_(math.log(2.0), math.log(180.0), generator=g))
    corner = torch.rand(count, 2, generator=g, dtype=F64) * torch.tensor([image[1] + 20.0, image[0] + 20.0]) - 20
    index = torch.randint(0, batch, (count, 1), generator=g).to(F64)
    return torch.cat([index, corner, corner + size], dim=1)


def per_level(features, rois, levels, size, aligned):
    """The single-level op, one box at a time on its own level."""
    return torch.cat(
        [prroi_pool(features[levels[k]], rois[k : k + 1], size, SCALES[levels[k]], aligned) for k in range(len(rois))]
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aligned", [False, True])
def test_levels_equal_the_single_level_op_on_each_box(device, aligned):
    features = [f.requires_grad_(True) for f in pyramid(device=device)]
    rois = random_rois(40).to(device).requires_grad_(True)
    levels = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(2)).to(device)  # level 3 unused
    out = prroi_pool_levels(features, rois, levels, (3, 4), SCALES, aligned)
    expected = per_level(features, rois, levels.tolist(), (3, 4), aligned)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=F64).to(device)
    got = torch.autograd.grad(out, features + [rois], grad_out)
    want = torch.autograd.grad(expected, features + [rois], grad_out, allow_unused=True)
    want = [w if w is not None else torch.zeros_like(f) for w, f in zip(want, features + [rois])]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    assert torch.all(got[3] == 0)  # the unused level gets a zero gradient
    assert out.abs().sum() > 0 and got[4][:, 1:].abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_levels_gradcheck(device):
    features = [f[:, :, :7, :8].contiguous().requires_grad_(True) for f in pyramid(channels=2, device=device)[:3]]
    g = torch.Generator().manual_seed(4)
    # boxes well inside the maps and away from integer bin edges: the op is smooth around them
    boxes = torch.tensor([[2.3, 3.1, 19.7, 14.9], [5.2, 4.4, 37.7, 40.6], [9.1, 6.3, 70.7, 81.9]], dtype=F64)
    boxes = (boxes + 0.01 * torch.rand(boxes.shape, generator=g, dtype=F64)).to(device).requires_grad_(True)
    batch = torch.tensor([[0.0], [1.0], [0.0]], dtype=F64, device=device)
    levels = torch.tensor([0, 1, 2], device=device)

    def fn(f0, f1, f2, b):
        return prroi_pool_levels([f0, f1, f2], torch.cat([batch, b], dim=1), levels, 2, SCALES[:3], True)

    assert torch.autograd.gradcheck(fn, (*features, boxes), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_levels_opcheck():
    features = pyramid(channels=3)
    rois = random_rois(12)
    levels = assign_fpn_levels(rois, SCALES, canonical_box_size=56)
    assert len(set(levels.tolist())) > 1
    torch.library.opcheck(LEVELS_OP, (features, rois, levels, 2, 3, SCALES, True))
    torch.library.opcheck(
        LEVELS_BACKWARD_OP,
        (torch.randn(12, 3, 2, 3, dtype=F64), features, rois, levels, 2, 3, SCALES, True, True, True),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_levels_double_backward_raises():
    features = [f.requires_grad_(True) for f in pyramid(channels=2)]
    rois = random_rois(3)
    out = prroi_pool_levels(features, rois, torch.tensor([0, 1, 2]), 2, SCALES)
    (grad,) = torch.autograd.grad(out.sum(), features[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


def test_cpu_bad_level_raises():
    with pytest.raises(ValueError, match=r"levels\[1\] is 4"):
        prroi_pool_levels(pyramid(), random_rois(2), torch.tensor([0, 4]), 2, SCALES)
    with pytest.raises(ValueError, match=r"levels\[0\] is -1"):
        prroi_pool_levels(pyramid(), random_rois(2), torch.tensor([-1, 0]), 2, SCALES)


@pytest.mark.cuda
def test_cuda_bad_level_gives_nan():
    features = [f.requires_grad_(True) for f in pyramid(device="cuda")]
    rois = random_rois(3).cuda().requires_grad_(True)
    out = prroi_pool_levels(features, rois, torch.tensor([0, 4, 1], device="cuda"), 2, SCALES)
    out.sum().backward()
    torch.cuda.synchronize()
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
    assert torch.isnan(rois.grad[1, 1:]).all() and torch.isfinite(rois.grad[[0, 2]]).all()
    assert all(torch.isfinite(f.grad).all() for f in features)


@pytest.mark.cuda
@pytest.mark.parametrize("size", [7, 14])
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_levels_match_cpu(size, deterministic):
    """float64 CUDA against the float64 CPU composition, forward and all gradients, 20 channels, few and many boxes."""
    features = pyramid(channels=20, seed=5)
    for count in (7, 600):
        rois = random_rois(count, seed=6)
        levels = assign_fpn_levels(rois, SCALES, canonical_box_size=56)
        grad_out = torch.randn(count, 20, size, size, generator=torch.Generator().manual_seed(7), dtype=F64)
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        try:
            cuda = LEVELS_BACKWARD_OP(
                grad_out.cuda(),
                [f.cuda() for f in features],
                rois.cuda(),
                levels.cuda(),
                size,
                size,
                SCALES,
                True,
                True,
                True,
            )
            cuda_out = LEVELS_OP([f.cuda() for f in features], rois.cuda(), levels.cuda(), size, size, SCALES, True)
        finally:
            torch.use_deterministic_algorithms(previous)
        cpu = LEVELS_BACKWARD_OP(grad_out, features, rois, levels, size, size, SCALES, True, True, True)
        cpu_out = LEVELS_OP(features, rois, levels, size, size, SCALES, True)
        pairs = [(cuda_out, cpu_out), (cuda[1], cpu[1])] + list(zip(cuda[0], cpu[0]))
        for a, b in pairs:
            torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-9 * b.abs().max().item())


def test_assign_fpn_levels_matches_detectron2():
    pytest.importorskip("detectron2")
    from detectron2.modeling.poolers import assign_boxes_to_levels
    from detectron2.structures import Boxes

    rois = random_rois(300, image=(800, 1200), seed=8)
    rois[:, 3:] = rois[:, 1:3] + (rois[:, 3:] - rois[:, 1:3]) * 4  # sizes up to ~700 px, every level
    for scales in (SCALES, SCALES[:3], [1 / 8, 1 / 16]):
        min_level, max_level = round(-math.log2(scales[0])), round(-math.log2(scales[-1]))
        boxes = [Boxes(rois[rois[:, 0] == i, 1:].float()) for i in range(2)]
        expected = assign_boxes_to_levels(boxes, min_level, max_level, 224, 4)
        order = torch.cat([torch.nonzero(rois[:, 0] == i).flatten() for i in range(2)])
        got = assign_fpn_levels(rois.float(), scales)[order]
        assert torch.equal(got, expected)
        assert len(set(got.tolist())) == len(scales)


def test_assign_fpn_levels_degenerate_boxes():
    rois = torch.tensor([[0, 5, 5, 1, 1], [0, 0, 0, math.nan, 4], [0, 0, 0, 1e6, 1e6], [0, 0, 0, 0, 0]], dtype=F64)
    assert assign_fpn_levels(rois, SCALES).tolist() == [0, 0, 3, 0]
    assert assign_fpn_levels(rois[:, 1:], SCALES).tolist() == [0, 0, 3, 0]


BAD_CALLS = {
    "no_features": (
        lambda: prroi_pool_levels([], random_rois(2), torch.zeros(2, dtype=torch.long), 2, []),
        ValueError,
        "features",
    ),
    "nine_levels": (
        lambda: prroi_pool_levels(pyramid()[:1] * 9, random_rois(2), torch.zeros(2, dtype=torch.long), 2, [0.25] * 9),
        ValueError,
        "1 to 8",
    ),
    "scales_length": (
        lambda: prroi_pool_levels(pyramid(), random_rois(2), torch.zeros(2, dtype=torch.long), 2, SCALES[:3]),
        ValueError,
        "spatial_scales",
    ),
    "scale_zero": (
        lambda: prroi_pool_levels(
            pyramid(), random_rois(2), torch.zeros(2, dtype=torch.long), 2, [0.25, 0.0, 0.1, 0.1]
        ),
        ValueError,
        r"spatial_scales\[1\]",
    ),
    "channels_differ": (
        lambda: prroi_pool_levels(
            pyramid()[:1] + pyramid(channels=4)[1:], random_rois(2), torch.zeros(2, dtype=torch.long), 2, SCALES
        ),
        ValueError,
        r"features\[1\]",
    ),
    "dtype_differs": (
        lambda: prroi_pool_levels(
            pyramid()[:1] + pyramid(dtype=torch.float32)[1:],
            random_rois(2),
            torch.zeros(2, dtype=torch.long),
            2,
            SCALES,
        ),
        TypeError,
        r"features\[1\]",
    ),
    "feature_3d": (
        lambda: prroi_pool_levels(
            [f[0] for f in pyramid()], random_rois(2), torch.zeros(2, dtype=torch.long), 2, SCALES
        ),
        ValueError,
        r"features\[0\]",
    ),
    "levels_int32": (
        lambda: prroi_pool_levels(pyramid(), random_rois(2), torch.zeros(2, dtype=torch.int32), 2, SCALES),
        TypeError,
        "levels",
    ),
    "levels_length": (
        lambda: prroi_pool_levels(pyramid(), random_rois(2), torch.zeros(3, dtype=torch.long), 2, SCALES),
        ValueError,
        "levels",
    ),
    "rois_k4": (
        lambda: prroi_pool_levels(pyramid(), random_rois(2)[:, 1:], torch.zeros(2, dtype=torch.long), 2, SCALES),
        ValueError,
        "rois",
    ),
    "assign_scales_not_powers": (lambda: assign_fpn_levels(random_rois(2), [0.3]), ValueError, "spatial_scales"),
    "assign_scales_gap": (lambda: assign_fpn_levels(random_rois(2), [1 / 4, 1 / 16]), ValueError, "consecutive"),
    "assign_rois_shape": (lambda: assign_fpn_levels(random_rois(2)[:, :3], SCALES), ValueError, "rois"),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_arguments_raise_naming_the_argument(name):
    call, exc, pattern = BAD_CALLS[name]
    with pytest.raises(exc, match=pattern):
        call()
