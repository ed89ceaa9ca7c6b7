"""Section ``cascade``: inference latency of Cascade R-CNN + IoU-Net (configs/iounet_cascade_R50.yaml) against
Detectron2's stock Cascade R-CNN R50-FPN (its Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml without the mask head, box
heads on ROIAlignV2), batch 1, 800x1333, random weights made realistic stage by stage."""

import copy
import os

import torch
from detectron2 import model_zoo

from tools.experiments.benchmarks.faster_rcnn import row
from tools.experiments.benchmarks.workload import (
    ROOT,
    build,
    calibrate_backbone_and_rpn,
    calibrate_box_predictor,
    calibrate_iou_head,
    install_level_offsets,
    load_shared,
    make_cfg,
    make_inputs,
)

STOCK_CASCADE_CONFIG = "Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml"
IOUNET_CASCADE_CONFIG = os.path.join(ROOT, "configs", "iounet_cascade_R50.yaml")


def make_realistic_cascade(model, inputs, target, logit_spread=2.0):
    """:func:`~tools.experiments.benchmarks.workload.make_realistic` for Cascade R-CNN: backbone and RPN as there,
    then each stage's predictor in turn (a stage's boxes are the next one's proposals), each set for ``target``
    candidates per image. Returns the last stage's expected candidates per image and the RPN level offsets."""
    offsets = calibrate_backbone_and_rpn(model, inputs)
    expected = 0.0
    for predictor in model.roi_heads.box_predictor:
        expected = calibrate_box_predictor(predictor, lambda: model(inputs), target, len(inputs), logit_spread)
    return expected, offsets


def section_cascade(setup, timer, repeat, warmup, checks):
    setup = copy.copy(setup)
    if not setup.tiny:
        setup.height, setup.width = 800, 1333
    stock = build(make_cfg(setup, False, config_file=model_zoo.get_config_file(STOCK_CASCADE_CONFIG)), False)
    inputs = make_inputs(setup, 1, with_gt=False, seed=3)
    expected, offsets = make_realistic_cascade(stock, inputs, setup.candidates)
    models = {"stock Cascade R-CNN (box heads ROIAlignV2)": stock}
    variants = {
        "Cascade + IoU-Net (PrRoIPoolV2; IoU-guided NMS, refinement T=5)": None,
        "Cascade + IoU-Net, box heads ROIAlignV2": "ROIAlignV2",
    }
    head = None
    for name, box_pooler in variants.items():
        model = build(make_cfg(setup, True, box_pooler, config_file=IOUNET_CASCADE_CONFIG), False)
        load_shared(model, stock)
        install_level_offsets(model, offsets)
        if head is None:
            calibrate_iou_head(model, inputs)
            head = model.roi_heads.iou_head.state_dict()
        model.roi_heads.iou_head.load_state_dict(head)
        models[name] = model

    def infer(model):
        def fn():
            with torch.inference_mode():
                model(inputs)

        return fn

    with torch.inference_mode():
        detections = {name: len(m(inputs)[0]["instances"]) for name, m in models.items()}
    fns = {name: infer(m) for name, m in models.items()}
    stats = timer.measure(fns, repeat, warmup)
    peaks = {name: timer.peak_mib(fn) for name, fn in fns.items()}
    names = list(models)
    header = [
        f"Cascade R-CNN inference latency, batch 1, {setup.height}x{setup.width}, torch.inference_mode(), "
        f"R{'18' if setup.tiny else '50'}-FPN, 3 stages, random weights made realistic (make_realistic per stage, "
        f"~{setup.candidates} candidates per image; the last stage's calibration expects {expected:.0f}), the same "
        "weights in every model; ratio = median / stock Cascade R-CNN",
        "Detections (first image): " + "; ".join(f"{n}: {d}" for n, d in detections.items()),
    ]
    ref = stats[names[0]]
    rows = [row(n, stats[n], peaks[n], ref) for n in names]
    checks.append(("cascade: Cascade + IoU-Net / stock Cascade R-CNN, batch 1", rows[1]["ratio"], 1.10))
    return header, rows, {"detections": detections, "expected_candidates": expected, "rpn_level_offsets": offsets}
