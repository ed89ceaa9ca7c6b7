"""Training-loop glue for Detectron2: ``launch`` (multi-process training on GPUs with NCCL, on CPUs with gloo)."""

from prroi_d2.engine.launch import launch

__all__ = ["launch"]
