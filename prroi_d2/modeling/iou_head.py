"""The IoU head of IoU-Net: pooled RoI features -> predicted IoU of each box with its object, per class.

Registry ``IOU_HEAD_REGISTRY``; ``build_iou_head(cfg, input_shape)`` builds ``cfg.MODEL.IOU_NET.HEAD.NAME``.
"""

from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.utils.registry import Registry
from fvcore.nn import weight_init
from torch import Tensor, nn

from prroi_d2.modeling.iou_training_signal import put_iou_training_signal

__all__ = ["IOU_HEAD_REGISTRY", "LAYER_BACKWARDS", "IoUHead", "build_iou_head", "sequential_forward_with_backward"]

IOU_HEAD_REGISTRY = Registry("IOU_HEAD")
IOU_HEAD_REGISTRY.__doc__ = """
Registry for IoU heads: modules mapping pooled RoI features (K, C, S, S) to raw IoU outputs (K, num_classes or 1),
with ``predict_ious(raw, classes) -> (K,)`` in [0, 1] and ``losses(raw, classes, target_ious) -> dict``. A head whose
``forward`` and ``predict_ious`` never synchronise with the host and keep no state across calls may set the class
attribute ``cuda_graph_safe = True``: refinement then replays it from CUDA graphs. A head with
``predict_ious_and_input_grad(pooled, classes) -> (ious (K,), d ious / d pooled (K, C, S, S))`` whose
``supports_input_grad()`` is true is refined without autograd (and can be traced and exported); others are refined
through autograd.
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
        head = cfg.MODEL.IOU_NET.HEAD
        return {
            "input_shape": input_shape,
            "num_classes": cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            "num_fc": head.NUM_FC,
            "fc_dim": head.FC_DIM,
            "class_agnostic": head.CLS_AGNOSTIC,
            "loss_type": head.LOSS_TYPE,
            "smooth_l1_beta": head.SMOOTH_L1_BETA,
            "loss_weight": head.LOSS_WEIGHT,
            "pred_init_std": head.PRED_INIT_STD,
            "norm": head.NORM,
        }

    def forward(self, x: Tensor) -> Tensor:
        """x: (K, C, S, S) pooled features -> raw outputs (K, num_classes), or (K, 1) when class-agnostic."""
        return self.predictor(self.fcs(torch.flatten(x, start_dim=1)))

    def supports_input_grad(self) -> bool:
        """Whether :meth:`predict_ious_and_input_grad` applies: every layer of ``fcs`` has an explicit backward in
        :data:`LAYER_BACKWARDS`, and a subclass that overrides ``forward`` overrides that method too."""
        cls = type(self)
        own_forward = cls.forward is IoUHead.forward
        if not own_forward and cls.predict_ious_and_input_grad is IoUHead.predict_ious_and_input_grad:
            return False
        return all(type(layer) in LAYER_BACKWARDS for layer in self.fcs)

    def predict_ious_and_input_grad(self, pooled: Tensor, classes: Tensor) -> Tuple[Tensor, Tensor]:
        """The unclamped predicted IoU of each box for its class (``predict_ious(self(pooled), classes,
        clamp=False)``, float32) and its gradient with respect to the pooled features, computed by explicit
        backward formulas per layer (no autograd, so it runs under ``torch.inference_mode()`` and traces).

        pooled (K, C, S, S), classes (K,) -> ious (K,) float32, d ious / d pooled (K, C, S, S) in pooled's dtype.
        Each box's output depends on its own row only, so the gradient of the sum is every box's own gradient.
        """
        x = torch.flatten(pooled, start_dim=1)
        x, backward = sequential_forward_with_backward(self.fcs, x)
        out = self.select(self.predictor(x), classes).float()
        ious, d_out = self.iou_and_derivative(out)
        weight = self.predictor.weight  # (num_classes or 1, D): d raw[class] / d x is the class's row
        rows = weight[:1] if self.class_agnostic else weight.index_select(0, classes.view(-1).to(torch.int64))
        grad = backward(d_out.to(rows.dtype)[:, None] * rows)
        return ious, grad.view(pooled.shape).to(pooled.dtype)

    def iou_and_derivative(self, out: Tensor) -> Tuple[Tensor, Tensor]:
        """The selected raw output (K,) float32 -> unclamped predicted IoU (K,) and d IoU / d out (K,): the sigmoid
        of a ``bce`` head, the affine map ``(out + 1) / 2`` of a ``smooth_l1`` head."""
        if self.loss_type == "bce":
            iou = out.sigmoid()
            return iou, iou * (1.0 - iou)
        return (out + 1.0) * 0.5, torch.full_like(out, 0.5)

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


# ---------------------------------------------------------------------------------------------------------------------
# Explicit backward of the layers an IoU head is made of (rows of a batch never mix): IoU-Net's refinement needs
# d predicted IoU / d input at inference, where autograd is not wanted (inference mode, tracing, export).
# ---------------------------------------------------------------------------------------------------------------------

Backward = Callable[[Tensor], Tensor]


def _linear(layer: nn.Linear, x: Tensor) -> Tuple[Tensor, Backward]:
    return F.linear(x, layer.weight, layer.bias), lambda grad: grad.matmul(layer.weight.to(grad.dtype))


def _relu(layer: nn.ReLU, x: Tensor) -> Tuple[Tensor, Backward]:
    y = torch.relu(x)  # never in place: the forward of the explicit path keeps its inputs
    return y, lambda grad: grad * (y > 0).to(grad.dtype)


def _layer_norm(layer: nn.LayerNorm, x: Tensor) -> Tuple[Tensor, Backward]:
    dims = tuple(range(-len(layer.normalized_shape), 0))
    mean = x.mean(dim=dims, keepdim=True)
    centred = x - mean
    rstd = torch.rsqrt(centred.pow(2).mean(dim=dims, keepdim=True) + layer.eps)
    normed = centred * rstd
    y = F.layer_norm(x, layer.normalized_shape, layer.weight, layer.bias, layer.eps)

    def backward(grad: Tensor) -> Tensor:
        g = grad if layer.weight is None else grad * layer.weight
        return rstd * (g - g.mean(dim=dims, keepdim=True) - normed * (g * normed).mean(dim=dims, keepdim=True))

    return y, backward


def _flatten(layer: nn.Flatten, x: Tensor) -> Tuple[Tensor, Backward]:
    return layer(x), lambda grad: grad.reshape(x.shape)


def _identity(layer: nn.Module, x: Tensor) -> Tuple[Tensor, Backward]:
    return x, lambda grad: grad


LAYER_BACKWARDS: Dict[type, Callable[[nn.Module, Tensor], Tuple[Tensor, Backward]]] = {
    nn.Linear: _linear,
    nn.ReLU: _relu,
    nn.LayerNorm: _layer_norm,
    nn.Flatten: _flatten,
    nn.Identity: _identity,
    nn.Dropout: _identity,  # inference only
}
"""Per layer type: ``rule(layer, x) -> (layer(x), backward)`` with ``backward(d out) -> d x`` (batch rows
independent). A new head made of other layers adds their rules here."""


def sequential_forward_with_backward(layers: nn.Module, x: Tensor) -> Tuple[Tensor, Backward]:
    """Run ``layers`` (an iterable of modules of :data:`LAYER_BACKWARDS` types) on x and return their output and
    the map from d output to d x (the vector-Jacobian product, explicit)."""
    backwards: List[Backward] = []
    for layer in layers:
        rule = LAYER_BACKWARDS.get(type(layer))
        if rule is None:
            raise TypeError(f"no explicit backward for IoU head layer {type(layer).__name__}; see LAYER_BACKWARDS")
        x, backward = rule(layer, x)
        backwards.append(backward)

    def backward_all(grad: Tensor) -> Tensor:
        for backward in reversed(backwards):
            grad = backward(grad)
        return grad

    return x, backward_all


def build_iou_head(cfg, input_shape: ShapeSpec) -> nn.Module:
    """Build the IoU head named by ``cfg.MODEL.IOU_NET.HEAD.NAME`` for pooled features of ``input_shape``."""
    return IOU_HEAD_REGISTRY.get(cfg.MODEL.IOU_NET.HEAD.NAME)(cfg, input_shape)
