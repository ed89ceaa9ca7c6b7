#!/usr/bin/env python
"""Benchmark Precise RoI Pooling against torchvision ``roi_align`` on a Detectron2 R50-FPN box-head workload.

Workload: 2 images 800x1216, 256 channels, FPN levels P2-P5 (strides 4-32); boxes of log-uniform size 16-700 px and
aspect 0.5-2, assigned to levels as Detectron2's ``assign_boxes_to_levels`` does (canonical 224 px at P4); one op
call per level, as ``ROIPooler`` makes. "refine" is IoU-Net's loop: 200 boxes x 5 iterations of forward +
coordinate-only backward, all levels in one ``prroi_pool_levels`` call (and, for comparison, one call per level).
CUDA times use CUDA events after warm-up (median of --repeat); CPU times use a wall clock
on a scaled-down workload (--cpu-* options).

    python tools/experiments/benchmark_op.py                 # CUDA if available, and CPU
    python tools/experiments/benchmark_op.py --device cpu
"""

import argparse
import math
import statistics
import time

import torch
from torchvision.ops import roi_align

import prroi_d2
from prroi_d2 import assign_fpn_levels, prroi_pool_levels
from prroi_d2.functional import channels_last_copy

STRIDES = (4, 8, 16, 32)
SCALES = [1.0 / s for s in STRIDES]


def make_boxes(num, image_h, image_w, gen, device, dtype):
    """(num, 4) boxes of log-uniform size 16-700 px and aspect 0.5-2, centres inside the image."""
    size = torch.exp(torch.empty(num).uniform_(math.log(16), math.log(700), generator=gen))
    aspect = torch.exp(torch.empty(num).uniform_(math.log(0.5), math.log(2.0), generator=gen))
    w, h = size * aspect.sqrt(), size / aspect.sqrt()
    cx = torch.rand(num, generator=gen) * image_w
    cy = torch.rand(num, generator=gen) * image_h
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image_w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image_h)
    return boxes.to(device=device, dtype=dtype)


def all_rois(boxes_per_image):
    """(K, 5) rois of the per-image (Ki, 4) boxes, and their (K,) FPN level indices (Detectron2's rule)."""
    rois = torch.cat(
        [torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes_per_image)], dim=0
    )
    return rois, assign_fpn_levels(rois, SCALES)


def level_rois(boxes_per_image):
    """Per FPN level: (K_l, 5) rois, as ``ROIPooler`` splits them."""
    rois, levels = all_rois(boxes_per_image)
    return [rois[levels == i].contiguous() for i in range(len(STRIDES))]


def make_workload(num_rois, images, image_h, image_w, channels, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    features = [
        torch.randn(images, channels, math.ceil(image_h / s), math.ceil(image_w / s), generator=gen).to(
            device=device, dtype=dtype
        )
        for s in STRIDES
    ]
    boxes = [make_boxes(num_rois // images, image_h, image_w, gen, device, dtype) for _ in range(images)]
    return features, level_rois(boxes)


def prroi_forward(features, rois, size):
    return [
        torch.ops.prroi_d2.prroi_pool2d(f, r, size, size, 1.0 / s, True) for f, r, s in zip(features, rois, STRIDES)
    ]


def roi_align_forward(features, rois, size):
    return [roi_align(f, r, size, 1.0 / s, 0, True) for f, r, s in zip(features, rois, STRIDES)]


def prroi_backward(grads, features, rois, size, features_grad, rois_grad):
    for g, f, r, s in zip(grads, features, rois, STRIDES):
        torch.ops.prroi_d2._prroi_pool2d_backward(g, f, r, size, size, 1.0 / s, True, features_grad, rois_grad)


def forward_backward(pool, features, rois, size):
    feats = [f.detach().requires_grad_() for f in features]
    outs = pool(feats, rois, size)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])


def refine(features, rois, levels, size, iterations=5):
    """IoU-Net refinement's loop: forward, then the coordinate gradient only, then a step. All levels are pooled in
    one call; each box keeps the level of its starting position."""
    boxes = rois
    for _ in range(iterations):
        boxes = boxes.detach().requires_grad_()
        out = prroi_pool_levels(features, boxes, levels, size, SCALES, aligned=True)
        (grad,) = torch.autograd.grad(out.sum(), boxes)
        boxes = boxes.add(grad, alpha=1e-3)
    return boxes


def refine_per_level(features, rois, size, iterations=5):
    """The same loop with one op call per level (as ``ROIPooler`` pools), for comparison."""
    boxes = [r.clone() for r in rois]
    for _ in range(iterations):
        boxes = [b.detach().requires_grad_() for b in boxes]
        outs = prroi_forward(features, boxes, size)
        score = sum(o.sum() for o in outs)
        grads = torch.autograd.grad(score, boxes)
        boxes = [b.add(g, alpha=1e-3) for b, g in zip(boxes, grads)]
    return boxes


def time_cuda(fn, repeat, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(times), peak


def time_cpu(fn, repeat, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), float("nan")


def deterministic(fn):
    """fn run under torch.use_deterministic_algorithms(True)."""

    def run():
        torch.use_deterministic_algorithms(True)
        try:
            fn()
        finally:
            torch.use_deterministic_algorithms(False)

    return run


def cuda_rows(args, checks):
    """Table rows (name, ours, our peak, reference, reference peak); appends (target, value, limit) to checks."""
    rows = []
    for num_rois in args.rois:
        for size in args.sizes:
            feats, rois = make_workload(num_rois, 2, 800, 1216, 256, "cuda", torch.float32)
            outs = prroi_forward(feats, rois, size)
            ones = [torch.ones_like(o) for o in outs]
            tag = f"{num_rois} RoIs {size}x{size}"

            def t(fn):
                return time_cuda(fn, args.repeat)

            ours_fwd, m1 = t(lambda: prroi_forward(feats, rois, size))
            tv_fwd, m2 = t(lambda: roi_align_forward(feats, rois, size))
            rows.append((f"forward, {tag}", ours_fwd, m1, tv_fwd, m2))
            checks.append((f"forward / roi_align, {tag}", ours_fwd / tv_fwd, 1.0))
            ours_fb, m1 = t(lambda: forward_backward(prroi_forward, feats, rois, size))
            tv_fb, m2 = t(lambda: forward_backward(roi_align_forward, feats, rois, size))
            rows.append((f"forward + feature backward, {tag}", ours_fb, m1, tv_fb, m2))
            checks.append((f"forward + feature backward / roi_align, {tag}", ours_fb / tv_fb, 1.0))
            coord, m1 = t(lambda: prroi_backward(ones, feats, rois, size, False, True))
            rows.append((f"coordinate backward, {tag}", coord, m1, None, None))
            rows.append((f"  coordinate backward / our forward, {tag}", coord / ours_fwd, None, None, None))
            checks.append((f"coordinate backward / our forward, {tag}", coord / ours_fwd, 2.0))
            # The same maps in the channels-last memory format (read by the op's kernels of their own).
            last = [f.contiguous(memory_format=torch.channels_last) for f in feats]
            last_fwd, m1 = t(lambda: prroi_forward(last, rois, size))
            rows.append((f"forward, channels-last vs contiguous maps, {tag}", last_fwd, m1, ours_fwd, None))
            last_coord, m1 = t(lambda: prroi_backward(ones, last, rois, size, False, True))
            rows.append((f"coordinate backward, channels-last vs contiguous, {tag}", last_coord, m1, coord, None))
            halves = [f.half() for f in feats]
            last_halves = [f.half() for f in last]
            last_half, m1 = t(lambda: prroi_forward(last_halves, rois, size))
            half, _ = t(lambda: prroi_forward(halves, rois, size))
            rows.append((f"forward float16, channels-last vs contiguous, {tag}", last_half, m1, half, None))
            if num_rois == args.rois[0] and size == args.sizes[0]:
                one = [f[:1] for f in feats]
                convert, m1 = t(lambda: [channels_last_copy(f) for f in one])
                by_torch, m2 = t(lambda: [f.contiguous(memory_format=torch.channels_last) for f in one])
                rows.append(("channels-last copy of one image's maps, ours vs torch's", convert, m1, by_torch, m2))
            for name, features_grad, rois_grad in (("feature", True, False), ("coordinate", False, True)):
                default, m2 = t(lambda: prroi_backward(ones, feats, rois, size, features_grad, rois_grad))
                det, m1 = t(deterministic(lambda: prroi_backward(ones, feats, rois, size, features_grad, rois_grad)))
                rows.append((f"{name} backward deterministic vs default, {tag}", det, m1, default, m2))
                checks.append((f"{name} backward deterministic / default, {tag}", det / default, 2.0))
            for dtype in (torch.float16, torch.bfloat16):
                f16 = [f.to(dtype) for f in feats]
                r16 = rois  # float32 boxes with float16/bfloat16 features, as the op recommends
                half, m1 = t(lambda: prroi_forward(f16, r16, size))
                rows.append((f"forward {str(dtype)[6:]} / float32, {tag}", half / ours_fwd, m1, None, None))
                checks.append((f"forward {str(dtype)[6:]} / float32, {tag}", half / ours_fwd, 0.7))
    for size, limit in zip(args.sizes, (1.5, 3.0) if args.sizes == [7, 14] else [None] * len(args.sizes)):
        feats, rois = make_workload(200, 2, 800, 1216, 256, "cuda", torch.float32, seed=1)
        every, levels = torch.cat(rois), torch.cat([torch.full((len(r),), i) for i, r in enumerate(rois)]).cuda()
        ms, mem = time_cuda(lambda: refine(feats, every, levels, size), args.repeat)
        rows.append((f"refine 200 boxes x 5 iterations, {size}x{size}", ms, mem, None, None))
        per_level, mem = time_cuda(lambda: refine_per_level(feats, rois, size), args.repeat)
        rows.append((f"  the same, one op call per level, {size}x{size}", per_level, mem, None, None))
        if limit is not None:
            checks.append((f"refine ms, {size}x{size}", ms, limit))
    return rows


def cpu_rows(args, checks):
    rows = []
    torch.set_num_threads(args.cpu_threads)
    for size in args.sizes:
        feats, rois = make_workload(
            args.cpu_rois, 2, args.cpu_image[0], args.cpu_image[1], args.cpu_channels, "cpu", torch.float32
        )
        ours, _ = time_cpu(lambda: forward_backward(prroi_forward, feats, rois, size), args.cpu_repeat)
        tv, _ = time_cpu(lambda: forward_backward(roi_align_forward, feats, rois, size), args.cpu_repeat)
        tag = f"{args.cpu_rois} RoIs {size}x{size}"
        rows.append((f"CPU forward + feature backward, {tag}", ours, None, tv, None))
        checks.append((f"CPU forward + feature backward / roi_align, {tag}", ours / tv, 2.0))
        ours, _ = time_cpu(lambda: prroi_forward(feats, rois, size), args.cpu_repeat)
        tv, _ = time_cpu(lambda: roi_align_forward(feats, rois, size), args.cpu_repeat)
        rows.append((f"CPU forward, {tag}", ours, None, tv, None))
    return rows


def copy_bandwidth(repeat):
    """Device-to-device copy bandwidth in GB/s (bytes read + written), the memory ceiling of the card."""
    src = torch.randn(256 * 2**20, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms, _ = time_cuda(lambda: dst.copy_(src), repeat)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def print_checks(checks):
    print("\nTargets (value <= limit)")
    for name, value, limit in checks:
        verdict = "met" if value <= limit else "NOT MET"
        print(f"  {verdict:<8} {name:<62} {value:8.3f}  (<= {limit})")


def print_table(title, rows):
    print(f"\n{title}")
    print(
        f"| {'measure':<58} | {'prroi_d2':>10} | {'peak MiB':>8} | {'reference':>10} | {'peak MiB':>8} | {'ratio':>6} |"
    )
    print(f"|{'-' * 60}|{'-' * 11}:|{'-' * 9}:|{'-' * 11}:|{'-' * 9}:|{'-' * 7}:|")
    for name, ours, m1, ref, m2 in rows:

        def fmt(v, spec):
            return format(v, spec) if v is not None and not math.isnan(v) else "-"

        ratio = fmt(ours / ref if ref else None, ".2f")
        print(
            f"| {name:<58} | {fmt(ours, '10.3f')} | {fmt(m1, '8.1f')} | {fmt(ref, '10.3f')} | {fmt(m2, '8.1f')}"
            f" | {ratio:>6} |"
        )


def profile(args):
    """Per size, for the first --rois: roi_align forward, then our forward, feature backward and coordinate
    backward, one call per level each (untimed, for a profiler)."""
    feats, rois = make_workload(args.rois[0], 2, 800, 1216, 256, "cuda", torch.float32)
    for size in args.sizes:
        ones = [torch.ones_like(o) for o in prroi_forward(feats, rois, size)]
        torch.cuda.synchronize()
        roi_align_forward(feats, rois, size)
        prroi_forward(feats, rois, size)
        prroi_backward(ones, feats, rois, size, True, False)
        prroi_backward(ones, feats, rois, size, False, True)
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["all", "cuda", "cpu"], default="all")
    parser.add_argument("--rois", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--sizes", type=int, nargs="+", default=[7, 14])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--cpu-repeat", type=int, default=5)
    parser.add_argument("--cpu-rois", type=int, default=256)
    parser.add_argument("--cpu-image", type=int, nargs=2, default=[400, 608])
    parser.add_argument("--cpu-channels", type=int, default=64)
    parser.add_argument("--cpu-threads", type=int, default=2)
    parser.add_argument(
        "--profile", action="store_true", help="run each CUDA op once per level, untimed (for ncu / nsys)"
    )
    args = parser.parse_args()
    if args.profile:
        profile(args)
        return

    print(f"torch {torch.__version__}, prroi_d2 {prroi_d2.__version__}")
    checks = []
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        print(f"{name}: device-to-device copy {copy_bandwidth(args.repeat):.0f} GB/s")
        print_table(
            f"CUDA ({name}), float32, ms (median of {args.repeat}); reference = torchvision roi_align "
            "(aligned=True, sampling_ratio=0); ratio = prroi_d2 / reference",
            cuda_rows(args, checks),
        )
    if args.device in ("all", "cpu"):
        print_table(
            f"CPU ({args.cpu_threads} threads), float32, 2 images {args.cpu_image[0]}x{args.cpu_image[1]}, "
            f"{args.cpu_channels} channels, ms (median of {args.cpu_repeat}); reference = torchvision roi_align",
            cpu_rows(args, checks),
        )
    print_checks(checks)


if __name__ == "__main__":
    main()
