"""The per-box acceptance rule of refinement against a plain loop."""

import torch

from prroi_d2.modeling.refine_acceptance import accept_refinement, accepted_mask


def _reference(initial_boxes, refined_boxes, initial_ious, refined_ious, margin, low, high):
    boxes, ious = [], []
    for b0, b1, p0, p1 in zip(
        initial_boxes.tolist(), refined_boxes.tolist(), initial_ious.tolist(), refined_ious.tolist()
    ):
        keep = (p1 - p0) > margin and low <= p0 <= high
        boxes.append(b1 if keep else b0)
        ious.append(p1 if keep else p0)
    return torch.tensor(boxes, dtype=torch.float64), torch.tensor(ious, dtype=torch.float64)


def test_accept_refinement_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    k = 200
    initial = torch.rand(k, 4, generator=g, dtype=torch.float64) * 100
    refined = initial + torch.randn(k, 4, generator=g, dtype=torch.float64)
    p0 = torch.rand(k, generator=g, dtype=torch.float64)
    p1 = (p0 + 0.1 * torch.randn(k, generator=g, dtype=torch.float64)).clamp(0, 1)
    for margin, (low, high) in [(0.0, (0.0, 1.0)), (0.03, (0.0, 1.0)), (0.0, (0.5, 0.9)), (0.02, (0.3, 0.8))]:
        boxes, ious = accept_refinement(initial, refined, p0, p1, margin, (low, high))
        ref_boxes, ref_ious = _reference(initial, refined, p0, p1, margin, low, high)
        torch.testing.assert_close(boxes, ref_boxes)
        torch.testing.assert_close(ious, ref_ious)
        kept = accepted_mask(p0, p1, margin, (low, high))
        assert 0 < int(kept.sum()) < k  # the rule both keeps and rejects boxes here


def test_permissive_rule_keeps_every_moved_box():
    initial = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 9.0, 9.0]])
    refined = torch.tensor([[1.0, 0.0, 10.0, 11.0], [5.0, 5.0, 9.0, 9.0]])
    boxes, ious = accept_refinement(initial, refined, torch.tensor([0.5, 0.7]), torch.tensor([0.6, 0.7]))
    assert torch.equal(boxes, refined) and torch.equal(ious, torch.tensor([0.6, 0.7]))
