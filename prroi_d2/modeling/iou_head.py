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

    def supports_input_grad(self) -> bool:
        """Whether :meth:`predict_ious_and_input_grad` applies: every layer of ``convs`` and ``fcs`` has an explicit
        backward in :data:`LAYER_BACKWARDS`, and a subclass that overrides ``forward`` overrides that method too."""
        cls = type(self)
        own_forward = cls.forward is IoUHead.forward
        if not own_forward and cls.predict_ious_and_input_grad is IoUHead.predict_ious_and_input_grad:
            return False
        return all(type(layer) in LAYER_BACKWARDS for layer in list(self.convs) + list(self.fcs))

    def predict_ious_and_input_grad(self, pooled: Tensor, classes: Tensor) -> Tuple[Tensor, Tensor]:
        """The unclamped predicted IoU of each box for its class (``predict_ious(self(pooled), classes,
        clamp=False)``, float32) and its gradient with respect to the pooled features, computed by explicit
        backward formulas per layer (no autograd, so it runs under ``torch.inference_mode()`` and traces).

        pooled (K, C, S, S), classes (K,) -> ious (K,) float32, d ious / d pooled (K, C, S, S) in pooled's dtype.
        Each box's output depends on its own row only, so the gradient of the sum is every box's own gradient.
        """
        x, conv_backward = sequential_forward_with_backward(self.convs, pooled)
        features_shape = x.shape
        x, fc_backward = sequential_forward_with_backward(self.fcs, torch.flatten(x, start_dim=1))
        out = self.select(self.predictor(x), classes).float()  # (K,) or, decoupled, (K, 2)
        ious, d_out = self.iou_and_derivative(out)
        p = self.outputs_per_class
        weight = self.predictor.weight.view(-1, p, self.predictor.weight.size(1))  # (classes or 1, P, D)
        rows = weight[:1].expand(len(classes), -1, -1) if self.class_agnostic else weight[classes.long()]
        d_out = d_out.view(-1, p, 1).to(rows.dtype)
        grad = fc_backward((d_out * rows).sum(dim=1))
        grad = conv_backward(grad.view(features_shape))
        return ious, grad.view(pooled.shape).to(pooled.dtype)

    def iou_and_derivative(self, out: Tensor) -> Tuple[Tensor, Tensor]:
        """The selected raw output (K,) float32 (decoupled: (K, 2)) -> unclamped predicted IoU (K,) and
        d IoU / d out (K,) (decoupled: (K, 2)): the sigmoid of a ``bce`` head, the affine map ``(out + 1) / 2`` of
        a ``smooth_l1`` head; decoupled, each factor's map then IoU = ab / (a + b - ab), whose partial derivatives
        are b^2 / D^2 and a^2 / D^2 with D = a + b - ab."""
        if self.loss_type == "bce":
            unit = out.sigmoid()
            d_unit = unit * (1.0 - unit)
        else:
            unit = (out + 1.0) * 0.5
            d_unit = torch.full_like(out, 0.5)
        if self.target != "decoupled":
            return unit, d_unit
        if self.loss_type != "bce":  # predict_ious clamps each factor to [0, 1]: no gradient outside
            d_unit = d_unit * ((unit >= 0) & (unit <= 1)).to(d_unit.dtype)
            unit = unit.clamp(0.0, 1.0)
        a, b = unit.unbind(1)
        ab = a * b
        denominator = (a + b - ab).clamp(min=1e-6)
        iou = ab / denominator
        d_iou = torch.stack([b * b, a * a], dim=1) / denominator[:, None].square()
        return iou, d_iou * d_unit

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


def _conv2d(layer: nn.Conv2d, x: Tensor) -> Tuple[Tensor, Backward]:
    def backward(grad: Tensor) -> Tensor:  # the input gradient of a convolution is the transposed convolution
        return F.conv_transpose2d(
            grad, layer.weight.to(grad.dtype), None, layer.stride, layer.padding, 0, layer.groups, layer.dilation
        )

    return layer(x), backward


def _flatten(layer: nn.Flatten, x: Tensor) -> Tuple[Tensor, Backward]:
    return layer(x), lambda grad: grad.reshape(x.shape)


def _identity(layer: nn.Module, x: Tensor) -> Tuple[Tensor, Backward]:
    return x, lambda grad: grad


LAYER_BACKWARDS: Dict[type, Callable[[nn.Module, Tensor], Tuple[Tensor, Backward]]] = {
    nn.Linear: _linear,
    nn.Conv2d: _conv2d,
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
