"""IoU-Net's stage vocabulary, the one place it is written: the stages' names in pipeline order, which stages a
model with given switches builds, which one is final, which one the localisation statistics read, and the names
of the predicted IoU in ``Instances`` fields and in COCO result records.

Pure data and small functions (no torch, no Detectron2): the model (``IoUBranch.inference``), the evaluation
(``prroi_d2.evaluation``), the trainers and the experiment scripts (``tools/experiments``) import it.
"""

from typing import Dict, Iterable, Optional, Tuple

__all__ = [
    "BASELINE",
    "DISPLAY_NAMES",
    "FIELD_OF_RECORD_KEY",
    "FINAL",
    "IOU_NMS",
    "PRED_BOXES_INITIAL",
    "PRED_IOUS",
    "PRED_IOUS_INITIAL",
    "RECORD_BOX",
    "RECORD_BOX_INITIAL",
    "RECORD_IOU",
    "RECORD_IOU_INITIAL",
    "RECORD_IOU_OF_BOX",
    "REFINED",
    "STAGES",
    "STAGE_ORDER",
    "STAGE_SWITCH",
    "built_stages",
    "final_stage",
    "localization_stage",
    "sort_stages",
]

# ---------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------

BASELINE = "baseline"  # Detectron2's NMS on the box head's predictions, no refinement
IOU_NMS = "iou_nms"  # IoU-guided NMS (Algorithm 1)
REFINED = "refined"  # IoU-guided NMS (or the baseline's boxes with NMS off) + refinement (Algorithm 2)
# The model's pipeline, in order: each stage's boxes come from the one before it.
STAGES: Tuple[str, ...] = (BASELINE, IOU_NMS, REFINED)
# The evaluator's name for ``outputs["instances"]`` when a model returns no stages (a plain detector).
FINAL = "final"
# The order in which evaluations and tables list the stages they find (unknown names come after, as found).
STAGE_ORDER: Tuple[str, ...] = STAGES + (FINAL,)
# The ``MODEL.IOU_NET`` switch of each stage (``None``: always built); the switches are ``IoUBranch``'s
# ``nms_enabled`` / ``refine_enabled`` (``NMS.ENABLED`` / ``REFINE.ENABLED``).
STAGE_SWITCH: Dict[str, Optional[str]] = {BASELINE: None, IOU_NMS: "nms", REFINED: "refine"}
# Names for people (plot legends, table captions).
DISPLAY_NAMES: Dict[str, str] = {
    BASELINE: "baseline (Detectron2 NMS)",
    IOU_NMS: "IoU-guided NMS",
    REFINED: "IoU-guided NMS + refinement",
    FINAL: "final detections",
}


def built_stages(nms: bool, refine: bool) -> Tuple[str, ...]:
    """The stages a model with IoU-guided NMS ``nms`` and refinement ``refine`` switched on or off has, in pipeline
    order (the baseline always; a stage whose switch is off is skipped)."""
    switches = {None: True, "nms": bool(nms), "refine": bool(refine)}
    return tuple(stage for stage in STAGES if switches[STAGE_SWITCH[stage]])


def final_stage(nms: bool, refine: bool) -> str:
    """The stage whose boxes a model returns as its detections: the last one it builds (``refined`` if refinement is
    on, else ``iou_nms`` if IoU-guided NMS is on, else ``baseline``)."""
    return built_stages(nms, refine)[-1]


def localization_stage(names: Iterable[str]) -> Optional[str]:
    """Of the evaluated stages ``names``, the one whose predicted IoU the flat statistics and the histogram
    describe: ``refined`` (it also has the boxes before refinement), else ``final``, else the last one; None if
    there is none."""
    names = list(names)
    return next((n for n in (REFINED, FINAL) if n in names), names[-1] if names else None)


def sort_stages(names: Iterable[str]) -> list:
    """``names`` in :data:`STAGE_ORDER`, names it does not know last in their given order."""
    return sorted(names, key=lambda n: STAGE_ORDER.index(n) if n in STAGE_ORDER else len(STAGE_ORDER))  # stable


# ---------------------------------------------------------------------------------------------------------------
# The predicted IoU and the boxes before refinement, by name
# ---------------------------------------------------------------------------------------------------------------

# ``Instances`` fields of every stage's detections (besides Detectron2's ``pred_boxes, scores, pred_classes``):
PRED_IOUS = "pred_ious"  # (R,) predicted IoU of ``pred_boxes``
# and of the refined stage only:
PRED_BOXES_INITIAL = "pred_boxes_initial"  # (R, 4) boxes before refinement
PRED_IOUS_INITIAL = "pred_ious_initial"  # (R,) predicted IoU of ``pred_boxes_initial``

# Keys of a COCO result record (one detection; ``coco_instances_results_<stage>.json``): COCO's ``bbox`` (XYWH) and
# the predicted IoU of that box, and the same before refinement. Short and singular as COCO's own keys; the files
# written since the first release use them.
RECORD_BOX = "bbox"
RECORD_IOU = "iou"
RECORD_BOX_INITIAL = "bbox_initial"
RECORD_IOU_INITIAL = "iou_initial"
# The record key of the predicted IoU of each record box key.
RECORD_IOU_OF_BOX: Dict[str, str] = {RECORD_BOX: RECORD_IOU, RECORD_BOX_INITIAL: RECORD_IOU_INITIAL}
# The ``Instances`` field each record key is written from (boxes converted XYXY -> XYWH).
FIELD_OF_RECORD_KEY: Dict[str, str] = {
    RECORD_BOX: "pred_boxes",
    RECORD_IOU: PRED_IOUS,
    RECORD_BOX_INITIAL: PRED_BOXES_INITIAL,
    RECORD_IOU_INITIAL: PRED_IOUS_INITIAL,
}
