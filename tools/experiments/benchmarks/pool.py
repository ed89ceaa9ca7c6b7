"""Section ``pool``: Detectron2's ROIPooler, PrRoIPoolV2 against ROIAlignV2."""

import contextlib
import math

import torch
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels, convert_boxes_to_pooler_format
from detectron2.structures import Boxes

from tools.experiments.benchmarks.faster_rcnn import row
from tools.experiments.benchmarks.workload import STRIDES, random_boxes


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
