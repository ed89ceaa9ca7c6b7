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
