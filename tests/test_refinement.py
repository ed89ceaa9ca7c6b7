"""Box refinement (Algorithm 2) on hand-made differentiable IoU functions (CPU; CUDA when available)."""

import pytest
import torch

pytest.importorskip("detectron2")

from prroi_d2.modeling import refine_boxes
from prroi_d2.modeling.box_jitter import box_iou

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _iou_with(target):
    """A differentiable 'predicted IoU': the true IoU of each box with its own target box (K, 4)."""

    def predict(boxes):
        lt = torch.maximum(boxes[:, :2], target[:, :2])
        rb = torch.minimum(boxes[:, 2:], target[:, 2:])
        inter = (rb - lt).clamp(min=0).prod(dim=1)
        area = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1) + (target[:, 2:] - target[:, :2]).prod(dim=1)
        return inter / (area - inter)

    return predict


def _case(device, k=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(k, 2, generator=g) * 100
    target = torch.cat([target, target + 20 + torch.rand(k, 2, generator=g) * 60], dim=1)
    size = target[:, 2:] - target[:, :2]
    start = target + (torch.rand(k, 4, generator=g) - 0.5) * 0.3 * size.repeat(1, 2)
    return target.to(device), start.to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_boxes_move_toward_the_optimum(device):
    target, start = _case(device)
    predict = _iou_with(target)
    refined, ious, initial = refine_boxes(start, predict, step=0.5, max_iter=5, stop_delta=0.0, stop_drop=-1.0)
    torch.testing.assert_close(initial, box_iou(start, target).diagonal())
    torch.testing.assert_close(ious, box_iou(refined, target).diagonal())
    assert (ious >= initial).all()
    assert ious.mean() > initial.mean() + 0.1
    assert (refined - target).abs().mean() < 0.7 * (start - target).abs().mean()
    # More iterations get closer still.
    longer, longer_ious, _ = refine_boxes(start, predict, step=0.5, max_iter=20, stop_delta=0.0, stop_drop=-1.0)
    assert longer_ious.mean() > ious.mean()


@pytest.mark.parametrize("device", DEVICES)
def test_never_returns_a_lower_predicted_iou(device):
    target, start = _case(device, seed=1)
    # A huge step overshoots: the predicted IoU drops, and the best box seen (often the input) is returned.
    refined, ious, initial = refine_boxes(start, _iou_with(target), step=8.0, max_iter=5)
    assert (ious >= initial).all()
    torch.testing.assert_close(ious, box_iou(refined, target).diagonal())
    assert torch.equal(refined[ious == initial], start[ious == initial])


def test_early_stop_rules():
    # Scripted predicted IoU per evaluation t = 0..5 and box; the gradient is 1 for x0 and x1, so every step of a
    # running box shifts it right by step * width.
    table = torch.tensor(
        [
            [0.50, 0.60, 0.70, 0.80, 0.90, 0.95],  # A: keeps improving: runs all 5 steps, the last box is best
            [0.50, 0.5005, 0.9, 0.9, 0.9, 0.9],  # B: change < Omega_1 at t=1: stops, best = box after 1 step
            [0.60, 0.70, 0.65, 0.99, 0.99, 0.99],  # C: drop < Omega_2 at t=2: stops, best = box after 1 step
            [0.60, 0.595, 0.59, 0.585, 0.58, 0.575],  # D: small drops: keeps running, best = the input
        ]
    ).T
    calls = []

    def predict(boxes):
        t = len(calls)
        calls.append(boxes.detach().clone())
        moving = boxes[:, 0] + boxes[:, 2]
        return table[t] + moving - moving.detach()

    start = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]])
    refined, ious, initial = refine_boxes(start, predict, step=0.5, max_iter=5, stop_delta=0.001, stop_drop=-0.01)
    assert len(calls) == 6
    shift = refined[:, 0] / 5.0  # steps taken by the returned box (each moves by 0.5 * width = 5)
    assert shift.tolist() == [5.0, 1.0, 1.0, 0.0]
    assert ious.tolist() == pytest.approx([0.95, 0.5005, 0.70, 0.60], abs=1e-5)
    assert initial.tolist() == pytest.approx([0.5, 0.5, 0.6, 0.6], abs=1e-5)
    # Stopped boxes stay where they stopped.
    assert calls[-1][1, 0].item() == 5.0 and calls[-1][2, 0].item() == 10.0 and calls[-1][3, 0].item() == 25.0


@pytest.mark.parametrize("device", DEVICES)
def test_batched_equals_one_box_at_a_time(device):
    target, start = _case(device, k=12, seed=2)
    refined, ious, initial = refine_boxes(start, _iou_with(target), step=0.5, max_iter=5)
    for i in range(len(start)):
        r, s, s0 = refine_boxes(start[i : i + 1], _iou_with(target[i : i + 1]), step=0.5, max_iter=5)
        torch.testing.assert_close(r[0], refined[i])
        torch.testing.assert_close(s[0], ious[i])
        torch.testing.assert_close(s0[0], initial[i])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_under_no_grad_and_inference_mode(device, context):
    target, start = _case(device, k=8, seed=3)
    expected = refine_boxes(start, _iou_with(target))
    with context():
        got = refine_boxes(start.clone(), _iou_with(target))  # the boxes are inference tensors under inference_mode
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    assert (got[1] > got[2]).any()


def test_clipped_to_the_image():
    target = torch.tensor([[-30.0, -30.0, 20.0, 20.0]])  # optimum partly outside the image
    start = torch.tensor([[2.0, 2.0, 30.0, 30.0]])
    refined, _, _ = refine_boxes(start, _iou_with(target), step=0.5, max_iter=5, clip_size=torch.tensor([[50, 40]]))
    assert (refined >= 0).all() and refined[0, 2] <= 40 and refined[0, 3] <= 50


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"boxes": torch.zeros(2, 5)}, "boxes"),
        ({"step": float("nan")}, "step"),
        ({"max_iter": -1}, "max_iter"),
        ({"stop_drop": 0.1}, "stop_drop"),
        ({"clip_size": torch.ones(3, 2)}, "clip_size"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    args = {"boxes": torch.tensor([[0.0, 0, 10, 10], [1, 1, 5, 5]]), "predict_iou": lambda b: b.sum(dim=1)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        refine_boxes(**args)


def reference_refine_step(
    boxes, grad, ious, previous, best_boxes, best_ious, active, clip_size, step, delta, drop, first
):
    """_refine_step written with torch's element-wise ops, as Algorithm 2 reads."""
    if first:
        best_boxes, best_ious = boxes, ious
    else:
        improved = active & (ious > best_ious)
        best_boxes = torch.where(improved[:, None], boxes, best_boxes)
        best_ious = torch.where(improved, ious, best_ious)
        change = ious - previous
        active = active & (change.abs() >= delta) & (change >= drop)
    if grad is not None:
        size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
        moved = boxes + step * grad * size
        if clip_size is not None:
            high = clip_size.flip(1).repeat(1, 2)
            moved = torch.minimum(torch.maximum(moved, torch.zeros_like(moved)), high)
        boxes = torch.where(active[:, None], moved, boxes)
    return boxes, best_boxes, best_ious, active


def _step_inputs(device, dtype, k=300, seed=4):
    g = torch.Generator().manual_seed(seed)
    boxes = torch.rand(k, 2, generator=g, dtype=torch.float64) * 80
    boxes = torch.cat([boxes, boxes + torch.rand(k, 2, generator=g, dtype=torch.float64) * 60], dim=1)
    grad = torch.randn(k, 4, generator=g, dtype=torch.float64)
    ious = torch.rand(k, generator=g, dtype=torch.float64)
    previous = ious + torch.randn(k, generator=g, dtype=torch.float64) * 0.01  # some changes below Omega_1
    previous[::7] = ious[::7] + 0.0005
    best_ious = torch.rand(k, generator=g, dtype=torch.float64)
    best_boxes = boxes + torch.randn(k, 4, generator=g, dtype=torch.float64)
    active = torch.rand(k, generator=g) > 0.2
    ious[5], previous[6], grad[7, 2] = float("nan"), float("nan"), float("nan")
    clip = torch.tensor([[100.0, 120.0]], dtype=torch.float64).repeat(k, 1)
    args = [boxes, grad, ious, previous, best_boxes, best_ious, active, clip]
    return [a.to(device=device, dtype=dtype if a.is_floating_point() else a.dtype) for a in args]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("with_grad", [False, True])
@pytest.mark.parametrize("with_clip", [False, True])
def test_refine_step_op_equals_the_element_wise_reference(device, dtype, first, with_grad, with_clip):
    args = _step_inputs(device, dtype)
    if not with_grad:
        args[1] = None
    if not with_clip:
        args[7] = None
    got = torch.ops.prroi_d2._refine_step(*args, 0.5, 0.001, -0.01, first)
    want = reference_refine_step(*args, 0.5, 0.001, -0.01, first)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-6, atol=1e-5)
    assert not torch.equal(got[0], args[0]) if with_grad else torch.equal(got[0], args[0])
    assert first or (got[3] != args[6]).any()  # the stop rules stopped some boxes


def test_refine_step_opcheck_and_named_errors():
    args = _step_inputs("cpu", torch.float32, k=9)
    torch.library.opcheck(torch.ops.prroi_d2._refine_step, (*args, 0.5, 0.001, -0.01, False))
    bad = {1: torch.ones(9, 3), 2: torch.ones(8), 6: torch.ones(9), 7: torch.ones(9, 2, dtype=torch.float64)}
    for i, value in bad.items():
        broken = list(args)
        broken[i] = value
        name = ["boxes", "grad", "ious", "previous", "best_boxes", "best_ious", "active", "clip_size"][i]
        with pytest.raises((ValueError, TypeError), match=f"_refine_step: {name}"):
            torch.ops.prroi_d2._refine_step(*broken, 0.5, 0.001, -0.01, False)


# ---------------------------------------------------------------------------------------------------------------------
# Refinement without autograd: the IoU head's explicit input gradient chained with the PrRoI coordinate backward op,
# against autograd on the differentiable forward (an independent reference).
# ---------------------------------------------------------------------------------------------------------------------


def _head(norm="LN", loss_type="bce", class_agnostic=False, channels=4, size=3, dtype=torch.float64, seed=0, **options):
    from detectron2.layers import ShapeSpec

    from prroi_d2.modeling import IoUHead

    torch.manual_seed(seed)
    head = IoUHead(
        ShapeSpec(channels=channels, height=size, width=size),
        num_classes=3,
        num_fc=2,
        fc_dim=16,
        class_agnostic=class_agnostic,
        loss_type=loss_type,
        pred_init_std=0.3,
        norm=norm,
        **options,
    )
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # LayerNorm's affine parameters away from (1, 0)
    return head.to(dtype).eval()


@pytest.mark.parametrize("norm", ["", "LN"])
@pytest.mark.parametrize("loss_type", ["bce", "smooth_l1"])
@pytest.mark.parametrize("class_agnostic", [False, True])
@pytest.mark.parametrize("options", [{}, {"num_conv": 2, "conv_dim": 5}, {"target": "decoupled"}])
def test_iou_head_input_gradient_equals_autograd(norm, loss_type, class_agnostic, options):
    head = _head(norm, loss_type, class_agnostic, **options)
    assert head.supports_input_grad()
    pooled = torch.randn(50, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    classes = torch.randint(0, 3, (50,))
    want = head.predict_ious(head(pooled), classes, clamp=False)
    want_grad = torch.autograd.grad(want.sum(), pooled)[0]
    with torch.inference_mode():
        ious, grad = head.predict_ious_and_input_grad(pooled.detach(), classes)
    torch.testing.assert_close(ious, want.detach().float(), rtol=1e-6, atol=1e-7)
    if options.get("target") == "decoupled":  # the combination of the factors runs in float32, as predict_ious
        torch.testing.assert_close(grad, want_grad, rtol=1e-3, atol=1e-6 * float(want_grad.abs().max()))
    else:
        torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-12)
    assert grad.abs().max() > 0


def test_iou_head_without_explicit_backward_says_so():
    from prroi_d2.modeling import IoUHead

    class Tanh(IoUHead):  # another forward, no explicit gradient of its own: refined through autograd
        def forward(self, x):
            return self.predictor(torch.tanh(self.fcs(torch.flatten(x, 1))))

    head = _head()
    assert head.supports_input_grad()
    head.__class__ = Tanh
    assert not head.supports_input_grad()
    head.__class__ = IoUHead
    head.fcs.append(torch.nn.Tanh())  # a layer without a rule
    assert not head.supports_input_grad()


def _branch(dtype, head=None):
    from detectron2.modeling.poolers import ROIPooler

    from prroi_d2.modeling import IoUBranch

    pooler = ROIPooler(output_size=5, scales=(1 / 4, 1 / 8), sampling_ratio=0, pooler_type="PrRoIPoolV2")
    head = head if head is not None else _head(channels=6, size=5, dtype=dtype)
    branch = IoUBranch(
        in_features=["p2", "p3"], pooler=pooler, iou_head=head, refine_step=1.0, refine_max_iter=5, tf32=False
    )
    g = torch.Generator().manual_seed(5)
    features = [
        torch.randn(2, 6, 40, 48, generator=g, dtype=dtype),
        torch.randn(2, 6, 20, 24, generator=g, dtype=dtype),
    ]
    xy = torch.rand(30, 2, generator=g, dtype=dtype) * torch.tensor([150.0, 120.0], dtype=dtype)
    boxes = torch.cat([xy, xy + 8 + torch.rand(30, 2, generator=g, dtype=dtype) * 60], dim=1)
    images = torch.randint(0, 2, (30,), generator=g)
    sizes = torch.tensor([[160.0, 192.0], [150.0, 180.0]], dtype=dtype)[images]
    classes = torch.randint(0, 3, (30,), generator=g)
    return branch, features, boxes.clamp(max=150.0), classes, images, sizes


def _autograd_reference(branch, features, boxes, classes, images, sizes):
    """Algorithm 2 through autograd on the differentiable forward (the path before the explicit gradient)."""
    from prroi_d2 import prroi_pool_levels

    head, pooler = branch.iou_head, branch.pooler
    levels = pooler.levels_of(boxes)

    def predict(b):
        rois = torch.cat([images.to(b.dtype)[:, None], b], dim=1)
        pooled = prroi_pool_levels(features, rois, levels, pooler.output_size, pooler.prroi_scales, aligned=True)
        return head.predict_ious(head(pooled), classes, clamp=False)

    refined, ious, initial = refine_boxes(boxes, predict, step=1.0, max_iter=5, clip_size=sizes)
    return refined, ious.clamp(0, 1), initial.clamp(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_branch_refinement_without_autograd_equals_autograd(dtype, context):
    branch, features, boxes, classes, images, sizes = _branch(dtype)
    assert branch.iou_head.supports_input_grad()
    want = _autograd_reference(branch, features, boxes, classes, images, sizes)
    with context():
        got = branch.refine_boxes(boxes, classes, images, sizes, *features)
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-9}
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)
    assert (got[0] != boxes).any() and (got[1] > got[2]).any()  # boxes moved, predicted IoU rose


def test_branch_refinement_runs_without_autograd():
    """The explicit path never calls autograd: it runs with autograd's grad function unavailable."""
    branch, features, boxes, classes, images, sizes = _branch(torch.float64)
    want = branch.refine_boxes(boxes, classes, images, sizes, *features)
    original = torch.autograd.grad
    torch.autograd.grad = None
    try:
        with torch.inference_mode():
            got = branch.refine_boxes(boxes, classes, images, sizes, *features)
    finally:
        torch.autograd.grad = original
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_branch_refinement_falls_back_to_autograd():
    from prroi_d2.modeling import IoUHead

    class Opaque(IoUHead):  # a head without an explicit input gradient
        def forward(self, x):
            return self.predictor(self.fcs(torch.flatten(x, 1)))

    head = _head(channels=6, size=5)
    head.__class__ = Opaque
    branch, features, boxes, classes, images, sizes = _branch(torch.float64, head=head)
    assert not head.supports_input_grad()
    want = _autograd_reference(branch, features, boxes, classes, images, sizes)
    kept = {"boxes": boxes, "classes": classes, "images": images}
    with torch.inference_mode():  # through refine (which runs autograd outside inference mode)
        got = branch.refine(features, kept, [(160, 192), (150, 180)])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-9)


def test_refine_boxes_takes_exactly_one_gradient_source():
    boxes = torch.tensor([[0.0, 0, 10, 10]])
    with pytest.raises(ValueError, match="exactly one"):
        refine_boxes(boxes)
    with pytest.raises(ValueError, match="exactly one"):
        refine_boxes(boxes, lambda b: b.sum(1), predict_iou_and_grad=lambda b, g: (b.sum(1), torch.ones_like(b)))
