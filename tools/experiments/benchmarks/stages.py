"""Section ``stages``: each IoU-Net stage timed on its own, on inputs captured from one forward."""

import copy

import torch
from detectron2.layers import batched_nms
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference

from prroi_d2.modeling.cuda_graphs import CUDAGraphCache
from prroi_d2.modeling.detections import select_candidates, top_per_image
from prroi_d2.modeling.iou_guided_nms import iou_guided_nms
from tools.experiments.benchmarks.faster_rcnn import inference_models, row
from tools.experiments.benchmarks.workload import box_head_outputs


def section_stages(setup, timer, repeat, warmup, checks):
    plain, iounet, _, inputs, _ = inference_models(setup, with_variants=False)
    heads, plain_heads = iounet.roi_heads, plain.roi_heads
    c = box_head_outputs(iounet, inputs)
    images, features, proposals = c["images"], c["features"], c["proposals"]
    sizes = images.image_sizes
    predictor = heads.box_predictor
    topk = predictor.test_topk_per_image
    with torch.inference_mode():
        # what IoUNetROIHeads pools from (channels-last copies on CUDA)
        maps = heads.iou_branch.pooling_maps(features, heads.box_in_features)
    iou_in = [maps[f] for f in heads.iou_branch.in_features]
    iou_in_contiguous = [features[f].contiguous() for f in heads.iou_branch.in_features]
    heads_contiguous = copy.deepcopy(heads)  # graphs of its own, captured on contiguous maps
    proposal_boxes = [p.proposal_boxes for p in proposals]
    with torch.inference_mode():
        cand = select_candidates(c["boxes"], c["probs"], sizes, heads.box_predictor.test_score_thresh)
        cand["ious"] = heads.iou_branch.predict_ious(iou_in, cand["boxes"], cand["images"], cand["classes"])
        groups = cand["images"] * heads.num_classes + cand["classes"]
        keep_all, cluster_scores = iou_guided_nms(
            cand["boxes"], cand["scores"], cand["ious"], groups, heads.iou_branch.nms_thresh
        )
        top = top_per_image(
            torch.arange(len(keep_all), device=keep_all.device), cluster_scores, cand["images"][keep_all], topk, 1
        )
        keep = keep_all[top]
    m, k, r = len(cand["scores"]), len(keep_all), len(keep)

    def ieee(fn):
        """``fn`` with the IoU branch in IEEE float32 (MODEL.IOU_NET.TF32 False: a graph of its own)."""

        def run(*args):
            heads.iou_branch.tf32 = False
            try:
                return fn(*args)
            finally:
                heads.iou_branch.tf32 = True

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
        return lambda: h.iou_branch.refine(maps_in, kept, sizes, len(sizes) * topk)

    def predict_on(maps_in):
        return lambda: heads.iou_branch.predict_ious(maps_in, cand["boxes"], cand["images"], cand["classes"])

    refine_graph, predict = refine_on(heads, iou_in), predict_on(iou_in)
    t = heads.iou_branch.refine_max_iter
    spec = {  # key: (row label, callable)
        "backbone": ("backbone (ResNet-FPN)", lambda: iounet.backbone(images.tensor)),
        "rpn": ("RPN", lambda: iounet.proposal_generator(images, features, None)),
        "box_align": (
            f"box head (pool + FCs + predictor), ROIAlignV2, {len(proposals[0])} proposals",
            box_head(plain_heads, features),
        ),
        "box_prroi": ("box head (pool + FCs + predictor), PrRoIPoolV2", box_head(heads, maps)),
        "box_prroi_contiguous": ("  the same, contiguous maps", box_head(heads, features)),
        "maps": (
            "IoUBranch.pooling_maps (channels-last copies of P2-P5)",
            lambda: heads.iou_branch.pooling_maps(features, heads.box_in_features),
        ),
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
            "IoU-Net select_candidates (score threshold)",
            lambda: select_candidates(c["boxes"], c["probs"], sizes, heads.box_predictor.test_score_thresh),
        ),
        "predict": (f"IoUBranch.predict_ious of {m} candidates (pool + IoU head)", predict),
        "predict_contiguous": ("  predict_ious, contiguous maps", predict_on(iou_in_contiguous)),
        "iou_nms": (
            f"IoU-Net iou_guided_nms ({m} -> {k})",
            lambda: iou_guided_nms(cand["boxes"], cand["scores"], cand["ious"], groups, heads.iou_branch.nms_thresh),
        ),
        "topk": (
            f"IoU-Net top_per_image ({k} -> {r})",
            lambda: top_per_image(
                torch.arange(k, device=keep_all.device), cluster_scores, cand["images"][keep_all], topk, len(sizes)
            ),
        ),
        "refine": (f"IoUBranch.refine of {r} boxes (T={t}), CUDA graph", refine_graph),
        "refine_contiguous": ("  refine, CUDA graph, contiguous maps", refine_on(heads_contiguous, iou_in_contiguous)),
        "refine_eager": (
            f"IoUBranch.refine of {r} boxes (T={t}), kernels launched from Python",
            lambda: CUDAGraphCache.eager(heads.iou_branch.refine_boxes, refine_inputs),
        ),
        "refine_ieee": ("  refine, CUDA graph, IoU branch in IEEE float32 (TF32 False)", ieee(refine_graph)),
        "predict_ieee": ("  predict_ious, IoU branch in IEEE float32 (TF32 False)", ieee(predict)),
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
