"""Models and inputs of the benchmarks, and the realistic inference workload made from random weights
(``make_realistic``: see tools/experiments/benchmark_iounet.py)."""

import math
import os

import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.modeling.poolers import assign_boxes_to_levels
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.structures import Boxes, Instances

from prroi_d2 import add_iounet_config
from prroi_d2.modeling.detections import select_candidates
from prroi_d2.modeling.iou_guided_nms import iou_guided_nms

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
PLAIN_CONFIG = "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"
IOUNET_CONFIG = os.path.join(ROOT, "configs", "iounet_R50.yaml")
STRIDES = (4, 8, 16, 32)
NUM_CLASSES = 80


class Setup:
    """Sizes of the workload: the full one, or --tiny (R18, small images, few boxes) for a CPU smoke run."""

    def __init__(self, args):
        self.device = args.device
        self.tiny = args.tiny
        self.height, self.width = (192, 288) if args.tiny else (800, 1216)
        self.gt_per_image = 10
        self.candidates = args.candidates or (300 if args.tiny else 2000)
        self.pool_boxes = 100 if args.tiny else 1000
        self.pool_channels = 64 if args.tiny else 256


def make_cfg(setup, iounet, box_pooler=None, config_file=None):
    """The benchmark config of IoU-Net (``config_file``, default configs/iounet_R50.yaml) or, ``iounet`` False, of the
    plain detector (``config_file``, default Detectron2's faster_rcnn_R_50_FPN_1x.yaml); random weights, no masks."""
    cfg = get_cfg()
    add_iounet_config(cfg)
    if iounet:
        cfg.merge_from_file(config_file or IOUNET_CONFIG)
        cfg.MODEL.IOU_NET.OUTPUT_STAGES = False
    else:
        cfg.merge_from_file(config_file or model_zoo.get_config_file(PLAIN_CONFIG))
    cfg.MODEL.MASK_ON = False
    if box_pooler is not None:
        cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE = box_pooler
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = setup.device
    cfg.SOLVER.BASE_LR = 0.0
    if setup.tiny:
        cfg.MODEL.RESNETS.DEPTH = 18
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
        cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 300
        cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 150
        cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
        cfg.MODEL.IOU_NET.JITTER.NUM_PER_IMAGE = 32
    cfg.freeze()
    return cfg


def flat(node, prefix=""):
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def cfg_diff(reference, other):
    """'KEY: reference -> other' for every MODEL key that differs."""
    a, b = flat(reference.MODEL, "MODEL."), flat(other.MODEL, "MODEL.")
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def build(cfg, train):
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train(train)
    return model


def load_shared(dst, src):
    """Load ``src``'s state into ``dst`` (strict=False); only the IoU head may be missing."""
    result = dst.load_state_dict(src.state_dict(), strict=False)
    odd = [k for k in result.missing_keys if ".iou_head." not in k] + list(result.unexpected_keys)
    if odd:
        raise RuntimeError(f"unexpected state_dict mismatch: {odd[:10]}")
    return len(result.missing_keys)


def random_boxes(num, height, width, gen, min_size, max_size):
    """(num, 4) XYXY boxes of log-uniform sqrt-area in [min_size, max_size] and aspect 0.5-2, inside the image."""
    size = torch.exp(torch.empty(num).uniform_(math.log(min_size), math.log(max_size), generator=gen))
    aspect = torch.exp(torch.empty(num).uniform_(math.log(0.5), math.log(2.0), generator=gen))
    w = (size * aspect.sqrt()).clamp(max=width - 1)
    h = (size / aspect.sqrt()).clamp(max=height - 1)
    x0 = torch.rand(num, generator=gen) * (width - w)
    y0 = torch.rand(num, generator=gen) * (height - h)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def make_inputs(setup, num_images, with_gt, seed):
    """Detectron2 inputs: uint8 random images (already on the device), optionally ~10 GT boxes each."""
    gen = torch.Generator().manual_seed(seed)
    h, w = setup.height, setup.width
    inputs = []
    for _ in range(num_images):
        item = {
            "image": torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8).to(setup.device),
            "height": h,
            "width": w,
        }
        if with_gt:
            n = setup.gt_per_image + int(torch.randint(-2, 3, (1,), generator=gen))
            inst = Instances((h, w))
            inst.gt_boxes = Boxes(random_boxes(n, h, w, gen, 24, 0.7 * min(h, w)).to(setup.device))
            inst.gt_classes = torch.randint(0, NUM_CLASSES, (n,), generator=gen).to(setup.device)
            item["instances"] = inst
        inputs.append(item)
    return inputs


def box_head_outputs(model, inputs):
    """Everything the ROI heads see in one inference forward: images, features, proposals, box-head features,
    predictions, class-specific boxes and probabilities (under inference mode)."""
    heads = model.roi_heads
    with torch.inference_mode():
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features, None)
        box_features = heads.box_head(
            heads.box_pooler([features[f] for f in heads.box_in_features], [p.proposal_boxes for p in proposals])
        )
        predictions = heads.box_predictor(box_features)
        boxes = heads.box_predictor.predict_boxes(predictions, proposals)
        probs = heads.box_predictor.predict_probs(predictions, proposals)
    return {
        "images": images,
        "features": features,
        "proposals": proposals,
        "box_features": box_features,
        "boxes": boxes,
        "probs": probs,
    }


def capture_outputs(modules, fn):
    """Run ``fn`` under inference mode; returns, per module, its outputs of that run as one (N, channels) tensor."""
    outputs = [[] for _ in modules]

    def hook(i):
        def save(module, args, out):
            outputs[i].append(out.movedim(1, -1).reshape(-1, out.size(1)).double() if out.dim() > 2 else out.double())

        return save

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        with torch.inference_mode():
            fn()
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(o) for o in outputs]


def standardize(layer, out, std, mean=0.0):
    """Rescale the linear or convolution ``layer`` whose outputs ``out`` (N, channels) were captured, so that each
    output channel is centred on ``mean`` and the whole output has standard deviation ``std``; returns the new
    outputs (exactly: ``std / s * (out - channel mean) + mean``)."""
    centre = out.mean(dim=0)
    scale = std / (out - centre).std().clamp(min=1e-30)
    with torch.no_grad():
        layer.weight.mul_(float(scale))
        layer.bias.copy_(((layer.bias.double() - centre) * scale + mean).to(layer.bias))
    return (out - centre) * scale + mean


def make_realistic(model, inputs, target, logit_spread=2.0):
    """Give a randomly initialised R-CNN the statistics that drive a trained one's inference cost, in place.

    With random weights and frozen BatchNorm, FPN features have a standard deviation in the thousands: the RPN's
    deltas blow every anchor up to the whole image (a handful of proposals survive NMS), box deltas are as large, and
    class scores are flat (~1/81). Layer by layer, on ``inputs``: each FPN output convolution is rescaled to unit
    standard deviation, the RPN's objectness logits to std 2 (plus an offset per level, see
    :func:`install_level_offsets`, so that each level gives about as many proposals) and anchor deltas to std 0.2,
    the box regressor to std
    1 (before its (10, 10, 5, 5) weights), the classifier's logits to std ``logit_spread`` with every class centred,
    and the background bias is set so that about ``target`` (proposal, class) pairs per image score above the test
    threshold. Only weights and biases change, so every op costs what it costs with trained weights of this spread.
    Returns the candidates per image the calibration expects, and the RPN level offsets."""
    offsets = calibrate_backbone_and_rpn(model, inputs)
    predictor = model.roi_heads.box_predictor
    expected = calibrate_box_predictor(
        predictor, lambda: box_head_outputs(model, inputs), target, len(inputs), logit_spread
    )
    return expected, offsets


def calibrate_backbone_and_rpn(model, inputs):
    """The backbone and RPN part of :func:`make_realistic`, in place (eval mode); returns the RPN level offsets."""
    model.eval()
    rpn = model.proposal_generator
    images = model.preprocess_image(inputs)
    convs = list(model.backbone.output_convs)
    for conv, out in zip(convs, capture_outputs(convs, lambda: model.backbone(images.tensor))):
        standardize(conv, out, 1.0)
    with torch.inference_mode():
        features = model.backbone(images.tensor)
    layers = [rpn.rpn_head.objectness_logits, rpn.rpn_head.anchor_deltas]
    objectness, deltas = capture_outputs(layers, lambda: rpn(images, features, None))
    standardize(layers[1], deltas, 0.2)
    objectness = standardize(layers[0], objectness, 2.0)
    # Per level, the k-th best logit (k = the proposals kept / the levels) is brought to the best level's.
    rows = [features[f].size(0) * features[f].size(2) * features[f].size(3) for f in rpn.in_features]
    share = max(1, rpn.post_nms_topk[False] // len(rows))
    kth = [
        float(level.flatten().topk(min(share, max(1, level.numel() // 4))).values[-1])
        for level in objectness.split(rows)
    ]
    offsets = [max(kth) - q for q in kth]
    install_level_offsets(model, offsets)
    return offsets


def calibrate_box_predictor(predictor, run, target, num_images, logit_spread=2.0):
    """The box predictor part of :func:`make_realistic`, in place, from its outputs in ``run()``: box deltas std 1,
    class logits std ``logit_spread``, background bias for ``target`` candidates per image; returns the candidates
    per image it expects."""
    layers = [predictor.bbox_pred, predictor.cls_score]
    regression, logits = capture_outputs(layers, run)
    standardize(layers[0], regression, 1.0)
    logits = standardize(layers[1], logits, logit_spread)
    thresh = predictor.test_score_thresh

    def count(bias):
        probs = torch.softmax(torch.cat([logits[:, :-1], logits[:, -1:] + bias], dim=1), dim=1)
        return int((probs[:, :-1] > thresh).sum()) / num_images

    lo, hi = -50.0, 50.0  # the count decreases as the background bias grows
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count(mid) > target else (lo, mid)
    with torch.no_grad():
        layers[1].bias[-1] += (lo + hi) / 2
    return count((lo + hi) / 2)


def install_level_offsets(model, offsets):
    """Add ``offsets[l]`` to the RPN's objectness logits of level l (a forward hook on the RPN head: one scalar
    addition per level). A random RPN's logits are alike on every level, so the finest level, with by far the most
    anchors, would give nearly every proposal; a trained RPN proposes boxes of every size."""
    if getattr(model.proposal_generator.rpn_head, "_benchmark_level_offsets", None) is not None:
        raise RuntimeError("RPN level offsets already installed")

    def hook(module, args, out):
        logits, deltas = out
        return [x + o for x, o in zip(logits, offsets)], deltas

    model.proposal_generator.rpn_head._benchmark_level_offsets = list(offsets)
    model.proposal_generator.rpn_head.register_forward_hook(hook)


def calibrate_iou_head(model, inputs, mean_iou=0.7, std_iou=0.15):
    """Rescale the IoU head's predictor so that its predicted IoU of the candidates of ``inputs`` is about
    ``mean_iou`` +- ``std_iou`` (random weights give a constant 0.5, or 0 and 1 once features are large)."""
    heads = model.roi_heads
    with torch.inference_mode():
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features, None)
        boxes, probs, predictor = heads._box_predictions(features, proposals)  # Faster R-CNN or Cascade
    iou_in = [features[f] for f in heads.iou_branch.in_features]

    def run():
        cand = select_candidates(boxes, probs, images.image_sizes, predictor.test_score_thresh)
        heads.iou_branch.predict_ious(iou_in, cand["boxes"], cand["images"], cand["classes"])

    (raw,) = capture_outputs([heads.iou_head.predictor], run)
    if heads.iou_head.loss_type == "bce":
        mean, std = math.log(mean_iou / (1 - mean_iou)), std_iou / (mean_iou * (1 - mean_iou))
    else:
        mean, std = 2 * mean_iou - 1, 2 * std_iou
    standardize(heads.iou_head.predictor, raw, std, mean)


def workload_counts(model, inputs, iounet):
    """Per image (of the first one): proposals, candidates, distinct candidate classes, boxes kept by NMS (before
    the top-k), and the final detections of a real forward."""
    heads = model.roi_heads
    c = box_head_outputs(model, inputs)
    predictor = heads.box_predictor
    sizes = c["images"].image_sizes
    with torch.inference_mode():
        if iounet:
            cand = select_candidates(c["boxes"], c["probs"], sizes, heads.box_predictor.test_score_thresh)
            cand["ious"] = heads.iou_branch.predict_ious(
                [c["features"][f] for f in heads.iou_branch.in_features], cand["boxes"], cand["images"], cand["classes"]
            )
            first = cand["images"] == 0
            groups = cand["images"] * heads.num_classes + cand["classes"]
            keep, _ = iou_guided_nms(cand["boxes"], cand["scores"], cand["ious"], groups, heads.iou_branch.nms_thresh)
            kept = int((cand["images"][keep] == 0).sum())
            num, classes = int(first.sum()), int(cand["classes"][first].unique().numel())
        else:
            probs = c["probs"][0][:, :-1]
            mask = probs > predictor.test_score_thresh
            num, classes = int(mask.sum()), int(mask.any(dim=0).sum())
            kept = len(
                fast_rcnn_inference(
                    c["boxes"][:1],
                    c["probs"][:1],
                    sizes[:1],
                    predictor.test_score_thresh,
                    predictor.test_nms_thresh,
                    -1,
                )[0][0]
            )
        detections = len(model(inputs)[0]["instances"])
        levels = assign_boxes_to_levels([c["proposals"][0].proposal_boxes], 2, 5, 224, 4)
    return {
        "proposals": len(c["proposals"][0]),
        "proposals_per_level": torch.bincount(levels, minlength=4).tolist(),
        "candidates": num,
        "candidate_classes": classes,
        "after_nms": kept,
        "detections": detections,
    }
