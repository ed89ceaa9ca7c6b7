"""Jittered ground-truth training boxes of the IoU head (CPU)."""

import pytest
import torch

pytest.importorskip("detectron2")

from reference import reference_box_iou

from prroi_d2.modeling.box_jitter import box_iou, sample_jittered_boxes, sample_uniform_over_bins

GT = torch.tensor(
    [[10.0, 20.0, 60.0, 90.0], [50.0, 30.0, 130.0, 70.0], [100.0, 80.0, 150.0, 118.0]], dtype=torch.float64
)
IMAGE = (120, 160)


def test_box_iou_matches_loop():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(20, 4, generator=g, dtype=torch.float64) * 50
    a[:, 2:] += a[:, :2]
    expected = torch.tensor([[reference_box_iou(x.tolist(), y.tolist()) for y in GT] for x in a], dtype=torch.float64)
    torch.testing.assert_close(box_iou(a, GT), expected)


def test_samples_are_valid_and_targets_are_max_overlap():
    g = torch.Generator().manual_seed(1)
    boxes, ious, index = sample_jittered_boxes(GT, IMAGE, 500, generator=g)
    assert boxes.shape == (500, 4) and ious.shape == (500,) and index.dtype == torch.int64
    assert (ious >= 0.5).all() and (ious <= 1.0).all()
    h, w = IMAGE
    assert (
        (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    )
    for box, iou, k in zip(boxes.tolist(), ious.tolist(), index.tolist()):
        overlaps = [reference_box_iou(box, gt) for gt in GT.tolist()]
        assert iou == pytest.approx(max(overlaps), abs=1e-9)
        assert overlaps[k] == pytest.approx(max(overlaps), abs=1e-9)


def test_uniform_over_iou_bins():
    # 5 bins of 0.1 over [0.5, 1]: 4000 samples -> 800 per bin by construction (repeats fill rare bins). Unique
    # boxes per bin must also be plentiful, i.e. the jitter really covers every bin: >= 200 distinct per bin.
    g = torch.Generator().manual_seed(2)
    boxes, ious, _ = sample_jittered_boxes(GT, IMAGE, 4000, generator=g)
    bins = ((ious - 0.5) / 0.1).floor().clamp(max=4).long()
    counts = torch.bincount(bins, minlength=5)
    assert counts.tolist() == [800] * 5
    for b in range(5):
        distinct = torch.unique(boxes[bins == b], dim=0).shape[0]
        assert distinct >= 200, (b, distinct)
    # Within a bin the IoUs spread over the bin (not all at one edge): each bin's two halves hold >= 25% each.
    for b in range(5):
        inside = ious[bins == b]
        low = (inside < 0.5 + 0.1 * b + 0.05).float().mean().item()
        assert 0.25 <= low <= 0.75, (b, low)


def test_reproducible_with_a_seed_and_different_without():
    a = sample_jittered_boxes(GT, IMAGE, 64, generator=torch.Generator().manual_seed(3))
    b = sample_jittered_boxes(GT, IMAGE, 64, generator=torch.Generator().manual_seed(3))
    c = sample_jittered_boxes(GT, IMAGE, 64, generator=torch.Generator().manual_seed(4))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])


def test_image_without_ground_truth():
    boxes, ious, index = sample_jittered_boxes(GT[:0], IMAGE, 64)
    assert boxes.shape == (0, 4) and ious.shape == (0,) and index.shape == (0,)


def test_uniform_sampler_quota_and_empty_bins():
    bins = torch.tensor([0, 0, 0, 2, 2, -1, 7, 2])
    chosen = sample_uniform_over_bins(bins, 3, 9, torch.Generator().manual_seed(0))
    # Bin 1 is empty: its 3 slots stay empty; bins 0 and 2 fill 3 slots each from their own members.
    assert sorted(bins[chosen].tolist()) == [0, 0, 0, 2, 2, 2]
    assert set(chosen.tolist()) == {0, 1, 2, 3, 4, 7}


@pytest.mark.parametrize(
    "kwargs",
    [{"gt_boxes": GT[:, :3]}, {"num_bins": 0}, {"min_iou": 1.0}, {"max_scale": 0.5}, {"candidates_per_sample": 0}],
)
def test_bad_arguments_raise(kwargs):
    args = {"gt_boxes": GT, "image_size": IMAGE, "num_samples": 8}
    args.update(kwargs)
    with pytest.raises(ValueError, match="sample_jittered_boxes"):
        sample_jittered_boxes(**args)
