"""Sections ``train`` and ``infer``: IoU-Net (configs/iounet_R50.yaml) against the plain Faster R-CNN R50-FPN."""

import torch
from detectron2.solver import build_optimizer
from detectron2.utils.events import EventStorage

from tools.experiments.benchmarks.workload import (
    NUM_CLASSES,
    build,
    calibrate_iou_head,
    cfg_diff,
    install_level_offsets,
    load_shared,
    make_cfg,
    make_inputs,
    make_realistic,
    workload_counts,
)


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
