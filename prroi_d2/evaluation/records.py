"""COCO result records of one IoU-Net stage: one dict per detection, with the predicted IoUs and the boxes before
refinement that the evaluation and the refinement pictures read."""

import numpy as np
import torch

from prroi_d2.modeling.stages import FIELD_OF_RECORD_KEY, RECORD_BOX, RECORD_BOX_INITIAL, RECORD_IOU, RECORD_IOU_INITIAL

__all__ = ["instances_to_records"]


def _xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    boxes[:, 2:] -= boxes[:, :2]
    return boxes


def _box_array(boxes) -> np.ndarray:
    tensor = boxes.tensor if hasattr(boxes, "tensor") else torch.as_tensor(boxes)
    return tensor.detach().to("cpu", torch.float64).numpy().reshape(-1, 4)


def _vector(values) -> list:
    return torch.as_tensor(values).detach().to("cpu").reshape(-1).tolist()


def instances_to_records(instances, image_id) -> list:
    """One COCO results record per detection of ``instances`` (an ``Instances`` with XYXY_ABS ``pred_boxes``).

    Each record has ``image_id, category_id, bbox [x, y, w, h], score``, plus ``iou`` (``pred_ious``) and
    ``bbox_initial`` / ``iou_initial`` (``pred_boxes_initial`` / ``pred_ious_initial``) where the instances have them
    (the names: :mod:`prroi_d2.modeling.stages`).
    ``category_id`` is the contiguous class id; :class:`IoUNetEvaluator` maps it to the dataset's ids.
    """
    num = len(instances)
    if num == 0:
        return []
    columns = {
        RECORD_BOX: _xyxy_to_xywh(_box_array(instances.pred_boxes)).tolist(),
        "score": _vector(instances.scores),
    }
    columns["category_id"] = [int(c) for c in _vector(instances.pred_classes)]
    for key in (RECORD_IOU, RECORD_BOX_INITIAL, RECORD_IOU_INITIAL):
        field = FIELD_OF_RECORD_KEY[key]
        if instances.has(field):
            value = instances.get(field)
            columns[key] = _xyxy_to_xywh(_box_array(value)).tolist() if key == RECORD_BOX_INITIAL else _vector(value)
    names = list(columns)
    image_id = int(image_id) if isinstance(image_id, (int, np.integer)) else image_id
    return [dict(image_id=image_id, **dict(zip(names, values))) for values in zip(*columns.values())]
