#!/usr/bin/env python
"""Export a trained IoU-Net (refinement and IoU-guided NMS included) for deployment, check it in a fresh process.

    python tools/export_model.py --config-file configs/iounet_synthetic_R18.yaml --output export/ \
        MODEL.WEIGHTS output/iounet_synthetic_R18/model_final.pth              # TorchScript, checked on 6 images
    python tools/export_model.py ... --sample-image a.jpg --sample-image b.jpg --run  # own images, and latency

What is exported: the whole model (backbone, RPN, box head, IoU head, IoU-guided NMS, refinement, mask head) from one
input image ``(3, H, W)`` float32 in ``INPUT.FORMAT`` (resized by the caller, as Detectron2's ``DefaultPredictor``
does with ``ResizeShortestEdge``) to the detections in that image's coordinates: the tensors named in
``OUTPUT_NAMES`` (``model.json`` lists those of the file). ``--format torchscript`` traces the model with
Detectron2's ``TracingAdapter`` and ``torch.jit.trace`` into ``model.ts``; running it needs torch, torchvision
(``import torchvision`` registers ``torchvision::nms``, which the RPN calls) and the prroi_d2 op library
(``import prroi_d2`` registers its ops); no Detectron2. ``--format torch_export`` tries
``torch.export.export`` with a dynamic image size and says why it cannot work for this model.

After writing the file the tool reloads it in a fresh Python process that imports only those, runs
it on the sample images (different sizes) and compares every output with the eager model (same number of
detections; boxes, scores, classes, predicted IoU within ``--atol``). ``--run`` also prints eager vs exported latency
(median of ``--repeats`` runs; CUDA events on the GPU).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

FORMATS = ("torchscript", "torch_export")
FILE_NAMES = {"torchscript": "model.ts", "torch_export": "model.pt2"}
# The exported model's outputs, in order: per detection (D rows).
OUTPUT_NAMES = ("pred_boxes", "scores", "pred_classes", "pred_ious")
REFINED_NAMES = ("pred_boxes_initial", "pred_ious_initial")  # with MODEL.IOU_NET.REFINE.ENABLED
MASK_NAMES = ("pred_masks",)  # with MODEL.MASK_ON: (D, 1, M, M) mask probabilities, pasted into the image by the caller
SCALES = (1.0, 0.8, 1.2)  # sample images are used at these scales of their test size, in turn, for varied sizes
CHECK_FLAG = "--check-exported"  # the fresh process's mode


class ExportError(RuntimeError):
    """A one-line reason why the model cannot be exported or does not match."""


# ---------------------------------------------------------------------------------------------------------------------
# The model and its inputs (Detectron2)
# ---------------------------------------------------------------------------------------------------------------------


def setup_cfg(args):
    from prroi_d2.config_checks import check_iounet_config
    from prroi_d2.engine.yaml_train import new_config
    from prroi_d2.safe_loading import safe_merge_from_file

    cfg = new_config()
    try:
        safe_merge_from_file(cfg, args.config_file)
        cfg.merge_from_list(args.opts)
    except (KeyError, ValueError, AssertionError, FileNotFoundError) as e:
        raise ExportError(f"Config {args.config_file} (and overrides): {e.args[0] if e.args else e}") from None
    cfg.MODEL.IOU_NET.OUTPUT_STAGES = False  # the export returns the final detections only
    if args.device:
        cfg.MODEL.DEVICE = args.device
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    try:
        check_iounet_config(cfg)
    except ValueError as e:
        raise ExportError(str(e)) from None
    return cfg


def build_eval_model(cfg):
    """The model of ``cfg`` in eval mode with the weights of ``MODEL.WEIGHTS``."""
    from detectron2.modeling import build_model

    from prroi_d2.engine.checkpoint import CheckpointReadError, WeightsError, load_weights_for_eval

    if not cfg.MODEL.WEIGHTS:
        raise ExportError("MODEL.WEIGHTS is empty: pass MODEL.WEIGHTS path/to/model_final.pth (the weights to export)")
    if not os.path.isfile(cfg.MODEL.WEIGHTS):
        raise ExportError(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}: no such file")
    model = build_model(cfg)
    try:
        load_weights_for_eval(model, cfg, resume=False)
    except (WeightsError, CheckpointReadError) as e:
        raise ExportError(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}: {e}") from None
    return model.eval()


def sample_images(cfg, paths: Sequence[str], count: int) -> List[torch.Tensor]:
    """``count`` model inputs (3, H, W) float32 of ``paths`` (or of the first images of ``DATASETS.TEST[0]``),
    resized by the test transform and then by :data:`SCALES` in turn, so their sizes differ."""
    from detectron2.data import DatasetCatalog
    from detectron2.data import transforms as T
    from detectron2.data.detection_utils import read_image

    if not paths:
        if not cfg.DATASETS.TEST:
            raise ExportError("no --sample-image given and DATASETS.TEST is empty: nothing to check the export on")
        from prroi_d2.engine.steps import prepare_datasets

        name = cfg.DATASETS.TEST[0]
        prepare_datasets([name])
        paths = [d["file_name"] for d in DatasetCatalog.get(name)[:count]]
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    images = []
    for i in range(count):
        path = paths[i % len(paths)]
        try:
            image = read_image(path, format=cfg.INPUT.FORMAT)
        except (OSError, ValueError) as e:
            raise ExportError(f"--sample-image {path}: cannot be read ({e})") from None
        image = resize.get_transform(image).apply_image(image)
        scale = SCALES[i % len(SCALES)]
        if scale != 1.0:
            height, width = image.shape[:2]
            image = T.ResizeTransform(height, width, round(height * scale), round(width * scale)).apply_image(image)
        images.append(torch.as_tensor(image.astype("float32").transpose(2, 0, 1).copy()))
    return images


def output_names(cfg) -> Tuple[str, ...]:
    refine = cfg.MODEL.IOU_NET.REFINE.ENABLED
    return OUTPUT_NAMES + (REFINED_NAMES if refine else ()) + (MASK_NAMES if cfg.MODEL.MASK_ON else ())


def detections(model, image: torch.Tensor, names: Sequence[str]) -> Tuple[torch.Tensor, ...]:
    """The eager model's detections of one input image (3, H, W) as the tensors ``names`` (boxes as (D, 4))."""
    instances = model.inference([{"image": image}], do_postprocess=False)[0]
    fields = instances.get_fields()
    return tuple(fields[n].tensor if n.startswith("pred_boxes") else fields[n] for n in names)


class ExportedDetector(torch.nn.Module):
    """The model as a function of the image tensor alone, returning :func:`detections` (what is traced)."""

    def __init__(self, model, names: Sequence[str]):
        super().__init__()
        self.model = model
        self.names = tuple(names)

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return detections(self.model, image, self.names)


# ---------------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------------


def export_torchscript(model, names: Sequence[str], sample: torch.Tensor, path: str) -> torch.jit.ScriptModule:
    """Trace ``model`` with Detectron2's ``TracingAdapter`` (v0.6 and main: model, inputs, inference_func) on one
    sample and save it to ``path``. The IoU heads of ``model`` are switched to float32 matmuls first
    (:func:`iou_heads_in_float32`), so that ``model`` computes what the exported file does."""
    iou_heads_in_float32(model)
    TracingAdapter = tracing_adapter_class()

    def inference(m, inputs):
        return detections(m, inputs[0]["image"], names)

    adapter = TracingAdapter(model, [{"image": sample}], inference_func=inference)
    try:
        with torch.no_grad():
            traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    except Exception as e:  # noqa: BLE001 - reported as one line
        raise ExportError(f"torch.jit.trace failed: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    traced.save(path)
    return traced


def iou_heads_in_float32(model) -> None:
    """Switch ``MODEL.IOU_NET.TF32`` off in every IoU branch of ``model``. On CUDA the IoU head's matmuls otherwise
    run in TF32, a process-wide switch that a trace does not record: the traced file computes them in whatever
    precision its process has (float32 by default), and refinement's gradient steps turn the TF32 rounding of the
    predicted IoU (about 4e-5 on an H200) into box differences of about 0.1 pixel."""
    from prroi_d2.modeling.iou_branch import IoUBranch

    for module in model.modules():  # the ROI heads hold their IoUBranch as a plain attribute, not a child module
        branch = getattr(module, "iou_branch", None)
        if isinstance(branch, IoUBranch):
            branch.tf32 = False


def tracing_adapter_class():
    """Detectron2's ``TracingAdapter``. Upstream main's ``detectron2.export`` imports it whatever is installed; v0.6's
    package ``__init__`` first imports its Caffe2 exporter, which fails without Caffe2 (gone from torch >= 1.x
    wheels). Then the ``flatten`` module, which needs no Caffe2, is imported under a bare package object instead of
    that ``__init__``."""
    import importlib
    import types

    if not getattr(sys.modules.get("detectron2.export"), "_bare_package", False):
        try:
            from detectron2.export import TracingAdapter

            return TracingAdapter
        except ImportError as e:
            if "caffe2" not in str(e):
                raise
        import detectron2

        package = types.ModuleType("detectron2.export")
        package.__path__ = [os.path.join(os.path.dirname(detectron2.__file__), "export")]
        package._bare_package = True
        sys.modules["detectron2.export"] = package
    return importlib.import_module("detectron2.export.flatten").TracingAdapter


def export_torch_export(model, names: Sequence[str], sample: torch.Tensor, path: str):
    """``torch.export.export`` with a dynamic image height and width, saved to ``path``; an :class:`ExportError`
    with the reason where it cannot capture the model."""
    if not hasattr(torch, "export"):
        raise ExportError(f"--format torch_export needs torch.export (torch >= 2.1); this is torch {torch.__version__}")
    height = torch.export.Dim("height", min=32, max=4096)
    width = torch.export.Dim("width", min=32, max=4096)
    try:
        with torch.no_grad():
            program = torch.export.export(
                ExportedDetector(model, names), (sample,), dynamic_shapes={"image": {1: height, 2: width}}
            )
    except Exception as e:  # noqa: BLE001 - reported as one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(
            f"--format torch_export: torch.export.export cannot capture this model ({type(e).__name__}: {first}). "
            "Detectron2's R-CNN inference builds Python structures (Instances, Boxes, per-image lists) whose sizes "
            "depend on the data; use --format torchscript"
        ) from None
    torch.export.save(program, path)
    return program.module()


# ---------------------------------------------------------------------------------------------------------------------
# The check in a fresh process (imports only torch and the prroi_d2 op layer)
# ---------------------------------------------------------------------------------------------------------------------


def run_exported(directory: str) -> None:
    """The fresh process: load ``model.json``'s file and ``inputs.pt``, write ``outputs.pt`` (per input the output
    tuple) and the Detectron2 / model-code modules that ended up imported (there should be none)."""
    import torchvision  # noqa: F401  (registers torchvision::nms, which Detectron2's RPN calls)

    import prroi_d2  # noqa: F401  (registers torch.ops.prroi_d2.*)

    with open(os.path.join(directory, "model.json")) as f:
        meta = json.load(f)
    path = os.path.join(directory, meta["file"])
    model = torch.jit.load(path) if meta["format"] == "torchscript" else torch.export.load(path).module()
    inputs = torch.load(os.path.join(directory, "inputs.pt"))
    with torch.no_grad():
        outputs = [tuple(t.cpu() for t in model(image.to(meta["device"]))) for image in inputs]
    imported = sorted(m for m in sys.modules if m.startswith(("detectron2", "prroi_d2.modeling", "fvcore")))
    torch.save({"outputs": outputs, "imported": imported}, os.path.join(directory, "outputs.pt"))


def check_in_fresh_process(directory: str, inputs: List[torch.Tensor]) -> Dict:
    """Run :func:`run_exported` in a new Python process; return what it wrote."""
    torch.save([t.cpu() for t in inputs], os.path.join(directory, "inputs.pt"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), CHECK_FLAG, directory], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ExportError(f"the exported model failed in a fresh process: {tail}")
    return torch.load(os.path.join(directory, "outputs.pt"))


def compare(names: Sequence[str], eager: Sequence[torch.Tensor], exported: Sequence[torch.Tensor], atol: float) -> str:
    """'' when ``exported`` matches ``eager`` (same detection count, every output within ``atol``), else why not."""
    if len(exported) != len(eager):
        return f"{len(exported)} outputs, eager has {len(eager)}"
    if eager[0].shape != exported[0].shape:
        return f"{len(exported[0])} detections, eager has {len(eager[0])}"
    for name, a, b in zip(names, eager, exported):
        a, b = a.cpu(), b.cpu()
        if a.shape != b.shape:
            return f"{name}: shape {tuple(b.shape)}, eager {tuple(a.shape)}"
        if a.numel() and (a.double() - b.double()).abs().max().item() > atol:
            return f"{name}: max difference {(a.double() - b.double()).abs().max().item():.3g} > {atol}"
    return ""


# ---------------------------------------------------------------------------------------------------------------------
# Latency
# ---------------------------------------------------------------------------------------------------------------------


def median_latency_ms(fn, image: torch.Tensor, repeats: int) -> float:
    """Median wall time of ``fn(image)`` over ``repeats`` runs after 3 warm-up runs (CUDA events on the GPU)."""
    times = []
    with torch.no_grad():
        for i in range(repeats + 3):
            if image.is_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(image)
                end.record()
                torch.cuda.synchronize()
                elapsed = start.elapsed_time(end)
            else:
                began = time.perf_counter()
                fn(image)
                elapsed = (time.perf_counter() - began) * 1000.0
            if i >= 3:
                times.append(elapsed)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------------


def export(args) -> Dict:
    """Export, check in a fresh process, optionally time. Returns the summary written to ``model.json``."""
    cfg = setup_cfg(args)
    model = build_eval_model(cfg)
    device = torch.device(cfg.MODEL.DEVICE)
    names = output_names(cfg)
    images = [t.to(device) for t in sample_images(cfg, args.sample_image, args.num_images)]
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, FILE_NAMES[args.format])
    exporter = export_torchscript if args.format == "torchscript" else export_torch_export
    exported = exporter(model, names, images[0], path)
    meta = {
        "format": args.format,
        "file": FILE_NAMES[args.format],
        "config": args.config_file,
        "weights": cfg.MODEL.WEIGHTS,
        "device": str(device),
        "input": f"image (3, H, W) float32, {cfg.INPUT.FORMAT}, resized to the test size by the caller",
        "outputs": list(names),
        "torch": torch.__version__,
    }
    with open(os.path.join(args.output, "model.json"), "w") as f:
        json.dump(meta, f, indent=2)
    with torch.no_grad():
        eager = [detections(model, image, names) for image in images]
    fresh = check_in_fresh_process(args.output, images)
    if fresh["imported"]:
        raise ExportError(f"the fresh process imported model code: {', '.join(fresh['imported'][:5])}")
    rows = []
    for image, want, got in zip(images, eager, fresh["outputs"]):
        problem = compare(names, want, got, args.atol)
        rows.append((tuple(image.shape[1:]), len(want[0]), problem))
    for (height, width), count, problem in rows:
        print(f"  {height}x{width}: {count} detections, {'matches eager' if not problem else 'DIFFERS: ' + problem}")
    bad = [r for r in rows if r[2]]
    if bad:
        raise ExportError(f"the exported model differs from eager on {len(bad)} of {len(rows)} images: {bad[0][2]}")
    meta["checked_images"] = [list(r[0]) for r in rows]
    meta["checked_detections"] = [r[1] for r in rows]
    if args.run:
        eager_ms = median_latency_ms(lambda x: detections(model, x, names), images[0], args.repeats)
        exported_ms = median_latency_ms(exported, images[0], args.repeats)
        size = "x".join(str(s) for s in images[0].shape[1:])
        print(
            f"latency on {device} ({size}, median of {args.repeats}): eager {eager_ms:.2f} ms, "
            f"exported {exported_ms:.2f} ms"
        )
        meta["latency_ms"] = {"eager": eager_ms, "exported": exported_ms, "repeats": args.repeats}
    with open(os.path.join(args.output, "model.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(
        f"exported {path}: matches eager on {len(rows)} images in a fresh process "
        "(torch, torchvision and the prroi_d2 op layer only)"
    )
    return meta


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE", help="a YAML config (configs/*.yaml)")
    parser.add_argument("--format", choices=FORMATS, default="torchscript")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the file and model.json")
    parser.add_argument("--sample-image", action="append", default=[], metavar="PATH", help="repeatable")
    parser.add_argument("--num-images", type=int, default=6, help="images to check on (default 6)")
    parser.add_argument("--device", default="", help="cpu or cuda (default: MODEL.DEVICE)")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest difference from eager (default 1e-4)")
    parser.add_argument("--run", action="store_true", help="also print eager vs exported latency")
    parser.add_argument("--repeats", type=int, default=50, help="--run: timed runs (default 50)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides, e.g. MODEL.WEIGHTS x.pth")
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.repeats < 1:
        parser.error("--num-images and --repeats must be >= 1")
    if not os.path.isfile(args.config_file):
        parser.error(f"--config-file {args.config_file}: no such file")
    if args.config_file.endswith(".py"):
        parser.error("--config-file: LazyConfig (.py) files are not supported by the exporter yet; use a YAML config")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHECK_FLAG]:
        run_exported(argv[1])
        return 0
    args = parse_args(argv)
    try:
        export(args)
    except ExportError as e:
        print(f"export_model: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
