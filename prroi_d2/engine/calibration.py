"""Calibrated refinement: choose IoU-Net's inference settings on a held-out split, so that refinement never costs
accuracy where the IoU head is not good enough to be trusted.

The held-out split is data the model did not train on and that is not the reporting split (the synthetic set's
``iounet_synth_holdout``, the trees' ``neon_trees_train_holdout``, a ``--register``ed split of one's own data).
:func:`calibrate` runs the model on it once per (IoU-guided NMS on/off, step, iterations) of the grid, keeps every
detection's initial and refined box and predicted IoU, and scores with pycocotools:

1. the two stages without refinement: ``baseline`` (Detectron2's NMS) and ``iou_nms`` (IoU-guided NMS);
2. refinement after IoU-guided NMS for every ``CALIBRATION.STEPS`` x ``CALIBRATION.MAX_ITERS``, each with every
   per-box acceptance rule ``CALIBRATION.MARGINS`` x ``CALIBRATION.IOU_RANGES``
   (:mod:`prroi_d2.modeling.refine_acceptance`), applied to the kept boxes without running the model again;
3. refinement after Detectron2's NMS with the step and iterations of the best of 2, with every acceptance rule.

A setting is *safe* when its held-out AP, AP75 and AP90 are each at least the baseline stage's, and its AP exceeds
the baseline's by at least ``MIN_AP_GAIN``. The safe setting with the highest AP is chosen; when none is safe,
refinement (and IoU-guided NMS, unless it is safe alone) is switched off. The choice is applied to the model and
written as ``MODEL.IOU_NET`` keys into ``OUTPUT_DIR/config.yaml`` (so ``--eval-only``, ``DefaultPredictor`` and export
use it) with the whole held-out table in ``OUTPUT_DIR/calibration.{json,md}``.
"""

import copy
import json
import logging
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import detectron2.utils.comm as comm
import torch
from detectron2.engine import HookBase
from detectron2.evaluation.evaluator import inference_context
from detectron2.structures import Boxes, Instances

from prroi_d2.evaluation.coco_stages import coco_stage_metrics
from prroi_d2.evaluation.iounet_evaluator import IoUNetEvaluator
from prroi_d2.evaluation.records import instances_to_records
from prroi_d2.modeling.refine_acceptance import accept_refinement
from prroi_d2.modeling.stages import BASELINE, IOU_NMS, REFINED

__all__ = [
    "CalibrateAfterTraining",
    "CalibrationSetting",
    "MIN_AP_GAIN",
    "apply_setting",
    "calibrate",
    "calibrate_and_save",
    "setting_of_cfg",
]

logger = logging.getLogger(__name__)

# The least held-out AP gain over the baseline stage for which a setting counts as an improvement.
MIN_AP_GAIN = 0.1
# The metrics a safe setting may not lower (held-out, against the baseline stage).
GUARDED_METRICS = ("AP", "AP75", "AP90")


@dataclass(frozen=True)
class CalibrationSetting:
    """IoU-Net's inference settings that the calibration chooses (``MODEL.IOU_NET`` keys in brackets)."""

    nms: bool  # NMS.ENABLED
    refine: bool  # REFINE.ENABLED
    step: float  # REFINE.STEP
    max_iter: int  # REFINE.MAX_ITER
    margin: float = 0.0  # REFINE.ACCEPT_MARGIN
    iou_range: Tuple[float, float] = (0.0, 1.0)  # REFINE.ACCEPT_IOU_RANGE

    @property
    def name(self) -> str:
        nms = IOU_NMS if self.nms else BASELINE
        if not self.refine:
            return nms
        low, high = self.iou_range
        return f"{nms}+refine(step {self.step:g}, T {self.max_iter}, margin {self.margin:g}, iou {low:g}-{high:g})"

    def config_items(self) -> List[Tuple[str, object]]:
        """The ``MODEL.IOU_NET`` (key, value) pairs of this setting."""
        return [
            ("NMS.ENABLED", self.nms),
            ("REFINE.ENABLED", self.refine),
            ("REFINE.STEP", float(self.step)),
            ("REFINE.MAX_ITER", int(self.max_iter)),
            ("REFINE.ACCEPT_MARGIN", float(self.margin)),
            ("REFINE.ACCEPT_IOU_RANGE", [float(v) for v in self.iou_range]),
        ]


def setting_of_cfg(cfg) -> CalibrationSetting:
    """The setting a config holds now."""
    iou = cfg.MODEL.IOU_NET
    return CalibrationSetting(
        nms=bool(iou.NMS.ENABLED),
        refine=bool(iou.REFINE.ENABLED),
        step=float(iou.REFINE.STEP),
        max_iter=int(iou.REFINE.MAX_ITER),
        margin=float(iou.REFINE.ACCEPT_MARGIN),
        iou_range=tuple(float(v) for v in iou.REFINE.ACCEPT_IOU_RANGE),
    )


def iou_branch_of(model):
    """The :class:`~prroi_d2.modeling.iou_branch.IoUBranch` of a model (DDP-wrapped or not)."""
    module = getattr(model, "module", model)
    branch = getattr(getattr(module, "roi_heads", None), "iou_branch", None)
    if branch is None:
        raise ValueError(
            "calibration needs an IoU-Net model (MODEL.ROI_HEADS.NAME IoUNetROIHeads or IoUNetCascadeROIHeads)"
        )
    return branch


def apply_setting(model, setting: CalibrationSetting) -> None:
    """Set the model's IoU branch to ``setting`` (in place)."""
    branch = iou_branch_of(model)
    branch.nms_enabled = setting.nms
    branch.refine_enabled = setting.refine
    branch.refine_step = float(setting.step)
    branch.refine_max_iter = int(setting.max_iter)
    branch.refine_accept_margin = float(setting.margin)
    branch.refine_accept_iou_range = tuple(float(v) for v in setting.iou_range)


def _collect(model, data_loader, nms: bool, step: float, max_iter: int) -> List[Dict]:
    """Run the model over ``data_loader`` with IoU-guided NMS ``nms`` and refinement (``step``, ``max_iter``, every
    refined box kept); per image, CPU tensors of the stage without refinement and of the refinement."""
    branch = iou_branch_of(model)
    saved = {k: getattr(branch, k) for k in ("output_stages", "score_mode", "refine_graphs")}
    apply_setting(model, CalibrationSetting(nms=nms, refine=True, step=step, max_iter=max_iter))
    branch.output_stages, branch.score_mode = True, "cls"  # stage scores = classification scores; rescored below
    branch.refine_graphs = type(saved["refine_graphs"])(0)  # each setting runs once: no graphs to capture
    images = []
    try:
        with inference_context(model), torch.no_grad():
            for inputs in data_loader:
                for inp, out in zip(inputs, model(inputs)):
                    stages = out["stages"]
                    plain, refined = stages[IOU_NMS if nms else BASELINE], stages[REFINED]
                    images.append(
                        {
                            "image_id": inp["image_id"],
                            BASELINE: _fields(stages[BASELINE]) if BASELINE in stages else None,
                            "plain": _fields(plain),
                            REFINED: _fields(refined),
                        }
                    )
    finally:
        for k, v in saved.items():
            setattr(branch, k, v)
    return images


def _fields(instances) -> Dict[str, torch.Tensor]:
    fields = {
        "boxes": instances.pred_boxes.tensor,
        "scores": instances.scores,
        "classes": instances.pred_classes,
    }
    if instances.has("pred_ious"):
        fields["ious"] = instances.pred_ious
    if instances.has("pred_boxes_initial"):
        fields["boxes_initial"] = instances.pred_boxes_initial.tensor
        fields["ious_initial"] = instances.pred_ious_initial
    return {k: v.detach().to("cpu", torch.float64 if v.is_floating_point() else v.dtype) for k, v in fields.items()}


def _records(images: List[Dict], part: str, dataset_ids: Sequence[int], score, accept=None) -> List[Dict]:
    """COCO result records of ``part`` of every image; ``score(cls, ious)`` the model's final score; ``accept``:
    (margin, iou_range) applied to refined boxes."""
    records = []
    for image in images:
        f = image[part]
        if f is None:
            continue
        boxes, ious = f["boxes"], f.get("ious")
        if accept is not None:
            boxes, ious = accept_refinement(f["boxes_initial"], boxes, f["ious_initial"], ious, *accept)
        scores = f["scores"] if ious is None or part == BASELINE else score(f["scores"], ious)
        detections = Instances((0, 0), pred_boxes=Boxes(boxes), scores=scores, pred_classes=f["classes"])
        for record in instances_to_records(detections, image["image_id"]):
            record["category_id"] = dataset_ids[record["category_id"]]
            records.append(record)
    return records


def _is_safe(metrics: Dict[str, float], reference: Dict[str, float]) -> bool:
    return metrics["AP"] >= reference["AP"] + MIN_AP_GAIN and all(
        metrics[m] >= reference[m] for m in GUARDED_METRICS[1:]
    )


def calibrate(model, cfg, dataset_name: str, data_loader, collect=None) -> Tuple[CalibrationSetting, List[Dict]]:
    """Choose the setting on ``dataset_name`` (iterated by ``data_loader``, sharded over processes as Detectron2's
    test loaders are); returns (the chosen setting, the held-out table: one row per setting tried, with its
    metrics). Every process returns the same choice; the model is left with its original setting.

    ``collect(nms, step, max_iter)`` -> per-image detections (default: running ``model`` over ``data_loader``)."""
    if collect is None:

        def collect(nms, step, max_iter):
            return _collect(model, data_loader, nms=nms, step=step, max_iter=max_iter)

    grid = cfg.MODEL.IOU_NET.CALIBRATION
    branch = iou_branch_of(model)
    original = setting_of_cfg(cfg)
    evaluator = IoUNetEvaluator(dataset_name, output_dir=None, distributed=False)
    score = branch.score
    rows: List[Dict] = []
    chosen: Optional[CalibrationSetting] = None
    ground_truth = {}

    def evaluate(images, setting, part, accept=None):
        merged = (
            [image for shard in comm.gather(images, dst=0) for image in shard] if comm.get_world_size() > 1 else images
        )
        if not comm.is_main_process():
            return None
        if not ground_truth:
            ground_truth["coco"] = evaluator._coco_gt()
            ground_truth["ids"] = evaluator._contiguous_to_dataset_id(ground_truth["coco"])
        coco_gt, ids = ground_truth["coco"], ground_truth["ids"]
        img_ids = sorted({image["image_id"] for image in merged})
        metrics = coco_stage_metrics(
            coco_gt, _records(merged, part, ids, score, accept), img_ids, cfg.TEST.DETECTIONS_PER_IMAGE
        )
        rows.append({"setting": setting.name, **asdict(setting), **{k: round(v, 3) for k, v in metrics.items()}})
        logger.info(
            f"calibration on {dataset_name}: {setting.name}: "
            + " ".join(f"{m} {metrics[m]:.2f}" for m in GUARDED_METRICS)
        )
        return metrics

    def evaluate_rules(images, nms, step, max_iter):
        for margin in grid.MARGINS:
            for low, high in grid.IOU_RANGES:
                setting = CalibrationSetting(nms, True, step, max_iter, float(margin), (float(low), float(high)))
                results[setting] = evaluate(images, setting, REFINED, (setting.margin, setting.iou_range))

    try:
        results = {}
        for i, (step, max_iter) in enumerate((s, t) for s in grid.STEPS for t in grid.MAX_ITERS):
            images = collect(True, float(step), int(max_iter))
            if i == 0:  # the stages without refinement do not depend on the refinement grid
                off = CalibrationSetting(nms=False, refine=False, step=original.step, max_iter=original.max_iter)
                results[off] = evaluate(images, off, BASELINE)
                results[replace(off, nms=True)] = evaluate(images, replace(off, nms=True), "plain")
            evaluate_rules(images, True, float(step), int(max_iter))
        # Refinement after Detectron2's NMS, with the (step, T) of the best refinement after IoU-guided NMS.
        if comm.is_main_process():
            best = max((s for s in results if s.refine), key=lambda s: results[s]["AP"])
        else:
            best = None
        best = comm.all_gather(best)[0] if comm.get_world_size() > 1 else best
        evaluate_rules(collect(False, best.step, best.max_iter), False, best.step, best.max_iter)
        if comm.is_main_process():
            reference = results[off]
            safe = [s for s, m in results.items() if s != off and _is_safe(m, reference)]
            chosen = max(safe, key=lambda s: results[s]["AP"]) if safe else off
            for row in rows:
                row["safe"] = row["setting"] != off.name and _is_safe(row, reference)
                row["chosen"] = row["setting"] == chosen.name
        chosen = comm.all_gather(chosen)[0] if comm.get_world_size() > 1 else chosen
    finally:
        apply_setting(model, original)
    return chosen, rows


def format_table(rows: List[Dict], dataset_name: str) -> str:
    """The held-out table as markdown."""
    lines = [
        f"Calibration of refinement on {dataset_name} (safe: AP >= baseline + {MIN_AP_GAIN}, AP75 and AP90 >= "
        "baseline's):",
        "",
        "| setting | AP | AP50 | AP75 | AP90 | safe | chosen |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['AP']:.2f} | {r['AP50']:.2f} | {r['AP75']:.2f} | {r['AP90']:.2f} | "
            f"{'yes' if r.get('safe') else ''} | {'**chosen**' if r.get('chosen') else ''} |"
        )
    return "\n".join(lines)


def write_calibrated_config(cfg, setting: CalibrationSetting, path: str) -> None:
    """Write ``cfg`` with ``setting``'s ``MODEL.IOU_NET`` keys to ``path`` (YAML), atomically."""
    cfg = cfg.clone()
    cfg.defrost()
    for key, value in setting.config_items():
        node = cfg.MODEL.IOU_NET
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = copy.deepcopy(value)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(cfg.dump())
    os.replace(tmp, path)


def calibrate_and_save(model, cfg, dataset_name: str, data_loader, output_dir: str) -> CalibrationSetting:
    """:func:`calibrate`, then apply the choice to ``model``, write ``output_dir/config.yaml`` with it and the table
    to ``output_dir/calibration.{json,md}`` (main process), and log the table. Returns the chosen setting."""
    chosen, rows = calibrate(model, cfg, dataset_name, data_loader)
    apply_setting(model, chosen)
    if comm.is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        table = format_table(rows, dataset_name)
        record = OrderedDict(dataset=dataset_name, chosen=asdict(chosen), chosen_name=chosen.name, rows=rows)
        with open(os.path.join(output_dir, "calibration.json"), "w") as f:
            json.dump(record, f, indent=1)
        with open(os.path.join(output_dir, "calibration.md"), "w") as f:
            f.write(table + "\n")
        write_calibrated_config(cfg, chosen, os.path.join(output_dir, "config.yaml"))
        logger.info("%s\nChosen: %s (written to %s)", table, chosen.name, os.path.join(output_dir, "config.yaml"))
    return chosen


class CalibrateAfterTraining(HookBase):
    """After a completed training, calibrate on ``MODEL.IOU_NET.CALIBRATION.DATASET`` (:func:`calibrate_and_save`),
    so that the final evaluation and ``OUTPUT_DIR/config.yaml`` use the chosen setting. Place it before the
    evaluation hook. ``build_loader(cfg, dataset_name)``: the trainer's test loader."""

    def __init__(self, cfg, build_loader):
        self._cfg = cfg
        self._build_loader = build_loader

    def after_train(self):
        if self.trainer.iter + 1 < self.trainer.max_iter:  # a training that stopped early is not calibrated
            return
        dataset = self._cfg.MODEL.IOU_NET.CALIBRATION.DATASET
        loader = self._build_loader(self._cfg, dataset)
        calibrate_and_save(self.trainer.model, self._cfg, dataset, loader, self._cfg.OUTPUT_DIR)
