"""The IoU head of IoU-Net: pooled RoI features -> predicted IoU of each box with its object, per class.

Registry ``IOU_HEAD_REGISTRY``; ``build_iou_head(cfg, input_shape)`` builds ``cfg.MODEL.IOU_NET.HEAD.NAME``.
"""

from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.utils.registry import Registry
from fvcore.nn import weight_init
from torch import Tensor, nn

from prroi_d2.modeling.iou_training_signal import put_iou_training_signal

__all__ = ["IOU_HEAD_REGISTRY", "IoUHead", "build_iou_head"]

IOU_HEAD_REGISTRY = Registry("IOU_HEAD")
IOU_HEAD_REGISTRY.__doc__ = """
Registry for IoU heads: modules mapping pooled RoI features (K, C, S, S) to raw IoU outputs (K, num_classes or 1),
with ``predict_ious(raw, classes) -> (K,)`` in [0, 1] and ``losses(raw, classes, target_ious) -> dict``. A head whose
``forward`` and ``predict_ious`` never synchronise with the host and keep no state across calls may set the class
attribute ``cuda_graph_safe = True``: refinement then replays it from CUDA graphs.
"""

LOSS_TYPES = ("smooth_l1", "bce")
NORMS = ("", "LN")


@IOU_HEAD_REGISTRY.register()
class IoUHead(nn.Module):
    """Fully connected IoU head: flatten -> ``num_fc`` x (FC ``fc_dim`` [+ LayerNorm] + ReLU) -> FC to one output per
    class.

    ``norm="LN"`` normalises each hidden layer of each box over its units before the ReLU (no coupling between boxes,
    so refinement's per-box gradients stay independent). Without it, large early updates can push every unit of the
    first layer below zero for every box: the head then outputs a constant and stops learning (its ``loss_ratio``
    stays at 1; docs/iounet.md). With it, about half the units of every box stay active whatever the weights do.

    Outputs are raw: with ``loss_type="smooth_l1"`` they estimate ``2 * IoU - 1`` (smooth-L1 loss), with ``"bce"``
    the logit of IoU (sigmoid + binary cross-entropy). :meth:`predict_ious` maps both to IoU in [0, 1].
    """

    cuda_graph_safe = True  # no host synchronisation, no state across calls: refinement may replay it from graphs

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        num_classes: int,
        num_fc: int = 2,
        fc_dim: int = 1024,
        class_agnostic: bool = False,
        loss_type: str = "smooth_l1",
        smooth_l1_beta: float = 1.0,
        loss_weight: float = 5.0,
        pred_init_std: float = 0.01,
        norm: str = "",
    ):
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"MODEL.IOU_NET.HEAD.LOSS_TYPE must be one of {LOSS_TYPES}, got {loss_type!r}")
        if norm not in NORMS:
            raise ValueError(f"MODEL.IOU_NET.HEAD.NORM must be one of {NORMS}, got {norm!r}")
        if num_fc < 0 or fc_dim < 1 or num_classes < 1:
            raise ValueError(
                f"IoU head needs num_fc >= 0, fc_dim >= 1, num_classes >= 1; got {num_fc}, {fc_dim}, {num_classes}"
            )
        self.num_classes = num_classes
        self.class_agnostic = class_agnostic
        self.loss_type = loss_type
        self.smooth_l1_beta = smooth_l1_beta
        self.loss_weight = loss_weight

        in_dim = input_shape.channels * (input_shape.height or 1) * (input_shape.width or 1)
        layers: List[nn.Module] = []
        for _ in range(num_fc):
            fc = nn.Linear(in_dim, fc_dim)
            weight_init.c2_xavier_fill(fc)
            layers += [fc] + ([nn.LayerNorm(fc_dim)] if norm == "LN" else []) + [nn.ReLU(inplace=True)]
            in_dim = fc_dim
        self.fcs = nn.Sequential(*layers)
        self.predictor = nn.Linear(in_dim, 1 if class_agnostic else num_classes)
        nn.init.normal_(self.predictor.weight, std=pred_init_std)
        nn.init.constant_(self.predictor.bias, 0.0)

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        """``num_classes`` from ``MODEL.ROI_HEADS``; every other keyword from ``MODEL.IOU_NET.HEAD`` through the
        table :data:`prroi_d2.options.OPTIONS` (its ``iou_head.*`` arguments)."""
        from prroi_d2.options import config_arguments

        return {
            "input_shape": input_shape,
            "num_classes": cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            **config_arguments(cfg.MODEL.IOU_NET)["iou_head"],
        }

    def forward(self, x: Tensor) -> Tensor:
        """x: (K, C, S, S) pooled features -> raw outputs (K, num_classes), or (K, 1) when class-agnostic."""
        return self.predictor(self.fcs(torch.flatten(x, start_dim=1)))

    def select(self, raw: Tensor, classes: Tensor) -> Tensor:
        """raw (K, num_classes or 1), classes (K,) int64 -> (K,) the output of each box's class."""
        if self.class_agnostic:
            return raw[:, 0]
        return raw.gather(1, classes.view(-1, 1).to(torch.int64)).squeeze(1)

    def predict_ious(self, raw: Tensor, classes: Tensor, clamp: bool = True) -> Tensor:
        """(K,) predicted IoU of each box for its class, float32 whatever the head's dtype; in [0, 1] with ``clamp``
        (without, the smooth-L1 head's estimate may leave [0, 1] but keeps its gradient there: for refinement)."""
        out = self.select(raw, classes).float()
        if self.loss_type == "bce":
            return out.sigmoid()
        iou = (out + 1.0) * 0.5
        return iou.clamp(0.0, 1.0) if clamp else iou

    def losses(self, raw: Tensor, classes: Tensor, target_ious: Tensor) -> Dict[str, Tensor]:
        """``{"loss_iou": loss_weight * mean loss}`` of the outputs of each box's class against its true IoU (K,).
        Inside a training loop it also puts ``iou_net/train_pearson`` and ``iou_net/loss_ratio`` into the event
        storage (:mod:`~prroi_d2.modeling.iou_training_signal`)."""
        if raw.numel() == 0:
            return {"loss_iou": raw.sum() * 0.0}
        out = self.select(raw, classes).float()
        target = target_ious.detach().float()
        if self.loss_type == "bce":
            loss = F.binary_cross_entropy_with_logits(out, target, reduction="mean")
        else:
            loss = F.smooth_l1_loss(out, 2.0 * target - 1.0, beta=self.smooth_l1_beta, reduction="mean")
        put_iou_training_signal(out, target, self.loss_type, self.smooth_l1_beta)
        return {"loss_iou": self.loss_weight * loss}


def build_iou_head(cfg, input_shape: ShapeSpec) -> nn.Module:
    """Build the IoU head named by ``cfg.MODEL.IOU_NET.HEAD.NAME`` for pooled features of ``input_shape``."""
    return IOU_HEAD_REGISTRY.get(cfg.MODEL.IOU_NET.HEAD.NAME)(cfg, input_shape)
