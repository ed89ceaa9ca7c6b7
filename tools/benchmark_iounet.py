#!/usr/bin/env python
"""Benchmark IoU-Net (prroi_d2's IoUNetRCNN) against Detectron2's plain Faster R-CNN, R50-FPN, on CUDA.

Sections (--only train,infer,stages,pool), each timed side by side in one run, float32 unless stated, CUDA events
after warm-up (the candidates of a section alternate iteration by iteration), median, p10 and p90 of --repeat:

* train:  one training iteration (forward + backward + SGD step, under an EventStorage), 2 images 800x1216 with
          ~10 random ground-truth boxes each (80 classes): plain Faster R-CNN (Detectron2's stock
          faster_rcnn_R_50_FPN_1x.yaml, ROIAlignV2) vs IoU-Net (configs/iounet_R50.yaml: box head and IoU branch on
          PrRoIPoolV2), plus IoU-Net with the box head on ROIAlignV2. The SGD step (Detectron2's build_optimizer)
          runs with lr 0: its kernels are the same, and the weights stay fixed, so every iteration sees the same
          workload and random weights cannot diverge.
* infer:  inference latency, batch 1, 800x1216, 100 detections per image, under torch.inference_mode(): plain vs
          IoU-Net (IoU prediction, IoU-guided NMS, refinement; OUTPUT_STAGES False), plus IoU-Net with a ROIAlignV2
          box head.
* stages: each IoU-Net stage timed on its own, on inputs captured from one forward of the same workload: the ROI
          heads' _candidates, _predict_ious (pool + IoU head), iou_guided_nms, _top_per_image, _refine (T=5), and for
          comparison Detectron2's batched_nms and fast_rcnn_inference, the box head on both poolers, and both ROI
          heads whole.
* pool:   Detectron2's ROIPooler, PrRoIPoolV2 vs ROIAlignV2, 7x7, P2-P5 of an 800x1216 image (256 channels),
          1000 boxes per image, batch 1 and 2, forward and forward + backward (features requiring grad), float32
          and under AMP (autocast float16, half features); plus, under AMP, the op called directly on the half
          features (what PrRoIPooler would cost without casting them to float32 first).

Realistic workload from random weights (nothing is downloaded, MODEL.WEIGHTS ""): with frozen BatchNorm, FPN
features of a random R50 have a standard deviation in the thousands, so the RPN's deltas blow every anchor up to
the whole image (a handful of proposals survive NMS) and class scores are flat (~1/81: nothing passes the 0.05
threshold). make_realistic rescales, layer by layer on the benchmark image, the FPN output convolutions, the RPN's
objectness (plus a per-level offset, a forward hook of one scalar addition per level, so that every RPN level gives
proposals, not only the finest with the most anchors) and delta layers, the box regressor and the classifier
(background bias chosen for --candidates (proposal, class) pairs above the threshold per image: ~1000 proposals,
>= 100 detections); calibrate_iou_head rescales the IoU predictor. The plain model's weights are then loaded into
the IoU-Net models (strict=False): backbone, RPN and box head are identical, and every model sees the same
workload. Each section's header prints its counts.

    python3 tools/benchmark_iounet.py                           # CUDA, every section
    python3 tools/benchmark_iounet.py --only infer,stages --json out.json
    python3 tools/benchmark_iounet.py --device cpu --tiny       # smoke run: R18, small images, few iterations
"""

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

warnings.filterwarnings("ignore", category=UserWarning, message=".*pkg_resources.*")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning, message="torch.meshgrid")

import detectron2  # noqa: E402
import torch  # noqa: E402
from detectron2 import model_zoo  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.layers import batched_nms  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels, convert_boxes_to_pooler_format  # noqa: E402
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference  # noqa: E402
from detectron2.solver import build_optimizer  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import prroi_d2  # noqa: E402
from prroi_d2 import add_iounet_config  # noqa: E402
from prroi_d2.evaluation.reports import json_safe  # noqa: E402
from prroi_d2.modeling.cuda_graphs import CUDAGraphCache  # noqa: E402
from prroi_d2.modeling.iou_guided_nms import iou_guided_nms  # noqa: E402
from prroi_d2.modeling.roi_heads import _top_per_image  # noqa: E402

SECTIONS = ("train", "infer", "stages", "pool")
PLAIN_CONFIG = "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"
IOUNET_CONFIG = os.path.join(ROOT, "configs", "iounet_R50.yaml")
STRIDES = (4, 8, 16, 32)
NUM_CLASSES = 80

# Per-section defaults: (repeat, warmup); --repeat / --warmup override every section.
DEFAULTS = {"train": (20, 5), "infer": (50, 10), "stages": (50, 10), "pool": (50, 10)}
TINY_DEFAULTS = {"train": (2, 1), "infer": (3, 1), "stages": (3, 1), "pool": (3, 1)}


# --------------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------------


class Timer:
    """CUDA events (synchronised after each call) on CUDA, a wall clock on CPU; times in ms."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def once(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def measure(self, fns, repeat, warmup):
        """{name: stats} of the callables ``fns`` ({name: fn}); after ``warmup`` calls of each, the calls alternate
        (one of each per round, ``repeat`` rounds) so that clock or thermal drift hits them all alike."""
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        self.sync()
        times = {name: [] for name in fns}
        for _ in range(repeat):
            for name, fn in fns.items():
                times[name].append(self.once(fn))
        return {name: summarize(t) for name, t in times.items()}

    def peak_mib(self, fn):
        """Peak CUDA memory of one call of ``fn`` above what was allocated before it (MiB); NaN on CPU."""
        if not self.cuda:
            return float("nan")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20


def percentile(sorted_values, q):
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times):
    s = sorted(times)
    return {
        "median": statistics.median(s),
        "p10": percentile(s, 0.1),
        "p90": percentile(s, 0.9),
        "mean": statistics.fmean(s),
        "min": s[0],
        "n": len(s),
        "times_ms": [round(t, 4) for t in times],
    }


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------------
# Models and inputs
# --------------------------------------------------------------------------------------------------------------------


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


def make_cfg(setup, iounet, box_pooler=None):
    cfg = get_cfg()
    add_iounet_config(cfg)
    if iounet:
        cfg.merge_from_file(IOUNET_CONFIG)
        cfg.MODEL.IOU_NET.OUTPUT_STAGES = False
    else:
        cfg.merge_from_file(model_zoo.get_config_file(PLAIN_CONFIG))
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


# --------------------------------------------------------------------------------------------------------------------
# A realistic inference workload
# --------------------------------------------------------------------------------------------------------------------


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
    model.eval()
    heads, rpn = model.roi_heads, model.proposal_generator
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
    layers = [heads.box_predictor.bbox_pred, heads.box_predictor.cls_score]
    regression, logits = capture_outputs(layers, lambda: box_head_outputs(model, inputs))
    standardize(layers[0], regression, 1.0)
    logits = standardize(layers[1], logits, logit_spread)
    thresh = heads.box_predictor.test_score_thresh

    def count(bias):
        probs = torch.softmax(torch.cat([logits[:, :-1], logits[:, -1:] + bias], dim=1), dim=1)
        return int((probs[:, :-1] > thresh).sum()) / len(inputs)

    lo, hi = -50.0, 50.0  # the count decreases as the background bias grows
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count(mid) > target else (lo, mid)
    with torch.no_grad():
        layers[1].bias[-1] += (lo + hi) / 2
    return count((lo + hi) / 2), offsets


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
    c = box_head_outputs(model, inputs)
    iou_in = [c["features"][f] for f in heads.iou_in_features]

    def run():
        cand = heads._candidates(c["boxes"], c["probs"], c["images"].image_sizes)
        heads._predict_ious(iou_in, cand["boxes"], cand["images"], cand["classes"])

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
            cand = heads._candidates(c["boxes"], c["probs"], sizes)
            cand["ious"] = heads._predict_ious(
                [c["features"][f] for f in heads.iou_in_features], cand["boxes"], cand["images"], cand["classes"]
            )
            first = cand["images"] == 0
            groups = cand["images"] * heads.num_classes + cand["classes"]
            keep, _ = iou_guided_nms(cand["boxes"], cand["scores"], cand["ious"], groups, heads.iou_nms_thresh)
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


# --------------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------------


def row(name, stats, peak=float("nan"), ref=None):
    return {"name": name, "stats": stats, "peak_mib": peak, "ratio": stats["median"] / ref["median"] if ref else None}


def section_train(setup, timer, repeat, warmup, checks):
    plain_cfg = make_cfg(setup, iounet=False)
    iou_cfg = make_cfg(setup, iounet=True)
    iou_align_cfg = make_cfg(setup, iounet=True, box_pooler="ROIAlignV2")
    models = {
        "plain Faster R-CNN (box head ROIAlignV2)": build(plain_cfg, True),
        "IoU-Net (box head + IoU branch PrRoIPoolV2)": build(iou_cfg, True),
        "IoU-Net, box head ROIAlignV2 (IoU branch PrRoIPoolV2)": build(iou_align_cfg, True),
    }
    names = list(models)
    inputs = make_inputs(setup, 2, with_gt=True, seed=1)
    calibrated = build(plain_cfg, False)
    _, offsets = make_realistic(calibrated, inputs, setup.candidates)
    for model in models.values():
        load_shared(model, calibrated)
        install_level_offsets(model, offsets)
    del calibrated
    optimizers = {name: build_optimizer(plain_cfg, m) for name, m in models.items()}
    losses_seen = {}

    def step(name):
        model, optimizer = models[name], optimizers[name]

        def fn():
            loss_dict = model(inputs)
            losses = sum(loss_dict.values())
            optimizer.zero_grad()
            losses.backward()
            optimizer.step()
            losses_seen[name] = loss_dict

        return fn

    fns = {name: step(name) for name in names}
    with EventStorage(0):
        stats = timer.measure(fns, repeat, warmup)
        peaks = {name: timer.peak_mib(fn) for name, fn in fns.items()}
    finite = all(bool(torch.isfinite(v).all()) for d in losses_seen.values() for v in d.values())
    iou_losses = sorted(losses_seen[names[1]])
    header = [
        f"Training iteration (forward + backward + SGD step, lr 0), 2 images {setup.height}x{setup.width} with "
        f"{setup.gt_per_image}+-2 random GT boxes each, {NUM_CLASSES} classes, R{plain_cfg.MODEL.RESNETS.DEPTH}-FPN, "
        "random weights made realistic as for inference (same in every model); ratio = median / plain",
        f"IoU-Net config vs plain: {'; '.join(cfg_diff(plain_cfg, iou_cfg))}",
        f"IoU-Net losses: {', '.join(iou_losses)}; all losses finite: {finite}",
    ]
    ref = stats[names[0]]
    rows = [row(n, stats[n], peaks[n], ref) for n in names]
    checks.append(("train: IoU-Net / plain Faster R-CNN", rows[1]["ratio"], 1.25))
    return header, rows, {}


def inference_models(setup, with_variants=True):
    """Plain (made realistic), IoU-Net and (with_variants) the IoU-Net variants {"align": ROIAlignV2 box head,
    "eager": REFINE.CUDA_GRAPHS 0, "ieee": TF32 False}, all with the plain model's weights (every IoU head calibrated
    alike); the inputs; the candidates per image calibration expects."""
    plain = build(make_cfg(setup, iounet=False), False)
    inputs = make_inputs(setup, 1, with_gt=False, seed=2)
    expected, offsets = make_realistic(plain, inputs, setup.candidates)
    iounet = build(make_cfg(setup, iounet=True), False)
    load_shared(iounet, plain)
    install_level_offsets(iounet, offsets)
    calibrate_iou_head(iounet, inputs)
    variants = {}
    options = {
        "align": ("ROIAlignV2", []),
        "eager": (None, ["MODEL.IOU_NET.REFINE.CUDA_GRAPHS", 0]),
        "ieee": (None, ["MODEL.IOU_NET.TF32", False]),
    }
    for name, (box_pooler, opts) in options.items() if with_variants else ():
        cfg = make_cfg(setup, iounet=True, box_pooler=box_pooler)
        cfg.defrost()
        cfg.merge_from_list(opts)
        variants[name] = build(cfg, False)
        load_shared(variants[name], plain)
        install_level_offsets(variants[name], offsets)
        variants[name].roi_heads.iou_head.load_state_dict(iounet.roi_heads.iou_head.state_dict())
    return plain, iounet, variants, inputs, expected


def section_infer(setup, timer, repeat, warmup, checks):
    plain, iounet, variants, inputs, expected = inference_models(setup)
    models = {
        "plain Faster R-CNN (box head ROIAlignV2)": (plain, False),
        "IoU-Net (PrRoIPoolV2; IoU-guided NMS, refinement T=5)": (iounet, True),
        "IoU-Net, box head ROIAlignV2": (variants["align"], True),
        "IoU-Net, IoU branch in IEEE float32 (MODEL.IOU_NET.TF32 False)": (variants["ieee"], True),
        "IoU-Net, refinement without CUDA graphs (REFINE.CUDA_GRAPHS 0)": (variants["eager"], True),
    }
    counts = {name: workload_counts(m, inputs, is_iou) for name, (m, is_iou) in models.items()}

    def infer(model):
        def fn():
            with torch.inference_mode():
                model(inputs)

        return fn

    fns = {name: infer(m) for name, (m, _) in models.items()}
    stats = timer.measure(fns, repeat, warmup)
    peaks = {name: timer.peak_mib(fn) for name, fn in fns.items()}
    names = list(models)
    offsets = plain.proposal_generator.rpn_head._benchmark_level_offsets
    header = [
        f"Inference latency, batch 1, {setup.height}x{setup.width}, torch.inference_mode(), "
        f"{plain.roi_heads.box_predictor.test_topk_per_image} detections per image, R"
        f"{'18' if setup.tiny else '50'}-FPN, random weights; ratio = median / plain",
        "Workload: random weights rescaled layer by layer on this image (make_realistic: FPN outputs std 1, RPN "
        "objectness std 2 plus a per-level offset (a forward hook, "
        f"{'/'.join(f'{o:.2f}' for o in offsets)} on P2-P6) so "
        "every level proposes, RPN deltas std 0.2, box deltas std 1, class logits std 2, predicted IoU "
        "0.7 +- 0.15), the same weights in every model, background bias set for ~"
        f"{setup.candidates} (proposal, class) candidates above score "
        f"{plain.roi_heads.box_predictor.test_score_thresh} per image (calibration expects {expected:.0f}):",
    ]
    for name in names:
        c = counts[name]
        nms = "IoU-guided NMS" if models[name][1] else "NMS"
        header.append(
            f"  {name}: {c['proposals']} proposals (P2-P5: {'/'.join(map(str, c['proposals_per_level']))}), "
            f"{c['candidates']} candidates over {c['candidate_classes']} "
            f"classes, {c['after_nms']} after {nms}, {c['detections']} detections"
        )
    ref = stats[names[0]]
    rows = [row(n, stats[n], peaks[n], ref) for n in names]
    checks.append(("infer: IoU-Net / plain Faster R-CNN, batch 1", rows[1]["ratio"], 1.10))
    return header, rows, {"workload": counts, "expected_candidates": expected, "rpn_level_offsets": offsets}


def section_stages(setup, timer, repeat, warmup, checks):
    plain, iounet, _, inputs, _ = inference_models(setup, with_variants=False)
    heads, plain_heads = iounet.roi_heads, plain.roi_heads
    c = box_head_outputs(iounet, inputs)
    images, features, proposals = c["images"], c["features"], c["proposals"]
    sizes = images.image_sizes
    predictor = heads.box_predictor
    topk = predictor.test_topk_per_image
    with torch.inference_mode():
        maps = heads._pooling_maps(features)  # what IoUNetROIHeads pools from (channels-last copies on CUDA)
    iou_in = [maps[f] for f in heads.iou_in_features]
    iou_in_contiguous = [features[f].contiguous() for f in heads.iou_in_features]
    heads_contiguous = copy.deepcopy(heads)  # graphs of its own, captured on contiguous maps
    proposal_boxes = [p.proposal_boxes for p in proposals]
    with torch.inference_mode():
        cand = heads._candidates(c["boxes"], c["probs"], sizes)
        cand["ious"] = heads._predict_ious(iou_in, cand["boxes"], cand["images"], cand["classes"])
        groups = cand["images"] * heads.num_classes + cand["classes"]
        keep_all, cluster_scores = iou_guided_nms(
            cand["boxes"], cand["scores"], cand["ious"], groups, heads.iou_nms_thresh
        )
        top = _top_per_image(
            torch.arange(len(keep_all), device=keep_all.device), cluster_scores, cand["images"][keep_all], topk, 1
        )
        keep = keep_all[top]
    m, k, r = len(cand["scores"]), len(keep_all), len(keep)

    def ieee(fn):
        """``fn`` with the IoU branch in IEEE float32 (MODEL.IOU_NET.TF32 False: a graph of its own)."""

        def run(*args):
            heads.iou_tf32 = False
            try:
                return fn(*args)
            finally:
                heads.iou_tf32 = True

        return run

    kept = {n: cand[n][keep] for n in ("boxes", "classes", "images")}
    refine_inputs = [kept["boxes"], kept["classes"], kept["images"]]
    refine_inputs += [torch.tensor(sizes, dtype=torch.float32, device=keep.device)[kept["images"]]] + iou_in

    def inference(fn):
        def run():
            with torch.inference_mode():
                fn()

        return run

    def box_head(h, pooled_maps):
        box_in = [pooled_maps[f] for f in h.box_in_features]
        return lambda: h.box_predictor(h.box_head(h.box_pooler(box_in, proposal_boxes)))

    def refine_on(h, maps_in):
        return lambda: h._refine(maps_in, kept, sizes, len(sizes) * topk)

    def predict_on(maps_in):
        return lambda: heads._predict_ious(maps_in, cand["boxes"], cand["images"], cand["classes"])

    refine_graph, predict = refine_on(heads, iou_in), predict_on(iou_in)
    t = heads.refine_max_iter
    spec = {  # key: (row label, callable)
        "backbone": ("backbone (ResNet-FPN)", lambda: iounet.backbone(images.tensor)),
        "rpn": ("RPN", lambda: iounet.proposal_generator(images, features, None)),
        "box_align": (
            f"box head (pool + FCs + predictor), ROIAlignV2, {len(proposals[0])} proposals",
            box_head(plain_heads, features),
        ),
        "box_prroi": ("box head (pool + FCs + predictor), PrRoIPoolV2", box_head(heads, maps)),
        "box_prroi_contiguous": ("  the same, contiguous maps", box_head(heads, features)),
        "maps": ("IoU-Net _pooling_maps (channels-last copies of P2-P5)", lambda: heads._pooling_maps(features)),
        "heads_std": (
            "ROI heads whole: StandardROIHeads (ROIAlignV2)",
            lambda: plain_heads(images, features, proposals),
        ),
        "heads_iou": ("ROI heads whole: IoUNetROIHeads (PrRoIPoolV2)", lambda: heads(images, features, proposals)),
        "fast_rcnn": (
            "Detectron2 fast_rcnn_inference (threshold + NMS + top-k)",
            lambda: fast_rcnn_inference(
                c["boxes"], c["probs"], sizes, predictor.test_score_thresh, predictor.test_nms_thresh, topk
            ),
        ),
        "batched_nms": (
            f"Detectron2 batched_nms of the {m} candidates",
            lambda: batched_nms(cand["boxes"], cand["scores"], groups, predictor.test_nms_thresh),
        ),
        "candidates": (
            "IoU-Net _candidates (score threshold)",
            lambda: heads._candidates(c["boxes"], c["probs"], sizes),
        ),
        "predict": (f"IoU-Net _predict_ious of {m} candidates (pool + IoU head)", predict),
        "predict_contiguous": ("  _predict_ious, contiguous maps", predict_on(iou_in_contiguous)),
        "iou_nms": (
            f"IoU-Net iou_guided_nms ({m} -> {k})",
            lambda: iou_guided_nms(cand["boxes"], cand["scores"], cand["ious"], groups, heads.iou_nms_thresh),
        ),
        "topk": (
            f"IoU-Net _top_per_image ({k} -> {r})",
            lambda: _top_per_image(
                torch.arange(k, device=keep_all.device), cluster_scores, cand["images"][keep_all], topk, len(sizes)
            ),
        ),
        "refine": (f"IoU-Net _refine of {r} boxes (T={t}), CUDA graph", refine_graph),
        "refine_contiguous": ("  _refine, CUDA graph, contiguous maps", refine_on(heads_contiguous, iou_in_contiguous)),
        "refine_eager": (
            f"IoU-Net _refine of {r} boxes (T={t}), kernels launched from Python",
            lambda: CUDAGraphCache.eager(heads._refine_boxes, refine_inputs),
        ),
        "refine_ieee": ("  _refine, CUDA graph, IoU branch in IEEE float32 (TF32 False)", ieee(refine_graph)),
        "predict_ieee": ("  _predict_ious, IoU branch in IEEE float32 (TF32 False)", ieee(predict)),
    }
    fns = {label: inference(fn) for label, fn in spec.values()}
    stats = timer.measure(fns, repeat, warmup)
    names = list(fns)
    ref_of = {
        spec[a][0]: spec[b][0]
        for a, b in (
            ("box_prroi", "box_align"),
            ("box_prroi_contiguous", "box_prroi"),
            ("predict_contiguous", "predict"),
            ("refine_contiguous", "refine"),
            ("heads_iou", "heads_std"),
            ("iou_nms", "batched_nms"),
            ("refine_eager", "refine"),
            ("refine_ieee", "refine"),
            ("predict_ieee", "predict"),
        )
    }
    rows = [row(n, stats[n], ref=stats[ref_of[n]] if n in ref_of else None) for n in names]
    iou_stages = [spec[key][0] for key in ("maps", "candidates", "predict", "iou_nms", "topk", "refine")]
    total = sum(stats[n]["median"] for n in iou_stages)
    fake = {"median": total, "p10": float("nan"), "p90": float("nan")}
    rows.append(
        {
            "name": "sum of the IoU-Net stage medians above (not a measurement)",
            "stats": fake,
            "peak_mib": float("nan"),
            "ratio": None,
        }
    )
    header = [
        f"IoU-Net stages on their own, batch 1, {setup.height}x{setup.width}, inputs captured from one forward "
        "(inference mode); ratio: PrRoIPoolV2 box head / ROIAlignV2 box head, IoUNetROIHeads / StandardROIHeads, "
        "IoU-guided NMS / batched_nms, refinement launched from Python / from a CUDA graph",
        f"{m} candidates (first image {int((cand['images'] == 0).sum())}), {k} kept by IoU-guided NMS, {r} refined",
    ]
    return header, rows, {}


def pool_features(setup, batch, dtype, gen_seed):
    gen = torch.Generator(device=setup.device).manual_seed(gen_seed)
    return [
        torch.randn(
            batch,
            setup.pool_channels,
            math.ceil(setup.height / s),
            math.ceil(setup.width / s),
            generator=gen,
            device=setup.device,
        ).to(dtype)
        for s in STRIDES
    ]


def section_pool(setup, timer, repeat, warmup, checks):
    scales = tuple(1.0 / s for s in STRIDES)
    poolers = {t: ROIPooler(7, scales, 0, t).to(setup.device) for t in ("ROIAlignV2", "PrRoIPoolV2")}
    prroi = poolers["PrRoIPoolV2"]
    # AMP: autocast float16 on CUDA; on CPU (smoke runs) autocast bfloat16, which the CPU kernels take.
    amp_device, amp_dtype = ("cuda", torch.float16) if timer.cuda else ("cpu", torch.bfloat16)
    rows = []

    def direct(feats, box_lists):
        """The op on 16-bit features and float32 rois as they are (what the PrRoIPooler could call under AMP)."""
        rois = convert_boxes_to_pooler_format(box_lists)
        levels = assign_boxes_to_levels(box_lists, prroi.min_level, prroi.max_level, 224, 4)
        return torch.ops.prroi_d2.prroi_pool2d_levels(feats, rois, levels, 7, 7, list(prroi.prroi_scales), True)

    for batch in (1, 2):
        gen = torch.Generator().manual_seed(10 + batch)
        box_lists = [
            Boxes(random_boxes(setup.pool_boxes, setup.height, setup.width, gen, 16, 700).to(setup.device))
            for _ in range(batch)
        ]
        tag = f"batch {batch}, {batch * setup.pool_boxes} boxes"
        modes = [("float32", torch.float32, False), (f"AMP {str(amp_dtype)[6:]}", amp_dtype, True)]
        for mode, dtype, amp in modes:
            feats = pool_features(setup, batch, dtype, batch)
            grad_feats = [f.detach().requires_grad_() for f in feats]

            def ctx():
                return torch.autocast(amp_device, dtype=amp_dtype) if amp else contextlib.nullcontext()

            def fwd(pool):
                def fn():
                    with torch.no_grad(), ctx():
                        pool(feats, box_lists)

                return fn

            def fwd_bwd(pool):
                def fn():
                    with ctx():
                        out = pool(grad_feats, box_lists)
                    torch.autograd.grad(out, grad_feats, torch.ones_like(out))

                return fn

            fns = {}
            for t, pool in poolers.items():
                fns[f"{t} forward, {mode}, {tag}"] = fwd(pool)
            if amp:
                fns[f"PrRoIPoolV2 op direct (16-bit features, float32 rois) forward, {mode}, {tag}"] = fwd(direct)
            for t, pool in poolers.items():
                fns[f"{t} forward + backward, {mode}, {tag}"] = fwd_bwd(pool)
            stats = timer.measure(fns, repeat, warmup)
            names = list(fns)
            peaks = {n: timer.peak_mib(fn) for n, fn in fns.items()}
            for n in names:
                ref = n.replace("PrRoIPoolV2 op direct (16-bit features, float32 rois)", "ROIAlignV2").replace(
                    "PrRoIPoolV2", "ROIAlignV2"
                )
                rows.append(row(n, stats[n], peaks[n], stats[ref] if ref != n else None))
                if n.startswith("PrRoIPoolV2 forward,"):
                    checks.append((f"pool: PrRoIPoolV2 / ROIAlignV2 forward, {mode}, {tag}", rows[-1]["ratio"], 0.8))
    header = [
        f"Box-head pooling: Detectron2 ROIPooler 7x7, P2-P5 of {setup.height}x{setup.width} ({setup.pool_channels} "
        f"channels), {setup.pool_boxes} boxes per image (sqrt-area log-uniform 16-700 px, aspect 0.5-2), "
        "features requiring grad for forward + backward; ratio = median / ROIAlignV2 of the same line"
        + ("" if timer.cuda else "; AMP on CPU: autocast bfloat16"),
    ]
    return header, rows, {}


# --------------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------------


def fmt(value, spec):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def print_table(header, rows):
    print()
    for line in header:
        print(line)
    width = max(60, *(len(r["name"]) for r in rows))
    print(f"| {'measure':<{width}} | {'median ms':>10} | {'p10':>9} | {'p90':>9} | {'peak MiB':>8} | {'ratio':>6} |")
    print(f"|{'-' * (width + 2)}|{'-' * 11}:|{'-' * 10}:|{'-' * 10}:|{'-' * 9}:|{'-' * 7}:|")
    for r in rows:
        s = r["stats"]
        cells = [
            f"{fmt(s['median'], '.3f'):>10}",
            f"{fmt(s['p10'], '.3f'):>9}",
            f"{fmt(s['p90'], '.3f'):>9}",
            f"{fmt(r['peak_mib'], '.1f'):>8}",
            f"{fmt(r['ratio'], '.3f'):>6}",
        ]
        print(f"| {r['name']:<{width}} | " + " | ".join(cells) + " |")


def print_checks(checks):
    print("\nTargets (ratio <= limit)")
    for name, value, limit in checks:
        verdict = "met" if value is not None and value <= limit else "NOT met"
        print(f"  {verdict:<8} {name:<64} {fmt(value, '8.3f')}  (<= {limit})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny, a smoke run)")
    parser.add_argument("--repeat", type=int, default=None, help="timed iterations (default: 20 train, 50 others)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default: 5 train, 10)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument(
        "--tiny", action="store_true", help="R18, 192x288 images, few boxes and iterations (CPU smoke run)"
    )
    parser.add_argument("--candidates", type=int, default=None, help="target candidates per image (default 2000)")
    parser.add_argument("--json", default=None, help="write every number to this file")
    parser.add_argument(
        "--cpu-threads", type=int, default=1, help="torch threads for --device cpu (default 1: robust on shared cores)"
    )
    args = parser.parse_args()
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available (use --device cpu --tiny for a smoke run)")

    setup = Setup(args)
    timer = Timer(args.device)
    if not timer.cuda:
        torch.set_num_threads(args.cpu_threads)
    gpu = torch.cuda.get_device_name(torch.device(args.device)) if timer.cuda else platform.processor() or "CPU"
    print(f"device: {args.device} ({gpu})")
    print(
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), detectron2 {detectron2.__version__}, "
        f"prroi_d2 {prroi_d2.__version__}, python {platform.python_version()}"
    )
    print(
        f"float32; cuDNN TF32 convolutions {torch.backends.cudnn.allow_tf32}, matmul TF32 "
        f"{torch.backends.cuda.matmul.allow_tf32} (IoU-Net's IoU branch: TF32 unless MODEL.IOU_NET.TF32 False), "
        f"cudnn.benchmark {torch.backends.cudnn.benchmark}; "
        f"{'CUDA events' if timer.cuda else f'wall clock, {torch.get_num_threads()} CPU threads'}, times in ms"
        + ("; --tiny: R18, 192x288, a smoke run, not a benchmark" if args.tiny else "")
    )

    runners = {"train": section_train, "infer": section_infer, "stages": section_stages, "pool": section_pool}
    checks, results = [], {}
    for name in sections:
        repeat, warmup = (TINY_DEFAULTS if args.tiny else DEFAULTS)[name]
        repeat = args.repeat if args.repeat is not None else repeat
        warmup = args.warmup if args.warmup is not None else warmup
        start = time.perf_counter()
        header, rows, extra = runners[name](setup, timer, repeat, warmup, checks)
        free_memory()  # the section's models and tensors went with its frame
        header[0] += f" (median of {repeat}, warm-up {warmup})"
        print_table(header, rows)
        print(f"({name}: {time.perf_counter() - start:.1f} s)")
        results[name] = {"header": header, "repeat": repeat, "warmup": warmup, "rows": rows, **extra}
    print_checks(checks)

    if args.json:
        data = {
            "device": args.device,
            "gpu": gpu,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "detectron2": detectron2.__version__,
            "prroi_d2": prroi_d2.__version__,
            "tiny": args.tiny,
            "sections": results,
            "targets": [
                {"name": n, "ratio": v, "limit": lim, "met": v is not None and v <= lim} for n, v, lim in checks
            ],
        }
        with open(args.json, "w") as f:
            json.dump(json_safe(data), f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
