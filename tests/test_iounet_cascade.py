"""IoU-Net on Cascade R-CNN (IoUNetCascadeROIHeads): trains with loss_iou, infers with and without the IoU branch,
its baseline stage equals Detectron2's CascadeROIHeads with the same weights; checkpoint names of the IoU branch.

Real Detectron2 models on small CPU inputs (the helpers of test_iounet_model).
"""

import copy

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.modeling import build_model
from reference import assert_baseline_stage_equals_stock
from test_iounet_model import _batch, _cfg, _train_steps

from prroi_d2.modeling import IoUBranch, IoUNetCascadeROIHeads, IoUNetRCNN

# The IoU head's parameter names in every IoU-Net checkpoint so far (before the IoU branch became a component).
OLD_IOU_HEAD_KEYS = {
    f"roi_heads.iou_head.{layer}.{kind}" for layer in ("fcs.0", "fcs.2", "predictor") for kind in ("weight", "bias")
}


def _stock(cfg, name):
    stock_cfg = cfg.clone()
    stock_cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    stock_cfg.MODEL.ROI_HEADS.NAME = name
    return build_model(stock_cfg).eval()


def test_cascade_iounet_trains_with_loss_iou_and_infers_every_stage():
    torch.manual_seed(0)
    cfg = _cfg("iounet_cascade_synthetic_R18.yaml")  # GroupNorm: trains from scratch
    model = build_model(cfg)
    assert isinstance(model, IoUNetRCNN) and isinstance(model.roi_heads, IoUNetCascadeROIHeads)
    assert isinstance(model.roi_heads.iou_branch, IoUBranch) and model.roi_heads.num_cascade_stages == 3
    history = _train_steps(model, cfg, _batch(seed=1), 6)
    expected = {"loss_iou", "loss_rpn_cls", "loss_rpn_loc"} | {
        f"{loss}_stage{k}" for loss in ("loss_cls", "loss_box_reg") for k in range(3)
    }
    assert expected <= set(history[0])
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    assert history[-1]["loss_iou"] < history[0]["loss_iou"]  # the IoU head learns on the fixed batch
    model.eval()
    with torch.no_grad():
        outputs = model(_batch())
    for out in outputs:
        inst = out["instances"]
        assert len(inst) > 0 and {"pred_ious", "pred_boxes_initial", "pred_ious_initial"} <= set(inst.get_fields())
        assert (inst.pred_ious >= inst.pred_ious_initial).all()  # refinement never lowers the predicted IoU
        assert set(out["stages"]) == {"baseline", "iou_nms", "refined"}
        torch.testing.assert_close(out["stages"]["refined"].pred_boxes.tensor, inst.pred_boxes.tensor)


@pytest.mark.parametrize("num_images", [1, 2])
@pytest.mark.parametrize("box_pooler", ["ROIAlignV2", "PrRoIPoolV2"])
def test_cascade_baseline_stage_equals_stock_cascade_roi_heads(num_images, box_pooler):
    cfg = _cfg("iounet_cascade_R50.yaml")
    cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE = box_pooler
    model = build_model(cfg).eval()
    stock = _stock(cfg, "CascadeROIHeads")
    missing, unexpected = stock.load_state_dict(model.state_dict(), strict=False)
    assert not missing and set(unexpected) == OLD_IOU_HEAD_KEYS
    assert_baseline_stage_equals_stock(model, stock, _batch(seed=3)[:num_images])


def test_cascade_inference_without_the_iou_branch_is_stock_cascade_and_with_it_differs():
    cfg = _cfg("iounet_cascade_R50.yaml")
    cfg.MODEL.IOU_NET.NMS.ENABLED = False
    cfg.MODEL.IOU_NET.REFINE.ENABLED = False
    cfg.MODEL.IOU_NET.OUTPUT_STAGES = False
    plain = build_model(cfg).eval()
    stock = _stock(cfg, "CascadeROIHeads")
    stock.load_state_dict(plain.state_dict(), strict=False)
    full_cfg = _cfg("iounet_cascade_R50.yaml")
    full_cfg.MODEL.IOU_NET.OUTPUT_STAGES = False
    full = build_model(full_cfg).eval()
    full.load_state_dict(plain.state_dict())
    batch = _batch(seed=4)
    with torch.no_grad():
        without, theirs, with_branch = plain(batch), stock(batch), full(batch)
    for a, b, c in zip(without, theirs, with_branch):
        assert set(a) == {"instances"} and set(c) == {"instances"}
        a, b, c = a["instances"], b["instances"], c["instances"]
        torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, rtol=0, atol=0)
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)
        assert a.has("pred_ious") and not a.has("pred_boxes_initial")
        assert c.has("pred_boxes_initial") and not torch.equal(c.pred_boxes.tensor, c.pred_boxes_initial.tensor)


@pytest.mark.parametrize("config", ["iounet_R50.yaml", "iounet_cascade_R50.yaml"])
def test_checkpoint_names_of_the_iou_branch_are_the_old_ones(config, tmp_path):
    cfg = _cfg(config)
    model = build_model(cfg)
    stock = _stock(cfg, {"IoUNetROIHeads": "StandardROIHeads"}.get(cfg.MODEL.ROI_HEADS.NAME, "CascadeROIHeads"))
    extra = set(model.state_dict()) - set(stock.state_dict())
    assert extra == OLD_IOU_HEAD_KEYS
    # A checkpoint written under the old names loads strictly into a fresh model and gives its outputs.
    path = tmp_path / "old.pth"
    torch.save({"model": copy.deepcopy(model.state_dict())}, path)
    fresh = build_model(cfg)
    fresh.load_state_dict(torch.load(path)["model"], strict=True)
    model.eval(), fresh.eval()
    with torch.no_grad():
        a, b = model(_batch(seed=2))[0]["instances"], fresh(_batch(seed=2))[0]["instances"]
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, rtol=0, atol=0)


def test_cascade_head_only_training_changes_only_the_iou_head():
    cfg = _cfg("iounet_cascade_R50.yaml")
    cfg.MODEL.IOU_NET.TRAIN_ONLY_IOU_HEAD = True
    model = build_model(cfg)
    before = copy.deepcopy(model.state_dict())
    history = _train_steps(model, cfg, _batch(), 2)
    assert set(history[0]) == {"loss_iou"}
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert changed and set(changed) <= OLD_IOU_HEAD_KEYS
