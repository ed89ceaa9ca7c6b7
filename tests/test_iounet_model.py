"""IoU-Net in Detectron2: configs build, train and infer; head-only training; stages; one-launch pooler; learning.

Real Detectron2 models on small CPU inputs (CUDA variants marked ``cuda``).
"""

import copy
import os

import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.modeling.poolers import ROIPooler
from detectron2.solver import build_optimizer
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from reference import assert_baseline_stage_equals_stock

from prroi_d2 import add_iounet_config
from prroi_d2.functional import boxes_to_rois
from prroi_d2.modeling import IoUNetRCNN, IoUNetROIHeads, pool_rois, sample_jittered_boxes
from prroi_d2.modeling import poolers as prroi_poolers  # its classes by attribute: test_poolers reloads it

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _cfg(config="iounet_R50.yaml", small_backbone=True, device="cpu"):
    cfg = get_cfg()
    add_iounet_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", config))
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.PIXEL_STD = [57.0, 57.0, 57.0]
    if small_backbone:
        cfg.MODEL.RESNETS.DEPTH = 18
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
        cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 4
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.IOU_NET.HEAD.FC_DIM = 64
    cfg.MODEL.IOU_NET.JITTER.NUM_PER_IMAGE = 16
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 64
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 64
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # untrained models still detect something
    cfg.TEST.DETECTIONS_PER_IMAGE = 20
    cfg.SOLVER.BASE_LR = 0.01
    return cfg


def _batch(num_classes=4, seed=0, masks=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    batch = []
    for h, w in ((128, 160), (112, 144)):
        image = torch.randint(0, 40, (3, h, w), generator=g, dtype=torch.uint8)
        xy = torch.rand(3, 2, generator=g) * torch.tensor([w - 60.0, h - 60.0])
        boxes = torch.cat([xy, xy + 20 + torch.rand(3, 2, generator=g) * 36], dim=1)
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.randint(num_classes, (3,), generator=g)
        bitmasks = torch.zeros(3, h, w, dtype=torch.bool)
        for k, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            image[:, y0:y1, x0:x1] = 200  # something to detect
            bitmasks[k, y0:y1, x0:x1] = True
        if masks:
            inst.gt_masks = BitMasks(bitmasks)
        batch.append({"image": image.to(device), "instances": inst.to(device), "height": h, "width": w})
    return batch


def _train_steps(model, cfg, batch, steps):
    optimizer = build_optimizer(cfg, model)
    model.train()
    history = []
    with EventStorage():
        for _ in range(steps):
            losses = model(batch)
            total = sum(losses.values())
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            history.append({k: float(v) for k, v in losses.items()})
    return history


@pytest.mark.parametrize("device", DEVICES)
def test_iounet_r50_config_trains_and_infers(device):
    cfg = _cfg(small_backbone=False, device=device)
    cfg.SOLVER.BASE_LR = 1e-5  # a randomly initialised R50 without normalisation diverges at larger rates
    model = build_model(cfg)
    assert isinstance(model, IoUNetRCNN) and isinstance(model.roi_heads, IoUNetROIHeads)
    assert isinstance(model.roi_heads.iou_pooler, prroi_poolers.PrRoIPooler)
    assert isinstance(model.roi_heads.box_pooler, prroi_poolers.PrRoIPooler)
    history = _train_steps(model, cfg, _batch(device=device), 2)
    assert {"loss_cls", "loss_box_reg", "loss_iou", "loss_rpn_cls", "loss_rpn_loc"} <= set(history[0])
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    model.eval()
    with torch.no_grad():
        outputs = model(_batch(device=device))
    for out, inputs in zip(outputs, _batch()):
        inst = out["instances"]
        assert inst.image_size == (inputs["height"], inputs["width"])
        assert len(inst) > 0 and {"pred_ious", "pred_boxes_initial", "pred_ious_initial"} <= set(inst.get_fields())
        assert ((inst.pred_ious >= 0) & (inst.pred_ious <= 1)).all()
        assert (inst.pred_ious >= inst.pred_ious_initial).all()  # refinement never lowers the predicted IoU
        assert set(out["stages"]) == {"baseline", "iou_nms", "refined"}


@pytest.mark.cuda
def test_amp_training_on_cuda():
    cfg = _cfg(device="cuda")
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda")
    model.train()
    with EventStorage():
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.float16):
                losses = model(_batch(device="cuda"))
            assert torch.isfinite(losses["loss_iou"]) and "loss_iou" in losses
            optimizer.zero_grad()
            scaler.scale(sum(losses.values())).backward()
            scaler.step(optimizer)
            scaler.update()
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        outputs = model(_batch(device="cuda"))
    assert all(len(o["instances"]) > 0 for o in outputs)


def test_head_only_training_leaves_the_detector_bit_identical():
    cfg = _cfg("iounet_R50_head_only.yaml")
    cfg.MODEL.RESNETS.NORM = "BN"  # BatchNorm with running statistics: they must not move either
    cfg.MODEL.FPN.NORM = "BN"
    model = build_model(cfg)
    before = copy.deepcopy(model.state_dict())
    history = _train_steps(model, cfg, _batch(), 3)
    assert set(history[0]) == {"loss_iou"}  # the RPN and box head stay in eval mode: no other loss
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith("roi_heads.iou_head.") for k in changed), changed
    assert any("running_mean" in k for k in before)
    assert model.backbone.training is False and model.roi_heads.iou_head.training is True


def test_mask_rcnn_with_iounet_trains_and_infers():
    cfg = _cfg("iounet_mask_R50.yaml")
    model = build_model(cfg)
    history = _train_steps(model, cfg, _batch(masks=True), 1)
    assert {"loss_mask", "loss_iou"} <= set(history[0])
    model.eval()
    with torch.no_grad():
        outputs = model(_batch())
    inst = outputs[0]["instances"]
    assert inst.has("pred_masks") and inst.pred_masks.shape[1:] == (128, 160) and inst.has("pred_ious")


@pytest.mark.parametrize("num_images", [1, 2])
def test_baseline_stage_equals_stock_standard_roi_heads(num_images):
    cfg = _cfg()
    cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIAlignV2"
    model = build_model(cfg).eval()
    stock_cfg = cfg.clone()
    stock_cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    stock_cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    stock = build_model(stock_cfg).eval()
    missing, unexpected = stock.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("roi_heads.iou_head.") for k in unexpected)
    for base in assert_baseline_stage_equals_stock(model, stock, _batch(seed=3)[:num_images]):
        assert base.has("pred_ious")


@pytest.mark.parametrize("device", DEVICES)
def test_one_launch_pooler_equals_detectron2_level_loop(device):
    scales = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
    pooler = ROIPooler(5, scales, 0, "PrRoIPoolV2")
    assert isinstance(pooler, prroi_poolers.PrRoIPooler)
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 3, int(256 * s), int(256 * s), generator=g, dtype=torch.float64) for s in scales]
    size = 4 * 60 ** torch.rand(2, 30, 2, generator=g, dtype=torch.float64)  # 4 to 240 px: levels P2 to P4
    xy = torch.rand(2, 30, 2, generator=g, dtype=torch.float64) * (256 - size)
    boxes = torch.cat([xy, xy + size], dim=2)
    results = []
    for forward in (
        prroi_poolers.PrRoIPooler.forward,
        ROIPooler.forward,
    ):  # ours, then Detectron2's own loop over levels
        f = [t.to(device).requires_grad_(True) for t in feats]
        # Boxes holds float32: leaves of that dtype, so that their gradients are the ones compared.
        leaves = [x.to(device=device, dtype=torch.float32).requires_grad_(True) for x in boxes]
        b = [Boxes(x) for x in leaves]
        assert all(x.tensor is leaf for x, leaf in zip(b, leaves))
        out = forward(pooler, f, b)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=device).view_as(out)).sum().backward()
        results.append((out, [t.grad for t in f], [leaf.grad for leaf in leaves]))
    (out, fgrad, bgrad), (ref, ref_fgrad, ref_bgrad) = results
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, r in zip(fgrad, ref_fgrad):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12)
    assert sum(int(r.abs().sum() > 0) for r in ref_fgrad) >= 3
    assert all(r is not None and r.abs().sum() > 0 for r in ref_bgrad)
    for a, r in zip(bgrad, ref_bgrad):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12)


def test_iou_head_learns_localisation_quality():
    """Training only the IoU head (frozen random backbone) on 4 fixed images: Pearson(predicted, true IoU) of fresh
    jittered boxes > 0.8. Fails if the IoU targets or the pooling of the boxes were wrong."""
    torch.manual_seed(0)
    cfg = _cfg("iounet_R50_head_only.yaml")
    cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "PrRoIPoolV2"
    cfg.MODEL.IOU_NET.HEAD.FC_DIM = 256
    cfg.MODEL.IOU_NET.JITTER.NUM_PER_IMAGE = 64
    model = build_model(cfg).train()
    heads = model.roi_heads
    batch = _batch(seed=5) + _batch(seed=6)
    with torch.no_grad():
        images = model.preprocess_image(batch)
        features = model.backbone(images.tensor)
    targets = [x["instances"] for x in batch]
    optimizer = torch.optim.Adam(heads.iou_head.parameters(), lr=1e-3)
    for _ in range(250):
        loss = heads._forward_iou_loss(features, None, targets)["loss_iou"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    g = torch.Generator().manual_seed(123)
    predicted, true = [], []
    for image, target in enumerate(targets):
        boxes, ious, index = sample_jittered_boxes(target.gt_boxes.tensor, target.image_size, 100, generator=g)
        rois = torch.cat([torch.full_like(boxes[:, :1], image), boxes], dim=1)
        with torch.no_grad():
            raw = heads.iou_head(pool_rois(heads.iou_pooler, [features[f] for f in heads.iou_in_features], rois))
        predicted.append(heads.iou_head.predict_ious(raw, target.gt_classes[index]))
        true.append(ious)
    r = torch.corrcoef(torch.stack([torch.cat(predicted), torch.cat(true)]))[0, 1].item()
    assert r > 0.8, r


@pytest.mark.cuda
def test_cuda_graph_refinement_equals_eager_refinement():
    cfg = _cfg(device="cuda")
    graphed = build_model(cfg).eval()
    cfg.MODEL.IOU_NET.REFINE.CUDA_GRAPHS = 0
    eager = build_model(cfg).eval()
    eager.load_state_dict(graphed.state_dict())
    batch = _batch(device="cuda", seed=5)
    with torch.inference_mode():
        reference = eager(batch)
        runs = [graphed(batch) for _ in range(3)]  # eager, then captured, then replayed
    assert len(graphed.roi_heads._refine_graphs) == 1 and len(eager.roi_heads._refine_graphs) == 0
    for outputs in runs:
        for out, ref in zip(outputs, reference):
            a, b = out["instances"], ref["instances"]
            assert len(b) > 0
            torch.testing.assert_close(a.pred_boxes_initial.tensor, b.pred_boxes_initial.tensor, rtol=0, atol=0)
            torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(a.pred_ious, b.pred_ious, rtol=1e-5, atol=1e-5)
    moved = (reference[0]["instances"].pred_boxes.tensor - reference[0]["instances"].pred_boxes_initial.tensor).abs()
    assert moved.max() > 0  # refinement did something to compare


def test_top_per_image_single_image_path_equals_general_path():
    from prroi_d2.modeling.detections import top_per_image

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40,), generator=g).float()  # many ties: their input order must be kept
    index = torch.randperm(40, generator=g)
    images = torch.zeros(40, dtype=torch.int64)
    for k in (-1, 0, 3, 39, 100):
        general = top_per_image(index, scores, images, k)
        assert torch.equal(top_per_image(index, scores, images, k, num_images=1), general)
    assert torch.equal(top_per_image(index, scores, images, 3), index[torch.sort(-scores, stable=True).indices[:3]])


def test_prroi_pooler_rois_equal_detectron2_pooler_format():
    from detectron2.modeling.poolers import convert_boxes_to_pooler_format

    g = torch.Generator().manual_seed(1)
    box_lists = [Boxes(torch.rand(n, 4, generator=g) * 50) for n in (3, 0, 5)]
    ours = boxes_to_rois([b.tensor for b in box_lists])  # what PrRoIPooler.forward pools
    torch.testing.assert_close(ours, convert_boxes_to_pooler_format(box_lists), rtol=0, atol=0)


@pytest.mark.cuda
def test_tf32_iou_branch_is_used_close_to_ieee_and_restores_the_setting():
    cfg = _cfg(device="cuda")
    cfg.MODEL.IOU_NET.HEAD.FC_DIM = 512
    model = build_model(cfg).eval()
    heads = model.roi_heads
    with torch.no_grad():
        heads.iou_head.predictor.weight.mul_(30.0)  # spread the predictions over [0, 1]
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(2, 32, 128 // s, 160 // s, generator=g).cuda() for s in (4, 8, 16, 32)]
    xy = torch.rand(300, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + 8 + torch.rand(300, 2, generator=g) * 60], dim=1).cuda()
    images = torch.randint(2, (300,), generator=g).cuda()
    classes = torch.randint(4, (300,), generator=g).cuda()
    assert torch.backends.cuda.matmul.allow_tf32 is False
    out = {}
    for tf32 in (True, False):
        heads.iou_tf32 = tf32
        with torch.inference_mode():
            out[tf32] = heads._predict_ious(features, boxes, images, classes)
        assert torch.backends.cuda.matmul.allow_tf32 is False  # restored
    diff = (out[True] - out[False]).abs()
    assert out[False].std() > 0.1
    assert diff.max() > 0  # TF32 was used
    assert diff.max() < 5e-3, float(diff.max())


@pytest.mark.cuda
def test_refinement_of_a_head_not_declared_graph_safe_runs_eagerly():
    from prroi_d2.modeling import IoUHead

    class Custom(IoUHead):
        cuda_graph_safe = False

    cfg = _cfg(device="cuda")
    model = build_model(cfg).eval()
    head = model.roi_heads.iou_head
    head.__class__ = Custom
    batch = _batch(device="cuda", seed=5)
    with torch.inference_mode():
        for _ in range(3):
            outputs = model(batch)
    assert len(model.roi_heads._refine_graphs) == 0 and len(outputs[0]["instances"]) > 0
