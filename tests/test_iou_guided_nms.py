"""IoU-guided NMS (Algorithm 1) against a plain loop written here (CPU; CUDA when available)."""

import pytest
import torch

pytest.importorskip("detectron2")

from reference import reference_box_iou

from prroi_d2.modeling import iou_guided_nms


def _reference(boxes, scores, ious, idxs, threshold):
    """Algorithm 1 as written in the paper, one box at a time (ties in predicted IoU: lower index first)."""
    remaining = sorted(range(len(boxes)), key=lambda i: (-ious[i], i))
    keep, cluster_scores = [], []
    while remaining:
        m = remaining.pop(0)
        s, rest = scores[m], []
        for j in remaining:
            if idxs[j] == idxs[m] and reference_box_iou(boxes[m], boxes[j]) > threshold:
                s = max(s, scores[j])
            else:
                rest.append(j)
        remaining = rest
        keep.append(m)
        cluster_scores.append(s)
    return keep, cluster_scores


def _random_case(seed, n, num_groups, device):
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(max(1, n // 6), 2, generator=g) * 200
    which = torch.randint(len(centres), (n,), generator=g)
    xy = centres[which] + torch.randn(n, 2, generator=g) * 6
    wh = 20 + torch.rand(n, 2, generator=g) * 40
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.rand(n, generator=g)
    ious = (torch.rand(n, generator=g) * 10).floor() / 10  # many ties
    idxs = torch.randint(num_groups, (n,), generator=g)
    return [t.to(device) for t in (boxes, scores, ious, idxs)]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "seed,n,groups,threshold", [(0, 60, 1, 0.5), (1, 150, 3, 0.5), (2, 200, 5, 0.3), (3, 7, 2, 0.7)]
)
def test_matches_the_paper_loop(device, seed, n, groups, threshold):
    boxes, scores, ious, idxs = _random_case(seed, n, groups, device)
    keep, cluster_scores = iou_guided_nms(boxes, scores, ious, idxs, threshold)
    ref_keep, ref_scores = _reference(boxes.double().tolist(), scores.tolist(), ious.tolist(), idxs.tolist(), threshold)
    assert keep.dtype == torch.int64 and keep.device.type == device
    assert keep.tolist() == ref_keep
    torch.testing.assert_close(cluster_scores.cpu(), torch.tensor(ref_scores), rtol=0, atol=0)
    if n >= 50:  # something was clustered, and some kept box got a higher score than its own from its cluster
        assert len(ref_keep) < n
        assert (cluster_scores > scores[keep]).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("groups", [1, 37])
def test_large_inputs_match_the_greedy_op_on_cpu(device, groups):
    """3000 boxes in 1 or 37 groups (a group's boxes walked by one thread block on CUDA): the same keep and cluster
    scores as on CPU, and the reference loop agrees on a 400-box subset."""
    boxes, scores, ious, idxs = _random_case(7, 3000, groups, "cpu")
    expected = iou_guided_nms(boxes, scores, ious, idxs, 0.5)
    keep, cluster_scores = iou_guided_nms(*(t.to(device) for t in (boxes, scores, ious, idxs)), 0.5)
    assert torch.equal(keep.cpu(), expected[0]) and torch.equal(cluster_scores.cpu(), expected[1])
    assert 100 < len(keep) < 3000
    sub = [t[:400] for t in (boxes, scores, ious, idxs)]
    ref_keep, ref_scores = _reference(sub[0].double().tolist(), sub[1].tolist(), sub[2].tolist(), sub[3].tolist(), 0.5)
    keep, cluster_scores = iou_guided_nms(*(t.to(device) for t in sub), 0.5)
    assert keep.tolist() == ref_keep
    torch.testing.assert_close(cluster_scores.cpu(), torch.tensor(ref_scores), rtol=0, atol=0)


@pytest.mark.parametrize(
    "boxes,groups,threshold,error,match",
    [
        (torch.zeros(3, 5), torch.zeros(3, dtype=torch.int64), 0.5, ValueError, "boxes must be"),
        (torch.zeros(3, 4), torch.zeros(2, dtype=torch.int64), 0.5, ValueError, "groups must be"),
        (torch.zeros(3, 4), torch.zeros(3), 0.5, TypeError, "groups must be int64"),
        (torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), 0.5, TypeError, "floating"),
        (torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64), 1.5, ValueError, "iou_threshold"),
    ],
)
def test_greedy_op_names_bad_arguments(boxes, groups, threshold, error, match):
    with pytest.raises(error, match=match):
        torch.ops.prroi_d2._nms_clusters(boxes, groups, threshold)


@pytest.mark.parametrize("device", DEVICES)
def test_cluster_max_and_groups(device):
    boxes = torch.tensor(
        [[0, 0, 10, 10], [1, 0, 11, 10], [0, 1, 10, 11], [50, 50, 60, 60], [0, 0, 10, 10]], dtype=torch.float32
    ).to(device)
    scores = torch.tensor([0.2, 0.9, 0.5, 0.4, 0.8], device=device)
    ious = torch.tensor([0.9, 0.6, 0.7, 0.5, 0.3], device=device)
    idxs = torch.tensor([0, 0, 0, 0, 1], device=device)  # box 4 is another class: never suppressed by box 0
    keep, cluster_scores = iou_guided_nms(boxes, scores, ious, idxs, 0.5)
    assert keep.tolist() == [0, 3, 4]
    assert cluster_scores.tolist() == pytest.approx([0.9, 0.4, 0.8])


def test_ties_broken_by_lower_index():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10.5]], dtype=torch.float32)
    keep, _ = iou_guided_nms(boxes, torch.tensor([0.1, 0.9]), torch.tensor([0.7, 0.7]), torch.tensor([0, 0]), 0.5)
    assert keep.tolist() == [0]


def test_empty_input():
    keep, cluster_scores = iou_guided_nms(
        torch.zeros(0, 4), torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5
    )
    assert keep.shape == (0,) and keep.dtype == torch.int64 and cluster_scores.shape == (0,)


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"boxes": torch.zeros(3, 5)}, ValueError, "boxes"),
        ({"scores": torch.zeros(2)}, ValueError, "scores"),
        ({"ious": torch.zeros(3, 1)}, ValueError, "ious"),
        ({"idxs": torch.zeros(3)}, TypeError, "idxs"),
        ({"iou_threshold": 1.5}, ValueError, "iou_threshold"),
    ],
)
def test_bad_arguments_are_named(change, error, match):
    args = {
        "boxes": torch.tensor([[0.0, 0, 10, 10]] * 3),
        "scores": torch.ones(3),
        "ious": torch.ones(3),
        "idxs": torch.zeros(3, dtype=torch.int64),
        "iou_threshold": 0.5,
    }
    args.update(change)
    with pytest.raises(error, match=match):
        iou_guided_nms(**args)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_op_passes_opcheck(device):
    boxes, _, ious, idxs = _random_case(3, 60, 4, device)
    order = torch.argsort(idxs * 2 + (ious < 0.5).long(), stable=True)
    torch.library.opcheck(torch.ops.prroi_d2._nms_clusters, (boxes[order], idxs[order].contiguous(), 0.5))
