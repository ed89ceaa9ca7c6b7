"""``IoULearningMonitor``: a training hook that warns once when the IoU head learns nothing well after warm-up."""

import logging
import math

from detectron2.engine import HookBase

__all__ = ["IoULearningMonitor"]

logger = logging.getLogger(__name__)


class IoULearningMonitor(HookBase):
    """Warns once if ``iou_net/loss_ratio`` (see :mod:`prroi_d2.modeling.iou_training_signal`), as a median over
    the last ``window`` iterations, is still above ``threshold`` at or after iteration ``start_iter``: the IoU head
    then predicts hardly better than a constant, and its IoU-guided NMS and refinement will not help."""

    def __init__(self, start_iter: int, threshold: float = 0.9, window: int = 50):
        self.start_iter = start_iter
        self.threshold = threshold
        self.window = window
        self.warned = False

    def after_step(self):
        storage = self.trainer.storage
        if self.warned or storage.iter < self.start_iter or "iou_net/loss_ratio" not in storage.histories():
            return
        ratio = storage.history("iou_net/loss_ratio").median(self.window)
        if math.isfinite(ratio) and ratio > self.threshold:
            self.warned = True
            logger.warning(
                f"iou_net/loss_ratio is {ratio:.2f} at iteration {storage.iter} (median of the last {self.window}): "
                "the IoU head predicts hardly better than a constant (1.0). IoU-guided NMS and refinement need a "
                "head that learns; see docs/iounet.md ('The IoU head's training signal')."
            )
