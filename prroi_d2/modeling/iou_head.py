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
# What the head regresses: "iou" (IoU itself), or "decoupled": the two factors of IoU, the fraction of the box covered
# by its object (I / box area) and of the object covered by the box (I / object area), combined into IoU.
TARGETS = ("iou", "decoupled")


def iou_from_factors(box_covered: Tensor, object_covered: Tensor) -> Tensor:
    """IoU from its two factors a = I / box area and b = I / object area (each (K,) in [0, 1]):
    IoU = I / (B + G - I) = a b / (a + b - a b); 0 where both are 0."""
    ab = box_covered * object_covered
    return ab / (box_covered + object_covered - ab).clamp(min=1e-6)


def coverage_factors(boxes: Tensor, objects: Tensor) -> Tensor:
    """(K, 2): for boxes (K, 4) and their objects (K, 4), XYXY, the fraction of each box covered by its object and
    of each object covered by its box."""
    lt = torch.max(boxes[:, :2], objects[:, :2])
    rb = torch.min(boxes[:, 2:], objects[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    box_area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(dim=1)
    object_area = (objects[:, 2:] - objects[:, :2]).clamp(min=0).prod(dim=1)
    tiny = torch.finfo(inter.dtype).tiny
    return torch.stack([inter / box_area.clamp(min=tiny), inter / object_area.clamp(min=tiny)], dim=1).clamp(0, 1)


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
        num_conv: int = 0,
        conv_dim: int = 256,
        target: str = "iou",
    ):
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"MODEL.IOU_NET.HEAD.LOSS_TYPE must be one of {LOSS_TYPES}, got {loss_type!r}")
        if norm not in NORMS:
            raise ValueError(f"MODEL.IOU_NET.HEAD.NORM must be one of {NORMS}, got {norm!r}")
        if target not in TARGETS:
            raise ValueError(f"MODEL.IOU_NET.HEAD.TARGET must be one of {TARGETS}, got {target!r}")
        if num_fc < 0 or fc_dim < 1 or num_classes < 1 or num_conv < 0 or conv_dim < 1:
            raise ValueError(
                f"IoU head needs num_fc >= 0, fc_dim >= 1, num_conv >= 0, conv_dim >= 1, num_classes >= 1; got "
                f"{num_fc}, {fc_dim}, {num_conv}, {conv_dim}, {num_classes}"
            )
        self.num_classes = num_classes
        self.class_agnostic = class_agnostic
        self.loss_type = loss_type
        self.smooth_l1_beta = smooth_l1_beta
        self.loss_weight = loss_weight
        self.target = target
        self.outputs_per_class = 2 if target == "decoupled" else 1

        channels = input_shape.channels
        convs: List[nn.Module] = []
        for _ in range(num_conv):  # 3x3 convolutions on the pooled S x S features (Detectron2's "4conv1fc" style)
            conv = nn.Conv2d(channels, conv_dim, kernel_size=3, padding=1)
            weight_init.c2_msra_fill(conv)
            convs += [conv, nn.ReLU(inplace=True)]
            channels = conv_dim
        self.convs = nn.Sequential(*convs)
        in_dim = channels * (input_shape.height or 1) * (input_shape.width or 1)
        layers: List[nn.Module] = []
        for _ in range(num_fc):
            fc = nn.Linear(in_dim, fc_dim)
            weight_init.c2_xavier_fill(fc)
            layers += [fc] + ([nn.LayerNorm(fc_dim)] if norm == "LN" else []) + [nn.ReLU(inplace=True)]
            in_dim = fc_dim
        self.fcs = nn.Sequential(*layers)
        self.predictor = nn.Linear(in_dim, self.outputs_per_class * (1 if class_agnostic else num_classes))
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
        """x: (K, C, S, S) pooled features -> raw outputs (K, P * num_classes), or (K, P) when class-agnostic, where
        P is 1 (IoU) or 2 (the decoupled factors, class-major: columns 2c, 2c + 1 are class c's)."""
        return self.predictor(self.fcs(torch.flatten(self.convs(x), start_dim=1)))

    def select(self, raw: Tensor, classes: Tensor) -> Tensor:
        """raw (K, P * num_classes or P), classes (K,) int64 -> (K,) with P = 1, or (K, 2) with the decoupled
        target: the outputs of each box's class."""
        p = self.outputs_per_class
        if not self.class_agnostic:
            index = classes.view(-1, 1).to(torch.int64) * p + torch.arange(p, device=raw.device)
            raw = raw.gather(1, index)
        return raw[:, 0] if p == 1 else raw[:, :p]

    def _to_unit(self, out: Tensor, clamp: bool) -> Tensor:
        if self.loss_type == "bce":
            return out.sigmoid()
        value = (out + 1.0) * 0.5
        return value.clamp(0.0, 1.0) if clamp else value

    def predict_ious(self, raw: Tensor, classes: Tensor, clamp: bool = True) -> Tensor:
        """(K,) predicted IoU of each box for its class, float32 whatever the head's dtype; in [0, 1] with ``clamp``
        (without, the smooth-L1 head's estimate may leave [0, 1] but keeps its gradient there: for refinement)."""
        out = self.select(raw, classes).float()
        if self.target == "decoupled":
            factors = self._to_unit(out, clamp=True)
            return iou_from_factors(factors[:, 0], factors[:, 1])
        return self._to_unit(out, clamp)

    def losses(self, raw: Tensor, classes: Tensor, target_ious: Tensor, target_factors=None) -> Dict[str, Tensor]:
        """``{"loss_iou": loss_weight * mean loss}`` of the outputs of each box's class against its true IoU (K,)
        (with the decoupled target: against ``target_factors`` (K, 2), :func:`coverage_factors`).
        Inside a training loop it also puts ``iou_net/train_pearson`` and ``iou_net/loss_ratio`` into the event
        storage (:mod:`~prroi_d2.modeling.iou_training_signal`)."""
        if raw.numel() == 0:
            return {"loss_iou": raw.sum() * 0.0}
        out = self.select(raw, classes).float()
        target = target_ious.detach().float()
        if self.target == "decoupled":
            if target_factors is None:
                raise ValueError("IoU head with HEAD.TARGET decoupled needs target_factors (K, 2)")
            factors = target_factors.detach().float()
            if self.loss_type == "bce":
                loss = F.binary_cross_entropy_with_logits(out, factors, reduction="mean")
            else:
                loss = F.smooth_l1_loss(out, 2.0 * factors - 1.0, beta=self.smooth_l1_beta, reduction="mean")
            # The training signal is that of the combined IoU (a logit / 2 IoU - 1 of it, as a plain head's).
            iou = iou_from_factors(*self._to_unit(out.detach(), clamp=True).unbind(1)).clamp(1e-4, 1 - 1e-4)
            out = torch.logit(iou) if self.loss_type == "bce" else 2.0 * iou - 1.0
        elif self.loss_type == "bce":
            loss = F.binary_cross_entropy_with_logits(out, target, reduction="mean")
        else:
            loss = F.smooth_l1_loss(out, 2.0 * target - 1.0, beta=self.smooth_l1_beta, reduction="mean")
        put_iou_training_signal(out, target, self.loss_type, self.smooth_l1_beta)
        return {"loss_iou": self.loss_weight * loss}


def build_iou_head(cfg, input_shape: ShapeSpec) -> nn.Module:
    """Build the IoU head named by ``cfg.MODEL.IOU_NET.HEAD.NAME`` for pooled features of ``input_shape``."""
    return IOU_HEAD_REGISTRY.get(cfg.MODEL.IOU_NET.HEAD.NAME)(cfg, input_shape)
