"""Training-loop glue for Detectron2: ``launch`` (multi-process training on GPUs with NCCL, on CPUs with gloo) and
``IoULearningMonitor`` (a hook that warns when the IoU head learns nothing)."""

from prroi_d2.engine.iou_learning_monitor import IoULearningMonitor
from prroi_d2.engine.launch import launch

__all__ = ["IoULearningMonitor", "launch"]
