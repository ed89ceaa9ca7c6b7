"""The IoU head: shapes, class-aware selection, both losses against values computed by hand (CPU)."""

import math

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec

from prroi_d2 import add_iounet_config
from prroi_d2.modeling import IoUHead, build_iou_head


def _cfg(**head):
    cfg = get_cfg()
    add_iounet_config(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.IOU_NET.HEAD.FC_DIM = 16
    for k, v in head.items():
        cfg.MODEL.IOU_NET.HEAD[k] = v
    return cfg


def test_shapes_and_class_aware_selection():
    head = build_iou_head(_cfg(), ShapeSpec(channels=4, height=7, width=7))
    assert isinstance(head, IoUHead)
    assert [m.out_features for m in head.fcs if isinstance(m, torch.nn.Linear)] == [16, 16]
    assert head.predictor.weight.std().item() == pytest.approx(0.01, rel=0.3)
    raw = head(torch.randn(5, 4, 7, 7))
    assert raw.shape == (5, 3)
    classes = torch.tensor([0, 2, 1, 1, 0])
    assert torch.equal(head.select(raw, classes), raw[torch.arange(5), classes])
    ious = head.predict_ious(raw, classes)
    assert ious.shape == (5,) and (ious >= 0).all() and (ious <= 1).all()

    agnostic = build_iou_head(_cfg(CLS_AGNOSTIC=True), ShapeSpec(channels=4, height=7, width=7))
    raw = agnostic(torch.randn(5, 4, 7, 7))
    assert raw.shape == (5, 1)
    assert torch.equal(agnostic.select(raw, classes), raw[:, 0])


def test_smooth_l1_loss_by_hand():
    head = build_iou_head(_cfg(SMOOTH_L1_BETA=0.5, LOSS_WEIGHT=5.0), ShapeSpec(channels=1, height=1, width=1))
    raw = torch.tensor([[0.9, -0.2, 0.0], [0.1, 0.3, -0.8]])
    classes = torch.tensor([0, 2])
    target = torch.tensor([0.7, 0.55])  # 2 * IoU - 1 = 0.4, 0.1
    # |0.9 - 0.4| = 0.5 >= beta: 0.5 - 0.25 = 0.25;  |-0.8 - 0.1| = 0.9: 0.9 - 0.25 = 0.65
    expected = 5.0 * (0.25 + 0.65) / 2
    assert head.losses(raw, classes, target)["loss_iou"].item() == pytest.approx(expected, rel=1e-6)
    # Small errors are quadratic: 0.5 * d^2 / beta.
    raw = torch.tensor([[0.5, 0, 0]])
    assert head.losses(raw, torch.tensor([0]), torch.tensor([0.7]))["loss_iou"].item() == pytest.approx(
        5.0 * 0.5 * 0.1**2 / 0.5, rel=1e-5
    )
    # Prediction of the smooth-L1 head: IoU = (out + 1) / 2, clamped.
    assert head.predict_ious(torch.tensor([[0.4, 3.0, -3.0]]), torch.tensor([0])).item() == pytest.approx(0.7)
    assert head.predict_ious(torch.tensor([[3.0]]), torch.tensor([0])).item() == 1.0


def test_bce_loss_by_hand():
    head = build_iou_head(_cfg(LOSS_TYPE="bce", LOSS_WEIGHT=2.0), ShapeSpec(channels=1, height=1, width=1))
    raw = torch.tensor([[0.3, 1.2, 0.0]])
    target = torch.tensor([0.8])
    p = 1 / (1 + math.exp(-1.2))
    expected = 2.0 * -(0.8 * math.log(p) + 0.2 * math.log(1 - p))
    assert head.losses(raw, torch.tensor([1]), target)["loss_iou"].item() == pytest.approx(expected, rel=1e-6)
    assert head.predict_ious(raw, torch.tensor([1])).item() == pytest.approx(p, rel=1e-6)


def test_bad_loss_type_names_the_option():
    with pytest.raises(ValueError, match="LOSS_TYPE"):
        build_iou_head(_cfg(LOSS_TYPE="l2"), ShapeSpec(channels=1, height=1, width=1))


def test_empty_batch_loss_is_zero_with_gradient():
    head = build_iou_head(_cfg(), ShapeSpec(channels=1, height=1, width=1))
    raw = head(torch.zeros(0, 1, 1, 1))
    loss = head.losses(raw, torch.zeros(0, dtype=torch.int64), torch.zeros(0))["loss_iou"]
    loss.backward()
    assert loss.item() == 0.0
