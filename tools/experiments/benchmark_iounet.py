#!/usr/bin/env python
"""Benchmark IoU-Net (prroi_d2's IoUNetRCNN) against Detectron2's plain Faster R-CNN and Cascade R-CNN, R50-FPN.

Sections (--only train,infer,stages,pool,cascade), each timed side by side in one run, float32 unless stated, CUDA
events after warm-up (the candidates of a section alternate iteration by iteration), median, p10 and p90 of --repeat:

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
          heads' select_candidates, IoUBranch.predict_ious (pool + IoU head), iou_guided_nms, top_per_image,
          IoUBranch.refine (T=5), and for comparison Detectron2's batched_nms and fast_rcnn_inference, the box head
          on both poolers, and both ROI heads whole.
* pool:   Detectron2's ROIPooler, PrRoIPoolV2 vs ROIAlignV2, 7x7, P2-P5 of an 800x1216 image (256 channels),
          1000 boxes per image, batch 1 and 2, forward and forward + backward (features requiring grad), float32
          and under AMP (autocast float16, half features); plus, under AMP, the op called directly on the half
          features (what PrRoIPooler would cost without casting them to float32 first).
* cascade: inference latency, batch 1, 800x1333: Detectron2's stock Cascade R-CNN R50-FPN (box heads ROIAlignV2) vs
          Cascade + IoU-Net (configs/iounet_cascade_R50.yaml), plus Cascade + IoU-Net with ROIAlignV2 box heads;
          each stage's predictor made realistic in turn (tools/experiments/benchmarks/cascade.py).

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

    python3 tools/experiments/benchmark_iounet.py                      # CUDA, every section
    python3 tools/experiments/benchmark_iounet.py --only infer,stages --json out.json
    python3 tools/experiments/benchmark_iounet.py --device cuda --only cascade --json cascade.json
    python3 tools/experiments/benchmark_iounet.py --device cpu --tiny  # smoke run: R18, small images, few iterations

The sections live in tools/experiments/benchmarks/ (one module each; workload.py builds the models and the realistic
workload).
"""

import argparse
import json
import os
import platform
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

warnings.filterwarnings("ignore", category=UserWarning, message=".*pkg_resources.*")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning, message="torch.meshgrid")

import detectron2  # noqa: E402
import torch  # noqa: E402

import prroi_d2  # noqa: E402
from prroi_d2.evaluation.reports import json_safe  # noqa: E402
from tools.experiments.benchmarks.cascade import section_cascade  # noqa: E402
from tools.experiments.benchmarks.faster_rcnn import section_infer, section_train  # noqa: E402
from tools.experiments.benchmarks.pool import section_pool  # noqa: E402
from tools.experiments.benchmarks.report import print_checks, print_table  # noqa: E402
from tools.experiments.benchmarks.stages import section_stages  # noqa: E402
from tools.experiments.benchmarks.timing import Timer, free_memory  # noqa: E402
from tools.experiments.benchmarks.workload import Setup  # noqa: E402

SECTIONS = ("train", "infer", "stages", "pool", "cascade")

# Per-section defaults: (repeat, warmup); --repeat / --warmup override every section.
DEFAULTS = {"train": (20, 5), "infer": (50, 10), "stages": (50, 10), "pool": (50, 10), "cascade": (50, 10)}
TINY_DEFAULTS = {"train": (2, 1), "infer": (3, 1), "stages": (3, 1), "pool": (3, 1), "cascade": (3, 1)}


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

    runners = {
        "train": section_train,
        "infer": section_infer,
        "stages": section_stages,
        "pool": section_pool,
        "cascade": section_cascade,
    }
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
